"""Training tokens/s: nichelm's gpt2 model vs nanoGPT's model.py, same shape, batch, threads, AdamW.

Usage: python bench/train_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT [--preset d6 --batch 8 --seq 256 --threads 2]
nanoGPT is a separate checkout given by path (never vendored). The two runs alternate
(nanoGPT, nichelm, nanoGPT, nichelm, ...) so drift in machine load hits both alike;
the best round of each is reported. Prints one JSON object.
"""

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from nichelm.bench import bench_train, time_steps
from nichelm.model import PRESETS


def bench_nanogpt(path: Path, preset: str, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> dict:
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    mod = importlib.util.module_from_spec(spec)
    shape = PRESETS[preset]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):      # nanoGPT prints; keep stdout one JSON object
        spec.loader.exec_module(mod)
        model = mod.GPT(mod.GPTConfig(block_size=seq, vocab_size=vocab, n_layer=shape["n_layer"],
                                      n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=True))
        optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu")
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    def one_step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return {"tokens_per_s": batch * seq * steps / time_steps(one_step, warmup, steps, torch.device("cpu"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", required=True, type=Path, help="path to a nanoGPT checkout (its model.py)")
    ap.add_argument("--preset", default="d6")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(bench_nanogpt(args.nanogpt, args.preset, args.batch, args.seq, args.vocab,
                                    args.steps, args.warmup)["tokens_per_s"])
        r = bench_train(preset=args.preset, arch="gpt2", device="cpu", steps=args.steps, warmup=args.warmup,
                        batch=args.batch, seq=args.seq, vocab=args.vocab, threads=args.threads)
        ours.append(r["tokens_per_s"])
    print(json.dumps({"preset": args.preset, "n_layer": r["n_layer"], "n_head": r["n_head"], "n_embd": r["n_embd"],
                      "batch_size": args.batch, "seq_len": args.seq, "vocab_size": args.vocab,
                      "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
                      "nichelm_tokens_per_s": max(ours), "nanogpt_tokens_per_s": max(theirs),
                      "ratio": max(ours) / max(theirs), "nichelm_all": ours, "nanogpt_all": theirs,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    sys.exit(main())
