"""Checkpoints: run/checkpoints/step_NNNNNNN/ with safetensors + json, no pickle.

  model.safetensors      weights (fp32)
  optimizer.safetensors  every optimizer state tensor, keyed "opt<j>.<param index>.<name>"
  trainer.json           step, elapsed time, tokens seen, param groups, RNG states, model config
  COMPLETE               written last: a folder without it is ignored (a crash mid-write loses nothing)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nichelm.io import atomic_write_json, atomic_write_text

MARKER = "COMPLETE"


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def complete_checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def latest_checkpoint(run: Path) -> Path | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def _save_tensors(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


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
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]        # tied to wte in gpt2
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


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
    out = step_dir(run, step)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _save_tensors(weights, out / "model.safetensors")
    _save_tensors(tensors, out / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_tensors(rng, out / "rng.safetensors")
    state = dict(trainer_state, param_groups=groups, optimizer_scalars=scalars)
    atomic_write_json(out / "trainer.json", state)
    atomic_write_text(out / MARKER, f"step {step}\n")
    for old in complete_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(path: Path, model, optimizer, weights: bool = True) -> dict:
    """Weights (unless weights=False: FSDP loads them whole before sharding), optimizer state (cut
    into shards where the parameters are FSDP2 shards), RNG state; returns trainer.json."""
    if weights:
        load_model_weights(model, path / "model.safetensors")
    state = json.loads((path / "trainer.json").read_text())
    entries = list(load_file(str(path / "optimizer.safetensors")).items())
    entries += list(state.get("optimizer_scalars", {}).items())
    per_opt: list[dict[int, dict]] = [{} for _ in optimizer.optimizers]
    for key, value in entries:
        j, idx, name = key.split(".", 2)
        per_opt[int(j[3:])].setdefault(int(idx), {})[name] = value
    if len(state["param_groups"]) != len(optimizer.optimizers):
        raise ValueError(f"{path}: checkpoint has {len(state['param_groups'])} optimizers, the run has "
                         f"{len(optimizer.optimizers)}; keep train.optimizer as it was or start a new run_dir")
    for opt, st, groups in zip(optimizer.optimizers, per_opt, state["param_groups"]):
        _shard_like_params(opt, st)
        opt.load_state_dict({"state": st, "param_groups": groups})
    rng = load_file(str(path / "rng.safetensors"))
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
