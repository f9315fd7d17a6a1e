"""`nichelm evaluate`: the task metric before and after the model.

This module scores free-text tasks (correction); a run whose task decodes to a label set goes to
nichelm.evaluate_labels (the model and the baselines on the same split).

Two entry points: `evaluate_project` scores the held-out test split of a project
(RUN/eval/report.json), `evaluate_external` scores any model (or the raw OCR
alone) on any pair set in a reader format, one whole document at a time
(OUT/report.json). Both write the same report keys and a self-contained
report.html beside the json.

Both score whole documents cut into windows as `apply` cuts them (cut_windows over the
document's text), never along the gold alignment prepare used for training. The project's
test documents are rebuilt from its windows (project_documents) and drawn at random with the
project's seed (sample_documents). With eval.guard_margin = "auto", the project evaluation
first chooses the do-no-harm guard's margin on the validation documents (calibrate_margin)
and stores it in RUN/guard.json, which every later load of the model reads.

Corpus (micro) CER/WER: total edits over total reference characters/words, never an
average of per-example rates. Also the share of examples the model made worse and a
per-source breakdown.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.artifacts import GUARD_FILE, read_task
from nichelm.inference import (HARD_LIMITS, NO_DOCUMENT_TESTS, NO_MARGIN, Correction, Corrector, DocumentTests,
                               by_document, chars_per_token, cut_windows, stitch)
from nichelm.io import atomic_write_json
from nichelm.metrics import CorpusScore, char_distance, mark_changes
from nichelm.tasks import get_task


def read_examples(path: Path, limit: int = 0) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no test examples; run `nichelm prepare` first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def score_corrections(examples: list[dict], outputs: list[str], raw: list[str] | None = None) -> dict:
    before, after = CorpusScore(), CorpusScore()
    per_source: dict[str, tuple[CorpusScore, CorpusScore]] = defaultdict(lambda: (CorpusScore(), CorpusScore()))
    worse_in: Counter = Counter()              # per source: examples made worse
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
        worse_in[ex.get("source", "?")] += a > b
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
                             "wer_before": sb.wer, "wer_after": sa.wer,
                             "worse_fraction": worse_in[src] / sb.n if sb.n else 0.0}
                       for src, (sb, sa) in sorted(per_source.items())},
    }


# --------------------------------------------------------------------------- a project's own split

def project_documents(path: Path) -> list[dict]:
    """The documents of a prepared split, rebuilt from its windows (examples.SPLIT.jsonl).

    prepare writes each document's windows one after another, in order, each stripped; the text
    between two windows was whitespace (windows are cut between words), so one space joins them
    (a newline between them becomes a space, and a window dropped as a duplicate of an earlier
    split's text leaves a gap). Rows without a doc_id are documents of their own.
    """
    if not path.is_file():
        raise UserError(f"{path}: not found; run `nichelm prepare` first")
    docs: dict[tuple, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            key = (ex.get("source", "?"), ex["doc_id"] if "doc_id" in ex else f"line {n}")
            inp, out = ex["input"], ex["output"]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise UserError(f"{path}:{n}: not an example (a JSON object with input and output); "
                            "re-run `nichelm prepare --force`") from None
        doc = docs.setdefault(key, {"id": str(key[1]), "source": key[0], "inputs": [], "outputs": []})
        doc["inputs"].append(inp)
        doc["outputs"].append(out)
    return [{"id": d["id"], "source": d["source"], "input": " ".join(d["inputs"]), "output": " ".join(d["outputs"])}
            for d in docs.values()]


def sample_documents(docs: list[dict], max_windows: int, seed: int, window_chars: int) -> list[dict]:
    """Documents drawn at random (seeded) until their windows, cut as apply cuts them, would pass
    max_windows (0: all documents); at least one. Returned in their order in the split."""
    if max_windows <= 0:
        return list(docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, windows = [], 0
    for i in order:
        n = len(cut_windows(docs[i]["input"], window_chars))
        if chosen and windows + n > max_windows:
            break
        chosen.append(i)
        windows += n
    return [docs[i] for i in sorted(chosen)]


def correct_pieces_of(corrector, texts: list[str]) -> list[list[tuple[Correction, str]]]:
    """Per document, (Correction, separator) for each window, from one decoding pass (as apply cuts)."""
    cut = [cut_windows(t, corrector.window_chars) for t in texts]
    return by_document(cut, corrector.correct_pieces(cut))


def guard_counts(fixed: list[list[tuple[Correction, str]]], margin: float,
                 tests: DocumentTests = NO_DOCUMENT_TESTS) -> dict:
    """What the guard did at `margin` (and the document test): windows kept by each rule, corrections
    let through, documents left whole, and the model's mean surprisal of the inputs (nats/token)."""
    cs = [c for pieces in fixed for c, _ in pieces]
    hard = [c for c in cs if c.kept_input in HARD_LIMITS]
    low = [c for c in cs if c.kept_input not in HARD_LIMITS and c.text_at(margin) != c.raw]
    changed = sum(c.raw != c.source for c in cs)
    passed = sum(c.text_at(margin) != c.source for c in cs)
    gated = [p for p in fixed if tests.unfamiliar([c for c, _ in p], margin)]
    undone = sum(c.text_at(margin) != c.source for p in gated for c, _ in p)
    tokens = sum(c.tokens for c in cs if c.surprisal is not None)
    nats = sum(c.surprisal * c.tokens for c in cs if c.surprisal is not None)
    return {"windows": len(cs), "kept_too_different": sum(c.kept_input == "too_different" for c in hard),
            "kept_hit_limit": sum(c.kept_input == "hit_limit" for c in hard), "kept_low_margin": len(low),
            "changed": changed, "passed_margin": passed, "documents_out_of_domain": len(gated),
            "kept_out_of_domain": undone, "corrected": passed - undone,
            "kept_share": (passed - undone) / changed if changed else None,
            "passed_share": passed / changed if changed else None,
            "input_surprisal": nats / tokens if tokens else None}


def unfamiliar_threshold(fixed: list[list[tuple[Correction, str]]], share: float) -> float | None:
    """The characters per token under which a document counts as unlike the training data: the val
    documents' figure (chars_per_token) that all but `share` of them reach (None: share 0, or nothing scored)."""
    figures = sorted(x for x in (chars_per_token([c for c, _ in p]) for p in fixed) if x is not None)
    if share <= 0 or not figures:
        return None
    return figures[min(int(share * len(figures)), len(figures) - 1)]


def reference_pieces(pieces: list[tuple[Correction, str]], reference: str) -> list[str]:
    """The reference cut where the document's input is cut into windows: one Levenshtein alignment of the
    input (the windows' sources and separators) with the reference, each window boundary carried over to
    the reference offset it aligns with. Reference text inserted at a boundary goes to the window before."""
    from rapidfuzz.distance import Levenshtein
    source = "".join(c.source + sep for c, sep in pieces)
    # the hint picks a banded method: 5x faster on 400k characters
    ops = Levenshtein.opcodes(source, reference, score_hint=16)
    ends, pos = [], 0
    for c, sep in pieces:
        pos += len(c.source) + len(sep)
        ends.append(pos)
    cuts, k = [], 0
    for end in ends[:-1]:
        while k < len(ops) and (ops[k].src_end < end or (ops[k].src_end == end and ops[k].src_start < end)
                                or (ops[k].tag == "insert" and ops[k].src_start == end)):
            k += 1         # the block holding the boundary (inserts at it stay with the window before)
        if k == len(ops):
            cuts.append(len(reference))
            continue
        op = ops[k]
        offset = end - op.src_start
        cuts.append(op.dest_start + (min(offset, op.dest_end - op.dest_start) if op.tag != "delete" else 0))
    bounds = [0, *cuts, len(reference)]
    return [reference[a:b] for a, b in zip(bounds, bounds[1:])]


def calibrate_margin(docs: list[dict], fixed: list[list[tuple[Correction, str]]], max_worse_share: float,
                     bounded: list[bool] | None = None) -> dict:
    """The margin with the lowest corpus CER over all `docs` that makes at most max_worse_share of the
    `bounded` ones worse (None: all of them).

    evaluate_project passes the val documents as they are and their gold side as input (clean text), and
    bounds the clean ones: on clean text every change is harm, so the bound there is the do-no-harm
    promise, and the errors on both sides are the objective (a needless change to clean text costs as
    much as a missed correction). The noisy documents are not bounded: a correction that removes four
    errors and adds one still makes its document better, and on them the objective is corpus CER (a
    small model that fixes most errors adds a few: bounding its noisy documents made worse would throw
    most of its gain away with them).

    Every margin between two windows' gains gives a different set of corrections, so the sweep goes
    through the windows by falling gain, letting one group of equal gains through at a time and
    re-scoring only those windows, each against its own part of the reference (reference_pieces: one
    alignment per document; re-scoring whole documents took 25 of 27 minutes on issue 17's val split,
    whose largest document is 379k characters). A document's errors are the sum over its windows (at
    least its true distance, equal where the alignment's cuts agree). The margin stored is halfway
    between the last gain let through and the next (or that gain itself when it is the lowest); if no
    margin helps within the bound, one above every gain (no correction of these documents kept). The
    document tests are left out here: their references follow from the margin chosen and the val
    documents (evaluate_project).
    """
    refs = [reference_pieces(p, d["output"]) for p, d in zip(fixed, docs)]
    window_errors = [[char_distance(c.source + sep, r) for (c, sep), r in zip(p, rs)] for p, rs in zip(fixed, refs)]
    before = [sum(e) for e in window_errors]
    errors = list(before)
    candidates = sorted(((c.gain, d, w) for d, pieces in enumerate(fixed) for w, (c, _) in enumerate(pieces)
                         if c.kept_input not in HARD_LIMITS and c.gain is not None and c.raw != c.source),
                        key=lambda t: -t[0])
    bounded = [True] * len(docs) if bounded is None else list(bounded)
    allowed = max_worse_share * sum(bounded)         # bounded documents that may be made worse
    worse = 0
    total = sum(before)
    best = (total, None)                    # (errors, index of the last gain let through)
    k = 0
    while k < len(candidates):
        gain, touched = candidates[k][0], set()
        while k < len(candidates) and candidates[k][0] == gain:
            _, d, w = candidates[k]
            touched.add((d, w))
            k += 1
        for d, w in touched:      # the window's correction let through: its document's errors change by as much
            c, sep = fixed[d][w]
            delta = char_distance(c.raw + sep, refs[d][w]) - window_errors[d][w]
            new = errors[d] + delta
            total += delta
            if bounded[d]:
                worse += (new > before[d]) - (errors[d] > before[d])
            errors[d] = new
        if worse <= allowed and total < best[0]:
            best = (total, k - 1)
    gains = [g for g, _, _ in candidates]
    last = best[1]
    if last is None:
        margin = (gains[0] + 1.0) if gains else 0.0
    elif last + 1 < len(gains):
        margin = (gains[last] + gains[last + 1]) / 2
    else:
        margin = gains[last]
    return {"margin": margin, "max_worse_share": max_worse_share, "windows_scored": len(candidates),
            "corrections_let_through": 0 if last is None else last + 1}


def _choose_margin(project: Project, corrector: Corrector) -> tuple[float, str, DocumentTests, dict | None]:
    """The guard margin evaluate reports at, where it came from, the document tests' references and, when
    chosen on val ("auto"), the calibration figures; stored in RUN/guard.json for apply and later loads."""
    from nichelm.checkpoint import latest_checkpoint
    ev, run = project.eval, project.run_path
    calibration, tests = None, NO_DOCUMENT_TESTS
    if ev.guard_margin != "auto":
        margin = NO_MARGIN if ev.guard_margin == "off" else float(ev.guard_margin)
        margin_from = "project"
    else:
        val_path = run / "data" / "examples.val.jsonl"
        val = project_documents(val_path) if val_path.is_file() else []
        if not val:
            return NO_MARGIN, "none: no validation examples to choose it on", tests, None
        # the val documents as they are, and their gold side as input (clean text: any change is harm)
        val = sample_documents(val, ev.max_examples, project.seed, corrector.window_chars)
        clean = [{**d, "input": d["output"]} for d in val]
        both = correct_pieces_of(corrector, [d["input"] for d in val + clean])
        fixed, fixed_clean = both[:len(val)], both[len(val):]
        calibration = calibrate_margin(val + clean, both, ev.max_worse_share,
                                       bounded=[False] * len(val) + [True] * len(clean))
        margin = calibration["margin"]
        tests = DocumentTests(guard_counts(fixed, margin)["passed_share"],
                              unfamiliar_threshold(fixed, ev.unfamiliar_share))
        calibration.update(asdict(tests))
        calibration["val"] = {"documents": len(val), **_scores_at(val, fixed, margin, tests),
                              **guard_counts(fixed, margin, tests)}
        calibration["val_clean"] = {"documents": len(clean), **_scores_at(clean, fixed_clean, margin, tests),
                                    **guard_counts(fixed_clean, margin, tests)}
        margin_from = "val"
    ckpt = latest_checkpoint(run)
    atomic_write_json(run / GUARD_FILE, {
        "margin": None if margin == NO_MARGIN else margin, "chosen_on": margin_from,
        "checkpoint": ckpt.name if ckpt else None, "max_change": ev.guard_max_change,
        "max_deleted_letters": ev.guard_max_deleted_letters,
        **({**asdict(tests), "max_worse_share": ev.max_worse_share,
            "val": calibration["val"], "val_clean": calibration["val_clean"]} if calibration else {})})
    return margin, margin_from, tests, calibration


def evaluate_project(project: Project, device: str = "cpu") -> dict:
    """Corpus CER/WER before and after on the project's test documents, cut as apply cuts them.

    With eval.guard_margin = "auto" the margin is first chosen on the validation documents, as they are
    and with their gold side as input (clean text), for the lowest CER over both with at most
    eval.max_worse_share of the clean ones changed (calibrate_margin), and stored in RUN/guard.json (with
    the checkpoint it was chosen for and the DocumentTests' references: the share of changes that passed
    and the characters per token under which a document counts as unfamiliar); a number or "off" is
    stored as given.
    The report gives the figures at that margin (the outputs users get), plus those of the model's raw
    outputs ("unguarded") and of the length cap alone ("no_margin"), all from one decoding pass."""
    ev, run = project.eval, project.run_path
    task = read_task(run / "task.json") if (run / "task.json").is_file() else get_task(project.task)
    if task.runner_error:                  # nothing to decode (a pre-training task): perplexity is its measure
        raise UserError(f"{project.source_file}: {task.runner_error}")
    if task.decoding == "labels":          # a label set: the model against the baselines (evaluate_labels)
        from nichelm.evaluate_labels import evaluate_labels
        return evaluate_labels(project, task, device)
    test = project_documents(run / "data" / "examples.test.jsonl")
    if not test:
        raise UserError(f"{run}/data/examples.test.jsonl is empty; raise split.test_fraction or add data")
    corrector = Corrector.from_run(run, device=device, batch_size=ev.batch_size,
                                   guard_max_change=ev.guard_max_change,
                                   guard_max_deleted_letters=ev.guard_max_deleted_letters,
                                   max_new_tokens_ratio=ev.max_new_tokens_ratio,
                                   beams=ev.beams, window_overlap=ev.window_overlap,
                                   draft_tokens=ev.draft_tokens, guard_margin=NO_MARGIN)
    corrector.document_tests = NO_DOCUMENT_TESTS           # the guard is replayed below (stitch)
    margin, margin_from, tests, calibration = _choose_margin(project, corrector)

    docs = sample_documents(test, ev.max_examples, project.seed, corrector.window_chars)
    corrector.stats = type(corrector.stats)()
    t0 = time.perf_counter()
    fixed = correct_pieces_of(corrector, [d["input"] for d in docs])
    seconds = time.perf_counter() - t0
    outputs = [stitch(p, margin, tests) for p in fixed]
    report = score_corrections(docs, outputs)
    raw = score_corrections(docs, [stitch(p, None) for p in fixed])
    no_margin = score_corrections(docs, [stitch(p, NO_MARGIN) for p in fixed])
    counts = guard_counts(fixed, margin, tests)
    windows = counts["windows"]
    report.update({
        "unit": "document", "n_documents": len(docs),
        "sample": {"split": "test", "documents_in_split": len(test), "documents": len(docs), "windows": windows,
                   "max_windows": ev.max_examples, "seed": project.seed,
                   "how": "whole test documents drawn at random with the seed, cut into windows as apply cuts "
                          "them" if ev.max_examples else "every test document, cut into windows as apply cuts them"},
        "cer_after_unguarded": raw["cer_after"], "wer_after_unguarded": raw["wer_after"],
        "worse_fraction_unguarded": raw["worse_fraction"],
        "cer_after_no_margin": no_margin["cer_after"], "wer_after_no_margin": no_margin["wer_after"],
        "worse_fraction_no_margin": no_margin["worse_fraction"],
        "guard": {"max_change": ev.guard_max_change, "max_deleted_letters": ev.guard_max_deleted_letters,
                  "kept_too_different": counts["kept_too_different"],
                  "kept_hit_limit": counts["kept_hit_limit"]},
        "margin_guard": {**_margin_guard(margin, margin_from, tests, counts),
                         **({"unfamiliar_share": ev.unfamiliar_share} if tests.min_chars_per_token is not None
                            else {}),
                         **({"calibration": calibration} if calibration else {})},
        "seconds": seconds,
        "chars_per_s": sum(len(d["input"]) for d in docs) / seconds if seconds else None,
        "examples": [{"id": d["id"], "input": d["input"], "output": out, "reference": d["output"],
                      "source": d["source"], "kept_input": _kept_reasons(p, margin, tests)}
                     for d, out, p in zip(docs[:50], outputs[:50], fixed[:50])],
    })
    report["per_example"] = per_example_scores(docs, outputs)
    write_report(report, run / "eval" / "report.json", run)
    return report


def write_report(report: dict, path: Path, run: Path | None) -> None:
    """report.json (and report.html beside it), keeping the "perplexity" key an earlier
    `evaluate --perplexity` stored there: the two commands share the file."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    if isinstance(earlier, dict) and "perplexity" in earlier and "perplexity" not in report:
        report["perplexity"] = earlier["perplexity"]
    atomic_write_json(path, report)
    _write_html(report, path.with_name("report.html"), run)


GUARD_REPORT_KEYS = ("kept_low_margin", "changed", "passed_margin", "documents_out_of_domain", "kept_out_of_domain",
                     "corrected", "kept_share", "input_surprisal")


def _margin_guard(margin: float, chosen_on: str, tests: DocumentTests, counts: dict) -> dict:
    """The report's margin_guard: the margin, where it came from, the document tests' references, and
    what the guard did (guard_counts)."""
    return {"margin": None if margin == NO_MARGIN else margin, "chosen_on": chosen_on,
            "val_passed_share": tests.passed_share, "min_chars_per_token": tests.min_chars_per_token,
            **{k: counts[k] for k in GUARD_REPORT_KEYS}}


def _kept_reasons(pieces, margin: float, tests: DocumentTests) -> str:
    """Why a document's windows kept their input: the reasons of those whose output was not used."""
    if tests.unfamiliar([c for c, _ in pieces], margin):
        return "out_of_domain"
    return ",".join(sorted({c.kept_input or "low_margin" for c, _ in pieces if c.text_at(margin) != c.raw}))


def _scores_at(docs: list[dict], fixed, margin: float, tests: DocumentTests = NO_DOCUMENT_TESTS) -> dict:
    """Corpus CER before/after and the share of documents made worse at `margin` (and with no margin)."""
    at = score_corrections(docs, [stitch(p, margin, tests) for p in fixed])
    off = score_corrections(docs, [stitch(p, NO_MARGIN) for p in fixed])
    return {"cer_before": at["cer_before"], "cer_after": at["cer_after"], "worse_fraction": at["worse_fraction"],
            "wer_before": at["wer_before"], "wer_after": at["wer_after"],
            "cer_after_no_margin": off["cer_after"], "worse_fraction_no_margin": off["worse_fraction"],
            "per_source": at["per_source"]}


def print_summary(report: dict, examples: int = 3, file=sys.stdout) -> None:
    if report.get("decoding") == "labels":
        from nichelm.evaluate_labels import print_label_summary
        return print_label_summary(report, file=file)
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
    m = report.get("margin_guard")
    if m and m.get("margin") is not None:
        kept = f"{100 * m['kept_share']:.0f}%" if m.get("kept_share") is not None else "n/a"
        cal = m.get("calibration")
        where = (f"chosen on {cal['val']['documents']} val documents and their clean side, at most "
                 f"{100 * cal['max_worse_share']:.0f}% of clean ones changed" if cal else f"from {m['chosen_on']}")
        no_margin = (f"; without it CER {100 * report['cer_after_no_margin']:.2f}%"
                     if report.get("cer_after_no_margin") is not None else "")
        gated = (f", {m['documents_out_of_domain']} unfamiliar documents left whole"
                 if m.get("documents_out_of_domain") else "")
        print(f"guard margin {m['margin']:.3f} nats/token ({where}): {kept} of the model's changed windows kept"
              f"{gated}{no_margin}", file=file)
        if cal and len(cal["val"].get("per_source", {})) > 1:
            print("\nvalidation documents at this margin:", file=file)
            print_per_source(cal["val"]["per_source"], file)
    if len(report.get("per_source", {})) > 1:
        print("\ntest documents:" if m and m.get("calibration") else "", file=file)
        print_per_source(report["per_source"], file)
    if report.get("sample"):
        s = report["sample"]
        print(f"test sample: {s['documents']} of {s['documents_in_split']} documents ({s['windows']} windows), "
              f"seed {s['seed']}", file=file)
    changed = [e for e in report.get("examples", []) if e["output"] != e["input"]]
    for e in changed[:examples]:
        print(f"\n  input:     {e['input']}", file=file)
        print(f"  corrected: {mark_changes(e['input'], e['output'])}", file=file)
        print(f"  reference: {e['reference']}", file=file)


def print_per_source(per_source: dict, file=sys.stdout) -> None:
    """One line per source: its documents (or windows), CER and WER before/after, the share made worse."""
    print(f"{'source':26}{'n':>6}{'CER before':>12}{'CER after':>11}{'WER before':>12}{'WER after':>11}"
          f"{'worse':>8}", file=file)
    for src, s in per_source.items():
        print(f"{src[:25]:26}{s['n_examples']:>6}{100 * s['cer_before']:>11.2f}%{100 * s['cer_after']:>10.2f}%"
              f"{100 * s['wer_before']:>11.2f}%{100 * s['wer_after']:>10.2f}%"
              f"{100 * s.get('worse_fraction', 0.0):>7.1f}%", file=file)


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


def load_corrector(model: Path, device: str = "cpu", guard_max_change: float | None = None, batch_size: int = 64,
                   window_overlap: int = 0):
    """A corrector for --model (run, project file or export): inference.load_corrector."""
    from nichelm.inference import load_corrector
    model = Path(model)
    if not model.exists():
        raise UserError(f"{model}: no such model; give --model a run directory or an export directory")
    return load_corrector(model, device=device, guard_max_change=guard_max_change, batch_size=batch_size,
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
                      guard_max_change: float | None = None, batch_size: int = 64,
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
    fixed = correct_pieces_of(corrector, inputs) if hasattr(corrector, "correct_pieces") else None
    if fixed is not None:
        margin, tests = corrector.guard_margin, corrector.document_tests
        outputs = [stitch(p, margin, tests) for p in fixed]
        unguarded = [stitch(p, None) for p in fixed]
    else:
        outputs, unguarded = correct_documents(corrector, inputs) if corrector else (inputs, inputs)
    seconds = time.perf_counter() - t0
    report = score_corrections(examples, outputs)
    if corrector is not None and unguarded is not outputs:
        raw = score_corrections(examples, unguarded)
        report.update({"cer_after_unguarded": raw["cer_after"], "wer_after_unguarded": raw["wer_after"],
                       "worse_fraction_unguarded": raw["worse_fraction"]})
    if fixed is not None:
        off = score_corrections(examples, [stitch(p, NO_MARGIN) for p in fixed])
        counts = guard_counts(fixed, margin, tests)
        report.update({"cer_after_no_margin": off["cer_after"], "wer_after_no_margin": off["wer_after"],
                       "worse_fraction_no_margin": off["worse_fraction"],
                       "margin_guard": _margin_guard(margin, corrector.guard.get("chosen_on", "none (not calibrated)"),
                                                     tests, counts)})
    report["per_example"] = per_example_scores(examples, outputs)
    report.update(_run_facts(data, fmt, gold, model, corrector, examples, seconds))
    report["examples"] = _worst_and_best(examples, outputs, report["per_example"])
    run = model_run_dir(model)
    out = Path(out) if out is not None else default_out_dir(run, data)
    write_report(report, out / "report.json", run)
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
    fixed = correct_pieces_of(corrector, texts)
    return ([stitch(p, corrector.guard_margin, corrector.document_tests) for p in fixed],
            [stitch(p, None) for p in fixed])


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
        facts["guard"] = {"max_change": getattr(corrector, "guard_max_change", None),
                          "max_deleted_letters": getattr(corrector, "guard_max_deleted_letters", None),
                          "windows": stats.windows,
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
    if report.get("chars_per_s"):
        print(f"throughput: {report['chars_per_s']:.0f} chars/s, {report['docs_per_s']:.2f} docs/s "
              f"({report['seconds']:.1f} s)", file=file)
    elif report.get("model") is None:
        print("no model: the raw OCR is scored (after = before)", file=file)
    print(f"\nreport: {out / 'report.json'}\n        {out / 'report.html'}", file=file)


def _write_html(report: dict, path: Path, run: Path | None) -> None:
    from nichelm.report import write_report_html   # matplotlib is imported only when a report is drawn
    write_report_html(report, path, run_dir=run)


# --------------------------------------------------------------------------- specialized perplexity

def evaluate_perplexity(project: Project | None, data: Path | None = None, model: Path | None = None,
                        out: Path | None = None, device: str = "cpu", max_docs: int = 0) -> tuple[dict, Path]:
    """`evaluate --perplexity`: the model's perplexity on held-out plain text (nichelm.perplexity), per
    domain (or source) and macro-averaged, stored as the "perplexity" key of report.json (other keys kept).

    Text: --data (jsonl(.gz) with a "text" field, .txt, .parquet, or a folder of them), else the test
    split of the project's target (role = "target" sources, else its pairs / clean gold side). Model:
    --model (run, project file or hf export), else the project's run. Report: OUT/report.json, else
    report.json in the model's (or the project's run's) eval/ folder."""
    from nichelm.perplexity import group_texts, load_model, perplexity_report
    from nichelm.selection import target_records
    from nichelm.selection.records import guess_format, iter_records
    if data is not None:
        data = Path(data)
        if not data.exists():
            raise UserError(f"{data}: not found; give --data a .jsonl(.gz), .txt or .parquet file or a folder of them")
        records = iter_records(data, guess_format(data), name=data_name(data))
        what = str(data)
    elif project is not None:
        records = target_records(project, "test")
        what = "the project's target, test split"
        if not records:
            raise UserError(f"{project.source_file}: no held-out target text (the test split is empty); give --data "
                            "PATH, or raise split.test_fraction")
    else:
        raise UserError("evaluate --perplexity needs a project file or --data PATH")
    groups = group_texts(records, max_docs)
    if model is None:
        if project is None:
            raise UserError("evaluate --perplexity --data PATH needs --model (a run, project file or export) "
                            "or a project file")
        model = project.run_path
    net, tokenizer, first_id = load_model(Path(model), device)
    report = perplexity_report(net, tokenizer, groups, first_id, device)
    report.update({"data": what, "model": str(model)})
    out = Path(out) if out is not None else (model_run_dir(Path(model)) or Path(model)) / "eval"
    path = out / "report.json"
    existing = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: not a readable report; move it away or give --out another folder") from None
    existing["perplexity"] = report
    atomic_write_json(path, existing)
    _write_html(existing, out / "report.html", model_run_dir(Path(model)))
    return report, path


def print_perplexity(report: dict, path: Path, file=None) -> None:
    file = file or sys.stdout              # looked up now: tests and callers may swap it
    print(f"\n{'':24}{'documents':>10}{'tokens':>10}{'perplexity':>12}{'bits/byte':>11}", file=file)
    for name, g in report["groups"].items():
        print(f"{name[:23]:24}{g['documents']:>10}{g['tokens']:>10}{g['perplexity']:>12.3f}{g['bits_per_byte']:>11.4f}",
              file=file)
    if report["groups"]:
        print(f"{'macro (exp mean NLL)':24}{report['documents']:>10}{report['tokens']:>10}"
              f"{report['macro_perplexity']:>12.3f}{report['bits_per_byte']:>11.4f}", file=file)
    print(f"\nreport: {path}", file=file)
