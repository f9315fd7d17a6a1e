"""Training phases ([[train.phases]]) and train.init_from: data switches and mixes, per-phase lr schedules,
early stopping, exact resume across phase boundaries, starting from another run's or an export's weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nichelm.config import load_project
from nichelm.errors import UserError
from nichelm.train import train
from tests.conftest import tiny_project

ROWS_PER_STEP = 8                      # the tiny project's batch_size (one process, no accumulation)
TOKENS_PER_STEP = ROWS_PER_STEP * 96   # x block_size


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny project prepared once, plus OTHER: a second data folder with the same tokenizer (its train
    split is the project's val split), standing in for another prepared project's data."""
    from nichelm.prepare import prepare
    folder = tmp_path_factory.mktemp("phases")
    project_file = getattr(tiny_project, "__wrapped__", tiny_project)(folder)    # the conftest fixture's body
    prepared = folder / "prepared"
    prepare(load_project(project_file, [f"run_dir={prepared}"]))
    other = folder / "other"
    (other / "data" / "shards").mkdir(parents=True)
    shutil.copytree(prepared / "tokenizer", other / "tokenizer")
    for split in ("train", "val"):
        shutil.copy(prepared / "data" / "shards" / "val_000000.bin", other / "data" / "shards" / f"{split}_000000.bin")
    return {"dir": folder, "text": project_file.read_text(), "prepared": prepared, "other": other}


