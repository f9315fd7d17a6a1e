"""Checkpoints: run/checkpoints/step_NNNNNNN/ with safetensors + json, no pickle.

  model.safetensors      weights (fp32)
  optimizer.safetensors  every optimizer state tensor, keyed "opt<j>.<param index>.<name>"
  rng.safetensors        RNG states (torch, and CUDA where present)
  trainer.json           step, elapsed time, tokens seen, param groups, model config
  COMPLETE               written last: a folder without it is ignored (a crash mid-write loses nothing)

A checkpoint is written whole into a hidden staging folder (.step_NNNNNNN.tmp-PID), every file
fsync'd, then the COMPLETE marker, then renamed into place: a step_NNNNNNN folder is complete or
absent. A complete checkpoint is never deleted before its replacement is complete: one for the
same step is moved aside (.step_NNNNNNN.old-PID) only once the new one is whole, and older ones
are pruned (train.keep_checkpoints) only after that, except those train marked as a phase's end
(trainer.json "phase_end"), which are never pruned. Leftovers of an interrupted save are
cleaned up (or, for a moved-aside checkpoint with no replacement, put back) by the next save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text, fsync_dir, fsync_file, replace_dir

MARKER = "COMPLETE"
_NAME = re.compile(r"step_(\d{7})")                          # a checkpoint in place
_ASIDE = re.compile(r"\.step_(\d{7})\.old-\d+")             # moved aside while its replacement went in
_STAGING = re.compile(r"\.step_\d{7}\.tmp-\d+")             # a save in progress (or interrupted)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint moved aside by a save that was cut off
    before its replacement was renamed in still counts (the next save puts it back)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        m = _NAME.fullmatch(p.name) or _ASIDE.fullmatch(p.name)
        if m and (p / MARKER).is_file():
            step = int(m.group(1))
            if step not in by_step or _NAME.fullmatch(p.name):        # the folder in place wins
                by_step[step] = p
    return [by_step[s] for s in sorted(by_step)]


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint, checked readable (UserError naming the bad file if not)."""
    found = complete_checkpoints(run)
    if not found:
        return None
    check_checkpoint(found[-1])
    return found[-1]


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; the checkpoint is damaged: delete the folder {path.parent} to resume "
                     "from the checkpoint before it (or to start over if it is the only one)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint(ckpt: Path) -> None:
    """Checks that every file of a checkpoint is whole and unchanged: each file's sha256 against the
    one its COMPLETE marker recorded (markers written before checksums existed have none), trainer.json
    parses, and each safetensors file's header matches its size (a truncated file fails here, not mid-load)."""
    lines = (ckpt / MARKER).read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        sums = json.loads(lines[1])["sha256"] if len(lines) > 1 else {}
    except (ValueError, KeyError, TypeError):
        raise _damaged(ckpt / MARKER, "unreadable checksums") from None
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file() or _sha256(f) != digest:
            raise _damaged(f, "missing, or its content changed since it was written (sha256 differs)")
    read_trainer_state(ckpt)
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise _damaged(f, f"unreadable ({e})") from None


def read_trainer_state(ckpt: Path) -> dict:
    """trainer.json of a checkpoint (step, elapsed time, model config, ...)."""
    path = ckpt / "trainer.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise _damaged(path, "not a JSON object")
    return state


def _load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (SafetensorError, OSError) as e:
        raise _damaged(path, f"unreadable ({e})") from None


def _save_tensors(tensors: dict, path: Path) -> None:
    """Into a staging folder (so no temporary name is needed), then fsync'd."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:          # a full or read-only disk: an OSError, as any other write gives
        code = errno.ENOSPC if "No space" in str(e) else errno.EROFS if "Read-only" in str(e) else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None
    fsync_file(path)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole; every rank must call this, in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_state(model: torch.nn.Module) -> dict:
    """Whole weights without duplicates (tied heads share storage; safetensors refuses shared tensors)."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        ptr = (t.to_local() if hasattr(t, "to_local") else t).data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        state[name] = _whole(t)
    return state


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = _load_tensors(path)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:                      # shapes differ: the project's model.* changed since
        raise UserError(f"{path}: weights do not match the model ({str(e).splitlines()[-1].strip()}); keep "
                        "model.* as they were for this run, or start a new run_dir") from None
    missing = [m for m in missing if m != "lm_head.weight"]        # tied to wte in gpt2
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); keep model.* as they were for this run, or start a new run_dir")


