"""`nichelm evaluate`: the task metric on the held-out test split, before and after the model.

Corpus (micro) CER/WER: total edits over total reference characters/words, never an
average of per-example rates. Also the share of examples the model made worse and a
per-source breakdown. Writes RUN/eval/report.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.inference import Corrector
from nichelm.io import atomic_write_json
from nichelm.metrics import CorpusScore, char_distance, mark_changes


def read_examples(path: Path, limit: int = 0) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no test examples; run `nichelm prepare` first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def score_corrections(examples: list[dict], outputs: list[str], raw: list[str] | None = None) -> dict:
    before, after = CorpusScore(), CorpusScore()
    per_source: dict[str, tuple[CorpusScore, CorpusScore]] = defaultdict(lambda: (CorpusScore(), CorpusScore()))
    worse = better = 0
    for ex, out in zip(examples, outputs):
        ref = ex["output"]
        b, a = char_distance(ex["input"], ref), char_distance(out, ref)
        worse += a > b
        better += a < b
        before.add(ex["input"], ref)
        after.add(out, ref)
        sb, sa = per_source[ex.get("source", "?")]
        sb.add(ex["input"], ref)
        sa.add(out, ref)
    n = len(examples)
    return {
        "n_examples": n,
        "cer_before": before.cer, "cer_after": after.cer,
        "wer_before": before.wer, "wer_after": after.wer,
        "cer_ratio": after.cer / before.cer if before.cer else None,
        # ICDAR's relative improvement: share of the original errors removed.
        "relative_improvement": (before.cer - after.cer) / before.cer if before.cer else None,
        "worse_fraction": worse / n if n else 0.0,
        "better_fraction": better / n if n else 0.0,
        "gold_chars": before.chars,
        "per_source": {src: {"n_examples": sb.n, "cer_before": sb.cer, "cer_after": sa.cer,
                             "wer_before": sb.wer, "wer_after": sa.wer}
                       for src, (sb, sa) in sorted(per_source.items())},
    }


def evaluate_project(project: Project, device: str = "cpu") -> dict:
    run = project.run_path
    examples = read_examples(run / "data" / "examples.test.jsonl", project.eval.max_examples)
    if not examples:
        raise UserError(f"{run}/data/examples.test.jsonl is empty; raise split.test_fraction or add data")
    corrector = Corrector.from_run(run, device=device, batch_size=project.eval.batch_size,
                                   guard_max_change=project.eval.guard_max_change,
                                   max_new_tokens_ratio=project.eval.max_new_tokens_ratio)
    t0 = time.perf_counter()
    results = corrector.correct_windows([e["input"] for e in examples])
    seconds = time.perf_counter() - t0
    outputs = [r.text for r in results]
    report = score_corrections(examples, outputs)
    raw = score_corrections(examples, [r.raw for r in results])
    report.update({
        "cer_after_unguarded": raw["cer_after"], "wer_after_unguarded": raw["wer_after"],
        "worse_fraction_unguarded": raw["worse_fraction"],
        "guard": {"max_change": project.eval.guard_max_change,
                  "kept_too_different": corrector.stats.kept_too_different,
                  "kept_hit_limit": corrector.stats.kept_hit_limit},
        "seconds": seconds,
        "chars_per_s": sum(len(r.raw) for r in results) / seconds if seconds else None,
        "examples": [{"input": e["input"], "output": r.text, "reference": e["output"], "source": e.get("source"),
                      "kept_input": r.kept_input} for e, r in zip(examples[:50], results[:50])],
    })
    atomic_write_json(run / "eval" / "report.json", report)
    return report


def print_summary(report: dict, examples: int = 3, file=sys.stdout) -> None:
    print(f"\n{'':24}{'before':>10}{'after':>10}", file=file)
    print(f"{'CER (corpus)':24}{100 * report['cer_before']:>9.2f}%{100 * report['cer_after']:>9.2f}%", file=file)
    print(f"{'WER (corpus)':24}{100 * report['wer_before']:>9.2f}%{100 * report['wer_after']:>9.2f}%", file=file)
    ratio = report.get("cer_ratio")
    ratio_text = f"{ratio:.3f}" if ratio is not None else "n/a (no errors before)"
    print(f"examples: {report['n_examples']}, CER ratio after/before: {ratio_text}, "
          f"made worse: {100 * report['worse_fraction']:.1f}%, made better: {100 * report['better_fraction']:.1f}%",
          file=file)
    if "guard" in report:
        g = report["guard"]
        print(f"do-no-harm guard kept the input for {g['kept_too_different']} too-different and "
              f"{g['kept_hit_limit']} unfinished outputs (unguarded CER {100 * report['cer_after_unguarded']:.2f}%)",
              file=file)
    changed = [e for e in report.get("examples", []) if e["output"] != e["input"]]
    for e in changed[:examples]:
        print(f"\n  input:     {e['input']}", file=file)
        print(f"  corrected: {mark_changes(e['input'], e['output'])}", file=file)
        print(f"  reference: {e['reference']}", file=file)
