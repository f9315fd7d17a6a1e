"""`nichelm evaluate --data`: any model (or the raw OCR) on any pair set, one document at a time.

Fixtures are written by the tests, with errors placed so the raw CER is known by
hand; one test reads the real ICDAR 2019 Dutch set and checks its published raw CER.
"""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from nichelm.errors import UserError
from nichelm.evaluate import default_out_dir, evaluate_external, evaluate_project, read_external_examples
from tests.conftest import needs_shared, run_cli

torch.set_num_threads(1)

REPORT_KEYS = ("cer_before", "cer_after", "wer_before", "wer_after", "n_examples", "worse_fraction",
               "better_fraction", "relative_improvement", "cer_ratio", "gold_chars", "per_source", "per_example",
               "examples", "unit", "n_documents", "data", "model", "chars_per_s", "docs_per_s")
PROMPT = "### Text ###\n{input}\n### Correction ###\n"
END = "<|endoftext|>"


# --------------------------------------------------------------------------- fixtures


def write_bln600(path: Path) -> float:
    """Two documents of two sentences; 3 substituted characters. Returns the raw CER."""
    rows = [("d1", "Tho cat sat.", "The cat sat."), ("d1", "It was warm.", "It was warm."),
            ("d2", "A dcg ran", "A dog ran"), ("d2", "to the rivor", "to the river")]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Sample ID", "Date", "Publication", "OCR Text", "Ground Truth", "CER"])
        for sid, ocr, gold in rows:
            w.writerow([sid, "1850", "The Times", ocr, gold, "0"])
    # The reader joins a document's rows with one space.
    gold_chars = len("The cat sat. It was warm.") + len("A dog ran to the river")
    return 3 / gold_chars


def write_icdar(root: Path) -> float:
    """Three-line files in nested language/type folders, with '@' padding and '#' (no gold) columns."""
    files = {
        # '#' columns (8, 9) are dropped from both sides, then '@' removed:
        # OCR "Tbe cat  sat" vs gold "The cat  sats": 2 edits over 13 characters.
        "EN/eng_mono/1.txt": ("Tbe cat XY sat", "Tbe cat XY sat@", "The cat ## sats"),
        # No '#': OCR "Al@ is well" -> "Al is well" vs "All is well": 1 edit over 11.
        "FR/fr_per/2.txt": ("Al is well", "Al@ is well", "All is well"),
    }
    for rel, (raw, ocr_al, gold_al) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[OCR_toInput] {raw}\n[OCR_aligned] {ocr_al}\n[ GS_aligned] {gold_al}\n", encoding="utf-8")
    return 3 / (13 + 11)


def write_icdar_lines(folder: Path) -> tuple[Path, Path, float]:
    """ICDAR 2017 training layout: line N of Input pairs with line N of GS ('@'-aligned)."""
    inp, gs = folder / "EngMonoInput.txt", folder / "EngMonoGS.txt"
    inp.write_text("Tbe cat sat@\nThe end\n", encoding="utf-8")
    gs.write_text("The cat sats\nThe end\n", encoding="utf-8")
    return inp, gs, 2 / (len("The cat sats") + len("The end"))


def write_jsonl(path: Path) -> float:
    rows = [{"input": "Tho cat sat.", "output": "The cat sat."}, {"input": "A dog", "output": "A dog"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 1 / (12 + 5)


def tiny_run(run: Path, texts: list[str]) -> Path:
    """A run directory with an untrained model: enough for Corrector.from_run to load and decode."""
    from safetensors.torch import save_file

    from nichelm.checkpoint import model_state
    from nichelm.data.tokenizer import save_tokenizer, special_tokens, train_tokenizer
    from nichelm.model import GPT, ModelConfig

    tok = train_tokenizer(texts * 5, 300, special_tokens(PROMPT, END))
    save_tokenizer(tok, run / "tokenizer" / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), block_size=96, n_layer=1, n_head=2, n_embd=32)
    ckpt = run / "checkpoints" / "step_0000003"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model_state(GPT(cfg)).items()}, str(ckpt / "model.safetensors"))
    (ckpt / "trainer.json").write_text(json.dumps({"step": 3, "model_config": cfg.to_dict()}))
    (ckpt / "COMPLETE").write_text("step 3\n")
    (run / "task.json").write_text(json.dumps({"prompt_template": PROMPT, "end_marker": END, "window_chars": 40}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": 6.0 - s, **({"val_loss": 5.5 - s} if s == 3 else {})}) + "\n"
        for s in (1, 2, 3)))
    return run


