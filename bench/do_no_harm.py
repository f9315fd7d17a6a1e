"""Do no harm: what the calibrated guard does on text the model was not trained on, and what it costs at home.

Usage: python bench/do_no_harm.py MODEL [--run RUN] [--bln600 CSV] [--icdar DIR] [--max-chars N] [--seed S]
       [--threads T] [--parts ood,clean,home] [--dtype auto|float32|bfloat16]

MODEL is a run directory or an export (its guard margin is the one `nichelm evaluate PROJECT` chose, read
from RUN/guard.json or the export's task.json); RUN gives the project's test split (default: MODEL).
Documents are drawn at random with --seed up to --max-chars characters per set, cut into windows as
`nichelm apply` cuts them, decoded once; the guard is then replayed at the stored margin and document
test ("guard") and with neither (the length cap alone, "no_margin": the guard as it was) from the same
decode.

Prints one JSON object with the command and, per part:
  ood:   real newspaper OCR of another domain (BLN600 train.csv documents; --icdar adds ICDAR 2017 English
         monographs): corpus CER before/after and the share of documents made worse.
         Acceptance: CER after <= CER before, worse share <= 5%.
  clean: clean text as input (BLN600's gold side; the run's own test documents' gold side, e.g. Bible
         verses): CER of the output against its input. Acceptance: <= 0.1%.
  home:  the run's test split: the share of the no-margin CER gain the guard keeps. Acceptance: >= 90%.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_OCR = ROOT.parent / "shared" / "data" / "ocr"


def sample(docs: list[dict], max_chars: int, seed: int) -> list[dict]:
    """Documents in a seeded random order until max_chars of input (at least one); in their own order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, chars = [], 0
    for i in order:
        if chosen and max_chars and chars + len(docs[i]["input"]) > max_chars:
            break
        chosen.append(i)
        chars += len(docs[i]["input"])
    return [docs[i] for i in sorted(chosen)]


def measure(corrector, docs: list[dict]) -> dict:
    """Corpus CER/WER and worse share at the corrector's margin, with no margin, and of the raw outputs."""
    from nichelm.evaluate import correct_pieces_of, guard_counts, score_corrections, stitch
    from nichelm.inference import NO_DOCUMENT_TESTS, NO_MARGIN
    t0 = time.perf_counter()
    fixed = correct_pieces_of(corrector, [d["input"] for d in docs])
    seconds = time.perf_counter() - t0
    margin, tests = corrector.guard_margin, corrector.document_tests
    out = {"documents": len(docs), "input_chars": sum(len(d["input"]) for d in docs), "seconds": round(seconds, 1)}
    for name, m, ts in (("guard", margin, tests), ("no_margin", NO_MARGIN, NO_DOCUMENT_TESTS),
                        ("unguarded", None, NO_DOCUMENT_TESTS)):
        s = score_corrections(docs, [stitch(p, m, ts) for p in fixed])
        if name == "guard":
            out.update({"cer_before": s["cer_before"], "wer_before": s["wer_before"]})
        out[name] = {"cer_after": s["cer_after"], "wer_after": s["wer_after"], "worse_share": s["worse_fraction"],
                     "better_share": s["better_fraction"]}
    out["guard"].update({k: v for k, v in guard_counts(fixed, margin, tests).items() if k != "windows"})
    out["windows"] = sum(len(p) for p in fixed)
    return out


def external_docs(path: Path, fmt: str) -> list[dict]:
    from nichelm.evaluate import read_external_examples
    return read_external_examples(path, fmt)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--run", help="run directory with the project's test split (default: MODEL)")
    ap.add_argument("--bln600", default=str(SHARED_OCR / "bln600" / "train.csv"))
    ap.add_argument("--icdar", default="", help="also ICDAR 2017 English monographs (the folder icdar2017-train)")
    ap.add_argument("--max-chars", type=int, default=100_000, help="characters of input per set (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--parts", default="ood,clean,home")
    ap.add_argument("--dtype", default="auto", help="the torch engine's dtype (nichelm.load): auto | float32 | "
                                                   "bfloat16 (the guard margin stays the stored one)")
    args = ap.parse_args(argv)
    import nichelm
    from nichelm.evaluate import project_documents
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    corrector = nichelm.load(args.model, batch_size=args.batch_size, dtype=args.dtype)
    result = {"command": "python bench/do_no_harm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model,
              "margin": None if corrector.guard_margin == float("-inf") else corrector.guard_margin,
              "margin_chosen_on": corrector.guard.get("chosen_on"), "max_change": corrector.guard_max_change,
              "passed_share": corrector.document_tests.passed_share,
              "min_chars_per_token": corrector.document_tests.min_chars_per_token,
              "seed": args.seed, "max_chars": args.max_chars, "threads": args.threads, "dtype": args.dtype}
    bln = Path(args.bln600)
    bln_docs = external_docs(bln, "bln600") if bln.is_file() and parts & {"ood", "clean"} else []
    if "ood" in parts:
        ood = {}
        if bln_docs:
            ood["bln600"] = measure(corrector, sample(bln_docs, args.max_chars, args.seed))
        if args.icdar:
            mono = _icdar_mono(Path(args.icdar))
            ood["icdar2017_eng_mono"] = measure(corrector, sample(mono, args.max_chars, args.seed))
        for figures in ood.values():
            figures["pass"] = (figures["guard"]["cer_after"] <= figures["cer_before"]
                               and figures["guard"]["worse_share"] <= 0.05)
        result["ood"] = ood
    if "clean" in parts:
        clean = {}
        if bln_docs:
            gold = [{**d, "input": d["output"]} for d in bln_docs]
            clean["bln600_gold"] = measure(corrector, sample(gold, args.max_chars, args.seed))
        run = Path(args.run or args.model)
        test = run / "data" / "examples.test.jsonl"
        if test.is_file():
            own = [{**d, "input": d["output"]} for d in project_documents(test)]
            clean["own_test_gold"] = measure(corrector, sample(own, args.max_chars, args.seed))
        for figures in clean.values():     # the reference is the input itself: CER after = CER against the input
            figures["cer_vs_input"] = figures["guard"]["cer_after"]
            figures["pass"] = figures["cer_vs_input"] <= 0.001
        result["clean"] = clean
    if "home" in parts:
        run = Path(args.run or args.model)
        test = run / "data" / "examples.test.jsonl"
        if test.is_file():
            home = measure(corrector, sample(project_documents(test), args.max_chars, args.seed))
            before = home["cer_before"]
            gain, gain_no_margin = before - home["guard"]["cer_after"], before - home["no_margin"]["cer_after"]
            home["gain_kept"] = gain / gain_no_margin if gain_no_margin > 0 else None
            home["pass"] = home["gain_kept"] is not None and home["gain_kept"] >= 0.9
            result["home"] = home
    return result


def _icdar_mono(folder: Path) -> list[dict]:
    """ICDAR 2017 English monographs: line N of EngMonoInput.txt pairs with line N of EngMonoGS.txt."""
    from nichelm.evaluate import read_external_examples
    return read_external_examples(folder / "EngMonoInput.txt", "icdar-lines", gold=folder / "EngMonoGS.txt")


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
