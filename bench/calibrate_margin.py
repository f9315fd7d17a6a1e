"""Time `calibrate_margin` (evaluate's margin sweep) as the validation split grows.

    python bench/calibrate_margin.py [--docs 50] [--windows 40] [--big-chars 400000] [--seed 0]

Synthetic, CPU only, no model: each document is --windows windows of ~170 characters of random words
with OCR-like character errors; each window has a "model correction" that fixes or adds errors, and a
random gain. Rows: --docs documents and twice as many (the sweep should grow linearly with the windows),
then one document of half --big-chars characters and one of --big-chars (issue 17's val split held a
379k-character book, where the former sweep, re-scoring whole documents per gain, spent 25 minutes).
A single document's one alignment (reference_pieces) grows with its length times its errors, as the
document CER evaluate reports does. Prints one JSON object: seconds per row, windows, and seconds per
1,000 windows.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from nichelm.evaluate import calibrate_margin
from nichelm.inference import Correction

WORDS = "the of and to in that was his with for on had which by he as from be at this but were not".split()


def noisy(text: str, rng: random.Random, rate: float) -> str:
    return "".join(rng.choice("ceilo.,") if ch.isalpha() and rng.random() < rate else ch for ch in text)


def document(rng: random.Random, windows: int) -> tuple[dict, list]:
    pieces, gold, ocr = [], [], []
    for _ in range(windows):
        ref = " ".join(rng.choice(WORDS) for _ in range(40))[:170]
        src = noisy(ref, rng, 0.06)
        raw = ref if rng.random() < 0.7 else noisy(ref, rng, 0.1)          # a right or a wrong correction
        pieces.append((Correction(src, raw, "", src, rng.uniform(-1, 2), 0.5, 60), " "))
        gold.append(ref + " ")
        ocr.append(src + " ")
    return {"input": "".join(ocr), "output": "".join(gold)}, pieces


def timed(docs, fixed) -> dict:
    t0 = time.perf_counter()
    calibrate_margin(docs, fixed, 0.05)
    seconds = time.perf_counter() - t0
    windows = sum(len(p) for p in fixed)
    return {"documents": len(docs), "windows": windows, "characters": sum(len(d["output"]) for d in docs),
            "seconds": round(seconds, 3), "seconds_per_1000_windows": round(1000 * seconds / windows, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--big-chars", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    made = [document(rng, args.windows) for _ in range(2 * args.docs)]
    docs, fixed = [d for d, _ in made], [p for _, p in made]
    big = [document(rng, max(1, args.big_chars // 2 // 171)), document(rng, max(1, args.big_chars // 171))]
    rows = [timed(docs[:args.docs], fixed[:args.docs]), timed(docs, fixed)] + [timed([d], [p]) for d, p in big]
    print(json.dumps({"bench": "calibrate_margin", "rows": rows,
                      "growth_2x_windows": round(rows[1]["seconds"] / rows[0]["seconds"], 2),
                      "growth_2x_one_document": round(rows[3]["seconds"] / rows[2]["seconds"], 2)}, indent=1))


if __name__ == "__main__":
    main()
