"""Durable writes and nothing lost: folder fsyncs, checkpoints replaced only once whole, damaged
checkpoints and metrics lines, prepare rebuilt in a staging folder, missing optional packages."""

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from nichelm import checkpoint
from nichelm.checkpoint import latest_checkpoint, load_model_weights, save_checkpoint
from nichelm.errors import UserError

# ----------------------------------------------------------------- helpers


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def io_log(monkeypatch):
    """Every fsync (by path), rename and replace, in order."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsync'd file descriptors")
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", fd_path(fd)))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def first(events, test) -> int:
    return next(i for i, e in enumerate(events) if test(e))


def tiny_model_and_optimizer():
    from nichelm.model import GPT, ModelConfig
    from nichelm.train import Optimizers
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = Optimizers([torch.optim.AdamW(model.parameters(), lr=1e-3)])
    x = torch.randint(0, 300, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    opt.step()                                  # optimizer state to save
    return model, opt


def save(run, step, model, opt, keep=2):
    return save_checkpoint(run, step, model, opt, {"step": step, "elapsed_s": 0.0, "tokens": 0,
                                                   "model_config": model.cfg.to_dict()}, keep=keep)


def snapshot(folder: Path) -> dict:
    """Every file under folder (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------- io.py


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, io_log):
    from nichelm.io import atomic_write_text
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "hello")
    renamed = first(io_log, lambda e: e[0] == "replace" and e[2] == str(target))
    assert any(e == ("fsync", str(target.parent)) for e in io_log[renamed:]), io_log
    assert first(io_log, lambda e: e[0] == "fsync" and e[1].startswith(str(target.parent / ".file.txt."))) < renamed


# ----------------------------------------------------------------- checkpoints


def test_every_checkpoint_file_is_on_disk_before_the_marker(tmp_path, io_log):
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt)
    root = tmp_path / "checkpoints"
    marker = first(io_log, lambda e: e[0] == "replace" and e[2].endswith("/COMPLETE"))
    staging = Path(io_log[marker][2]).parent
    assert staging.parent == root and staging.name.startswith(".step_0000004.tmp-")
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert first(io_log, lambda e: e[0] == "fsync" and e[1] == str(staging / name)) < marker, name
    # trainer.json is an atomic write (its temporary file fsync'd, then renamed: see the test above)
    assert first(io_log, lambda e: e[0] == "replace" and e[2] == str(staging / "trainer.json")) < marker
    assert first(io_log, lambda e: e == ("fsync", str(staging))) < marker
    in_place = first(io_log, lambda e: e == ("rename", str(staging), str(out)))
    assert in_place > marker
    assert any(e == ("fsync", str(root)) for e in io_log[in_place:])
    assert (out / "COMPLETE").is_file() and latest_checkpoint(tmp_path) == out


def test_a_failed_save_never_costs_the_complete_checkpoint(tmp_path, monkeypatch):
    """keep_checkpoints = 1: re-saving the same step (a finished run re-run) or saving the next one
    with a full disk leaves the complete checkpoint as it was, and no half folder behind."""
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt, keep=1)
    root = tmp_path / "checkpoints"
    before = snapshot(root)
    real_save_file = checkpoint.save_file

    def half_then_full(tensors, path, *a, **k):            # writes part of a file, then the disk is full
        Path(path).write_bytes(b"\0" * 100)
        disk_full()

    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    for step in (4, 8):
        with pytest.raises(OSError):
            save(tmp_path, step, model, opt, keep=1)
        assert snapshot(root) == before, step
        assert latest_checkpoint(tmp_path) == out
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    assert save(tmp_path, 4, model, opt, keep=1) == out       # replaced once the new one is whole
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004"]
    assert save(tmp_path, 8, model, opt, keep=1) == tmp_path / "checkpoints" / "step_0000008"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000008"]     # pruned after


