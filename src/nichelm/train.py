"""The training loop: one process on CPU/GPU, or many under torchrun (DDP, or FSDP2 with
train.parallel = "fsdp").

Re-running the same command resumes from the newest complete checkpoint: model,
optimizer, step, elapsed time and RNG state come back, and the data order is a
function of the step, so the resumed run continues exactly where it stopped.

Phases ([[train.phases]]): training in stretches, each with its data (this project's, another
prepared project's, or a mix in fixed shares of every step), length and lr schedule, optionally
ended early when its val loss stops improving; one optimizer throughout. Where a phase starts is
a function of the step (and of the early stops, which checkpoints record), and each phase reads
its data and its schedule by its own step, so a resume is exact across phase boundaries too. A run
without phases is one unnamed phase of train.max_steps, exactly as before. train.init_from starts
a new run from another run's (or an hf export's) weights with a fresh optimizer.

`train()` reads top to bottom as its parts, each a function or class below it:
  _set_up          config, devices, torchrun ranks; leftovers of a killed run removed
  _load_data       tokenizer, model config, shards checked, the phases (Plan): each its train batches (a
                   function of the step) and val batches
  _build_model     model (seeded), newest checkpoint (else train.init_from's weights), optimizer, compile,
                   DDP/FSDP wrapping
  _train_step      one optimizer step: lr, forward/backward over the micro-batches, clipping, update
  MetricsSink      metrics.jsonl, TensorBoard, progress line: tokens/s (data loading included), ETA
  _evaluate / _save   validation loss and checkpoints, during the loop, at each phase's end (kept whatever
                   train.keep_checkpoints says) and at the run's end
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nichelm.checkpoint import (MARKER, check_checkpoint, latest_checkpoint, load_checkpoint, load_model_weights,
                                read_trainer_state, save_checkpoint)
from nichelm.config import Project, TrainConfig, model_config
from nichelm.data.loader import MixedBatches, TaskBatches, mix_counts
from nichelm.data.shards import load_split
from nichelm.data.tokenizer import load_tokenizer
from nichelm.errors import UserError
from nichelm.io import atomic_write_text
from nichelm.model import GPT, ModelConfig
from nichelm.tasks import get_task

# Peak dense bf16 FLOP/s for MFU, by device name fragment.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def train(project: Project, *, stop_after_steps: int | None = None) -> dict:
    """Train (or resume training) the project's model. Returns a summary dict."""
    setup = _set_up(project)
    cfg, ddp = setup.cfg, setup.ddp
    data = _load_data(project, setup)
    grad_accum, tokens_per_step = data.grad_accum, data.tokens_per_step
    trainee = _build_model(project, setup, data)
    plan = data.plan
    plan.restore(trainee.phase_state)
    clock = Clock(trainee.elapsed_before)
    sink = MetricsSink(setup, trainee, data, tokens_per_step, clock)
    if ddp.main:
        mcfg = data.model_config
        log(f"model {mcfg.arch} {trainee.raw_model.num_params() / 1e6:.2f}M params, {mcfg.n_layer} layers, "
            f"d={mcfg.n_embd}; {tokens_per_step} tokens/step on {setup.device} x{ddp.world_size}"
            + (f" ({'fsdp' if trainee.fsdp else 'ddp'})" if ddp.enabled else ""))

    budget_s = cfg.max_minutes * 60
    step, tokens_seen = trainee.start_step, trainee.tokens_seen
    last_loss, val_loss, val_step = float("nan"), None, None       # val_step: the step val_loss is of
    announced = None
    while (phase := plan.at(step)) is not None:
        elapsed = clock.elapsed()
        # Ranks must agree on when to stop; asking them is a host sync, so ask every 10 steps.
        if budget_s > 0 and (not ddp.enabled or step % 10 == 0) and ddp.any(elapsed >= budget_s):
            break
        start = plan.start(phase)
        if plan.named and ddp.main and announced is not phase:
            log(f"phase {phase.name}: steps {start + 1}..{plan.end(phase)} on {phase.describe}")
            announced = phase
        # Through the lr schedule: the phase's steps (a run without phases on a time budget: elapsed time).
        progress = elapsed / budget_s if (budget_s > 0 and not plan.named) else (step - start) / phase.steps
        lr = lr_at(progress, step - start, phase.cfg)
        loss_sum, n_tokens, grad_norm = _train_step(setup, phase, trainee, step - start, lr, grad_accum)
        step += 1
        tokens_seen += tokens_per_step

        phase_done = step >= plan.end(phase)
        if cfg.eval_every and ((step - start) % cfg.eval_every == 0 or phase_done):
            with sink.paused():
                val_loss, val_step = _evaluate(setup, phase, trainee), step
            # Ranks decide together (their val losses agree; an all-reduce makes sure the plans do too).
            if phase.patience and ddp.any(plan.patience_used_up(phase, val_loss)) and step < plan.end(phase):
                plan.ended_early[phase.name] = step
                if ddp.main:
                    log(f"phase {phase.name}: no better val loss in {phase.patience} validations; "
                        f"it ends at step {step}")
        is_last = step >= plan.total
        if step % cfg.log_every == 0 or is_last:
            last_loss = ddp.sum(loss_sum).item() / n_tokens.item()       # every rank: an all-reduce
            record = {"step": step, "train_loss": last_loss, "tokens": tokens_seen, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None}
            if plan.named:
                record["phase"] = phase.name
            sink.write(record, val_loss if val_step == step else None)
        # A phase's end is always saved (and kept by pruning): the weights a user specialises from.
        due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (plan.named and step == plan.end(phase))
        if due and not is_last and (ddp.main or trainee.fsdp):
            with sink.paused():
                _save(setup, trainee, step, clock.elapsed(), tokens_seen, plan)
        if stop_after_steps is not None and step - trainee.start_step >= stop_after_steps:
            break

    # The final figure and checkpoint (FSDP: every rank takes part in the forward and the gather).
    elapsed = clock.elapsed()
    if ddp.main or trainee.fsdp:
        if val_step != step:
            val_loss = _evaluate(setup, plan.current(step), trainee)
        elapsed = clock.elapsed()
        _save(setup, trainee, step, elapsed, tokens_seen, plan)
    sink.close()
    if ddp.main:
        log(f"trained to step {step}: train loss {last_loss:.4f}, val loss {val_loss:.4f}, "
            f"{tokens_seen / 1e6:.2f}M tokens in {elapsed / 60:.1f} min; {sink.summary()}")
    # Free the model, optimizer and data while the process group is alive: under gloo, FSDP2 keeps its
    # collectives' Work objects (and their tensors) with the model, and freeing them at interpreter exit,
    # after the group is gone, aborted rank 1 ("terminate called without an active exception").
    del trainee, data, sink, plan
    gc.collect()
    ddp.close()
    return {"step": step, "train_loss": last_loss, "val_loss": val_loss, "tokens": tokens_seen}


