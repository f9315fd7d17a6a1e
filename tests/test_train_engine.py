"""The training engine: torchrun on CPU (gloo) and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli


def losses(run):
    return [(m["step"], m["train_loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _prepared(tiny_project, *sets):
    assert run_cli("prepare", tiny_project, *sets).returncode == 0


def test_torchrun_two_processes_match_one(tiny_project, tmp_path):
    """2 ranks x 4 rows must compute the same losses as 1 process x 8 rows (same global batch).

    The loss is normalised by the output-token count of the whole global batch, so the only
    difference is floating-point summation order (gradients are summed by all-reduce).
    """
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--set", "train.max_steps=8", "--set", "train.eval_every=0", "--set", "train.threads=1"]
    _prepared(tiny_project, "--set", f"run_dir={one}")
    _prepared(tiny_project, "--set", f"run_dir={two}")
    proc = run_cli("train", tiny_project, "--set", f"run_dir={one}", "--set", "train.batch_size=8", *common)
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nichelm", "train", str(tiny_project), "--set", f"run_dir={two}",
                           "--set", "train.batch_size=4", "--set", "train.device=cpu", *common],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), (la, lb)


def _torchrun(tiny_project, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nichelm", "train", str(tiny_project), "--set", "train.device=cpu", *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fsdp_two_processes_match_one_and_resume(tiny_project, tmp_path, arch):
    """train.parallel = "fsdp" (FSDP2 fully_shard, gloo on CPU): 2 ranks x 4 rows match 1 process x 8
    rows, across a stop and resume in the middle (whole weights and optimizer state are saved, then
    cut into shards again on resume). gpt2 checks that the tied head stays tied. The lr is held
    constant after warmup (min_lr_ratio = 1) so that a 4-step run continued to 8 has the 8-step
    run's schedule."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--set", "train.eval_every=0", "--set", "train.threads=1", "--set", "train.min_lr_ratio=1.0",
              "--set", "train.warmup_steps=2", "--set", f"model.arch={arch}"]
    _prepared(tiny_project, "--set", f"run_dir={one}")
    _prepared(tiny_project, "--set", f"run_dir={two}")
    proc = run_cli("train", tiny_project, "--set", f"run_dir={one}", "--set", "train.batch_size=8",
                   "--set", "train.max_steps=8", *common)
    assert proc.returncode == 0, proc.stderr
    fsdp = ["--set", f"run_dir={two}", "--set", "train.batch_size=4", "--set", "train.parallel=fsdp", *common]
    proc = _torchrun(tiny_project, "--set", "train.max_steps=4", *fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(tiny_project, "--set", "train.max_steps=8", *fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "x2 (fsdp)" in proc.stderr
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), (la, lb)


def test_fsdp_refuses_muon(tiny_project, tmp_path):
    proc = run_cli("train", tiny_project, "--set", f"run_dir={tmp_path}", "--set", "train.parallel=fsdp",
                   "--set", "train.optimizer=muon")
    assert proc.returncode == 2 and "train.optimizer = \"muon\"" in proc.stderr and "Traceback" not in proc.stderr


def test_sigkill_then_resume_is_bit_identical(tiny_project, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=5", "--set", "train.threads=1",
              "--set", "train.eval_every=10", "--set", "model.dropout=0.1"]
    for run in (full, killed):
        _prepared(tiny_project, "--set", f"run_dir={run}")
    assert run_cli("train", tiny_project, "--set", f"run_dir={full}", *common).returncode == 0

    cmd = [sys.executable, "-m", "nichelm", "train", str(tiny_project), "--set", f"run_dir={killed}", *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_0000015" / "COMPLETE").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < 40, "killed too late to test a resume"
    resumed = run_cli("train", tiny_project, "--set", f"run_dir={killed}", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert losses(killed) == losses(full)          # bit for bit: same floats, every step once


@pytest.mark.parametrize("optimizer,schedule", [("muon", "wsd"), ("adamw", "cosine")])
def test_stop_and_resume_in_process(tiny_project, tmp_path, optimizer, schedule):
    """Stopping after 4 steps and resuming gives the losses of one uninterrupted run (both optimizers)."""
    import torch

    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train

    torch.set_num_threads(1)
    runs = {}
    for name in ("straight", "resumed"):
        project = load_project(tiny_project, [f"run_dir={tmp_path / name}", "train.max_steps=8", "train.eval_every=0",
                                              f"train.optimizer={optimizer}", f"train.schedule={schedule}"])
        prepare(project)
        if name == "resumed":
            train(project, stop_after_steps=4)
            assert len(losses(project.run_path)) == 4
        train(project)
        runs[name] = losses(project.run_path)
    assert runs["straight"] == runs["resumed"]
    assert runs["straight"][-1][1] < runs["straight"][0][1]


def test_batch_tokens_accumulates_to_the_same_step(tiny_project, tmp_path):
    """4 rows x 2 micro-batches (batch_tokens) computes the step of 8 rows at once."""
    import torch

    from nichelm.config import load_project
    from nichelm.errors import UserError
    from nichelm.prepare import prepare
    from nichelm.train import train

    torch.set_num_threads(1)
    result = {}
    for name, sets in {"one": ["train.batch_size=8"],
                       "accum": ["train.batch_size=4", f"train.batch_tokens={8 * 96}"]}.items():
        project = load_project(tiny_project, [f"run_dir={tmp_path / name}", "train.max_steps=4", "train.eval_every=0",
                                              "train.log_every=1", *sets])
        prepare(project)
        train(project)
        result[name] = [json.loads(line) for line in (project.run_path / "metrics.jsonl").read_text().splitlines()]
    one, accum = result["one"], result["accum"]
    # every step logged once in both runs, each of 8 rows x 96 tokens
    assert [m["step"] for m in one] == [m["step"] for m in accum] == [1, 2, 3, 4]
    assert [m["tokens"] for m in one] == [m["tokens"] for m in accum] == [768, 1536, 2304, 3072]
    for a, b in zip(one, accum):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * abs(a["train_loss"]), (a, b)
    bad = load_project(tiny_project, [f"run_dir={tmp_path / 'accum'}", "train.batch_size=4", "train.batch_tokens=100"])
    with pytest.raises(UserError, match="batch_tokens"):
        train(bad)


def test_start_removes_temp_files_a_killed_train_left(tiny_project, tmp_path):
    """A train killed inside an atomic write leaves .metrics.jsonl.XXXXXXXX.tmp (or model_config.json's) in
    RUN; the next start deletes those, and only those: another command may be writing its own there."""
    import tempfile

    import torch

    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train

    torch.set_num_threads(1)
    project = load_project(tiny_project, [f"run_dir={tmp_path / 'run'}", "train.max_steps=1", "train.eval_every=0"])
    prepare(project)
    run = project.run_path

    def leftover(name):          # named as nichelm.io.atomic_file names its temporary file
        fd, path = tempfile.mkstemp(dir=run, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        return path

    ours = [leftover("metrics.jsonl"), leftover("model_config.json")]
    others = [leftover("guard.json"), leftover("metrics.jsonl.bak")]
    train(project)
    assert not any(map(os.path.exists, ours)), "a killed train's temporary files are still there"
    assert all(map(os.path.exists, others)), "train deleted a temporary file that is not its own"


def test_tokens_per_s_include_data_loading(tiny_project, tmp_path, monkeypatch, capsys):
    """Reading batches counts as training time: with 0.3 s of loading per step, no logged tokens/s can
    exceed tokens_per_step / 0.3, and the log line says that its tok/s include data loading (with an ETA)."""
    import re

    import torch

    from nichelm.config import load_project
    from nichelm.data.loader import TaskBatches
    from nichelm.prepare import prepare
    from nichelm.train import train

    torch.set_num_threads(1)
    project = load_project(tiny_project, [f"run_dir={tmp_path / 'run'}", "train.max_steps=3", "train.eval_every=0",
                                          "train.log_every=1"])
    prepare(project)
    real_rows = TaskBatches.rows                  # what get() reads a training batch with

    def slow_rows(self, *args, **kwargs):
        time.sleep(0.3)
        return real_rows(self, *args, **kwargs)

    monkeypatch.setattr(TaskBatches, "rows", slow_rows)
    capsys.readouterr()
    train(project)
    records = [json.loads(line) for line in (project.run_path / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 8 * 96
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["data_s_per_step"] >= 0.3, r
        assert r["tokens_per_s"] <= tokens_per_step / 0.3, r
    log = capsys.readouterr().err
    assert re.search(r"step 1/3 .* tok/s incl\. data loading, .*ETA \d+\.\d min", log), log
    assert re.search(r"step 3/3 .* tok/s incl\. data loading", log), log
    assert re.search(r"trained to step 3: .* tok/s incl\. data loading", log), log


def test_bf16_precision_trains_in_bf16_on_a_cpu(tiny_project, tmp_path, capsys):
    """train.precision = "bf16" runs the forward under bf16 autocast on a CPU too (the CPU recipe's 2.2x);
    "auto" keeps a CPU run in fp32 (bit-reproducible). A bad value is a one-line error."""
    import torch

    from nichelm.cli import main
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train, training_autocast

    cpu = torch.device("cpu")
    with training_autocast("bf16", cpu):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with training_autocast("auto", cpu):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    torch.set_num_threads(1)
    result = {}
    for precision in ("fp32", "bf16"):
        project = load_project(tiny_project, [f"run_dir={tmp_path / precision}", "train.max_steps=4",
                                              "train.eval_every=0", f"train.precision={precision}"])
        prepare(project)
        train(project)
        result[precision] = [loss for _, loss in losses(project.run_path)]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(result["fp32"], result["bf16"]))    # the same model ...
    assert result["fp32"] != result["bf16"]                                               # ... rounded in bf16
    assert main(["train", str(tiny_project), "--set", f"run_dir={tmp_path / 'bad'}", "--set",
                 "train.precision=fp16"]) == 2
    assert "'train.precision' is 'fp16'" in capsys.readouterr().err


def test_bench_train_runs_a_shape_in_bf16(capsys):
    """`nichelm bench train` times the shape and precision asked for (the figures BENCHMARKS.md records)."""
    from nichelm.cli import main
    assert main(["bench", "train", "--preset", "nano", "--arch", "llama", "--steps", "1", "--warmup", "0",
                 "--batch", "2", "--seq", "32", "--vocab", "64", "--threads", "1", "--precision", "bf16",
                 "--n-layer", "2", "--n-embd", "64", "--n-head", "2"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert (out["precision"], out["n_layer"], out["n_embd"], out["n_head"]) == ("bf16", 2, 64, 2)
    assert out["tokens_per_s"] > 0
