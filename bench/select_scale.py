"""How `nichelm select` scales: peak memory (all its processes) and CPU seconds at 0.1 GB and 1 GB.

    python bench/select_scale.py [--sizes 0.1,1] [--methods dsir,clusters] [--out DIR] [--target health]
                                 [--workers N]

For each size it writes a generic corpus of that many bytes (one plain .jsonl file): the documents of
../shared/data/generic in a seeded shuffled order, repeated (each pass shuffled anew, ids made unique
with "#PASS") until the size is reached. The target is 2 MB of one domain's documents (--target),
taken from the shared corpus (they also occur in the generic corpus: this bench measures cost, not
quality). Each method then runs as `nichelm select PROJECT --force --workers N` (default 0: all cores;
dsir scores and clusters assigns on that many datatrove tasks) with `fraction = 0.1` and
the default fit_chars (50 MB), and the bench records the peak of the summed VmRSS of the process
and all its children (polled every 0.1 s, bench/prepare_scale.py's tree_rss_kb) and their CPU seconds.

Acceptance (issue 13, "Scale", the same rule as prepare): per method, peak at 1 GB <= 1.5 x the
peak at 0.1 GB, and < 4 GB. Skips with a reason when ../shared is absent. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_scale import run_measured  # noqa: E402
from select_reference import SHARED, skipped_without  # noqa: E402

TARGET_BYTES = 2_000_000
MAX_RATIO, MAX_MB = 1.5, 4096


def shared_documents(root: Path) -> list[dict]:
    docs = []
    for path in sorted(root.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


def write_generic(path: Path, docs: list[dict], size: int, seed: int = 0) -> dict:
    """Shuffled passes over docs, ids made unique per pass, up to `size` bytes of jsonl."""
    rng, written, n, passes = random.Random(seed), 0, 0, 0
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                d = docs[i]
                line = json.dumps({"id": f"{d['id']}#{passes}", "text": d["text"], "domain": d["domain"],
                                   "licence": d.get("licence", "")}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                n += 1
                if written >= size:
                    break
            passes += 1
    tmp.rename(path)
    return {"bytes": written, "documents": n, "passes": passes}


def write_project(folder: Path, method: str, generic: Path, target: Path) -> Path:
    proj = folder / "project.toml"
    proj.write_text(f'run_dir = "{folder / "run"}"\nseed = 1\n'
                    f'[[sources]]\nname = "web"\npath = "{generic}"\nformat = "jsonl"\nrole = "generic"\n'
                    'id_field = "id"\n'
                    f'[[sources]]\nname = "mine"\npath = "{target}"\nformat = "jsonl"\nrole = "target"\n'
                    f'[select]\nmethod = "{method}"\nfraction = 0.1\n')
    return proj


def run_select(proj: Path, workers: int = 0) -> dict:
    cmd = [sys.executable, "-m", "nichelm", "select", str(proj), "--force", "--workers", str(workers)]
    wall, cpu, peak_kb = run_measured(cmd, "select")
    report = json.loads((proj.parent / "run" / "select" / "selection.json").read_text())
    gen = report["generic"]
    return {"workers": workers, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "generic_documents": gen["documents"], "generic_mb": round(gen["chars"] / 1e6, 1),
            "fit_sample_documents": gen["fit_sample_documents"],
            "selected_documents": report["selected"]["documents"],
            "mb_per_cpu_s": round(gen["chars"] / 1e6 / max(cpu, 0.01), 2),
            "kl_reduction": report["kl"]["reduction"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,1", help="GB of generic text, comma-separated (default 0.1,1)")
    ap.add_argument("--methods", default="dsir,clusters")
    ap.add_argument("--target", default="health", help="the domain the target's 2 MB come from")
    ap.add_argument("--data", default=str(SHARED), help="the shared generic corpus folder")
    ap.add_argument("--out", default="", help="folder for the corpora and runs (default: a temporary one; "
                                               "corpora already there are reused)")
    ap.add_argument("--workers", type=int, default=0, help="nichelm select --workers (default 0: all cores)")
    args = ap.parse_args(argv)
    root = Path(args.data)
    skipped = skipped_without(root)
    if skipped:
        return skipped
    sizes = [float(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    out = Path(args.out or tempfile.mkdtemp(prefix="select_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    docs = shared_documents(root)
    target = out / "target.jsonl"
    if not target.is_file():
        with open(target, "w", encoding="utf-8") as f:
            size = 0
            for d in (d for d in docs if d["domain"] == args.target):
                f.write(json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n")
                size += len(d["text"].encode())
                if size >= TARGET_BYTES:
                    break
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
              "target": args.target, "corpora": {}, "runs": {m: [] for m in methods}}
    for gb in sizes:
        generic = out / f"generic_{gb:g}gb.jsonl"
        if not generic.is_file():
            result["corpora"][f"{gb:g}"] = write_generic(generic, docs, int(gb * 1e9))
        for method in methods:
            folder = out / f"{method}_{gb:g}gb"
            folder.mkdir(exist_ok=True)
            run = run_select(write_project(folder, method, generic, target), args.workers)
            result["runs"][method].append({"gb": gb, **run})
            print(json.dumps({"gb": gb, "method": method, **run}), file=sys.stderr, flush=True)
    del docs
    if len(sizes) > 1:
        result["acceptance"] = {}
        for method, runs in result["runs"].items():
            small, big = runs[0], runs[-1]
            ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
            result["acceptance"][method] = {"memory_ratio_big_vs_small": round(ratio, 3),
                                            "big_peak_mb": big["peak_rss_mb"],
                                            "passes": ratio <= MAX_RATIO and big["peak_rss_mb"] < MAX_MB}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