# ---------------------------------------------------------------- set-up

@dataclass
class Setup:
    """Where and how this process trains."""
    cfg: TrainConfig
    run: Path
    ddp: Distributed
    device: torch.device
    autocast: object             # bf16 autocast (train.precision), else a no-op context


# What a killed train can leave in RUN: nichelm.io.atomic_file's temporary files (.NAME.XXXXXXXX.tmp) for
# the files train rewrites. Checkpoint staging folders are cleaned by the next save (checkpoint.py).
_STALE_TEMP = re.compile(r"\.(metrics\.jsonl|model_config\.json)\.[a-z0-9_]{8}\.tmp")


def _set_up(project: Project) -> Setup:
    cfg, run = project.train, project.run_path
    tok_path = run / "tokenizer" / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{tok_path}: no tokenizer; run `nichelm prepare {project.source_file}` first")
    ddp = Distributed(cfg.device)
    device = pick_device(cfg.device)
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if ddp.main:
        remove_stale_temp_files(run)
    return Setup(cfg=cfg, run=run, ddp=ddp, device=device, autocast=training_autocast(cfg.precision, device))


def training_autocast(precision: str, device: torch.device):
    """bf16 autocast where train.precision asks for it ("auto": on CUDA only; a CPU run stays fp32 and
    bit-reproducible unless the project says "bf16"), else a no-op context."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def remove_stale_temp_files(run: Path) -> None:
    """Delete the temporary files a train killed mid-write left beside metrics.jsonl / model_config.json
    (only those: another command, e.g. evaluate, may be writing its own in RUN at this moment)."""
    if run.is_dir():
        for path in run.iterdir():
            if _STALE_TEMP.fullmatch(path.name):
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------- data

@dataclass
class Data:
    model_config: ModelConfig    # its vocabulary is the tokenizer's, its block_size the row length
    vocab: dict[str, int]        # the tokenizer's: other data (phases) and init_from weights must share it
    grad_accum: int              # micro-batches per optimizer step
    tokens_per_step: int         # of the global step (all micro-batches, all ranks)
    plan: Plan                   # the phases: each its train batches (this rank's slice) and val batches

    @property
    def seq_len(self) -> int:
        return self.model_config.block_size

    def pop_load_seconds(self) -> float:
        return sum(phase.train.pop_load_seconds() for phase in self.plan.phases)


def step_batches(batches, step: int, grad_accum: int, batch_size: int, device: torch.device) -> list[tuple]:
    """This rank's micro-batches (x, y, mask) of optimizer step `step` (of the phase). The order is a function
    of the step alone, so a resumed run needs no saved position: it reads what the uninterrupted one would."""
    out = [batches.get(step, micro, grad_accum, batch_size) for micro in range(grad_accum)]
    if device.type == "cuda":              # pinned pages let the copies to the GPU run asynchronously
        out = [tuple(t.pin_memory() for t in b) for b in out]
    return out


def _load_data(project: Project, setup: Setup) -> Data:
    run, ddp, cfg = setup.run, setup.ddp, setup.cfg
    tokenizer = load_tokenizer(run / "tokenizer" / "tokenizer.json")
    ids = get_task(project.task).marker_ids(tokenizer)     # the loss mask is read off the task's markers
    mcfg = model_config(project, tokenizer.get_vocab_size())
    grad_accum = accumulation_steps(cfg, mcfg.block_size, ddp.world_size)
    tokens_per_step = cfg.batch_size * grad_accum * mcfg.block_size * ddp.world_size
    vocab = tokenizer.get_vocab(with_added_tokens=True)

    def split(data_dir: Path, name: str, seed: int, rank: int = 0, world_size: int = 1) -> TaskBatches:
        return TaskBatches(load_split(data_dir / "shards", name), mcfg.block_size, *ids, seed=seed, rank=rank,
                           world_size=world_size)

    if mcfg.projected is not None:   # a projected network: every phase mixes one data part per cluster
        k = mcfg.projected.clusters
        bad = [i for i, ph in enumerate(cfg.phases) if not (isinstance(ph.data, list) and len(ph.data) == k)]
        if not cfg.phases or bad:
            where = f"train.phases[{bad[0]}]" if bad else "[[train.phases]]"
            raise UserError(f"{project.source_file}: {where}: a projected network (model.projected, {k} clusters) "
                            f"trains on one data folder per cluster: give each phase data = [{k} folders, cluster "
                            "0 first] and weights (e.g. the clusters' generic shares)")
    if not cfg.phases:               # one unnamed phase: the project's own data for train.max_steps
        check_shards(run / "data")
        own = Phase(name="", steps=cfg.max_steps, cfg=cfg, describe="this project's data",
                    train=split(run / "data", "train", project.seed, ddp.rank, ddp.world_size),
                    val=split(run / "data", "val", project.seed))
        return Data(mcfg, vocab, grad_accum, tokens_per_step, Plan([own], named=False))
    phases = []
    for index, ph in enumerate(cfg.phases):
        where = f"{project.source_file}: train.phases[{index}] ({ph.name})"
        entries = ph.data if isinstance(ph.data, list) else [ph.data]
        dirs = [phase_data_dir(project, entry, where, vocab) for entry in entries]
        # Phase i shuffles its rows with seed + i: a phase on the same data as an earlier one sees a new order.
        seed = project.seed + index
        if len(dirs) == 1:
            batches = split(dirs[0], "train", seed, ddp.rank, ddp.world_size)
        else:
            weights = ph.weights
            counts = mix_counts(weights, grad_accum * cfg.batch_size * ddp.world_size)
            if 0 in counts:
                k = counts.index(0)
                raise UserError(f"{where}: weights[{k}] = {weights[k]} is less than one of the {sum(counts)} rows of "
                                "a step; raise that share, or train.batch_size / train.grad_accum")
            batches = MixedBatches([split(d, "train", seed) for d in dirs], weights, seed, ddp.rank, ddp.world_size)
        steps = ph.steps or -(-ph.tokens // tokens_per_step)            # tokens: whole steps, rounded up
        pcfg = dataclasses.replace(
            cfg, lr=ph.lr or cfg.lr, schedule=ph.schedule or cfg.schedule,
            warmup_steps=cfg.warmup_steps if ph.warmup_steps < 0 else ph.warmup_steps,
            min_lr_ratio=cfg.min_lr_ratio if ph.min_lr_ratio < 0 else ph.min_lr_ratio,
            decay_fraction=ph.decay_fraction or cfg.decay_fraction)
        describe = " + ".join((entry or "this project's data") + (f" ({counts[k]} rows/step)" if len(dirs) > 1 else "")
                              for k, entry in enumerate(entries))
        # a projected network validates every cluster's val split with that cluster's expert (part k = cluster k)
        by_cluster = [split(d, "val", seed) for d in dirs] if mcfg.projected is not None else None
        phases.append(Phase(name=ph.name, steps=steps, cfg=pcfg, train=batches,
                            val=by_cluster[0] if by_cluster else split(dirs[0], "val", seed),
                            val_by_cluster=by_cluster, patience=ph.patience, describe=describe))
    return Data(mcfg, vocab, grad_accum, tokens_per_step, Plan(phases, named=True))


def phase_data_dir(project: Project, entry: str, where: str, vocab: dict[str, int]) -> Path:
    """The prepared data folder a phase's data entry names ("" = the project's own), checked: its shards as
    prepare wrote them, and prepared with this run's tokenizer (token ids must mean the same)."""
    if entry == "":
        folder = project.run_path / "data"
    else:
        given = project.resolve(entry)
        folder = given / "data" if (given / "data" / "shards").is_dir() else given
        if not (folder / "shards").is_dir():
            raise UserError(f"{where}: data {entry!r}: {str(given)!r} holds neither data/shards/ (a prepared run) "
                            "nor shards/ (a data folder); run `nichelm prepare` for that project or fix the path")
        tokenizer = folder.parent / "tokenizer" / "tokenizer.json"
        differs = vocab_difference(vocab, load_tokenizer(tokenizer).get_vocab(with_added_tokens=True))
        if differs:
            raise UserError(f"{where}: data {entry!r} was prepared with another tokenizer ({tokenizer}: {differs}); "
                            "prepare one project with tokenizer.from = the other's run folder")
    check_shards(folder)
    return folder


