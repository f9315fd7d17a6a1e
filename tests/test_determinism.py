"""What the README promises about determinism on a CPU, tested as stated there.

- Eager training (train.compile = false, the default on a CPU) with a fixed max_steps is bit-reproducible:
  two runs with the same seed and thread count write byte-identical weights; a resume continues
  bit for bit (tests/test_train_engine.py kills and resumes).
- Compiled training (train.compile = true) is not bit-reproducible on a CPU: Inductor's kernels round
  differently from run to run in the 7th significant digit (measured: two of four identical runs differ
  at step 19 of 20, with TORCHINDUCTOR_DETERMINISTIC=1 too). The promise is the bound: a compiled run
  stopped and resumed stays within 1e-4 relative of an uninterrupted one over a short run.
"""

import json

import pytest

from tests.conftest import run_cli


def losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


COMMON = ["--set", "train.max_steps=12", "--set", "train.eval_every=0", "--set", "train.log_every=1",
          "--set", "train.threads=2"]


def _prepare(project, run):
    proc = run_cli("prepare", project, "--set", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr


def test_eager_training_is_bit_reproducible(tiny_project, tmp_path):
    weights = []
    for name in ("a", "b"):
        run = tmp_path / name
        _prepare(tiny_project, run)
        proc = run_cli("train", tiny_project, "--set", f"run_dir={run}", "--set", "train.compile=false", *COMMON)
        assert proc.returncode == 0, proc.stderr
        weights.append((run / "checkpoints" / "step_0000012" / "model.safetensors").read_bytes())
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_compiled_resume_stays_within_the_documented_bound(tiny_project, tmp_path):
    import torch

    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train

    torch.set_num_threads(2)
    runs = {}
    for name in ("straight", "resumed"):
        project = load_project(tiny_project, [f"run_dir={tmp_path / name}", "train.max_steps=12", "train.eval_every=0",
                                              "train.log_every=1", "train.compile=true"])
        prepare(project)
        if name == "resumed":
            train(project, stop_after_steps=6)
            assert len(losses(project.run_path)) == 6
        train(project)
        runs[name] = losses(project.run_path)
    a, b = runs["straight"], runs["resumed"]
    assert len(a) == len(b) == 12
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
