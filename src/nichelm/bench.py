"""`nichelm bench train`: training throughput of one model shape on random tokens.

Times whole optimizer steps (forward, backward, clip, AdamW) after warm-up steps, so
the figure is what a training run would see. Prints one JSON object.
"""

from __future__ import annotations

import time

import torch

from nichelm.model import GPT, PRESETS, ModelConfig
from nichelm.train import PEAK_FLOPS, make_optimizer, training_autocast


class _OptimizerSettings:
    lr, beta1, beta2, weight_decay = 3e-4, 0.9, 0.95, 0.1



def time_steps(one_step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` training steps after `warmup` untimed ones (the compile, the allocator).
    One loss is read at the end, so queued GPU work is inside the timing; peak memory counts from
    the first timed step."""
    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0

def bench_train(preset: str = "d6", arch: str = "gpt2", device: str = "cpu", steps: int = 10, warmup: int = 3,
                batch: int = 8, seq: int = 256, vocab: int = 50257, threads: int = 0, compile: bool = False,
                peak_tflops: float | None = None, precision: str = "auto", n_layer: int = 0, n_embd: int = 0,
                n_head: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    shape = {**PRESETS[preset], **{k: v for k, v in dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head).items() if v}}
    cfg = ModelConfig(arch=arch, vocab_size=vocab, block_size=seq, **shape)
    model = GPT(cfg).to(dev)
    optimizer = make_optimizer(model, _OptimizerSettings, dev)
    step_model = torch.compile(model) if compile else model
    autocast = training_autocast(precision, dev)         # as `nichelm train` runs train.precision
    x = torch.randint(0, vocab, (batch, seq), device=dev)
    y = torch.randint(0, vocab, (batch, seq), device=dev)

    def one_step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    seconds = time_steps(one_step, warmup, steps, dev)
    tokens_per_s = batch * seq * steps / seconds
    if peak_tflops is None and dev.type == "cuda":
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(dev)), None)
    else:
        peak = peak_tflops * 1e12 if peak_tflops else None
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": model.flops_per_token(seq) * tokens_per_s / peak if peak else None,
        "step_ms": 1000 * seconds / steps,
        "arch": arch, "preset": preset, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "seq_len": seq, "batch_size": batch, "vocab_size": vocab, "params": model.num_params(),
        "threads": torch.get_num_threads(), "device": str(dev), "compile": compile, "precision": precision, "steps": steps,
        "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
        "torch": torch.__version__,
    }