# --------------------------------------------------------------------------- raw OCR, each format


@pytest.mark.parametrize("fmt", ["bln600", "icdar", "icdar-lines", "jsonl"])
def test_raw_ocr_cer_per_format(tmp_path, fmt):
    gold = None
    if fmt == "bln600":
        data, expected = tmp_path / "train.csv", write_bln600(tmp_path / "train.csv")
    elif fmt == "icdar":
        data, expected = tmp_path / "icdar", write_icdar(tmp_path / "icdar")
    elif fmt == "icdar-lines":
        data, gold, expected = write_icdar_lines(tmp_path)
    else:
        data, expected = tmp_path / "pairs.jsonl", write_jsonl(tmp_path / "pairs.jsonl")
    report, out = evaluate_external(data, fmt, gold=gold, out=tmp_path / "out")
    assert report["cer_before"] == pytest.approx(expected)
    assert report["cer_after"] == report["cer_before"] and report["wer_after"] == report["wer_before"]
    assert report["worse_fraction"] == 0 and report["relative_improvement"] == 0
    assert report["model"] is None and report["unit"] == "document"
    saved = json.loads((out / "report.json").read_text())
    assert all(k in saved for k in REPORT_KEYS)
    assert saved["n_examples"] == saved["n_documents"] == len(saved["per_example"])
    assert sum(r["errors_before"] for r in saved["per_example"]) / saved["gold_chars"] == pytest.approx(expected)
    assert (out / "report.html").is_file()


def test_icdar_documents_are_whole_and_grouped_by_folder(tmp_path):
    write_icdar(tmp_path / "icdar")
    examples = read_external_examples(tmp_path / "icdar", "icdar")
    assert [(e["id"], e["source"]) for e in examples] == [("EN/eng_mono/1.txt", "EN/eng_mono"),
                                                          ("FR/fr_per/2.txt", "FR/fr_per")]
    assert examples[0]["input"] == "Tbe cat  sat" and examples[0]["output"] == "The cat  sats"
    report, _ = evaluate_external(tmp_path / "icdar", "icdar", out=tmp_path / "out", max_docs=1)
    assert report["n_examples"] == 1 and list(report["per_source"]) == ["EN/eng_mono"]


def test_bln600_documents_join_their_sentences(tmp_path):
    write_bln600(tmp_path / "train.csv")
    examples = read_external_examples(tmp_path / "train.csv", "bln600")
    assert [e["id"] for e in examples] == ["d1", "d2"]
    assert examples[0]["input"] == "Tho cat sat. It was warm." and examples[0]["source"] == f"{tmp_path.name}-train"
    assert examples[1]["output"] == "A dog ran to the river"


