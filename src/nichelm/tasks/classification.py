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
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from nichelm.data import tokenizer as tokmod
from nichelm.data.readers import Document
from nichelm.errors import UserError
from nichelm.metrics import char_distance
from nichelm.tasks.base import USAGE_INTRO, Task

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
    text_outputs = False

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

    def check(self, where: str = "task", prefix: str = "") -> None:
        super().check(where, prefix)
        if not self.labels:
            raise UserError(f"{where}: '{prefix}labels' is empty; list the labels, e.g. labels = [\"yes\", \"no\"]")
        if not all(isinstance(x, str) and x.strip() for x in self.labels):
            raise UserError(f"{where}: '{prefix}labels' {self.labels!r} must be non-blank strings")
        dup = [x for x, n in Counter(self.labels).items() if n > 1]
        if dup:
            raise UserError(f"{where}: label {dup[0]!r} appears twice in '{prefix}labels'; give each label once")
        if self.bands is not None:
            if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.bands):
                raise UserError(f"{where}: '{prefix}bands' {self.bands!r} must be numbers (the edges between labels)")
            if len(self.bands) != len(self.labels) - 1 or any(b >= c for b, c in zip(self.bands, self.bands[1:])):
                raise UserError(f"{where}: '{prefix}bands' needs {len(self.labels) - 1} ascending edges for "
                                f"{len(self.labels)} labels (got {self.bands!r})")
        if self.text not in TEXT_SIDES:
            raise UserError(f"{where}: '{prefix}text' is {self.text!r}; use one of {', '.join(TEXT_SIDES)}")

    # ------------------------------------------------------------ examples

    def label_of(self, value) -> str:
        """The label of a metadata value: its band with `bands`, else the value itself (must be a label)."""
        if self.bands is not None:
            return self.labels[bisect.bisect_right(self.bands, number(value))]
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
            out.append(Labelled(text, label, number(value) if self.bands is not None else None))
        return out

    def examples(self, doc: Document) -> list[tuple[str, str]]:
        return [(x.text, x.label) for x in self.labelled(doc)]

    def valued_examples(self, doc: Document) -> list[tuple[str, str, float | None]]:
        return [(x.text, x.label, x.value) for x in self.labelled(doc)]

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

    # ------------------------------------------------------------ model card

    def describe(self) -> str:
        """What the labels mean, in a sentence."""
        source = ("the measured character error rate of the OCR text against its gold text"
                  if self.label_field == WINDOW_CER else f"the documents' `{self.label_field}` field")
        how = (f"the band of {source} (edges {', '.join(f'{b:g}' for b in self.bands)})" if self.bands is not None
               else source)
        return f"one label of {', '.join(f'`{x}`' for x in self.labels)}: {how}"

    def card(self, prompt_code: str) -> list[str]:
        return ["## Task", "",
                f"Classification: the model reads at most ~{self.window_chars} characters of "
                f"{'the OCR' if self.text == 'input' else 'the'} text and answers {self.describe()}.", "",
                "## Prompt format", "",
                "The model reads the prompt below with `{input}` replaced by one window of text, then writes "
                f"a label and the end marker `{self.end_marker}`. Do not generate freely: score every label "
                "(its tokens followed by the end marker, teacher-forced after the prompt) and take the "
                "highest total log-probability, so the answer is always one of the labels. A longer text is "
                "cut into windows and its label is the best sum of the windows' scores (`nichelm apply` and "
                "`nichelm.load(PATH).classify(texts)` do both).", "",
                "```", self.prompt_template.rstrip("\n"), "```", "",
                "`task.json` holds the template, the end marker and the labels for programs.", "",
                *USAGE_INTRO,
                "```python", "import torch",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "tok = AutoTokenizer.from_pretrained(PATH)",
                "model = AutoModelForCausalLM.from_pretrained(PATH)",
                f"labels = {self.labels!r}",
                prompt_code,
                "def score(label):",
                "    cont = tok(label, split_special_tokens=True).input_ids + [tok.eos_token_id]",
                "    x = torch.tensor([ids + cont])",
                "    with torch.no_grad():",
                "        logp = model(x).logits[0, len(ids) - 1:-1].log_softmax(-1)",
                "    return logp.gather(1, torch.tensor(cont)[:, None]).sum().item()",
                "print(max(labels, key=score))", "```", "",
                "Or with nichelm: `nichelm apply --model PATH --input records.jsonl --output labelled/` "
                "(adds a label field to each record).", ""]

    def card_metrics(self, report: dict) -> list[str]:
        m = report.get("metrics") or {}
        lines = [f"Held-out test documents ({report.get('n_documents', '?')}), {m.get('n', '?')} windows; "
                 "the baselines are trained and scored on the same split.", "",
                 "| model | accuracy | macro-F1 |" + (" Spearman |" if self.ordered else ""),
                 "|---|---|---|" + ("---|" if self.ordered else "")]
        rows = [("this model", m), *((f"baseline: {k}", v) for k, v in (report.get("baselines") or {}).items())]
        for name, r in rows:
            if "accuracy" not in r:
                continue
            rho = r.get("spearman")
            lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['macro_f1']:.3f} |"
                         + ((f" {rho:.3f} |" if rho is not None else " – |") if self.ordered else ""))
        return lines

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


_LEADING_NUMBER = re.compile(r"\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def number(value) -> float:
    """A metadata value as the number bands are cut on: a number, or a string starting with one (a date
    "1882-05-27" gives its year, 1882; a CSV cell "0.031" gives 0.031)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _LEADING_NUMBER.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError("not a number, nor text starting with one")
    return float(m[1])


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