def vocab_difference(ours: dict[str, int], theirs: dict[str, int]) -> str | None:
    """None if two vocabularies give every token the same id; else the first difference, in words."""
    if len(ours) != len(theirs):
        return f"{len(theirs)} tokens, this run's has {len(ours)}"
    for token, i in sorted(ours.items(), key=lambda kv: kv[1]):
        if theirs.get(token) != i:
            return f"token {token!r} is id {theirs.get(token)}, in this run's id {i}"
    return None


# ---------------------------------------------------------------- phases

@dataclass(eq=False)
class Phase:
    """A stretch of training: its batches, its planned length, its lr schedule (train's config with the
    phase's lr keys). A run without [[train.phases]] is one unnamed phase of train.max_steps."""
    name: str
    steps: int                   # planned length in optimizer steps
    cfg: TrainConfig             # lr, schedule, warmup_steps, min_lr_ratio, decay_fraction of this phase
    train: TaskBatches | MixedBatches
    val: TaskBatches             # the val split of the phase's (first) data: validation and early stopping
    val_by_cluster: list[TaskBatches] | None = None   # a projected network: each cluster's val split; the val
                                                      # loss is their mean, each run with its cluster's expert
    describe: str = ""           # its data, for the log
    patience: int = 0            # validations without a new best before the phase ends early; 0 = never