def test_format_is_guessed_and_out_dir_defaults(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    report, out = evaluate_external(Path("pairs.jsonl"))
    assert report["data"]["format"] == "jsonl"
    assert out == Path(f"eval-{tmp_path.name}-pairs") and (tmp_path / out / "report.json").is_file()
    assert default_out_dir(Path("runs/a"), tmp_path) == Path("runs/a/eval/external") / tmp_path.name
    assert default_out_dir(None, tmp_path) == Path(f"eval-{tmp_path.name}")


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_user_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"output": "gold only"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl: line 1 has no OCR side"):
        evaluate_external(bad, "jsonl", out=tmp_path / "out")
    inp, _, _ = write_icdar_lines(tmp_path)
    with pytest.raises(UserError, match="needs --gold"):
        evaluate_external(inp, "icdar-lines", out=tmp_path / "out")
    with pytest.raises(UserError, match="cannot tell the format"):
        evaluate_external(inp, out=tmp_path / "out")
    with pytest.raises(UserError, match="only read with --format icdar-lines"):
        evaluate_external(inp, "jsonl", gold=inp, out=tmp_path / "out")
    write_jsonl(tmp_path / "ok.jsonl")
    with pytest.raises(UserError, match="no such model"):
        evaluate_external(tmp_path / "ok.jsonl", "jsonl", model=tmp_path / "nope", out=tmp_path / "out")
    (tmp_path / "notarun").mkdir()
    with pytest.raises(UserError, match="notarun"):
        evaluate_external(tmp_path / "ok.jsonl", "jsonl", model=tmp_path / "notarun", out=tmp_path / "out")


def test_cli_errors_exit_2_with_one_line(tmp_path):
    proc = run_cli("evaluate", timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--data" in proc.stderr
    inp, _, _ = write_icdar_lines(tmp_path)
    proc = run_cli("evaluate", "--data", inp, "--format", "icdar-lines", timeout=120)
    assert proc.returncode == 2 and "needs --gold" in proc.stderr and proc.stderr.count("\n") == 1


# --------------------------------------------------------------------------- with a model


def test_run_directory_model_is_loaded_and_reported(tmp_path):
    write_icdar(tmp_path / "icdar")
    texts = [e["output"] for e in read_external_examples(tmp_path / "icdar", "icdar")]
    run = tiny_run(tmp_path / "run", texts)
    report, out = evaluate_external(tmp_path / "icdar", "icdar", model=run)
    assert out == run / "eval" / "external" / "icdar"
    assert report["model"] == str(run) and report["guard"]["windows"] >= 2
    assert report["chars_per_s"] > 0 and report["docs_per_s"] > 0
    # An untrained model never reaches the end marker, so the guard keeps every input.
    assert report["cer_after"] == pytest.approx(report["cer_before"])
    assert report["guard"]["kept_hit_limit"] + report["guard"]["kept_too_different"] >= 2
    assert report["cer_after_unguarded"] >= report["cer_after"]
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3          # loss curve, per source, histogram


def test_project_evaluation_also_writes_html(tmp_path):
    from nichelm.config import Project
    rows = [{"input": "Tho cat sat.", "output": "The cat sat.", "source": "a"},
            {"input": "A dog ran.", "output": "A dog ran.", "source": "b"}]
    run = tiny_run(tmp_path / "run", [r["output"] for r in rows])
    (run / "data").mkdir()
    (run / "data" / "examples.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate_project(Project(run_dir=str(run)))
    saved = json.loads((run / "eval" / "report.json").read_text())
    assert saved["n_examples"] == 2 and set(saved["per_source"]) == {"a", "b"} and len(saved["per_example"]) == 2
    assert report["cer_before"] == pytest.approx(1 / 22)
    page = (run / "eval" / "report.html").read_text()
    assert "<img" in page and not re.search(r"""(?:src|href)\s*=\s*["']?https?:""", page)


# --------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_icdar2019_nl_raw_ocr_cer_is_32_percent(tmp_path):
    """Acceptance check: `nichelm evaluate --format icdar --data ../shared/data/ocr/icdar2019-nl`."""
    data = needs_shared() / "icdar2019-nl"
    if not data.is_dir():
        pytest.skip(f"{data} not present: the ICDAR 2019 Dutch set is needed for this check")
    proc = run_cli("evaluate", "--format", "icdar", "--data", data, "--out", tmp_path / "nl", timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "nl" / "report.json").read_text())
    assert report["n_examples"] == 49 and report["gold_chars"] == 208_748
    assert 100 * report["cer_before"] == pytest.approx(32.0, abs=0.1)
    assert report["cer_after"] == report["cer_before"]
    assert "32.04%" in proc.stdout
