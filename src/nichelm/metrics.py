"""Scoring for OCR correction: corpus CER/WER and readable diffs.

Corpus (micro) rates are the only rates reported here: total edits divided by
total reference units. Averaging per-sentence rates over-weights short
sentences and overstates gains (see the BLN600 note in the data README).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein


def char_distance(hyp: str, ref: str) -> int:
    """Character-level Levenshtein distance (unit costs)."""
    return Levenshtein.distance(hyp, ref, score_hint=16)   # the hint only picks a faster method


def word_distance(hyp: str, ref: str) -> int:
    """Word-level Levenshtein distance over whitespace-split tokens."""
    return Levenshtein.distance(hyp.split(), ref.split(), score_hint=16)


def markdown_score_table(first_column: str, rows: list[tuple[str, dict]]) -> list[str]:
    """A Markdown table of before/after scores (model cards): one row per (name, scores), the scores as
    score_corrections writes them (n_examples, cer_before, cer_after, wer_before, wer_after, worse_fraction)."""
    lines = [f"| {first_column} | documents | CER input | CER output | WER input | WER output | made worse |",
             "|---|---|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s.get('n_examples', '?')} | {100 * s['cer_before']:.2f}% | {100 * s['cer_after']:.2f}% "
                     f"| {100 * s['wer_before']:.2f}% | {100 * s['wer_after']:.2f}% "
                     f"| {100 * s.get('worse_fraction', 0.0):.1f}% |")
    return lines


@dataclass
class CorpusScore:
    """Running totals for corpus (micro-averaged) CER and WER."""

    char_errors: int = 0
    chars: int = 0
    word_errors: int = 0
    words: int = 0
    n: int = 0

    @property
    def cer(self) -> float:
        """Total character edits / total reference characters."""
        return self.char_errors / self.chars if self.chars else 0.0

    @property
    def wer(self) -> float:
        """Total word edits / total reference words."""
        return self.word_errors / self.words if self.words else 0.0

    def add(self, hyp: str, ref: str) -> None:
        """Accumulate one (hypothesis, reference) pair."""
        self.char_errors += char_distance(hyp, ref)
        self.chars += len(ref)
        self.word_errors += word_distance(hyp, ref)
        self.words += len(ref.split())
        self.n += 1


def score_pairs(pairs: Iterable[tuple[str, str]]) -> CorpusScore:
    """Score (hyp, ref) pairs as one corpus."""
    score = CorpusScore()
    for hyp, ref in pairs:
        score.add(hyp, ref)
    return score


def _change_chunks(before: str, after: str) -> list[tuple[bool, str, str]]:
    """Split the alignment into (changed, old, new) chunks.

    Consecutive non-equal edit operations are merged into one chunk so that
    e.g. ``h -> li`` shows as one change, not a substitution plus an insertion.
    Unchanged chunks have ``old == new``.
    """
    chunks: list[tuple[bool, str, str]] = []
    for op in Levenshtein.opcodes(before, after, score_hint=16):
        old = before[op.src_start : op.src_end]
        new = after[op.dest_start : op.dest_end]
        changed = op.tag != "equal"
        if chunks and changed and chunks[-1][0]:
            _, prev_old, prev_new = chunks[-1]
            chunks[-1] = (True, prev_old + old, prev_new + new)
        else:
            chunks.append((changed, old, new))
    return chunks


def mark_changes(before: str, after: str) -> str:
    """One-line terminal diff: ``the [-c-]{+e+}at`` (wdiff-style markers)."""
    parts = []
    for changed, old, new in _change_chunks(before, after):
        if not changed:
            parts.append(old)
            continue
        if old:
            parts.append(f"[-{old}-]")
        if new:
            parts.append(f"{{+{new}+}}")
    return "".join(parts).replace("\n", "\u21b5")


def mark_changes_html(before: str, after: str) -> str:
    """HTML diff with ``<del>``/``<ins>`` spans; all text is escaped."""
    parts = []
    for changed, old, new in _change_chunks(before, after):
        if not changed:
            parts.append(html.escape(old))
            continue
        if old:
            parts.append(f"<del>{html.escape(old)}</del>")
        if new:
            parts.append(f"<ins>{html.escape(new)}</ins>")
    return "".join(parts)