def project(base, tmp_path, phases: str = "", sets=(), run=None):
    """A copy of the prepared run (no checkpoints) in tmp_path, and the project file with these phases."""
    run = run or tmp_path / "run"
    if not run.exists():
        shutil.copytree(base["prepared"], run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    path = base["dir"] / f"{tmp_path.name}.toml"          # beside the sources, which are relative to it
    path.write_text(base["text"] + phases.replace("OTHER", str(base["other"])))
    return load_project(path, [f"run_dir={run}", *sets])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


TWO_PHASES = """
[[train.phases]]
name = "general"
data = "OTHER"
steps = 5
lr = 3e-3
warmup_steps = 2

[[train.phases]]
name = "special"
data = ["", "OTHER"]
weights = [0.75, 0.25]
tokens = 3000
lr = 1e-3
warmup_steps = 1
schedule = "wsd"
"""


def test_two_phases_resumed_inside_phase_two_are_bit_identical(base, tmp_path):
    """A run stopped in phase 1, resumed, stopped again inside phase 2 (a data mix) and resumed, writes the
    same weights, optimizer state and losses as one uninterrupted run; each phase has its own lr schedule."""
    torch.set_num_threads(1)
    sets = ["train.eval_every=3", "train.log_every=1", "model.dropout=0.1"]    # dropout: the RNG must resume too
    straight = project(base, tmp_path / "a", TWO_PHASES, sets)
    train(straight)
    resumed = project(base, tmp_path / "b", TWO_PHASES, sets)
    for stop in (3, 4, None):                           # stops at steps 3 (phase 1) and 7 (phase 2)
        train(resumed, stop_after_steps=stop)
    a, b = metrics(straight.run_path), metrics(resumed.run_path)
    # 3000 tokens = 4 steps of 768, rounded up
    assert [r["phase"] for r in a] == ["general"] * 5 + ["special"] * 4
    assert [r["step"] for r in b] == list(range(1, 10))
    assert [(r["phase"], r["train_loss"], r.get("val_loss")) for r in a] == \
           [(r["phase"], r["train_loss"], r.get("val_loss")) for r in b]
    # each phase's warmup starts at its own first step
    assert a[0]["lr"] == pytest.approx(3e-3 / 2)
    assert [r["lr"] for r in a[5:]] == pytest.approx([1e-3] * 4)     # wsd: no decay before 80% of the phase
    assert a[4].get("val_loss") is not None          # a validation at the end of each phase
    ca, cb = last_checkpoint(straight.run_path), last_checkpoint(resumed.run_path)
    assert ca.name == cb.name == "step_0000009"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (ca / name).read_bytes() == (cb / name).read_bytes(), name


def test_phase_end_checkpoint_survives_pruning_and_resume_is_exact(base, tmp_path):
    """With keep_checkpoints = 1 the checkpoint at the end of phase 1 (step 5, not a multiple of checkpoint_every)
    is written and kept, marked in its trainer.json, beside the newest; a run stopped at steps 3 and 5 (the phase
    end, saved there by the stop) and resumed writes the same files as one uninterrupted run."""
    torch.set_num_threads(1)
    sets = ["train.checkpoint_every=2", "train.keep_checkpoints=1", "train.eval_every=0", "train.log_every=1"]
    straight = project(base, tmp_path / "a", TWO_PHASES, sets)
    train(straight)
    resumed = project(base, tmp_path / "b", TWO_PHASES, sets)
    for stop in (3, 2, None):
        train(resumed, stop_after_steps=stop)
    for run in (straight.run_path, resumed.run_path):
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert kept == ["step_0000005", "step_0000009"], run
        states = [json.loads((run / "checkpoints" / name / "trainer.json").read_text()) for name in kept]
        assert [s.get("phase_end") for s in states] == ["general", None]
    assert [r["train_loss"] for r in metrics(straight.run_path)] == [r["train_loss"] for r in metrics(resumed.run_path)]
    for name in ("step_0000005", "step_0000009"):
        for file in ("model.safetensors", "optimizer.safetensors"):
            a = straight.run_path / "checkpoints" / name / file
            assert a.read_bytes() == (resumed.run_path / "checkpoints" / name / file).read_bytes(), (name, file)


def test_phases_read_their_own_data(base, tmp_path):
    """Phase 1's rows come from OTHER's train split, phase 2's from the mix in its shares: 6 + 2 of 8 rows."""
    from nichelm.train import _load_data, _set_up, step_batches
    p = project(base, tmp_path, TWO_PHASES)
    data = _load_data(p, _set_up(p))
    general, special = data.plan.phases
    other_tokens = np.fromfile(base["other"] / "data" / "shards" / "train_000000.bin", dtype=np.uint16)[512:]
    own_tokens = np.fromfile(base["prepared"] / "data" / "shards" / "train_000000.bin", dtype=np.uint16)[512:]

    def source(row):                                   # which shard holds this row of tokens
        windows = {"other": other_tokens, "own": own_tokens}
        found = [k for k, t in windows.items() if any(np.array_equal(t[i:i + len(row)], row)
                                                      for i in np.flatnonzero(t == row[0]))]
        return found[0] if len(found) == 1 else "?"

    (x, _, _), = step_batches(general.train, 0, 1, ROWS_PER_STEP, torch.device("cpu"))
    assert [source(r.numpy()) for r in x] == ["other"] * ROWS_PER_STEP
    (x, _, _), = step_batches(special.train, 0, 1, ROWS_PER_STEP, torch.device("cpu"))
    assert sorted(source(r.numpy()) for r in x) == ["other"] * 2 + ["own"] * 6
    assert special.steps == 4 and special.cfg.lr == 1e-3 and special.cfg.schedule == "wsd"
    assert general.cfg.schedule == p.train.schedule            # left out: train's


def test_mixed_batches_split_across_ranks_and_steps(base):
    """MixedBatches: rank r of N reads its slice of the one-process batch; part k gives counts[k] rows of every
    step, continuing its own order from step to step."""
    from nichelm.data.loader import MixedBatches, TaskBatches, mix_counts
    from nichelm.data.shards import load_split
    assert mix_counts([1, 1, 1], 8) == [3, 3, 2] and mix_counts([0.95, 0.05], 8) == [8, 0]
    assert mix_counts([3, 1], 8) == [6, 2]

    from nichelm.config import TaskConfig
    from nichelm.data.tokenizer import load_tokenizer, template_markers
    task = TaskConfig()                                # the tiny project's template and end marker
    tok = load_tokenizer(base["prepared"] / "tokenizer" / "tokenizer.json")
    ids = [tok.token_to_id(m) for m in (*template_markers(task.prompt_template), task.end_marker)]

    def parts():
        return [TaskBatches(load_split(folder / "data" / "shards", "train"), 96, *ids, seed=5)
                for folder in (base["prepared"], base["other"])]
    one = MixedBatches(parts(), [3.0, 1.0], seed=5)
    ranks = [MixedBatches(parts(), [3.0, 1.0], seed=5, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 3):
        for micro in (0, 1):                       # 2 micro-batches of 4 rows x 1 process = 2 of 2 x 2 processes
            whole = one.get(step, micro, 2, 4)[0]
            split = torch.cat([r.get(step, micro, 2, 2)[0] for r in ranks])
            assert torch.equal(whole, split)
        rows = torch.cat([one.get(step, m, 2, 4)[0] for m in (0, 1)]).numpy()
        first = parts()[0]
        expected = first.rows_at(np.arange(step * 6, step * 6 + 6))[:, :-1]
        assert sorted(map(bytes, rows[one.layout(8)[1] == 0])) == sorted(map(bytes, expected))


EARLY_STOP = """
[[train.phases]]
name = "stuck"
steps = 20
lr = 1e-30
patience = 2

[[train.phases]]
name = "special"
steps = 3
"""


def test_early_stopping_ends_a_phase_and_resumes_exactly(base, tmp_path):
    """An lr of 1e-30 leaves the weights as they are, so the val loss never improves on its first figure:
    with patience 2 and a validation every 2 steps the phase ends at step 6, and the next one follows. A run
    stopped at step 5 (one validation without progress counted) ends the phase at the same step, and one
    stopped at step 7 resumes in the next phase."""
    torch.set_num_threads(1)
    sets = ["train.eval_every=2", "train.log_every=1"]
    straight = project(base, tmp_path / "a", EARLY_STOP, sets)
    train(straight)
    resumed = project(base, tmp_path / "b", EARLY_STOP, sets)
    for stop in (5, 2, None):                   # stopped in the phase (step 5) and after it ended early (step 7)
        train(resumed, stop_after_steps=stop)
    a, b = metrics(straight.run_path), metrics(resumed.run_path)
    assert [r["phase"] for r in a] == ["stuck"] * 6 + ["special"] * 3
    assert [(r["phase"], r["train_loss"]) for r in a] == [(r["phase"], r["train_loss"]) for r in b]
    state = json.loads((last_checkpoint(resumed.run_path) / "trainer.json").read_text())["phases"]
    assert state["ended_early"] == {"stuck": 6}
    assert (last_checkpoint(straight.run_path) / "model.safetensors").read_bytes() == \
           (last_checkpoint(resumed.run_path) / "model.safetensors").read_bytes()


def _trained(base, tmp_path, steps=6):
    p = project(base, tmp_path, sets=[f"train.max_steps={steps}", "train.eval_every=0"])
    train(p)
    return p.run_path


def test_init_from_a_run_and_from_its_export(base, tmp_path, capsys):
    """init_from: the new run starts from the source's weights (checked through a step with lr 1e-30, which
    changes nothing) and a fresh optimizer; from an hf export too (its vocabulary rows; padding rows are zero)."""
    from nichelm.export import export
    torch.set_num_threads(1)
    source = _trained(base, tmp_path / "src")
    assert all("phase" not in r for r in metrics(source))          # no phases: records as before
    weights = load_file(str(last_checkpoint(source) / "model.safetensors"))
    hf = export(source, "hf")
    vocab = json.loads((source / "model_config.json").read_text())["vocab_size"]
    for name, given in (("run", source), ("export", hf), ("checkpoint", last_checkpoint(source))):
        p = project(base, tmp_path / name, sets=[f"train.init_from={given}", "train.max_steps=1", "train.lr=1e-30",
                                                 "train.warmup_steps=0", "train.eval_every=0"])
        capsys.readouterr()
        train(p)
        assert "train.init_from" in capsys.readouterr().err
        ckpt = last_checkpoint(p.run_path)
        assert ckpt.name == "step_0000001"
        got = load_file(str(ckpt / "model.safetensors"))
        assert got.keys() == weights.keys()
        for key, value in weights.items():
            rows = vocab if (name == "export" and key in ("wte.weight", "lm_head.weight")) else None
            assert torch.equal(got[key][:rows], value[:rows]), (name, key)
        optimizer = load_file(str(ckpt / "optimizer.safetensors"))
        assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {1.0}       # a fresh AdamW


def test_init_from_and_phase_data_refuse_another_model_or_tokenizer(base, tmp_path):
    torch.set_num_threads(1)
    source = _trained(base, tmp_path / "src", steps=1)
    p = project(base, tmp_path / "a", sets=[f"train.init_from={source}", "model.n_layer=3"])
    with pytest.raises(UserError, match=r"init_from.*n_layer 2 there, 3 here"):
        train(p)
    # the same tokens under other ids: a tokenizer of another preparation
    swapped = tmp_path / "swapped"
    shutil.copytree(source, swapped)
    tok_path = swapped / "tokenizer" / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_path.write_text(json.dumps(tok))
    p = project(base, tmp_path / "b", sets=[f"train.init_from={swapped}"])
    with pytest.raises(UserError, match=r"init_from.*its tokenizer is not this run's.*tokenizer.from"):
        train(p)
    p = project(base, tmp_path / "c", f'[[train.phases]]\nname = "x"\nsteps = 2\ndata = "{swapped}"\n')
    with pytest.raises(UserError, match=r"train.phases\[0\] \(x\): data .* prepared with another tokenizer"):
        train(p)
    p = project(base, tmp_path / "d", sets=[f"train.init_from={tmp_path}"])
    with pytest.raises(UserError, match="neither a run folder"):
        train(p)
    p = project(base, tmp_path / "e", '[[train.phases]]\nname = "x"\nsteps = 2\ndata = ["", "OTHER"]\n'
                                      'weights = [0.99, 0.01]\n')
    with pytest.raises(UserError, match=r"weights\[1\] = 0.01 is less than one of the 8 rows"):
        train(p)


@pytest.mark.parametrize("phases,message", [
    ('name = "a"\nsteps = 2\n[[train.phases]]\nname = "a"\nsteps = 2', "names an earlier phase"),
    ('name = "a"\nsteps = 2\ntokens = 100', "exactly one length"),
    ('name = "a"', "exactly one length"),
    ('name = "a b"\nsteps = 2', "train.phases\\[0\\].name"),
    ('name = "a"\nsteps = 2\ndata = ["", "x"]\nweights = [1.0]', "1 numbers for 2 data entries"),
    ('name = "a"\nsteps = 2\nweights = [1.0, 2.0]', "weights' is for a list"),
    ('name = "a"\nsteps = 2\ndata = []', "empty list"),
    ('name = "a"\nsteps = 2\nschedule = "linear"', "use cosine or wsd"),
    ('name = "a"\nsteps = 2\nlr = -1.0', "train.phases\\[0\\].lr"),
    ('name = "a"\nsteps = 2\nsurprise = 1', "unknown key 'train.phases\\[0\\].surprise'"),
    ('steps = 2', "missing required key 'name'"),
])
def test_phase_keys_are_checked(base, tmp_path, phases, message):
    with pytest.raises(UserError, match=message):
        project(base, tmp_path, "\n[[train.phases]]\n" + phases + "\n")


def test_patience_needs_validations(base, tmp_path):
    with pytest.raises(UserError, match="patience' needs validations"):
        project(base, tmp_path, '\n[[train.phases]]\nname = "a"\nsteps = 2\npatience = 2\n', ["train.eval_every=0"])


def test_loss_curve_marks_phase_starts():
    pytest.importorskip("matplotlib")
    from nichelm.report import loss_curve_png
    plain = [{"step": s, "train_loss": 5.0 - 0.1 * s} for s in range(1, 9)]
    phased = [dict(r, phase="general" if r["step"] <= 4 else "special") for r in plain]
    assert loss_curve_png(phased) != loss_curve_png(plain)