class Plan:
    """The phases in order. A phase ends after its steps, or at the step where early stopping ended it
    (`ended_early`, saved in every checkpoint with the early-stopping counters): so which phase a step
    belongs to, and the step within it, is a function of the step and that record, and a run resumed
    anywhere (across a boundary too) goes on exactly as an uninterrupted one."""

    def __init__(self, phases: list[Phase], named: bool):
        self.phases, self.named = phases, named
        self.ended_early: dict[str, int] = {}    # phase name -> the step it ended at
        self.best: dict[str, float] = {}         # phase name -> its best val loss so far
        self.since_best: dict[str, int] = {}     # phase name -> validations since that best

    def _bounds(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for phase in self.phases:
            end = self.ended_early.get(phase.name, start + phase.steps)
            out.append((start, end))
            start = end
        return out

    def start(self, phase: Phase) -> int:
        return self._bounds()[self.phases.index(phase)][0]

    def end(self, phase: Phase) -> int:
        return self._bounds()[self.phases.index(phase)][1]

    @property
    def total(self) -> int:
        return self._bounds()[-1][1]

    def at(self, step: int) -> Phase | None:
        """The phase that optimizer step `step` (0-based: the step about to run) belongs to; None past the end."""
        for phase, (start, end) in zip(self.phases, self._bounds()):
            if start <= step < end:
                return phase
        return None

    def current(self, step: int) -> Phase:
        """The phase of step `step`, or the last one when the run is over (its val split is the final figure)."""
        return self.at(step) or self.phases[-1]

    def patience_used_up(self, phase: Phase, val_loss: float) -> bool:
        """Count a validation of `phase`; True once `patience` of them in a row brought no new best."""
        if phase.name not in self.best or val_loss < self.best[phase.name]:
            self.best[phase.name], self.since_best[phase.name] = val_loss, 0
            return False
        self.since_best[phase.name] = self.since_best.get(phase.name, 0) + 1
        return self.since_best[phase.name] >= phase.patience

    def state(self) -> dict:
        """What a checkpoint keeps (trainer.json "phases")."""
        return {"ended_early": self.ended_early, "best_val": self.best, "since_best": self.since_best}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.ended_early = {k: int(v) for k, v in state.get("ended_early", {}).items()}
        self.best = {k: float(v) for k, v in state.get("best_val", {}).items()}
        self.since_best = {k: int(v) for k, v in state.get("since_best", {}).items()}


# ---------------------------------------------------------------- model and resume

@dataclass
class Trainee:
    """The model being trained and where it starts from."""
    raw_model: GPT               # the module itself: checkpoints, validation, FLOPs
    model: torch.nn.Module       # what a step calls: raw_model compiled and/or wrapped in DDP
    optimizer: Optimizers
    fsdp: bool
    start_step: int = 0          # from the checkpoint; 0 for a new run
    elapsed_before: float = 0.0  # seconds trained by earlier runs
    tokens_seen: int = 0
    phase_state: dict | None = None   # the checkpoint's early-stopping record (Plan.state)


def _build_model(project: Project, setup: Setup, data: Data) -> Trainee:
    """A seeded model, then the newest complete checkpoint (weights, optimizer, RNG) if there is one;
    else train.init_from's weights if set (with a fresh optimizer)."""
    cfg, ddp, device, mcfg = setup.cfg, setup.ddp, setup.device, data.model_config
    torch.manual_seed(project.seed)
    model = GPT(mcfg).to(device)
    ckpt = latest_checkpoint(setup.run)
    if ckpt is None and cfg.init_from:
        source = load_init_weights(project, model, data.vocab)
        if ddp.main:
            log(f"starting from the weights of {source} (train.init_from), with a fresh optimizer")
    fsdp = ddp.enabled and cfg.parallel == "fsdp"
    if fsdp:
        if ckpt is not None:           # checkpoints hold whole weights: load them, then shard
            load_model_weights(model, ckpt / "model.safetensors")
        shard_model(model, device)
    optimizer = make_optimizer(model, cfg, device)     # after sharding: it steps the shards
    trainee = Trainee(raw_model=model, model=model, optimizer=optimizer, fsdp=fsdp)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, weights=not fsdp)
        trainee.start_step, trainee.elapsed_before = state["step"], state["elapsed_s"]
        trainee.tokens_seen, trainee.phase_state = state["tokens"], state.get("phases")
        if ddp.main:
            log(f"resuming from {ckpt} (step {trainee.start_step})")
    else:
        # The RNG (dropout) continues from the checkpoint when resuming; ranks draw differently.
        torch.manual_seed(project.seed + ddp.rank)
    if ddp.main:
        atomic_write_text(setup.run / "model_config.json", json.dumps(mcfg.to_dict(), indent=2) + "\n")

    if cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda"):
        from torch import _dynamo
        _dynamo.config.suppress_errors = True         # a machine without a working compiler falls back to eager
        trainee.model = torch.compile(trainee.model)
    if ddp.enabled and not fsdp:
        trainee.model = torch.nn.parallel.DistributedDataParallel(
            trainee.model, device_ids=[device.index] if device.type == "cuda" else None)
    return trainee


