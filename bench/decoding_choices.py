"""Decoding choices on a project's held-out split: do-no-harm bound, greedy vs beam, window size.

Usage: python bench/decoding_choices.py PROJECT.toml [--set run_dir=...] [--split val|test] [--beam-examples 150]
       [--sizes 80,120,180,240] [--overlaps 0,20,40] [--parts guard,beam,windows] [--max-examples N]
Prints one JSON object:
  guard:   corpus CER, WER and worse share of the split's windows for several guard bounds, from one
           greedy decode (the guard only chooses between the model's output and the input);
  beam:    greedy vs beam search (4 beams) on the first N windows;
  windows: whole documents corrected with windows of --sizes characters and --overlaps characters of
           context each side (key "SIZE", or "SIZE+OVERLAP" for overlap > 0), with the project's guard bound.
"""

import argparse
import json
import time
from collections import defaultdict

import torch

from nichelm.config import load_project
from nichelm.evaluate import read_examples, score_corrections
from nichelm.inference import Corrector


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--beam-examples", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="val", choices=["val", "test"],
                    help="choose decoding settings on val; report test once they are chosen")
    ap.add_argument("--sizes", default="80,120,180,240", help="window sizes (characters) for the windows sweep")
    ap.add_argument("--overlaps", default="0", help="window overlaps (characters each side), e.g. 0,20,40")
    ap.add_argument("--parts", default="guard,beam,windows", help="which sweeps to run")
    ap.add_argument("--max-examples", type=int, default=0, help="only the first N windows of the split (smoke runs)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    project = load_project(args.project, args.set)
    examples = read_examples(project.run_path / "data" / f"examples.{args.split}.jsonl", args.max_examples)
    corrector = Corrector.from_run(project.run_path, guard_max_change=-1)
    out = {"run": str(project.run_path), "split": args.split, "n_examples": len(examples)}

    if parts & {"guard", "beam"}:
        guard_and_beam(corrector, examples, args.beam_examples, out, parts)
    if "windows" in parts:
        windows_sweep(corrector, project, examples, args, out)
    print(json.dumps(out, indent=1))


def guard_and_beam(corrector, examples, beam_examples, out, parts):
    t0 = time.perf_counter()
    results = corrector.correct_windows([e["input"] for e in examples])
    out["greedy_seconds"] = time.perf_counter() - t0
    guard = {}
    for bound in (-1, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        chosen = [r.raw if (not r.kept_input and (bound < 0 or _change(r.raw, e["input"]) <= bound)) else e["input"]
                  for r, e in zip(results, examples)]
        guard[str(bound)] = _summary(score_corrections(examples, chosen))
    out["guard"] = guard
    if "beam" not in parts:
        return

    subset = examples[:beam_examples]
    greedy = [r.raw if not r.kept_input else e["input"] for r, e in zip(results, subset)]
    corrector.beams = 4
    t0 = time.perf_counter()
    beam = [r.raw if not r.kept_input else e["input"] for r, e in
            zip(corrector.correct_windows([e["input"] for e in subset]), subset)]
    out["beam"] = {"n": len(subset), "greedy": _summary(score_corrections(subset, greedy)),
                   "beam4": _summary(score_corrections(subset, beam)), "beam4_seconds": time.perf_counter() - t0}
    corrector.beams = 1


def windows_sweep(corrector, project, examples, args, out):
    docs = defaultdict(list)
    for e in examples:
        docs[(e["source"], e["doc_id"])].append(e)
    documents = [{"input": " ".join(x["input"] for x in ws), "output": " ".join(x["output"] for x in ws),
                  "source": src} for (src, _), ws in docs.items()]
    windows = {}
    corrector.guard_max_change = project.eval.guard_max_change
    for size in (int(x) for x in args.sizes.split(",")):
        for overlap in (int(x) for x in args.overlaps.split(",")):
            corrector.window_chars, corrector.window_overlap = size, overlap
            t0 = time.perf_counter()
            outputs = corrector.correct([d["input"] for d in documents])
            windows[f"{size}+{overlap}" if overlap else str(size)] = {
                **_summary(score_corrections(documents, outputs)), "seconds": time.perf_counter() - t0}
    out["windows_guarded"] = {"guard": project.eval.guard_max_change, **windows}


def _change(a: str, b: str) -> float:
    from nichelm.metrics import char_distance
    return char_distance(a, b) / max(len(b), 1)


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("cer_before", "cer_after", "wer_before", "wer_after", "worse_fraction")}


if __name__ == "__main__":
    main()