def test_leftovers_are_ignored_then_cleaned_by_the_next_save(tmp_path):
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt, keep=0)
    root = tmp_path / "checkpoints"
    staged = root / ".step_0000008.tmp-99999"              # a save killed just before its rename
    staged.mkdir()
    (staged / "COMPLETE").write_text("step 8\n")
    (root / "step_0000009").mkdir()                         # an old-style save killed mid-write
    (root / "step_0000009" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == out
    # Killed between moving a checkpoint aside and renaming its replacement in: it still counts...
    aside = root / ".step_0000004.old-99999"
    out.rename(aside)
    assert latest_checkpoint(tmp_path) == aside
    save(tmp_path, 6, model, opt, keep=0)
    # ... and the next save puts it back; the rest is gone.
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000006"]
    assert (out / "COMPLETE").is_file()


@pytest.mark.parametrize("damage", ["truncated weights", "garbage trainer.json", "truncated optimizer"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, damage):
    from nichelm.cli import main
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt)
    name = {"truncated weights": "model.safetensors", "garbage trainer.json": "trainer.json",
            "truncated optimizer": "optimizer.safetensors"}[damage]
    f = out / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if name.endswith(".safetensors") else b'{"step": 4, "mo')
    with pytest.raises(UserError, match=f"{name}.*delete the folder .*step_0000004"):
        latest_checkpoint(tmp_path)
    with pytest.raises(UserError, match=name):
        checkpoint.load_checkpoint(out, model, opt)
    if name == "model.safetensors":
        with pytest.raises(UserError, match=name):
            load_model_weights(model, f)
    # export, correct and apply find the newest checkpoint the same way: one line, exit 2
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nichelm: error:") and "\n" not in err and name in err and "Traceback" not in err


def test_weights_of_another_shape_are_a_user_error(tmp_path):
    from nichelm.model import GPT, ModelConfig
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt)
    other = GPT(ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="do not match the model.*model"):
        load_model_weights(other, out / "model.safetensors")


# ----------------------------------------------------------------- train: re-run, torn metrics


def test_rerun_with_a_full_disk_keeps_the_model_and_a_torn_metrics_line_is_dropped(tiny_project, monkeypatch):
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train
    torch.set_num_threads(1)
    common = ["train.eval_every=0", "train.keep_checkpoints=1"]
    project = load_project(tiny_project, ["train.max_steps=4", *common])
    prepare(project)
    train(project)
    run = project.run_path
    before = snapshot(run / "checkpoints")
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        train(project)                           # finished already: saves step 4 again, and the disk is full
    assert snapshot(run / "checkpoints") == before
    monkeypatch.undo()

    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 5, "train_lo')          # killed mid-line
    train(load_project(tiny_project, ["train.max_steps=6", *common]))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: .*delete that line"):
        train(load_project(tiny_project, ["train.max_steps=7", *common]))


# ----------------------------------------------------------------- prepare


def run_files(run: Path) -> dict:
    """What train, evaluate and export read: the data folder, the tokenizer and task.json (a failed
    build keeps its own work folder, RUN/.prepare, and datatrove's logs, so that a re-run resumes)."""
    return {k: v for k, v in snapshot(run).items()
            if k.startswith(("data/", "tokenizer/")) or k == "task.json"}


def test_a_failed_rebuild_leaves_the_earlier_data_byte_identical(tiny_project, monkeypatch):
    from nichelm import prepare as prep
    from nichelm.config import load_project
    from nichelm.data.pipeline import ShardWriter
    project = load_project(tiny_project)
    prep.prepare(project)
    run = project.run_path
    before = run_files(run)
    assert "data/manifest.json" in before and "tokenizer/tokenizer.json" in before and "task.json" in before
    real = ShardWriter.close
    calls = []

    def fail_second(self):                 # the disk fills while the second split's shards are written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(ShardWriter, "close", fail_second)
    # --force, and a new vocabulary and template too: the tokenizer and task.json would change
    changed = load_project(tiny_project, ["tokenizer.vocab_size=340",
                                          'task.prompt_template="## In ##\\n{input}\\n## Out ##\\n"'])
    with pytest.raises(OSError):
        prep.prepare(changed, force=True)
    assert len(calls) == 2
    assert run_files(run) == before
    monkeypatch.undo()
    manifest = prep.prepare(changed)
    assert manifest["tokenizer"]["vocab_size"] == 340
    assert json.loads((run / "task.json").read_text())["prompt_template"].startswith("## In ##")
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".prepare"]