def save_checkpoint(run: Path, step: int, model, optimizer, trainer_state: dict, keep: int,
                    write: bool = True) -> Path | None:
    """Under FSDP every rank calls this (the shards are gathered whole) and only the one with
    write=True writes; the files are the same as a single process's."""
    weights = model_state(model)
    tensors, scalars, groups = {}, {}, []
    for j, opt in enumerate(optimizer.optimizers):
        sd = opt.state_dict()
        groups.append(sd["param_groups"])
        for idx, st in sd["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"opt{j}.{idx}.{name}"] = _whole(value)
                else:
                    scalars[f"opt{j}.{idx}.{name}"] = value
    if not write:
        return None
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    out = step_dir(run, step)
    staging = root / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _save_tensors(weights, staging / "model.safetensors")
        _save_tensors(tensors, staging / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        _save_tensors(rng, staging / "rng.safetensors")
        state = dict(trainer_state, param_groups=groups, optimizer_scalars=scalars)
        atomic_write_json(staging / "trainer.json", state)
        fsync_dir(staging)                         # every file durable before the marker exists
        # the marker holds every file's sha256: a bit flipped later is found on load, never trained on
        sums = {f.name: _sha256(f) for f in sorted(staging.iterdir()) if f.is_file()}
        atomic_write_text(staging / MARKER, f"step {step}\n" + json.dumps({"sha256": sums}) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out)      # one already there for this step (a finished run re-run) goes only now
    for old in complete_checkpoints(run)[:-keep] if keep > 0 else []:    # only once the new one is whole
        if old != out and not is_phase_end(old):
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(root)
    return out


def is_phase_end(ckpt: Path) -> bool:
    """Whether train saved this checkpoint at the end of a phase (trainer.json "phase_end"): the weights a
    user specialises from, which pruning keeps. An unreadable trainer.json counts as not (pruned as before)."""
    try:
        state = json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "phase_end" in state


def _clean_leftovers(root: Path) -> None:
    """What an interrupted save left: staging folders and incomplete step folders are deleted; a
    checkpoint moved aside whose replacement never arrived goes back in place."""
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        aside = _ASIDE.fullmatch(p.name)
        if aside:
            home = root / f"step_{aside.group(1)}"
            if (p / MARKER).is_file() and not (home / MARKER).is_file():
                shutil.rmtree(home, ignore_errors=True)
                p.rename(home)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif _STAGING.fullmatch(p.name) or (_NAME.fullmatch(p.name) and not (p / MARKER).is_file()):
            shutil.rmtree(p, ignore_errors=True)
    fsync_dir(root)


def load_checkpoint(path: Path, model, optimizer, weights: bool = True) -> dict:
    """Weights (unless weights=False: FSDP loads them whole before sharding), optimizer state (cut
    into shards where the parameters are FSDP2 shards), RNG state; returns trainer.json."""
    if weights:
        load_model_weights(model, path / "model.safetensors")
    state = read_trainer_state(path)
    entries = list(_load_tensors(path / "optimizer.safetensors").items())
    entries += list(state.get("optimizer_scalars", {}).items())
    if len(state["param_groups"]) != len(optimizer.optimizers):
        raise UserError(f"{path}: checkpoint has {len(state['param_groups'])} optimizers, the run has "
                        f"{len(optimizer.optimizers)}; keep train.optimizer as it was or start a new run_dir")
    per_opt: list[dict[int, dict]] = [{} for _ in optimizer.optimizers]
    for key, value in entries:
        j, idx, name = key.split(".", 2)
        per_opt[int(j[3:])].setdefault(int(idx), {})[name] = value
    for opt, st, groups in zip(optimizer.optimizers, per_opt, state["param_groups"]):
        _shard_like_params(opt, st)
        opt.load_state_dict({"state": st, "param_groups": groups})
    rng = _load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def _shard_like_params(opt: torch.optim.Optimizer, state: dict[int, dict]) -> None:
    """Whole optimizer tensors (as saved) -> shards placed like their FSDP2-sharded parameter."""
    params = [p for group in opt.param_groups for p in group["params"]]     # the state's indices
    for idx, st in state.items():
        p = params[idx]
        if not hasattr(p, "device_mesh"):
            continue
        from torch.distributed.tensor import distribute_tensor
        for name, value in st.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                st[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
