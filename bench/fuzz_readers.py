"""Fuzz every reader and the project-file parser at scale; prints one JSON object.

    python bench/fuzz_readers.py [--max-examples 10000] [--readers text,jsonl,...] [--seed 0]

The property (tests/fuzz_strategies.py, also run by tests/test_fuzz.py at 500 inputs per reader):
any generated input gives Documents (a Project, for "project") or a one-line UserError naming the
file and, where one line is at fault, the line; nothing else is raised and no input takes over
10 s. Per reader it reports the inputs checked, how many gave documents and how many a UserError,
the failures with the first few reproducers, the slowest input's seconds and the total seconds.
The exit status is 1 when any input failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the strategies live with the tests

from tests.fuzz_strategies import LIMIT_S, STRATEGIES, run_property  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=10_000, help="generated inputs per reader")
    ap.add_argument("--readers", default=",".join(STRATEGIES), help="comma-separated, from: " + ", ".join(STRATEGIES))
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same seed gives the same inputs)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.readers.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        ap.error(f"unknown reader(s) {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
    result = {"max_examples": args.max_examples, "seed": args.seed, "limit_s": LIMIT_S, "readers": {}}
    for name in names:
        stats = run_property(name, args.max_examples, collect=True, seed_value=args.seed)
        result["readers"][name] = {
            "inputs": stats.inputs, "documents": stats.documents, "user_errors": stats.user_errors,
            "failures": stats.failures, "reproducers": stats.reproducers,
            "slowest_s": round(stats.slowest_s, 3), "total_s": round(stats.total_s, 1),
        }
        print(f"{name}: {stats.inputs} inputs, {stats.failures} failures, {stats.total_s:.0f} s",
              file=sys.stderr, flush=True)
    result["failures"] = sum(r["failures"] for r in result["readers"].values())
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
