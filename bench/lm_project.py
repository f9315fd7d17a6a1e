"""The project file of one plain-text pre-training or fine-tuning run, shared by the benches that train many
small language models (select_pays.py, plan_early.py). nichelm.pilot writes its own (src does not import bench)."""

from __future__ import annotations

from pathlib import Path

PROJECT = """run_dir = "{run}"
seed = {seed}

[task]
type = "language-model"
window_chars = {window}

{sources}
[split]
val_fraction = {val}
test_fraction = 0.0

[tokenizer]
vocab_size = {vocab}
{tokenizer_from}
[model]
arch = "llama"
preset = "{preset}"
block_size = {block}
{projected}
[train]
max_steps = {steps}
batch_size = {batch}
lr = {lr}
warmup_steps = {warmup}
eval_every = {eval_every}
eval_batches = 4
log_every = {log_every}
device = "cpu"
threads = {threads}
compile = false
{train_extra}
{phases}"""


def lm_project_file(path: Path, run: Path, sources: str, *, seed: int, window: int, val: float, vocab: int,
                    preset: str, block: int, steps: int, batch: int, lr: float, threads: int, log_every: int = 50,
                    tokenizer_from: Path | None = None, init_from: Path | None = None, projected: str = "",
                    phases: str = "") -> Path:
    """Write one language-model project file (its relative source paths are read beside it), unless it already
    holds exactly this text (its mtime then stays)."""
    text = PROJECT.format(
        run=run, seed=seed, window=window, sources=sources, val=val, vocab=vocab,
        tokenizer_from=f'from = "{tokenizer_from}"\n' if tokenizer_from else "", preset=preset, block=block,
        projected=projected, steps=steps, batch=batch, lr=lr, warmup=max(1, steps // 10), eval_every=steps,
        log_every=log_every, threads=threads, train_extra=f'init_from = "{init_from}"\n' if init_from else "",
        phases=phases)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path
