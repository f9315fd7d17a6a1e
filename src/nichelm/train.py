"""The training loop: one process on CPU/GPU, or many under torchrun (DDP, or FSDP2 with
train.parallel = "fsdp").

Re-running the same command resumes from the newest complete checkpoint: model,
optimizer, step, elapsed time and RNG state come back, and the data order is a
function of the step, so the resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from nichelm.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from nichelm.config import Project, model_config
from nichelm.data.loader import TaskBatches
from nichelm.data.shards import load_split
from nichelm.data.tokenizer import load_tokenizer, template_markers
from nichelm.errors import UserError
from nichelm.io import atomic_write_text
from nichelm.model import GPT

# Peak dense bf16 FLOP/s for MFU, by device name fragment.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def train(project: Project, *, stop_after_steps: int | None = None) -> dict:
    """Train (or resume training) the project's model. Returns a summary dict."""
    cfg = project.train
    run = project.run_path
    shards = run / "data" / "shards"
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

    tokenizer = load_tokenizer(tok_path)
    input_marker, output_marker = template_markers(project.task.prompt_template)
    ids = [tokenizer.token_to_id(t) for t in (input_marker, output_marker, project.task.end_marker)]
    mcfg = model_config(project, tokenizer.get_vocab_size())
    seq_len = mcfg.block_size
    check_shards(run / "data")
    train_data = TaskBatches(load_split(shards, "train"), seq_len, *ids, seed=project.seed,
                             rank=ddp.rank, world_size=ddp.world_size)
    val_data = TaskBatches(load_split(shards, "val"), seq_len, *ids, seed=project.seed)

    torch.manual_seed(project.seed)
    model = GPT(mcfg).to(device)
    ckpt = latest_checkpoint(run)
    fsdp = ddp.enabled and cfg.parallel == "fsdp"
    if fsdp:
        if ckpt is not None:           # checkpoints hold whole weights: load them, then shard
            load_model_weights(model, ckpt / "model.safetensors")
        shard_model(model, device)
    optimizer = make_optimizer(model, cfg, device)     # after sharding: it steps the shards
    start_step, elapsed_before, tokens_seen = 0, 0.0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, weights=not fsdp)
        start_step, elapsed_before, tokens_seen = state["step"], state["elapsed_s"], state["tokens"]
        if ddp.main:
            log(f"resuming from {ckpt} (step {start_step})")
    # The RNG (dropout) continues from the checkpoint when resuming; ranks draw differently.
    if ckpt is None:
        torch.manual_seed(project.seed + ddp.rank)
    if ddp.main:
        _truncate_metrics(run / "metrics.jsonl", start_step)
        atomic_write_text(run / "model_config.json", json.dumps(mcfg.to_dict(), indent=2) + "\n")

    raw_model = model
    if cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda"):
        from torch import _dynamo
        _dynamo.config.suppress_errors = True         # a machine without a working compiler falls back to eager
        model = torch.compile(model)
    if ddp.enabled and not fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())

    grad_accum = accumulation_steps(cfg, seq_len, ddp.world_size)
    tokens_per_step = cfg.batch_size * grad_accum * seq_len * ddp.world_size
    flops_per_step = raw_model.flops_per_token(seq_len) * tokens_per_step
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    budget_s = cfg.max_minutes * 60
    metrics_file = open(run / "metrics.jsonl", "a") if ddp.main else None
    board = _tensorboard(run) if (cfg.tensorboard and ddp.main) else None
    progress_bar = _progress(cfg.max_steps, start_step) if ddp.main else None
    if ddp.main:
        log(f"model {mcfg.arch} {raw_model.num_params() / 1e6:.2f}M params, {mcfg.n_layer} layers, d={mcfg.n_embd}; "
            f"{tokens_per_step} tokens/step on {device} x{ddp.world_size}"
            + (f" ({'fsdp' if fsdp else 'ddp'})" if ddp.enabled else ""))

    step, t_start = start_step, time.perf_counter()
    last_loss, val_loss = float("nan"), None
    t_last, steps_since_log, eval_seconds = t_start, 0, 0.0   # tokens/s includes data loading, excludes validation
    while step < cfg.max_steps:
        elapsed = elapsed_before + (time.perf_counter() - t_start)
        # Ranks must agree on when to stop; asking them is a host sync, so ask every 10 steps.
        if budget_s > 0 and (not ddp.enabled or step % 10 == 0) and ddp.any(elapsed >= budget_s):
            break
        progress = elapsed / budget_s if budget_s > 0 else step / cfg.max_steps
        lr = lr_at(progress, step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Normalise by the output tokens of the whole global step (all micro-batches, all ranks), so
        # N processes x B rows compute exactly the loss and gradient of one process with N*B rows.
        batches = [train_data.get(step, micro, grad_accum, cfg.batch_size) for micro in range(grad_accum)]
        if device.type == "cuda":              # pinned pages let the copies below run asynchronously
            batches = [tuple(t.pin_memory() for t in b) for b in batches]
        # The masks are on the host; the global count stays a tensor (on the GPU under NCCL), read
        # back only when logging, so a step never waits for the device.
        n_tokens = ddp.sum(torch.tensor(float(sum(int(m.sum()) for _, _, m in batches)))).clamp(min=1.0)
        loss_sum = torch.zeros((), device=device)
        for micro, batch in enumerate(batches):
            x, y, mask = (t.to(device, non_blocking=True) for t in batch)
            last_micro = micro == grad_accum - 1
            if fsdp:
                raw_model.set_requires_gradient_sync(last_micro)  # reduce-scatter once per step
            sync = model.no_sync() if (ddp.enabled and not fsdp and not last_micro) else nullcontext()
            with sync:
                with autocast:
                    _, loss = model(x, y, mask, reduction="sum")
                # DDP/FSDP average gradients over ranks; scale by world size so the result is a global-token mean.
                (loss * ddp.world_size / n_tokens).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step

        is_last = step >= cfg.max_steps
        evaluated_now = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or is_last)
        if evaluated_now:
            t_eval = time.perf_counter()
            val_loss = evaluate_loss(raw_model, val_data, cfg, device, autocast)
            eval_seconds += time.perf_counter() - t_eval
        steps_since_log += 1
        if step % cfg.log_every == 0 or is_last:
            last_loss = ddp.sum(loss_sum).item() / n_tokens.item()
            now = time.perf_counter()
            dt = (now - t_last - eval_seconds) / steps_since_log        # seconds per training step
            data_dt = train_data.pop_load_seconds() / steps_since_log   # of which reading batches
            t_last, steps_since_log, eval_seconds = now, 0, 0.0
            record = {"step": step, "train_loss": last_loss, "tokens": tokens_seen, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
                      "data_s_per_step": round(data_dt, 6),
                      "mfu": (flops_per_step / dt / peak / ddp.world_size) if (peak and dt > 0) else None,
                      "elapsed_s": round(elapsed_before + now - t_start, 3)}
            if evaluated_now:
                record["val_loss"] = val_loss
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if board:
                for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    if record.get(key) is not None:
                        board.add_scalar(key, record[key], step)
            if progress_bar:
                progress_bar(step, record)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps and (ddp.main or fsdp):
            _save(run, step, raw_model, optimizer, elapsed_before + time.perf_counter() - t_start, tokens_seen, cfg,
                  write=ddp.main)
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            break

    if ddp.main or fsdp:                        # FSDP: every rank takes part in the forward and the gather
        if not (cfg.eval_every and val_loss is not None and step % cfg.eval_every == 0):
            val_loss = evaluate_loss(raw_model, val_data, cfg, device, autocast)   # the final figure
        elapsed = elapsed_before + time.perf_counter() - t_start
        _save(run, step, raw_model, optimizer, elapsed, tokens_seen, cfg, write=ddp.main)
    if ddp.main:
        if metrics_file:
            metrics_file.close()
        if board:
            board.close()
        log(f"trained to step {step}: train loss {last_loss:.4f}, val loss {val_loss:.4f}, "
            f"{tokens_seen / 1e6:.2f}M tokens in {elapsed / 60:.1f} min")
    ddp.close()
    return {"step": step, "train_loss": last_loss, "val_loss": val_loss, "tokens": tokens_seen}


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


def _save(run, step, model, optimizer, elapsed, tokens, cfg, write: bool = True):
    save_checkpoint(run, step, model, optimizer,
                    {"step": step, "elapsed_s": elapsed, "tokens": tokens, "model_config": model.cfg.to_dict()},
                    keep=cfg.keep_checkpoints, write=write)


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
def evaluate_loss(model, data: TaskBatches, cfg, device, autocast) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        x, y, mask = (t.to(device) for t in data.fixed(i, cfg.batch_size))
        with autocast:
            _, loss = model(x, y, mask)
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


def _progress(total: int, start: int):
    """A tqdm bar on a terminal; a plain line every ~10 s otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

        def update(step, rec):
            bar.n = step
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}", refresh=False)
            bar.refresh()
        return update
    last = [0.0]

    def update(step, rec):
        if time.perf_counter() - last[0] >= 10 or step == total:
            last[0] = time.perf_counter()
            val = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            log(f"step {step}/{total} loss {rec['train_loss']:.4f}{val} lr {rec['lr']:.2e} "
                f"{rec['tokens_per_s'] or 0:.0f} tok/s {rec['elapsed_s'] / 60:.1f} min")
    return update
