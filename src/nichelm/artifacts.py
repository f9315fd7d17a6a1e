"""Where a model comes from, read in one place: a run directory (its newest complete checkpoint), a project
file that names one, an hf export (`nichelm export --format hf`) or a ct2 export.

open_model(path) reads what every user of a model needs, without the weights: its kind, model config,
tokenizer, task (with the guard `nichelm evaluate` calibrated: run_task, or the export's task.json) and
provenance. Source.load_model() then reads the weights into our GPT (an hf export's through
convert.from_hf), and Source.run_model() gives the RunModel exports are written from. Every loader
(the Corrector, the engines of nichelm.backends, exports, perplexity) goes through here, so a run and its
export load the same way and a missing file is the same one-line error everywhere.

This module sits below inference, backends and export and imports none of them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nichelm.checkpoint import latest_checkpoint, load_model_weights
from nichelm.errors import UserError
from nichelm.model import GPT, ModelConfig
from nichelm.tasks import Task, get_task

NICHELM_JSON = "nichelm.json"      # marks a folder as a nichelm export; holds our model config
GUARD_FILE = "guard.json"          # RUN/guard.json: the margin `nichelm evaluate` chose (calibrate_margin)


def run_dir(path: str | Path, overrides: list[str] = ()) -> Path:
    """A run directory, or a project file that names one (with its --set overrides)."""
    path = Path(path)
    if path.is_dir():
        return path
    from nichelm.config import load_project
    return load_project(path, overrides).run_path


def is_export(path: Path) -> bool:
    return (Path(path) / NICHELM_JSON).is_file()


def is_ct2_export(path: Path) -> bool:
    """A folder written by CTranslate2's converter (`nichelm export --format ct2`; it also holds nichelm.json)."""
    return (Path(path) / "model.bin").is_file()


def read_task(path: Path, extra: dict | None = None) -> Task:
    """The Task a task.json describes (nichelm.tasks.get_task; no "type": the correction task)."""
    try:
        d = json.loads(Path(path).read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; re-run the stage that wrote it (prepare, or export)") from None
    return get_task({**d, **(extra or {})}, str(path))


def run_task(run: Path, checkpoint: Path | None = None) -> Task:
    """RUN/task.json plus the guard `nichelm evaluate` calibrated for the run's newest checkpoint
    (RUN/guard.json, under "guard"), as exports store it in their task.json. A calibration made for an
    older checkpoint is left out, with a note: its margin says nothing about the new weights."""
    run = Path(run)
    task = {}
    path = run / GUARD_FILE
    if path.is_file():
        try:
            guard = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path}: not valid JSON; delete it and re-run `nichelm evaluate`") from None
        checkpoint = checkpoint or latest_checkpoint(run)
        if checkpoint is not None and guard.get("checkpoint") not in (None, checkpoint.name):
            print(f"nichelm: {path} was calibrated for {guard.get('checkpoint')}, the newest checkpoint is "
                  f"{checkpoint.name}: guard margin not used; re-run `nichelm evaluate`", file=sys.stderr)
        else:
            task["guard"] = guard
    return read_task(run / "task.json", task)


def model_identity(path: Path) -> str:
    """Names the weights (an export's run and checkpoint, or a run's newest checkpoint), so a resumed
    `nichelm apply` with another model or a newer checkpoint is refused."""
    path = Path(path)
    if is_export(path):
        meta = json.loads((path / NICHELM_JSON).read_text())
        return f"export of {meta.get('run')} {meta.get('checkpoint')}"
    ckpt = latest_checkpoint(run_dir(path))
    return str(ckpt.resolve()) if ckpt else str(path)