def load_init_weights(project: Project, model: GPT, vocab: dict[str, int]) -> Path:
    """train.init_from's weights into `model`: a run folder's newest complete checkpoint, or an hf export
    folder's model.safetensors. The source's model shape (dropout aside) and tokenizer must be this run's."""
    given = project.resolve(project.train.init_from)
    where = f"{project.source_file}: 'train.init_from' = {str(given)!r}"
    from nichelm.artifacts import NICHELM_JSON, is_export
    from nichelm.convert import from_hf
    try:
        if is_export(given):
            theirs = ModelConfig(**json.loads((given / NICHELM_JSON).read_text(encoding="utf-8"))["model_config"])
            tokenizer, weights = given / "tokenizer.json", given / "model.safetensors"
        elif (given / "checkpoints").is_dir() or (given / MARKER).is_file():
            # a run folder (its newest checkpoint), or one checkpoint of a run (e.g. a phase end): RUN/checkpoints/step_N
            one = not (given / "checkpoints").is_dir()
            ckpt = given if one else latest_checkpoint(given)
            if ckpt is None:
                raise UserError(f"{where}: that run has no complete checkpoint yet; train it first")
            if one:
                check_checkpoint(ckpt)                      # latest_checkpoint checks the ones it returns
            run = given.parent.parent if one else given
            theirs = ModelConfig(**read_trainer_state(ckpt)["model_config"])
            tokenizer, weights = run / "tokenizer" / "tokenizer.json", ckpt / "model.safetensors"
        else:
            raise UserError(f"{where}: neither a run folder (with checkpoints/), a complete checkpoint folder, nor an "
                            f"hf export (with {NICHELM_JSON}); give one of those (`nichelm export --format hf` makes one)")
    except (OSError, ValueError, KeyError, TypeError) as e:       # unreadable json, a config of another version
        raise UserError(f"{where}: its model config is unreadable ({type(e).__name__}: {e}); "
                        "train or export it again") from None
    ours = model.cfg
    differ = [f"{f.name} {getattr(theirs, f.name)!r} there, {getattr(ours, f.name)!r} here"
              for f in dataclasses.fields(ModelConfig)
              if f.name != "dropout" and getattr(theirs, f.name) != getattr(ours, f.name)]
    if differ:
        raise UserError(f"{where}: its model is not this project's ({'; '.join(differ)}); set model.* (and the "
                        "tokenizer) as for that model, or leave train.init_from out")
    differs = vocab_difference(vocab, load_tokenizer(tokenizer).get_vocab(with_added_tokens=True))
    if differs:
        raise UserError(f"{where}: its tokenizer is not this run's ({tokenizer}: {differs}); prepare this project with "
                        f"tokenizer.from = {project.train.init_from!r}")
    if not is_export(given):
        load_model_weights(model, weights)
        return given
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        model.load_state_dict(from_hf(load_file(str(weights)), ours), strict=True)
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"{where}: {weights.name} does not hold this model's weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); export it again") from None
    return given