def test_a_source_edited_in_place_is_noticed(tiny_project, capsys):
    """Same size, same mtime, two letters swapped: only the content hash can tell, and it does."""
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    project = load_project(tiny_project)
    first_manifest = prepare(project)
    capsys.readouterr()
    assert prepare(project)["fingerprint"] == first_manifest["fingerprint"]
    assert "already prepared" in capsys.readouterr().err

    pairs = tiny_project.parent / "pairs.jsonl"
    st = pairs.stat()
    text = pairs.read_text()
    assert "committee" in text
    pairs.write_text(text.replace("committee", "commitete"))
    os.utime(pairs, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pairs.stat().st_size == st.st_size and pairs.stat().st_mtime_ns == st.st_mtime_ns
    rebuilt = prepare(project)
    assert "already prepared" not in capsys.readouterr().err
    assert rebuilt["fingerprint"] != first_manifest["fingerprint"]
    examples = "".join((project.run_path / "data" / f"examples.{s}.jsonl").read_text() for s in ("train", "val", "test"))
    assert "commitete" in examples


def test_a_changed_tokenizer_file_is_rebuilt(tiny_project, capsys):
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    project = load_project(tiny_project)
    prepare(project)
    tok = project.run_path / "tokenizer" / "tokenizer.json"
    good = tok.read_bytes()
    tok.write_bytes(good[:100])                  # as after a crash between prepare's renames
    capsys.readouterr()
    prepare(project)
    assert "already prepared" not in capsys.readouterr().err
    assert tok.read_bytes() == good              # same data, same seed: the same tokenizer


# ----------------------------------------------------------------- optional packages


@pytest.mark.parametrize("fmt,module,words", [("hf", "transformers", "needs transformers"),
                                              ("gguf", "gguf", "needs the gguf package"),
                                              ("ct2", "ctranslate2", "needs ctranslate2")])
def test_export_without_its_optional_package_is_one_line(tmp_path, monkeypatch, capsys, fmt, module, words):
    from nichelm.cli import main
    from tests.test_evaluate_external import tiny_run
    run = tiny_run(tmp_path / "run", ["The cat sat on the mat.", "A dog barked at the moon."])
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)         # import MODULE -> ImportError
    assert main(["export", str(run), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nichelm: error: export --format {fmt} ")
    assert words in err and "pip install 'nichelm[export]'" in err and "\n" not in err
    assert not (run / "export" / fmt).exists()


def test_tensorboard_and_parquet_without_their_packages(tmp_path, monkeypatch):
    from nichelm.apply import pyarrow_for
    from nichelm.train import _tensorboard
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="needs the tensorboard package: pip install tensorboard"):
        _tensorboard(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"needs pyarrow: pip install 'nichelm\[parquet\]'"):
        pyarrow_for(tmp_path / "x.parquet")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_a_bit_flipped_in_a_checkpoint_is_found_not_trained_on(tmp_path, name):
    """Same size, valid header, one data byte changed: only the marker's sha256 can tell, and does."""
    model, opt = tiny_model_and_optimizer()
    out = save(tmp_path, 4, model, opt)
    f = out / name
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10                                  # inside the tensor data, past the header
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{name}.*sha256 differs.*delete the folder .*step_0000004"):
        latest_checkpoint(tmp_path)


def test_a_bit_flipped_in_a_shard_stops_training_in_one_line(tiny_project):
    from tests.conftest import run_cli
    assert run_cli("prepare", tiny_project).returncode == 0
    shard = tiny_project.parent / "run" / "data" / "shards" / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01                                # a token id, not the header
    shard.write_bytes(bytes(data))
    proc = run_cli("train", tiny_project, "--set", "train.max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{shard}: missing, or changed since prepare wrote it" in proc.stderr


def test_a_full_disk_is_one_line_and_exit_1(tiny_project, monkeypatch, capsys):
    """Disk errors are not the user's input (exit 1, not 2) but still one line, naming the file."""
    from nichelm import cli

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/checkpoints/x")
    monkeypatch.setattr(cli, "cmd_train", full)          # build_parser binds the name when main() runs
    assert cli.main(["train", str(tiny_project)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("nichelm: error: /data/run/checkpoints/x: No space left on device; free some space, then "
                   "re-run the same command (finished work is kept)")
