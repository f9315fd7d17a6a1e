"""`nichelm evaluate`: the task metric before and after the model.

Two entry points: `evaluate_project` scores the held-out test split of a project
(RUN/eval/report.json), `evaluate_external` scores any model (or the raw OCR
alone) on any pair set in a reader format, one whole document at a time
(OUT/report.json). Both write the same report keys and a self-contained
report.html beside the json.

Corpus (micro) CER/WER: total edits over total reference characters/words, never an
average of per-example rates. Also the share of examples the model made worse and a
per-source breakdown.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.inference import Corrector, cut_windows
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
                                   max_new_tokens_ratio=project.eval.max_new_tokens_ratio,
                                   beams=project.eval.beams, window_overlap=project.eval.window_overlap,
                                   draft_tokens=project.eval.draft_tokens)
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
    report["unit"] = "window"
    report["per_example"] = per_example_scores(examples, outputs)
    atomic_write_json(run / "eval" / "report.json", report)
    _write_html(report, run / "eval" / "report.html", run)
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


# --------------------------------------------------------------------------- any model, any pair set

# --format values: the reader format behind each, and its reader settings.
EXTERNAL_FORMATS = {
    "icdar": ("icdar", {}),
    "icdar-lines": ("icdar-lines", {}),
    "bln600": ("csv", {}),
    "csv": ("csv", {}),
    "jsonl": ("jsonl", {"input_field": "input", "output_field": "output"}),
}
KEPT_EXAMPLES = 5   # worst and best documents kept with their full text in report.json


def per_example_scores(examples: list[dict], outputs: list[str]) -> list[dict]:
    """Edits before/after for each example, so the report can show where the model helped or hurt."""
    rows = []
    for i, (ex, out) in enumerate(zip(examples, outputs)):
        ref = ex["output"]
        before = char_distance(ex["input"], ref)
        after = before if out == ex["input"] else char_distance(out, ref)
        chars = len(ref)
        rows.append({"id": ex.get("id", str(i)), "source": ex.get("source", "?"), "chars": chars,
                     "errors_before": before, "errors_after": after,
                     "cer_before": before / chars if chars else 0.0, "cer_after": after / chars if chars else 0.0})
    return rows


def guess_format(data: Path, gold: Path | None) -> str:
    """The --format a path most likely has, so the common cases need no flag."""
    name = data.name.removesuffix(".gz")
    if gold is not None:
        return "icdar-lines"
    if data.is_dir():
        return "icdar"
    if name.endswith(".csv"):
        return "bln600"
    if name.endswith(".jsonl"):
        return "jsonl"
    raise UserError(f"{data}: cannot tell the format from the name; give --format "
                    f"({'|'.join(EXTERNAL_FORMATS)})")


def data_name(data: Path) -> str:
    """A short folder-safe name for a data set: the folder name, or parent-stem for a file."""
    data = Path(data).resolve()
    if data.is_dir():
        name = data.name
    else:
        stem = data.name.removesuffix(".gz").rsplit(".", 1)[0]
        name = f"{data.parent.name}-{stem}" if data.parent.name else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def read_external_examples(data: Path, fmt: str, gold: Path | None = None, max_docs: int = 0) -> list[dict]:
    """One example per document: the concatenated OCR segments as input, the gold ones as output.

    Whole documents (not training windows) are the unit, as in the ICDAR and BLN600
    evaluations; the corrector cuts its own windows. `source` is the document's
    folder (ICDAR language/type folders) or the data set's name.
    """
    from nichelm.data.readers import read_documents
    if fmt not in EXTERNAL_FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use one of: {', '.join(EXTERNAL_FORMATS)}")
    if fmt == "icdar-lines" and gold is None:
        raise UserError(f"{data}: --format icdar-lines needs --gold GS_FILE (the gold file paired line by line)")
    if fmt != "icdar-lines" and gold is not None:
        raise UserError(f"{gold}: --gold is only read with --format icdar-lines; drop it or change --format")
    reader_fmt, options = EXTERNAL_FORMATS[fmt]
    docs = read_documents(Path(data), reader_fmt, gold_path=gold, **options)
    name = data_name(data)
    examples = []
    for doc in docs[:max_docs] if max_docs > 0 else docs:
        if any(s.input is None for s in doc.segments):
            where = f"line {doc.meta['line']}" if "line" in doc.meta else f"document {doc.doc_id}"
            raise UserError(f"{data}: {where} has no OCR side (no 'input' field); every pair needs input and output")
        folder = doc.meta.get("folder")
        examples.append({"id": doc.doc_id, "source": folder if folder not in (None, "", ".") else name,
                         "input": "".join(s.input for s in doc.segments),
                         "output": "".join(s.output for s in doc.segments)})
    return examples


def load_corrector(model: Path, device: str = "cpu", guard_max_change: float = 0.15, batch_size: int = 64,
                   window_overlap: int = 0):
    """A corrector for --model: `nichelm.load` when this nichelm has it (run, project file or export),
    else `Corrector.from_run` for a run directory."""
    import nichelm
    model = Path(model)
    if not model.exists():
        raise UserError(f"{model}: no such model; give --model a run directory or an export directory")
    load = getattr(nichelm, "load", None)
    if load is not None:
        return load(model, device=device, guard_max_change=guard_max_change, batch_size=batch_size,
                    window_overlap=window_overlap)
    if not (model / "checkpoints").is_dir():
        raise UserError(f"{model}: not a run directory (no checkpoints/); give --model a directory made by "
                        "`nichelm train`")
    return Corrector.from_run(model, device=device, guard_max_change=guard_max_change, batch_size=batch_size,
                              window_overlap=window_overlap)


def model_run_dir(model: Path | None) -> Path | None:
    """The run directory behind --model (a project file names its run_dir); its metrics.jsonl has the loss curves."""
    if model is None:
        return None
    model = Path(model)
    if model.is_file() and model.suffix == ".toml":
        from nichelm.config import load_project
        return load_project(model).run_path
    return model


def default_out_dir(model: Path | None, data: Path) -> Path:
    """RUN/eval/external/NAME beside the model, or ./eval-NAME when only the raw OCR is scored."""
    name = data_name(data)
    return Path(model) / "eval" / "external" / name if model is not None else Path(f"eval-{name}")


def evaluate_external(data: Path, fmt: str | None = None, *, model: Path | None = None, gold: Path | None = None,
                      out: Path | None = None, max_docs: int = 0, device: str = "cpu",
                      guard_max_change: float = 0.15, batch_size: int = 64,
                      window_overlap: int = 0) -> tuple[dict, Path]:
    """Score `model` (None: the raw OCR alone) on a pair set; write report.json and report.html into `out`.

    Returns (report, out). The report has the project evaluation's keys (the
    examples are whole documents, `unit` = "document") plus `per_example`,
    throughput and what was evaluated, so reports from both paths compare directly.
    """
    data = Path(data)
    gold = Path(gold) if gold is not None else None
    fmt = fmt or guess_format(data, gold)
    examples = read_external_examples(data, fmt, gold, max_docs)
    corrector = (load_corrector(model, device, guard_max_change, batch_size, window_overlap)
                 if model is not None else None)
    inputs = [e["input"] for e in examples]
    t0 = time.perf_counter()
    outputs, unguarded = correct_documents(corrector, inputs) if corrector else (inputs, inputs)
    seconds = time.perf_counter() - t0
    report = score_corrections(examples, outputs)
    if corrector is not None and unguarded is not outputs:
        raw = score_corrections(examples, unguarded)
        report.update({"cer_after_unguarded": raw["cer_after"], "wer_after_unguarded": raw["wer_after"],
                       "worse_fraction_unguarded": raw["worse_fraction"]})
    report["per_example"] = per_example_scores(examples, outputs)
    report.update(_run_facts(data, fmt, gold, model, corrector, examples, seconds))
    report["examples"] = _worst_and_best(examples, outputs, report["per_example"])
    run = model_run_dir(model)
    out = Path(out) if out is not None else default_out_dir(run, data)
    atomic_write_json(out / "report.json", report)
    _write_html(report, out / "report.html", run)
    return report, out


def correct_documents(corrector, texts: list[str]) -> tuple[list[str], list[str]]:
    """(guarded, unguarded) corrections of whole documents from one decoding pass.

    Same windows and stitching as Corrector.correct, but keeping both sides of the
    do-no-harm guard, so the report can say what the guard saved or cost. Any other
    corrector (e.g. from `nichelm.load`) only needs `correct(texts)`; then both are the same list.
    """
    if not hasattr(corrector, "correct_windows"):
        outputs = corrector.correct(texts)
        return outputs, outputs
    cut = [cut_windows(t, corrector.window_chars) for t in texts]
    fixed = iter(corrector.correct_pieces(cut))
    guarded, unguarded = [], []
    for pieces in cut:
        done = [(next(fixed), sep) for _, sep in pieces]
        guarded.append("".join(c.text + sep for c, sep in done))
        unguarded.append("".join(c.raw + sep for c, sep in done))
    return guarded, unguarded


def _run_facts(data, fmt, gold, model, corrector, examples, seconds) -> dict:
    """What was evaluated and how fast: enough to reproduce and compare a report."""
    chars = sum(len(e["input"]) for e in examples)
    facts = {
        "unit": "document", "n_documents": len(examples),
        "data": {"path": str(data), "format": fmt, "gold": str(gold) if gold else None, "name": data_name(data)},
        "model": str(model) if model is not None else None,
        "input_chars": chars,
        "seconds": seconds if corrector else None,
        "chars_per_s": chars / seconds if corrector and seconds else None,
        "docs_per_s": len(examples) / seconds if corrector and seconds else None,
    }
    stats = getattr(corrector, "stats", None)
    if stats is not None:
        facts["window_overlap"] = getattr(corrector, "window_overlap", 0)
        facts["guard"] = {"max_change": getattr(corrector, "guard_max_change", None), "windows": stats.windows,
                          "kept_too_different": stats.kept_too_different, "kept_hit_limit": stats.kept_hit_limit}
    return facts


def _worst_and_best(examples: list[dict], outputs: list[str], rows: list[dict]) -> list[dict]:
    """The documents the model hurt most and helped most (raw OCR only: highest and lowest CER), with text.

    Long documents are kept as aligned excerpts (report.excerpt); their scores are of the whole document.
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["cer_after"] - rows[i]["cer_before"],
                                                    rows[i]["cer_after"]), reverse=True)
    picked = order[:KEPT_EXAMPLES] + [i for i in order[::-1][:KEPT_EXAMPLES] if i not in order[:KEPT_EXAMPLES]]
    from nichelm.report import excerpt
    return [excerpt({"id": examples[i]["id"], "source": examples[i]["source"], "cer_before": rows[i]["cer_before"],
                     "cer_after": rows[i]["cer_after"], "input": examples[i]["input"], "output": outputs[i],
                     "reference": examples[i]["output"]}) for i in picked]


def print_external_summary(report: dict, out: Path, file=sys.stdout) -> None:
    """The headline figures, the per-source table and where the reports are."""
    print_summary(report, examples=0, file=file)
    if len(report["per_source"]) > 1:
        print(f"\n{'source':24}{'n':>6}{'CER before':>12}{'CER after':>12}", file=file)
        for src, s in report["per_source"].items():
            print(f"{src[:23]:24}{s['n_examples']:>6}{100 * s['cer_before']:>11.2f}%{100 * s['cer_after']:>11.2f}%",
                  file=file)
    if report.get("chars_per_s"):
        print(f"throughput: {report['chars_per_s']:.0f} chars/s, {report['docs_per_s']:.2f} docs/s "
              f"({report['seconds']:.1f} s)", file=file)
    elif report.get("model") is None:
        print("no model: the raw OCR is scored (after = before)", file=file)
    print(f"\nreport: {out / 'report.json'}\n        {out / 'report.html'}", file=file)


def _write_html(report: dict, path: Path, run: Path | None) -> None:
    from nichelm.report import write_report_html   # matplotlib is imported only when a report is drawn
    write_report_html(report, path, run_dir=run)