# ---------------------------------------------------------------- one step

def _train_step(setup: Setup, phase: Phase, trainee: Trainee, step: int, lr: float, grad_accum: int):
    """One optimizer step (step `step` of the phase) over grad_accum micro-batches. Returns (summed loss,
    output-token count of the global step, gradient norm or None), all left on the device: reading them back
    is the caller's choice."""
    cfg, ddp, device, model = setup.cfg, setup.ddp, setup.device, trainee.model
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    # Normalise by the output tokens of the whole global step (all micro-batches, all ranks), so
    # N processes x B rows compute exactly the loss and gradient of one process with N*B rows.
    batches = step_batches(phase.train, step, grad_accum, cfg.batch_size, device)
    # The masks are on the host; the global count stays a tensor (on the GPU under NCCL), read
    # back only when logging, so a step never waits for the device.
    n_tokens = ddp.sum(torch.tensor(float(sum(int(m.sum()) for _, _, m in batches)))).clamp(min=1.0)
    loss_sum = torch.zeros((), device=device)
    projected = trainee.raw_model.experts is not None
    for micro, batch in enumerate(batches):
        x, y, mask = (t.to(device, non_blocking=True) for t in batch)
        # a projected network: each row runs its cluster's expert (the phase's part k is cluster k)
        experts = {"cluster": torch.from_numpy(phase.train.parts_of(step, micro, grad_accum, cfg.batch_size))} \
            if projected else {}
        last_micro = micro == grad_accum - 1
        if trainee.fsdp:
            trainee.raw_model.set_requires_gradient_sync(last_micro)  # reduce-scatter once per step
        sync = model.no_sync() if (ddp.enabled and not trainee.fsdp and not last_micro) else nullcontext()
        with sync:
            with setup.autocast:
                _, loss = model(x, y, mask, reduction="sum", **experts)
            # DDP/FSDP average gradients over ranks; scale by world size so the result is a global-token mean.
            (loss * ddp.world_size / n_tokens).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens, grad_norm


# ---------------------------------------------------------------- metrics sink

class Clock:
    """Training time: what earlier runs spent (from the checkpoint) plus this run's wall time."""

    def __init__(self, before: float):
        self.before, self.start = before, time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (time.perf_counter() if now is None else now) - self.start


