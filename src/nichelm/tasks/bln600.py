"""Two classification tasks from BLN600's metadata (19th-century London newspapers, real OCR + gold).

  dating       an article's OCR text -> its decade (1830s ... 1890s), from the Date column;
  ocr-quality  OCR text -> the band of its character error rate (<1%, 1-3%, 3-10%, >=10%), measured
               on each window against its gold text (for a single row this is the CSV's CER column).

Both read windows of a document (readers.pair_segments_to_windows, as prepare cuts them) and split
by document (Sample ID) with prepare's seeded hash, seed and fractions as examples/bln600.toml, so
the held-out documents are the correction project's test documents.

    python -m nichelm.tasks.bln600 ../shared/data/ocr/bln600/train.csv   # label counts + baselines (JSON)
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path

from nichelm.data.readers import Document, read_documents
from nichelm.errors import UserError
from nichelm.prepare import SPLITS, split_of
from nichelm.tasks import baselines
from nichelm.tasks.classification import WINDOW_CER, ClassificationTask, by_document

SOURCE = "bln600"                 # the source name prepare hashes with the document id (examples/bln600.toml)
SEED, VAL, TEST = 1337, 0.1, 0.1

DECADES = [f"{y}s" for y in range(1830, 1900, 10)]
DATING = ClassificationTask(
    name="bln600-dating", prompt_template="### Text ###\n{input}\n### Decade ###\n", window_chars=300,
    labels=DECADES, bands=[float(y) for y in range(1840, 1900, 10)], label_field="year", text="input")
QUALITY = ClassificationTask(
    name="bln600-ocr-quality", prompt_template="### Text ###\n{input}\n### OCR quality ###\n", window_chars=300,
    labels=["<1%", "1-3%", "3-10%", ">=10%"], bands=[0.01, 0.03, 0.10], label_field=WINDOW_CER, text="input")
TASKS = {"dating": DATING, "ocr-quality": QUALITY}


def read_bln600(path: Path) -> list[Document]:
    """BLN600's documents as prepare reads them (rows as segments), with meta year, date, publication."""
    path = Path(path)
    docs = read_documents(path, "csv")
    meta: dict[str, dict] = {}
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    for row in reader:
        need = [k for k in ("Sample ID", "Date", "Publication") if row.get(k) is None]
        if need:
            raise UserError(f"{path}:{reader.line_num}: no column {need[0]!r}; this is not BLN600's train.csv")
        date = row["Date"].strip()
        if not (date[:4].isascii() and date[:4].isdigit()):
            raise UserError(f"{path}:{reader.line_num}: Date {date!r} does not start with a year (YYYY-MM-DD)")
        meta.setdefault(row["Sample ID"], {"year": int(date[:4]), "date": date, "publication": row["Publication"]})
    for doc in docs:
        doc.meta.update(meta[doc.doc_id])
    return docs


def split_documents(docs: list[Document], seed: int = SEED, val: float = VAL, test: float = TEST,
                    source: str = SOURCE) -> dict[str, list[Document]]:
    """Documents by split, with prepare's rule (a seeded hash of seed, source and Sample ID)."""
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(seed, source, doc.doc_id, val, test)].append(doc)
    return out


def dataset(task: ClassificationTask, docs: list[Document]) -> dict[str, list]:
    """Parallel lists of the documents' windows: texts, labels, values, doc_ids."""
    out: dict[str, list] = {"texts": [], "labels": [], "values": [], "doc_ids": []}
    for doc in docs:
        for x in task.labelled(doc):
            out["texts"].append(x.text)
            out["labels"].append(x.label)
            out["values"].append(x.value)
            out["doc_ids"].append(doc.doc_id)
    return out


def report(path: Path, seed: int = SEED) -> dict:
    """Label counts per split and the baselines on the test split (windows; dating also per document,
    by a vote over its windows), for both tasks."""
    splits = split_documents(read_bln600(path), seed)
    result: dict = {"documents": {s: len(d) for s, d in splits.items()}}
    for key, task in TASKS.items():
        data = {s: dataset(task, d) for s, d in splits.items()}
        tr, va, te = data["train"], data["val"], data["test"]
        predict, c = baselines.fit_tfidf_logreg(task, (tr["texts"], tr["labels"]), (va["texts"], va["labels"]), seed)
        predicted = predict(te["texts"])
        entry = {"counts": {s: {label: Counter(d["labels"])[label] for label in task.labels} for s, d in data.items()},
                 "majority": baselines.majority(task, tr["labels"], te["labels"], te["values"]),
                 "tfidf_logreg": {**task.metrics(predicted, te["labels"], values=te["values"]), "C": c}}
        if key == "dating":        # one label per document: score the documents too (a vote of its windows)
            truth = dict(zip(te["doc_ids"], te["labels"]))
            years = {d.doc_id: d.meta["year"] for d in splits["test"]}
            docs = sorted(truth)
            voted = by_document(te["doc_ids"], predicted, task.labels)
            refs, values = [truth[d] for d in docs], [years[d] for d in docs]
            entry["majority_by_document"] = baselines.majority(task, tr["labels"], refs, values)
            entry["tfidf_logreg_by_document"] = task.metrics([voted[d] for d in docs], refs, values=values)
        result[key] = entry
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nichelm.tasks.bln600 PATH/TO/bln600/train.csv")
    print(json.dumps(report(Path(sys.argv[1])), indent=1))
