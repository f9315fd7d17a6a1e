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


@pytest.mark.shared
@pytest.mark.slow
def test_plan_early_compares_the_five_arms_end_to_end(tmp_path):
    """bench/plan_early.py --quick on two targets of ../shared/data/generic: the five arms per target, each
    fine-tuned from the pre-training it names with the one shared tokenizer; the targets held out of the
    pool; the target-independent pre-trainings done once; SLM-mix's pick by `nichelm specialize
    --pick-expert` itself where it can; macro figures computed from the per-target ones; a re-run reuses
    everything and other settings are refused."""
    import argparse
    import hashlib
    import json
    import math
    import re
    import time

    bench = _import("plan_early")
    if not bench.SHARED.is_dir():
        pytest.skip(f"{bench.SHARED} not present (fresh clone without ../shared): nothing to compare")
    assert "skipped" in bench.main(["--data", str(tmp_path / "absent")])
    torch.set_num_threads(1)
    work = tmp_path / "work"
    argv = ["--quick", "--domains", "arxiv,legislation", "--generic", "books,python_docs,health", "--threads", "1",
            "--work", str(work), "--out", str(tmp_path / "out.json")]
    result = bench.main(argv)
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    arms = ("SLM-nopt", "SLM", "SLM-is", "SLM-mix", "SLM-pn")
    pool_domains = {json.loads(line)["domain"] for line in (work / "pool.jsonl").read_text().splitlines()}
    assert pool_domains == {"books", "python_docs", "health"}          # the targets are held out of the pool

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    tokenizer = sha(work / "slm" / "tokenizer" / "tokenizer.json")
    s = result["settings"]
    for domain, row in result["domains"].items():
        assert set(row["arms"]) == set(arms)
        assert 0 < row["specialist_tokens"] and abs(sum(row["target_histogram"]) - 1) < 1e-3
        tuned = bench.finetune_dir(work / domain, argparse.Namespace(**s))
        assert tuned.parent == work / domain
        for arm, figures in row["arms"].items():
            run = tuned / arm.lower()
            assert sha(run / "tokenizer" / "tokenizer.json") == tokenizer, (domain, arm)
            assert figures["finetune"]["tokens"] == s["finetune_steps"] * s["batch"] * s["block"]
            assert figures["bits_per_byte"] > 0 and figures["perplexity"] > 1
            init = re.search(r'init_from = "(.*)"', (tuned / f"{arm.lower()}.toml").read_text())
            assert (init is None) == (arm == "SLM-nopt"), (domain, arm)
            if arm == "SLM-nopt":
                continue
            start = Path(init[1])
            # fine-tuning moved the model away from where it started (before_finetune scores that start)
            assert figures["before_finetune"]["nll"] != figures["nll"]
            if arm == "SLM":
                assert start == work / "slm"
            elif arm == "SLM-is":
                assert start == work / domain / "is"
                assert figures["pretrain"]["selected_tokens"] >= s["select_tokens"]
            elif arm == "SLM-mix":
                picked = figures["picked"]
                assert picked["cluster"] == max(range(len(row["target_histogram"])),
                                                key=lambda c: (row["target_histogram"][c], -c))
                if domain == "arxiv":           # the partition's own target: the command itself picked
                    assert picked["command_picked"] == picked["cluster"] and start == work / domain / "mix-picked"
                else:
                    assert start == work / "experts" / f"cluster-{picked['cluster']:04d}"
            else:
                assert figures["picked"]["mixture"] == row["target_histogram"]
                mixture = json.loads((start / "specialized.json").read_text())["mixture"]
                assert mixture == pytest.approx(row["target_histogram"], abs=1e-4)
    assert result["domains"]["arxiv"]["histogram_as_select"] < 1e-9
    # the target-independent pre-trainings ran once, with the budget each arm is given
    shared = result["shared_pretraining"]
    tokens = s["pretrain_steps"] * s["batch"] * s["block"]
    assert shared["SLM"]["tokens"] == shared["SLM-pn"]["tokens"] == tokens == result["pretrain_tokens_per_arm"]
    assert len(shared["SLM-mix"]["experts"]) == s["k"]
    assert all(e["steps"] == s["pretrain_steps"] // s["k"] for e in shared["SLM-mix"]["experts"].values())
    for arm in arms:
        nlls = [row["arms"][arm]["nll"] for row in result["domains"].values()]
        assert result["macro"][arm]["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), abs=2e-3)
    order = result["ordering_worst_to_best"]
    assert sorted(order) == sorted(arms)
    assert [result["macro"][a]["perplexity"] for a in order] == sorted(
        (result["macro"][a]["perplexity"] for a in arms), reverse=True)

    kept = {p: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")}
    started = time.monotonic()
    again = bench.main(argv)                             # everything reused: the same figures, nothing redone
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    assert {p: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")} == kept
    assert time.monotonic() - started < 60
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--k", "3"])
    # other fine-tuning settings: new fine-tunings (their own folders) from the same pre-trainings
    other = bench.main([*argv, "--finetune-lr", "1e-3"])
    assert other["shared_pretraining"] == result["shared_pretraining"]
    assert other["macro"] != result["macro"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