class MetricsSink:
    """Where logged steps go: RUN/metrics.jsonl (rank 0, one line per logged step), TensorBoard, and the
    progress bar or log line.

    tokens_per_s is over the wall time of the training steps since the last logged one, data loading
    included (data_s_per_step says how much of it); time inside paused() (validation, checkpoints) is
    left out. The ETA is over all this run's time so far, pauses included."""

    def __init__(self, setup: Setup, trainee: Trainee, data: Data, tokens_per_step: int, clock: Clock):
        cfg, device, run = setup.cfg, setup.device, setup.run
        self.cfg, self.main, self.clock, self.data = cfg, setup.ddp.main, clock, data
        self.world_size, self.tokens_per_step = setup.ddp.world_size, tokens_per_step
        self.start_step = trainee.start_step
        self.total_steps = data.plan.total                         # ends earlier if a phase stops early
        self.flops_per_step = trainee.raw_model.flops_per_token(data.seq_len) * tokens_per_step
        self.peak = next((v for k, v in PEAK_FLOPS.items()
                          if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
        self.file = self.board = self.progress = None
        if self.main:
            _truncate_metrics(run / "metrics.jsonl", trainee.start_step)    # every step appears once
            self.file = open(run / "metrics.jsonl", "a")
            self.board = _tensorboard(run) if cfg.tensorboard else None
            self.progress = _progress(lambda: self.total_steps, trainee.start_step)
        self.t_last = self.t_start = time.perf_counter()
        self.last_step, self.paused_s = trainee.start_step, 0.0    # since the last logged step
        self.train_s, self.steps_timed = 0.0, 0                    # over this whole run, for the summary

    @contextmanager
    def paused(self):
        """Time spent inside is not training time (validation, checkpoints)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def write(self, record: dict, val_loss: float | None) -> None:
        """Complete a logged step's record with timings, and send it everywhere it goes."""
        now, step = time.perf_counter(), record["step"]
        self.total_steps = self.data.plan.total
        steps = step - self.last_step
        window = now - self.t_last - self.paused_s                    # seconds of training steps
        dt = window / steps
        data_dt = self.data.pop_load_seconds() / steps          # of which reading batches
        self.train_s, self.steps_timed = self.train_s + window, self.steps_timed + steps
        self.t_last, self.last_step, self.paused_s = now, step, 0.0
        mfu = self.flops_per_step / dt / self.peak / self.world_size if (self.peak and dt > 0) else None
        record.update({"tokens_per_s": self.tokens_per_step / dt if dt > 0 else None,
                       "data_s_per_step": round(data_dt, 6), "mfu": mfu,
                       "elapsed_s": round(self.clock.elapsed(now), 3)})
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board:
            for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if record.get(key) is not None:
                    self.board.add_scalar(key, record[key], step)
        if self.progress:
            self.progress(step, record, self.eta_s(step, now))

    def eta_s(self, step: int, now: float) -> float | None:
        """Seconds to the end at this run's pace so far (validation and checkpoints included), or to the
        end of train.max_minutes if that comes first."""
        done = step - self.start_step
        if done <= 0:
            return None
        eta = (self.total_steps - step) * (now - self.t_start) / done
        if self.cfg.max_minutes > 0:
            eta = min(eta, max(self.cfg.max_minutes * 60 - self.clock.elapsed(now), 0.0))
        return eta

    def summary(self) -> str:
        """This run's training throughput, for the last log line."""
        if self.train_s <= 0:
            return "no step timed"
        return f"{self.tokens_per_step * self.steps_timed / self.train_s:.0f} tok/s incl. data loading"

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


# ---------------------------------------------------------------- validation and checkpoints

def _evaluate(setup: Setup, phase: Phase, trainee: Trainee) -> float:
    if phase.val_by_cluster:
        losses = [evaluate_loss(trainee.raw_model, val, setup.cfg, setup.device, setup.autocast, cluster=c)
                  for c, val in enumerate(phase.val_by_cluster)]
        return sum(losses) / len(losses)
    return evaluate_loss(trainee.raw_model, phase.val, setup.cfg, setup.device, setup.autocast)


def _save(setup: Setup, trainee: Trainee, step: int, elapsed: float, tokens: int, plan: Plan) -> None:
    """A checkpoint of step `step`. Under FSDP every rank gathers the weights; rank 0 writes."""
    model = trainee.raw_model
    state = {"step": step, "elapsed_s": elapsed, "tokens": tokens, "model_config": model.cfg.to_dict()}
    if plan.named:
        state["phases"] = plan.state()              # early stopping's record: resuming needs it
        ended = next((p.name for p in plan.phases[:-1] if plan.end(p) == step), None)
        if ended is not None:
            state["phase_end"] = ended              # checkpoint pruning never deletes this one
    save_checkpoint(setup.run, step, model, trainee.optimizer, state,
                    keep=setup.cfg.keep_checkpoints, write=setup.ddp.main)


# ---------------------------------------------------------------- building blocks

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use --set train.device=cpu")
    return torch.device(name)


def lr_at(progress: float, step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then decay to lr * min_lr_ratio as progress goes 0 -> 1.

    cosine: the whole run decays. wsd (warmup-stable-decay): constant, then a linear decay over
    the last decay_fraction of the run, so a run can be extended before its decay starts.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if getattr(cfg, "schedule", "cosine") == "wsd":
        start = 1.0 - cfg.decay_fraction
        return cfg.lr if progress < start else cfg.lr - (cfg.lr - floor) * (progress - start) / cfg.decay_fraction
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> Optimizers:
    """AdamW with weight decay on matrices only; or Muon on the blocks' matrices (as in modded-nanogpt)
    with AdamW on embeddings, head, norms and biases."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
    use_muon = getattr(cfg, "optimizer", "adamw") == "muon"
    muon_ids = {id(p) for p in hidden} if use_muon else set()
    decay = [p for _, p in params if p.dim() >= 2 and id(p) not in muon_ids]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sharded = any(hasattr(p, "device_mesh") for _, p in params)       # FSDP2 shards: the foreach kernels
    opts = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              fused=device.type == "cuda" and not sharded)]
    if use_muon:
        # match_rms_adamw scales Muon's update to AdamW's RMS, so one lr schedule serves both.
        opts.insert(0, torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        adjust_lr_fn="match_rms_adamw"))
    return Optimizers(opts)


def accumulation_steps(cfg, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step: train.grad_accum, or enough to reach train.batch_tokens."""
    if cfg.batch_tokens <= 0:
        return cfg.grad_accum
    per_micro = cfg.batch_size * seq_len * world_size
    if cfg.batch_tokens % per_micro:
        raise UserError(f"train.batch_tokens = {cfg.batch_tokens} is not a multiple of batch_size x block_size x "
                        f"processes = {per_micro}; pick a multiple, e.g. {per_micro * max(1, cfg.batch_tokens // per_micro)}")
    return cfg.batch_tokens // per_micro


class Distributed:
    """Rank/world from torchrun's environment; a no-op for a single process."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if (device_name != "cpu" and torch.cuda.is_available()) else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduced sum; under NCCL a CUDA tensor, and the host does not wait for it."""
        if self.enabled:
            if dist.get_backend() == "nccl":         # a pinned copy does not make the host wait for the GPU
                value = value.pin_memory().cuda(non_blocking=True)
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        value = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self):
        """At the normal end of training (every rank gets here): wait for every rank, then tear down. Without
        the barrier a rank could tear down while rank 0 still writes the checkpoint (seen once under gloo:
        'terminate called without an active exception' on rank 1)."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def check_shards(data_dir: Path) -> None:
    """Every shard the manifest lists is there with the sha256 prepare recorded (manifests written
    before checksums existed list none): a shard damaged on disk stops training with one line."""
    manifest = data_dir / "manifest.json"
    if not manifest.exists():                     # shards made by hand, not by prepare: nothing recorded
        return
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("shard_sha256", {})
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{manifest}: unreadable; re-run `nichelm prepare PROJECT --force`") from None
    from nichelm.prepare import file_sha256
    for name, digest in listed.items():
        path = data_dir / "shards" / name
        if not path.is_file() or file_sha256(path) != digest:
            raise UserError(f"{path}: missing, or changed since prepare wrote it (sha256 differs); "
                            "re-run `nichelm prepare PROJECT --force`")


def shard_model(model: GPT, device: torch.device) -> None:
    """FSDP2: each block, then the rest (embeddings, final norm, head; a tied head stays with its
    embedding), sharded across the ranks; on CUDA the shards compute in bf16 and reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@torch.no_grad()
def evaluate_loss(model, data: TaskBatches, cfg, device, autocast, cluster: int | None = None) -> float:
    """Mean loss over train.eval_batches fixed batches of `data`; cluster: the expert a projected network runs."""
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        x, y, mask = (t.to(device) for t in data.fixed(i, cfg.batch_size))
        with autocast:
            _, loss = model(x, y, mask, **({} if cluster is None else {"cluster": cluster}))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run / "tensorboard"))


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop lines logged after the checkpoint so every step appears once. A torn last
    line (the process died mid-write) is dropped too; a bad line before it is the user's to fix."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):          # JSONDecodeError is a ValueError
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a metrics record; delete that line (or the file) to resume") from None
        if step <= start_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _progress(total, start: int):
    """A tqdm bar on a terminal; a plain line every ~10 s otherwise. Its tokens/s include data loading.
    total() gives the run's length in steps (early stopping in a phase shortens it)."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total(), initial=start, unit="step", dynamic_ncols=True)

        def update(step, rec, eta_s):
            bar.n, bar.total = step, total()
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s_incl_data=f"{rec['tokens_per_s'] or 0:.0f}",
                            refresh=False)
            bar.refresh()
        return update
    last = [0.0]

    def update(step, rec, eta_s):
        if time.perf_counter() - last[0] >= 10 or step == total():
            last[0] = time.perf_counter()
            val = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            eta = f", ETA {eta_s / 60:.1f} min" if eta_s is not None and step < total() else ""
            phase = f" [{rec['phase']}]" if "phase" in rec else ""
            log(f"step {step}/{total()}{phase} loss {rec['train_loss']:.4f}{val} lr {rec['lr']:.2e} "
                f"{rec['tokens_per_s'] or 0:.0f} tok/s incl. data loading, {rec['elapsed_s'] / 60:.1f} min{eta}")
    return update
