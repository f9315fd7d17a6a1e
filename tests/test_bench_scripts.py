"""The benchmark scripts run end to end on CPU (their figures are taken on real machines; here only
that they work and report what they say: same outputs across engines, token counts that add up)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.test_apply import build_run
from tests.test_backends import make_ending_run

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run whose windows partly end early and partly run to their budget."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    return make_ending_run(build_run(root / "trained", "llama"), root / "run")


def _import(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_decode_throughput_smoke_on_cpu(tiny_run):
    bench = _import("decode_throughput")
    result = bench.main([str(tiny_run), "--device", "cpu", "--preset", "nano", "--arch", "gpt2", "--block-size",
                         "96", "--windows", "10", "--new-tokens", "6", "--batch-size", "4",
                         "--engines", "nichelm-eager,vllm"])
    eager = result["engines"]["nichelm-eager"]
    assert result["params"] > 100_000 and result["windows"] == 10
    assert 0 < eager["generated_tokens"] <= 10 * 6 and eager["tokens_per_s"] > 0
    vllm = result["engines"]["vllm"]
    if importlib.util.find_spec("vllm") is None:      # no vLLM here: the JSON says why instead of a figure
        assert "pip install vllm" in vllm["skipped"]
    else:                                             # a figure, or why there is none (e.g. no GPU)
        assert vllm.get("skipped") or vllm["generated_tokens"] > 0, vllm


def test_apply_throughput_smoke_on_cpu(tiny_run):
    """Every engine decodes the same windows (transformers too, from the hf export: same tokens as
    nichelm); copy drafts change nothing; the token count is what the rows needed and the speedups
    are ratios of the engines' own tokens/s."""
    import nichelm
    from nichelm.generate import generate
    bench = _import("apply_throughput")
    result = bench.main([str(tiny_run), "--threads", "1", "--batch-size", "4", "--windows", "12", "--rounds", "1",
                         "--draft-tokens", "3", "--engines", "nichelm,nichelm-copy,transformers"])
    engines = result["engines"]
    assert result["measures"] == "decode_only"
    assert set(engines) == {"nichelm", "nichelm-copy", "transformers"} and result["windows"] == 12
    assert engines["nichelm-copy"]["same_as_nichelm"] == engines["transformers"]["same_as_nichelm"] == 1.0
    # Each row's tokens up to its budget, plus its end marker where it ended: counted here from
    # nichelm's own Generations over the windows and budgets the script says it uses.
    corrector = nichelm.load(tiny_run)
    texts = bench.windows_for(tiny_run, 12)
    prompts = [corrector._prompt_ids(t) for t in texts]
    gens = generate(corrector.model, prompts, bench.budgets(corrector, prompts, texts), corrector.end_id,
                    torch.device("cpu"))
    assert {g.hit_limit for g in gens} == {True, False}
    needed = sum(len(g.tokens) + (not g.hit_limit) for g in gens)
    assert engines["nichelm"]["tokens"] == engines["nichelm-copy"]["tokens"] == engines["transformers"]["tokens"] \
        == needed > 0
    for e in engines.values():
        assert len(e["decode_tokens_per_s_each_round"]) == 1
        # tokens over the timed seconds (rounded to 1 ms in the JSON)
        low, high = e["tokens"] / (e["seconds"] + 5e-4), e["tokens"] / (e["seconds"] - 5e-4)
        assert low - 0.05 <= e["decode_tokens_per_s"] <= high + 0.05, e
    speedup = result["decode_only_speedup_vs_transformers"]
    base = engines["transformers"]["decode_tokens_per_s"]
    assert set(speedup) == set(engines)
    for name in ("nichelm", "nichelm-copy"):
        assert speedup[name] == pytest.approx(engines[name]["decode_tokens_per_s"] / base, abs=0.006), name


def test_copy_drafts_counts_on_cpu(tiny_run):
    bench = _import("copy_drafts")
    result = bench.main([str(tiny_run), "--split", "val", "--windows", "8", "--batch-size", "4", "--drafts", "0,2"])
    runs = result["runs"]
    assert [(r["draft_tokens"], r["realign_by_length"]) for r in runs] == [(0, False), (2, False), (2, True)]
    assert all(r["same_as_one_token_steps"] for r in runs) and result["output_tokens"] > 0
    assert runs[0]["tokens_per_row_step"] == 1.0 and runs[0]["steps"] > 0


