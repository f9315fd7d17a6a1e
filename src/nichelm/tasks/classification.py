"""`classification`: text -> one label of a fixed set.

The model reads `prompt_template.format(input=text)` and writes a label then the end marker, so
training is the same next-token loss as correction (the output is the label). At decoding time it
never generates freely: each label's tokens (+ end marker) are scored after the prompt and the best
is taken (tasks.constrained), so no output lies outside the set.

Where a label comes from (`label_field`): a field of the document's metadata (e.g. a jsonl record's
"label"), or "window_cer", the measured character error rate of a window's input (OCR) against its
output (gold). With `bands` (ascending edges) the value is a number and the label is its band:
value < bands[0] -> labels[0], bands[i-1] <= value < bands[i] -> labels[i], value >= bands[-1] ->
labels[-1]. Banded labels are ordered, so the metrics add the Spearman correlation of the predicted
band's index with the numeric value (`ordered`: the same for labels given in order without bands).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from nichelm.data import tokenizer as tokmod
from nichelm.data.readers import Document
from nichelm.errors import UserError
from nichelm.metrics import char_distance
from nichelm.tasks.base import Task

WINDOW_CER = "window_cer"        # label_field: the window's own CER (paired documents)
TEXT_SIDES = ("input", "output")


class Labelled(NamedTuple):
    text: str                     # what the model reads
    label: str
    value: float | None           # the number the label is the band of (None: labels not from a number)


@dataclasses.dataclass
class ClassificationTask(Task):
    type = "classification"
    decoding = "labels"

    name: str = "classification"
    prompt_template: str = "### Text ###\n{input}\n### Label ###\n"
    end_marker: str = "<|endoftext|>"
    window_chars: int = 300
    labels: list[str] = dataclasses.field(default_factory=list)
    label_field: str = "label"
    bands: list[float] | None = None  # ascending edges of numeric bands (len(labels) - 1 of them)
    ordered: bool = False             # labels are in order (always so with bands): metrics add Spearman
    text: str = "input"               # the side of a window the model reads: input (e.g. OCR) or output (gold)

    def __post_init__(self):
        if self.bands is not None:
            self.ordered = True

    def check(self, where: str = "task") -> None:
        super().check(where)
        if not self.labels:
            raise UserError(f"{where}: 'labels' is empty; list the labels, e.g. labels = [\"yes\", \"no\"]")
        if not all(isinstance(x, str) and x.strip() for x in self.labels):
            raise UserError(f"{where}: 'labels' {self.labels!r} must be non-blank strings")
        dup = [x for x, n in Counter(self.labels).items() if n > 1]
        if dup:
            raise UserError(f"{where}: label {dup[0]!r} appears twice in 'labels'; give each label once")
        if self.bands is not None:
            if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.bands):
                raise UserError(f"{where}: 'bands' {self.bands!r} must be numbers (the edges between labels)")
            if len(self.bands) != len(self.labels) - 1 or any(b >= c for b, c in zip(self.bands, self.bands[1:])):
                raise UserError(f"{where}: 'bands' needs {len(self.labels) - 1} ascending edges for "
                                f"{len(self.labels)} labels (got {self.bands!r})")
        if self.text not in TEXT_SIDES:
            raise UserError(f"{where}: 'text' is {self.text!r}; use one of {', '.join(TEXT_SIDES)}")

    # ------------------------------------------------------------ examples

    def label_of(self, value) -> str:
        """The label of a metadata value: its band with `bands`, else the value itself (must be a label)."""
        if self.bands is not None:
            return self.labels[bisect.bisect_right(self.bands, float(value))]
        label = str(value)
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of {self.labels}")
        return label

    def labelled(self, doc: Document) -> list[Labelled]:
        """The document's windows with their labels (and the numbers behind banded labels)."""
        if self.label_field != WINDOW_CER and self.label_field not in doc.meta:
            raise UserError(f"document {doc.doc_id!r}: no metadata field {self.label_field!r} for the label; "
                            "set task.label_field to a field the documents have")
        out = []
        for w in self.windows(doc):
            if self.label_field == WINDOW_CER:
                if w.input is None:
                    raise UserError(f"document {doc.doc_id!r}: label_field = {WINDOW_CER!r} needs paired data "
                                    "(input and gold text); this document is clean text")
                value = char_distance(w.input, w.output) / max(1, len(w.output))
            else:
                value = doc.meta[self.label_field]
            try:
                label = self.label_of(value)
            except (TypeError, ValueError) as e:
                raise UserError(f"document {doc.doc_id!r}: field {self.label_field!r} = {value!r}: {e}; "
                                "fix the data or task.labels / task.bands") from None
            text = w.input if self.text == "input" and w.input is not None else w.output
            number = float(value) if self.bands is not None else None
            out.append(Labelled(text, label, number))
        return out

    def examples(self, doc: Document) -> list[tuple[str, str]]:
        return [(x.text, x.label) for x in self.labelled(doc)]

    # ------------------------------------------------------------ decoding

    def label_ids(self, tok) -> list[list[int]]:
        """Each label's token ids, encoded as text (marker-safe)."""
        return tokmod.encode_texts(tok, self.labels)

    def classify(self, model, tok, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        """The best label for each text (label-constrained decoding: never a label outside the set)."""
        from nichelm.tasks.constrained import best_labels      # torch: only when a model runs
        end_id = self.marker_ids(tok)[2]
        picks = best_labels(model, self.prompts(tok, texts), self.label_ids(tok), end_id, batch_size)
        return [self.labels[i] for i in picks]

    def postprocess(self, text: str) -> str:
        return text.strip()

    # ------------------------------------------------------------ metrics

    def metrics(self, predictions: Sequence[str], references: Sequence[str],
                values: Sequence[float] | None = None, **_) -> dict:
        """accuracy, macro-F1 over all labels, confusion matrix (rows: reference, columns: prediction,
        in `labels` order); for ordered labels with numeric `values`, Spearman's rho of the predicted
        label's index with the values."""
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        stray = sorted({*predictions, *references} - set(self.labels))
        if stray:
            raise ValueError(f"labels {stray} are not in the task's set {self.labels}")
        if not references:
            return {"n": 0}
        out = {
            "n": len(references),
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=self.labels, average="macro",
                                       zero_division=0)),
            "labels": list(self.labels),
            "confusion": confusion_matrix(references, predictions, labels=self.labels).tolist(),
        }
        if self.ordered and values is not None:
            out["spearman"] = spearman([self.labels.index(p) for p in predictions], values)
        return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get average ranks); None when either side is constant."""
    from scipy.stats import spearmanr
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def by_document(doc_ids: Sequence[str], labels: Sequence[str], order: Sequence[str]) -> dict[str, str]:
    """Each document's most frequent label over its windows (ties: the one earlier in `order`)."""
    votes: dict[str, Counter] = {}
    for d, label in zip(doc_ids, labels):
        votes.setdefault(d, Counter())[label] += 1
    rank = {label: i for i, label in enumerate(order)}
    return {d: min(c, key=lambda label: (-c[label], rank[label])) for d, c in votes.items()}
