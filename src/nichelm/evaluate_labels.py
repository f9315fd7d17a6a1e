"""`nichelm evaluate` for tasks whose decoding is "labels" (classification): the model against the baselines.

The test split's examples (RUN/data/examples.test.jsonl: one window of a document per line, its text as
"input", its label as "output", and for banded labels the number behind it as "value") are classified by
the model (classifier.Classifier: every label scored, the best taken) and scored with the task's own
metrics (accuracy, macro-F1, confusion, Spearman for ordered labels). The majority class and TF-IDF +
logistic regression (tasks.baselines), trained on the train split (C chosen on val), are scored on the
same windows, so the report says whether the model beats them. Where every document's windows share one
label (e.g. a date), documents are scored too: the model by the sum of its windows' label scores, the
TF-IDF baseline by a vote of its windows. eval.max_examples caps the test windows (whole documents,
drawn with the project seed). Writes RUN/eval/report.json and report.html (nichelm.report).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.io import atomic_write_json
from nichelm.report import write_report_html
from nichelm.tasks import baselines
from nichelm.tasks.classification import ClassificationTask, by_document


def read_labelled(path: Path, task: ClassificationTask) -> list[dict]:
    """A split's examples: input (the text), output (its label), doc_id, value (or None)."""
    if not path.is_file():
        raise UserError(f"{path}: not found; run `nichelm prepare` first")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            row = {"input": ex["input"], "output": ex["output"], "source": ex.get("source", "?"),
                   "doc_id": str(ex.get("doc_id", f"line {n}")), "value": ex.get("value")}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not an example (a JSON object with input and output); "
                            "re-run `nichelm prepare --force`") from None
        if row["output"] not in task.labels:
            raise UserError(f"{path}:{n}: label {row['output']!r} is not one of the task's {task.labels}; "
                            "re-run `nichelm prepare --force` with this task")
        rows.append(row)
    return rows


def sample_windows(rows: list[dict], max_windows: int, seed: int) -> list[dict]:
    """Whole documents drawn at random (seeded) until their windows would pass max_windows (0: all; at
    least one document), in their order in the split."""
    if max_windows <= 0:
        return rows
    docs: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        docs.setdefault(r["doc_id"], []).append(i)
    order = list(docs)
    random.Random(seed).shuffle(order)
    keep, n = set(), 0
    for d in order:
        if keep and n + len(docs[d]) > max_windows:
            break
        keep.add(d)
        n += len(docs[d])
    return [r for r in rows if r["doc_id"] in keep]


def _values(rows: list[dict]) -> list[float] | None:
    values = [r["value"] for r in rows]
    return values if values and all(isinstance(v, (int, float)) for v in values) else None


def evaluate_labels(project: Project, task: ClassificationTask, device: str = "cpu") -> dict:
    from nichelm.classifier import Classifier
    from nichelm.inference import open_run
    ev, run = project.eval, project.run_path
    data = run / "data"
    test = read_labelled(data / "examples.test.jsonl", task)
    if not test:
        raise UserError(f"{data}/examples.test.jsonl is empty; raise split.test_fraction or add data")
    train = read_labelled(data / "examples.train.jsonl", task)
    val_path = data / "examples.val.jsonl"
    val = read_labelled(val_path, task) if val_path.is_file() else []
    rows = sample_windows(test, ev.max_examples, project.seed)
    source = open_run(run)
    classifier = Classifier.from_source(source, device=device, batch_size=ev.batch_size)
    task = classifier.task                            # the run's task, as prepare wrote it
    t0 = time.perf_counter()
    scores = classifier.window_scores([r["input"] for r in rows])
    seconds = time.perf_counter() - t0
    predicted = [task.labels[i] for i in scores.argmax(dim=1).tolist()]
    refs, values = [r["output"] for r in rows], _values(rows)
    report = {"task": task.to_json(), "decoding": task.decoding, "unit": "window", "n_examples": len(rows),
              "n_documents": len({r["doc_id"] for r in rows}),
              "sample": {"split": "test", "windows_in_split": len(test), "windows": len(rows),
                         "max_windows": ev.max_examples, "seed": project.seed},
              "metrics": task.metrics(predicted, refs, values=values)}
    tfidf, c = baselines.fit_tfidf_logreg(task, ([r["input"] for r in train], [r["output"] for r in train]),
                                          ([r["input"] for r in val], [r["output"] for r in val]), project.seed)
    tfidf_predicted = tfidf([r["input"] for r in rows])
    report["baselines"] = {
        "majority": baselines.majority(task, [r["output"] for r in train], refs, values),
        "tfidf_logreg": {**task.metrics(tfidf_predicted, refs, values=values), "C": c}}
    labels_of: dict[str, set] = {}
    for r in rows:
        labels_of.setdefault(r["doc_id"], set()).add(r["output"])
    if all(len(s) == 1 for s in labels_of.values()):      # one label per document: score documents too
        docs = list(labels_of)
        at = {d: i for i, d in enumerate(docs)}
        summed = scores.new_zeros(len(docs), scores.shape[1])
        for r, s in zip(rows, scores):
            summed[at[r["doc_id"]]] += s
        doc_refs = [next(iter(labels_of[d])) for d in docs]
        first = {}
        for r in rows:
            first.setdefault(r["doc_id"], r["value"])
        doc_values = _values([{"value": first[d]} for d in docs])
        voted = by_document([r["doc_id"] for r in rows], tfidf_predicted, task.labels)
        report["by_document"] = {
            "metrics": task.metrics([task.labels[i] for i in summed.argmax(dim=1).tolist()], doc_refs,
                                    values=doc_values),
            "baselines": {"majority": baselines.majority(task, [r["output"] for r in train], doc_refs, doc_values),
                          "tfidf_logreg": task.metrics([voted[d] for d in docs], doc_refs, values=doc_values)}}
    report.update({"seconds": seconds, "windows_per_s": len(rows) / seconds if seconds else None,
                   "examples": [{"id": r["doc_id"], "input": r["input"], "reference": r["output"], "output": p}
                                for r, p in zip(rows[:50], predicted[:50])]})
    atomic_write_json(run / "eval" / "report.json", report)
    write_report_html(report, run / "eval" / "report.html", run_dir=run)
    return report


def print_label_summary(report: dict, file=sys.stdout) -> None:
    def line(name: str, m: dict) -> str:
        rho = m.get("spearman")
        return (f"{name:24}{100 * m['accuracy']:>9.1f}%{m['macro_f1']:>10.3f}"
                + (f"{rho:>10.3f}" if rho is not None else ""))

    for title, part in (("windows", report), ("documents", report.get("by_document"))):
        if not part:
            continue
        print(f"\n{title} ({part['metrics'].get('n', 0)})      accuracy  macro-F1  Spearman", file=file)
        print(line("this model", part["metrics"]), file=file)
        for name, m in part["baselines"].items():
            print(line(f"baseline {name}", m), file=file)