@dataclass
class RunModel:
    """What every export needs from a run: config, weights, tokenizer, task and provenance."""
    run: Path
    checkpoint: Path
    cfg: ModelConfig
    state: dict                    # our parameter names -> tensors (padded vocabulary)
    task: Task
    trainer: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.run / "tokenizer" / "tokenizer.json"

    def end_id(self) -> int:
        from nichelm.data.tokenizer import load_tokenizer
        end = load_tokenizer(self.tokenizer_path).token_to_id(self.task.end_marker)
        if end is None:
            raise UserError(f"{self.tokenizer_path}: end marker {self.task.end_marker!r} is not a token; "
                            "re-run `nichelm prepare --force`")
        return end


@dataclass
class Source:
    """A model's files, read except for the weights."""
    path: Path                     # the run directory, or the export folder
    kind: str                      # "run", "hf" (an hf export) or "ct2" (a CTranslate2 export)
    cfg: ModelConfig
    tokenizer_path: Path
    task: Task                     # with the calibrated guard (correction), when there is one
    checkpoint: Path | None = None                 # a run's newest complete checkpoint
    trainer: dict = field(default_factory=dict)    # its trainer.json

    def load_model(self, device="cpu") -> GPT:
        """Our GPT with these weights, on `device`. A ct2 export holds only CTranslate2's copy."""
        model = GPT(self.cfg)
        if self.kind == "run":
            load_model_weights(model, self.checkpoint / "model.safetensors")
        elif self.kind == "hf":
            from safetensors.torch import load_file

            from nichelm.convert import from_hf
            model.load_state_dict(from_hf(load_file(str(self.path / "model.safetensors")), self.cfg), strict=True)
        else:
            raise UserError(f"{self.path}: a CTranslate2 export runs only with --backend ct2; give the run or its "
                            "hf export for nichelm's own engine")
        return model.to(device)

    def load_tokenizer(self):
        from nichelm.data.tokenizer import load_tokenizer
        return load_tokenizer(self.tokenizer_path)

    def run_model(self) -> RunModel:
        """The run's weights and provenance, as exports are written from (runs only)."""
        if self.kind != "run":
            raise UserError(f"{self.path}: already an export; give the run it came from")
        return RunModel(self.path, self.checkpoint, self.cfg, dict(self.load_model().state_dict()), self.task,
                        self.trainer)


def open_run(run: Path) -> Source:
    """A run directory at its newest complete checkpoint."""
    run = Path(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no complete checkpoint; run `nichelm train` first")
    for need in (run / "task.json", run / "tokenizer" / "tokenizer.json"):
        if not need.is_file():
            raise UserError(f"{need}: missing; run `nichelm prepare` for this project")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    return Source(run, "run", ModelConfig(**trainer["model_config"]), run / "tokenizer" / "tokenizer.json",
                  run_task(run, ckpt), ckpt, trainer)


def open_model(path: str | Path) -> Source:
    """A run directory, a project file (its run), an hf export or a ct2 export."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found; give a run directory, a project file or an export folder")
    if path.is_dir() and (is_export(path) or is_ct2_export(path)):
        if not is_export(path):
            raise UserError(f"{path}: no {NICHELM_JSON} (exported by an older nichelm); re-run "
                            "`nichelm export --format ct2`, or give the run or its hf export")
        meta = json.loads((path / NICHELM_JSON).read_text())
        task = read_task(path / "task.json")
        return Source(path, "ct2" if is_ct2_export(path) else "hf", ModelConfig(**meta["model_config"]),
                      path / "tokenizer.json", task)
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise UserError(f"{path}: neither a run directory (no checkpoints/) nor an hf export (no {NICHELM_JSON}); "
                        "give a run, a project file, or a folder made by `nichelm export --format hf`")
    return open_run(run_dir(path))


def load_run(run: Path) -> RunModel:
    """A run's newest checkpoint with everything an export writes."""
    return open_run(run).run_model()


def model_shape(path: Path) -> tuple[ModelConfig, Path, Task]:
    """(model config, tokenizer.json, task) of a run, project file or export folder; no weights are read."""
    source = open_model(path)
    return source.cfg, source.tokenizer_path, source.task
