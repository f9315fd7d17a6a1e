"""One tiny run through every stage, as a user would type it."""

import json
import subprocess
import sys

from nichelm.config import load_project
from nichelm.data.shards import read_shard
from tests.conftest import run_cli


def test_prepare_train_evaluate_correct(tiny_project):
    run = tiny_project.parent / "run"
    proc = run_cli("prepare", tiny_project)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert {s["name"] for s in manifest["sources"]} == {"clean", "pairs"}
    for s in manifest["sources"]:
        assert len(s["sha256"]) == 64 and s["licence"].startswith("test")
    pairs = next(s for s in manifest["sources"] if s["name"] == "pairs")
    assert 0 < pairs["raw_ocr"]["cer"] < 0.05
    rows = [json.loads(x) for x in (run / "data" / "examples.train.jsonl").read_text().splitlines()]
    assert rows and all({"input", "output", "source"} <= r.keys() for r in rows)
    assert read_shard(run / "data" / "shards" / "train_000000.bin").size == manifest["tokens"]["train"]

    proc = run_cli("train", tiny_project)
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(m["train_loss"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (run / "checkpoints" / "step_0000012" / "COMPLETE").is_file()

    proc = run_cli("evaluate", tiny_project)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    for key in ("cer_before", "cer_after", "wer_before", "wer_after", "n_examples", "worse_fraction"):
        assert key in report
    assert report["n_examples"] == len(report["per_example"]) > 0 and report["per_source"]
    assert report["cer_before"] > 0                                          # the test inputs are noisy

    proc = subprocess.run([sys.executable, "-m", "nichelm", "correct", "--run", str(run), "-"],
                          input="The meeting was held.", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()                     # a correction is printed (the input where the guard kept it)


def test_prepare_is_reused_and_overrides_apply(tiny_project, tmp_path):
    other = tmp_path / "other_run"
    assert run_cli("prepare", tiny_project, "--set", f"run_dir={other}").returncode == 0
    assert (other / "data" / "manifest.json").is_file()
    again = run_cli("prepare", tiny_project, "--set", f"run_dir={other}")
    assert again.returncode == 0 and "already prepared" in again.stderr


def test_split_by_document_without_leakage(tiny_project):
    project = load_project(tiny_project, ["split.val_fraction=0.2", "split.test_fraction=0.2"])
    from nichelm.prepare import prepare
    prepare(project)
    data = project.run_path / "data"
    docs, texts = {}, {}
    for split in ("train", "val", "test"):
        for line in (data / f"examples.{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            docs.setdefault((row["source"], row["doc_id"]), set()).add(split)
            for t in (row["input"], row["output"]):
                texts.setdefault(t, set()).add(split)
    assert all(len(s) == 1 for s in docs.values()), "a document is in two splits"
    assert all(len(s) == 1 for s in texts.values()), "identical text in two splits"
    assert {s for v in docs.values() for s in v} == {"train", "val", "test"}
