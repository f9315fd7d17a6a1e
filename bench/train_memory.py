"""Peak memory of `nichelm train` over one split written as 1 shard and as N shards of the same tokens.

Usage: python bench/train_memory.py [--shards 30 --shard-tokens 2000000 --steps 20 --workdir DIR]
                                    [--compare-src OTHER_TREE/src]
The split is synthetic (random tokens laid out as examples: input marker, input, output marker,
output, end marker) and written twice: N shards of --shard-tokens each, and their concatenation as
1 shard. `nichelm train` runs on each as a fresh subprocess for --steps steps, starting cold (no
checkpoint, no cached index of example starts), and its peak RSS is read from os.wait4 (the child's
own ru_maxrss) by a small parent process of its own (see MEASURE). Criterion (issue 11): peak over N shards <= 1.2 x peak over 1 shard.
--compare-src runs the same two trainings with another source tree first on PYTHONPATH (e.g. an
older commit exported with `git archive`), to show what that code did on the same data.
Prints one JSON object.
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

import numpy as np

SENTENCE = "The committee met at the town hall on Monday evening to consider the new road number {i}."
# Linux counts in a child's ru_maxrss the memory of the process it was forked from, up to its exec:
# forked straight from this bench (which holds the synthetic split) every child would report the
# bench's size. So each `nichelm train` is started and waited for by a small Python of its own.
MEASURE = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=sys.stderr); "
           "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss); "
           "sys.exit(os.waitstatus_to_exitcode(status))")
PROJECT = """
run_dir = "{run}"
seed = 1
[task]
window_chars = 60
[[sources]]
name = "clean"
path = "clean"
format = "text"
role = "clean"
licence = "synthetic benchmark text"
[noise]
target_cer = 0.05
[split]
val_fraction = 0.1
test_fraction = 0.1
[tokenizer]
vocab_size = 320
[model]
preset = "nano"
n_layer = 1
n_embd = 32
block_size = 128
[train]
max_steps = {steps}
batch_size = 8
eval_every = 0
eval_batches = 2
warmup_steps = 2
threads = 1
"""


def synthetic_tokens(n: int, ids: tuple[int, int, int], vocab: int, seed: int) -> np.ndarray:
    """n tokens of back-to-back examples, 40-240 tokens each; the last one is cut at n."""
    input_id, output_id, end_id = ids
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n, dtype=np.int64)
    tokens[np.isin(tokens, ids)] = max(ids) + 1            # markers appear only where placed below
    lengths = rng.integers(40, 241, size=n // 40 + 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    inputs = (lengths - 3) // 2
    for positions, marker in ((starts, input_id), (starts + 1 + inputs, output_id), (starts + lengths - 1, end_id)):
        positions = positions[positions < n]
        tokens[positions] = marker
    return tokens.astype(np.uint16 if vocab <= 65535 else np.uint32)


def build(workdir: Path, shards: int, shard_tokens: int, steps: int) -> tuple[Path, dict[str, Path]]:
    """A project prepared on a small text, then its splits replaced by synthetic tokens: run_1 (one
    train shard) and run_N (N train shards) hold the same train tokens; run_small holds the first
    of the N shards only (a reference: memory should not grow with the split). Same val shard."""
    from nichelm.config import load_project
    from nichelm.data.shards import write_shard
    from nichelm.prepare import file_sha256
    from nichelm.data.tokenizer import load_tokenizer, template_markers
    from nichelm.prepare import prepare

    clean = workdir / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    for doc in range(12):
        (clean / f"doc{doc:02d}.txt").write_text("\n".join(SENTENCE.format(i=f"{doc}.{i}") for i in range(25)) + "\n")
    project_file = workdir / "project.toml"
    one = workdir / "run_1"
    project_file.write_text(PROJECT.format(run=one, steps=steps))
    project = load_project(project_file, [])
    prepare(project)
    tokenizer = load_tokenizer(one / "tokenizer" / "tokenizer.json")
    markers = (*template_markers(project.task.prompt_template), project.task.end_marker)
    ids = tuple(tokenizer.token_to_id(m) for m in markers)
    vocab = tokenizer.get_vocab_size()

    many, small = workdir / f"run_{shards}", workdir / "run_small"
    for run in (many, small):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(one, run)
    for run in (one, many, small):
        for old in (run / "data" / "shards").glob("*_*.*"):
            old.unlink()
        write_shard(run / "data" / "shards" / "val_000000.bin", synthetic_tokens(50_000, ids, vocab, seed=10**6), vocab)
    parts = []
    for k in range(shards):
        part = synthetic_tokens(shard_tokens, ids, vocab, seed=k)
        write_shard(many / "data" / "shards" / f"train_{k:06d}.bin", part, vocab)
        parts.append(part)
    write_shard(one / "data" / "shards" / "train_000000.bin", np.concatenate(parts), vocab)
    write_shard(small / "data" / "shards" / "train_000000.bin", parts[0], vocab)
    for run in (one, many, small):            # these shards are ours, not prepare's: record them as train checks
        manifest_path = run / "data" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["shard_sha256"] = {f.name: file_sha256(f) for f in sorted((run / "data" / "shards").glob("*.bin"))}
        manifest_path.write_text(json.dumps(manifest))
    return project_file, {"1_shard": one, f"{shards}_shards": many, "small_split": small}


def train_peak(project_file: Path, run: Path, steps: int, src: Path | None) -> dict:
    """Run `nichelm train` from scratch as one child process; its peak RSS and last metrics record."""
    shutil.rmtree(run / "checkpoints", ignore_errors=True)          # start cold: no checkpoint to resume,
    (run / "metrics.jsonl").unlink(missing_ok=True)
    for index in (run / "data" / "shards").glob("*.npy"):           # and no cached index of example starts
        index.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "nichelm", "train", str(project_file), "--set", f"run_dir={run}",
           "--set", f"train.max_steps={steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env)
    result = {"peak_rss_mb": round(int(proc.stdout.split()[-1]) / 1024, 1) if proc.stdout.strip() else None,
              "wall_s": round(time.perf_counter() - t0, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
        return result
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    result.update({k: last[k] for k in ("step", "tokens_per_s", "data_s_per_step") if k in last})
    return result


def compare(project_file: Path, runs: dict[str, Path], steps: int, src: Path | None) -> dict:
    """Peaks of the three runs; ratio = N shards / 1 shard (the criterion), ratio_to_small = 1 shard /
    the small split (how training memory grows with the split's size)."""
    out = {name: train_peak(project_file, run, steps, src) for name, run in runs.items()}
    one, many, small = (r["peak_rss_mb"] for r in out.values())      # in build()'s order
    out["ratio"] = round(many / one, 3) if one and many else None
    out["ratio_to_small"] = round(one / small, 3) if one and small else None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=30)
    ap.add_argument("--shard-tokens", type=int, default=2_000_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the runs (default: a temporary folder)")
    ap.add_argument("--compare-src", type=Path, default=None, help="another tree's src/ to run on the same data")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nichelm-train-memory-") as tmp:
        workdir = args.workdir or Path(tmp)
        project_file, runs = build(workdir, args.shards, args.shard_tokens, args.steps)
        train_tokens = args.shards * args.shard_tokens
        result = {"bench": "train_memory", "train_tokens": train_tokens,
                  "train_bytes_per_copy": sum(p.stat().st_size for p in (runs["1_shard"] / "data" / "shards").glob("train_*.bin")),
                  "shards": args.shards, "small_split_tokens": args.shard_tokens, "steps": args.steps,
                  "criterion": "ratio <= 1.2",
                  "nichelm": compare(project_file, runs, args.steps, None)}
        result["pass"] = result["nichelm"]["ratio"] is not None and result["nichelm"]["ratio"] <= 1.2
        if args.compare_src is not None:
            result["compare_src"] = {"src": str(args.compare_src),
                                     **compare(project_file, runs, args.steps, args.compare_src.resolve())}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