def test_apply_e2e_smoke_on_cpu(tiny_run, tmp_path):
    """End-to-end apply throughput: every engine's command runs over the same generated files; with the
    guard off (raw corrections) the torch engine, CTranslate2 and the plain transformers loop must write
    byte-identical files, over windows some of which end early and some run to their budget (so the
    loop's budgets, end-marker cuts and stitching are checked, not only its decoding); MB/s is input
    MB over the median wall time and the ratios are ratios of those."""
    import nichelm
    from nichelm.inference import cut_windows
    bench = _import("apply_e2e")
    ct2 = importlib.util.find_spec("ctranslate2") is not None
    result = bench.main(["--model", str(tiny_run), "--mb", "0.003", "--files", "3", "--threads", "1",
                         "--batch-size", "4", "--guard", "-1", "--no-startup", "--work", str(tmp_path)])
    engines = result["engines"]
    assert set(engines) == {"torch", "ct2", "transformers"}
    if not ct2:                                        # no CTranslate2 here: the JSON says why instead of a figure
        assert "pip install ctranslate2" in engines.pop("ct2")["skipped"]
    inp = result["input"]
    assert inp["files"] == 3 and 3000 <= inp["bytes"] < 4000 and inp["windows"] > 20
    for name, e in engines.items():
        assert e["same_outputs_every_round"] and len(e["wall_s_each_round"]) == 1, name
        assert e["same_files_as_transformers"] == e["same_files_as_torch"] == 1.0, name
        assert e["mb_per_s"] == pytest.approx(inp["mb"] / e["wall_s"], rel=1e-3), name
        assert e["startup_s"] is None and e["cpu_s"] > 0 and e["peak_rss_mb"] > 50, name
    assert "--guard -1.0" in engines["torch"]["command"] and " hf-loop " in engines["transformers"]["command"]
    ratios = result["ratio_vs_transformers"]
    assert set(ratios) == set(engines)
    for name, e in engines.items():
        assert ratios[name] == pytest.approx(e["mb_per_s"] / engines["transformers"]["mb_per_s"], rel=0.01)
    assert result["acceptance_torch_at_least_3x"] == (ratios["torch"] >= 3)
    # the input really has windows of both kinds: ended by the end marker, and cut at their budget
    corrector = nichelm.load(tiny_run, guard_max_change=-1)
    chunks = [c for p in sorted((tmp_path / "input").glob("*.txt"))
              for c, _ in cut_windows(p.read_text(), corrector.window_chars)]
    assert len(chunks) == inp["windows"]
    kinds = {c.kept_input for c in corrector.correct_windows(chunks) if c.source.strip()}
    assert {"", "hit_limit"} <= kinds, kinds


def test_task_bln600_runs_a_task_end_to_end_and_reports_its_evaluation(tmp_path):
    """bench/task_bln600.py at a tiny step budget on a BLN600-layout CSV made here (the real one is in
    ../shared): prepare, train and evaluate run as the commands it prints; steps and tokens are what the
    budget gives; the figures are evaluate's report.json, model beside both baselines; a project whose
    data is absent is skipped with the reason, not failed."""
    import csv
    import json

    from tests.conftest import SENTENCES
    bench = _import("task_bln600")
    data = tmp_path / "bln.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Sample ID", "Date", "Publication", "OCR Text", "Ground Truth", "CER"])
        for doc in range(24):                       # 3 lines a document, its decade named in its text
            for line in range(3):
                gold = f"{SENTENCES[(doc + line) % len(SENTENCES)]} In the year {1835 + 10 * (doc % 4)}, No. {doc}."
                ocr = gold.replace("e", "c", doc % 3)           # CER from 0 to a few % per line
                w.writerow([str(9000 + doc), f"{1835 + 10 * (doc % 4)}-05-27", "Gazette", ocr, gold, 0.0])
    project = tmp_path / "dating.toml"
    project.write_text(
        'run_dir = "unused"\nseed = 7\n[task]\ntype = "classification"\nname = "tiny-dating"\n'
        'prompt_template = "### Text ###\\n{input}\\n### Decade ###\\n"\nwindow_chars = 120\n'
        'labels = ["1830s", "1840s", "1850s", "1860s"]\nbands = [1840, 1850, 1860]\nlabel_field = "Date"\n'
        'text = "input"\n[[sources]]\nname = "bln"\npath = "bln.csv"\nformat = "csv"\nrole = "pairs"\n'
        'meta_fields = ["Date"]\n[split]\nval_fraction = 0.2\ntest_fraction = 0.2\n[tokenizer]\nvocab_size = 320\n'
        '[model]\narch = "llama"\npreset = "nano"\nblock_size = 64\n[train]\nbatch_size = 4\neval_every = 100\n')
    absent = tmp_path / "absent.toml"
    absent.write_text(project.read_text().replace('path = "bln.csv"', 'path = "shared/none.csv"'))

    done, skipped = bench.main([str(project), str(absent), "--work", str(tmp_path / "work"), "--minutes", "0",
                                "--steps", "3"])
    assert "shared/none.csv is absent" in skipped["skipped"] and "test" not in skipped
    assert "error" not in done, done.get("stages")
    assert all(s["rc"] == 0 and s["cpu_s"] > 0 for s in done["stages"].values())
    assert done["commands"][1].endswith("--set train.max_minutes=0.0 --set train.max_steps=3")
    assert done["train"]["steps"] == 3 and done["train"]["tokens"] == 3 * 4 * 64
    assert done["model"]["preset"] == "nano" and done["model"]["params"] > 100_000
    report = json.loads((tmp_path / "work" / "dating" / "eval" / "report.json").read_text())
    test = done["test"]
    assert test["windows"] == report["n_examples"] > 0
    assert test["model"]["accuracy"] == report["metrics"]["accuracy"]
    assert test["model"]["macro_f1"] == report["metrics"]["macro_f1"]
    assert test["tfidf_logreg"]["accuracy"] == report["baselines"]["tfidf_logreg"]["accuracy"]
    assert test["majority"]["accuracy"] == report["baselines"]["majority"]["accuracy"]
    docs = done["test_by_document"]                   # a date per document: documents are scored too
    assert docs["model"]["accuracy"] == report["by_document"]["metrics"]["accuracy"]
    assert done["model_beats_tfidf_logreg"]["accuracy"] == (test["model"]["accuracy"]
                                                          > test["tfidf_logreg"]["accuracy"])
