"""`nichelm prepare`: sources -> task examples -> tokenizer -> token shards + manifest.

The work itself runs as datatrove jobs (prepare_pipeline.py, steps in data/pipeline.py): read, split
by document, windows, noise, dedupe, tokenize, shards, on one machine or a cluster, streaming and
resumable. This module holds `prepare()` (reuse the finished data when nothing changed, else run the
jobs) and what the steps share with the rest of nichelm: the split rule, filters, scoring units,
the example encoder, the fingerprint and the swap of a finished build into RUN/data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nichelm.config import Project
from nichelm.config import source_name as source_name  # noqa: F401  (re-exported: prepare.source_name is public)
from nichelm.data.readers import Document, pair_segments_to_windows
from nichelm.data.tokenizer import encode_texts, prompt_ids_batch
from nichelm.io import fsync_dir, fsync_tree, replace_dir

SPLITS = ("train", "val", "test")


@dataclass
class Example:
    input: str
    output: str
    source: str
    doc_id: str
    synthetic: bool

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "source": self.source,
                "doc_id": self.doc_id, "synthetic_input": self.synthetic}


# ------------------------------------------------------------------ filters

FILTERS = {
    # Bracketed editorial notes such as the World English Bible's {footnotes}.
    "drop_braced": lambda s: re.sub(r"\s*\{[^{}]*\}", "", s),
    "collapse_spaces": lambda s: re.sub(r"[ \t]+", " ", s),
}


# ------------------------------------------------------------------ steps

def scoring_units(doc: Document, fmt: str) -> list[tuple[str, str]]:
    """(OCR, gold) pairs for the raw-OCR CER, at the source's own unit of alignment.

    csv/jsonl rows are independent sentence pairs (BLN600's published CER is over rows), so
    each row counts alone, without the separator the reader puts between rows. ICDAR and
    text sources are whole documents.
    """
    pairs = [(s.input, s.output) for s in doc.segments if s.input is not None]
    if fmt in ("csv", "jsonl"):
        return [(i.strip(), o.strip()) for i, o in pairs]
    return [("".join(i for i, _ in pairs).strip(), "".join(o for _, o in pairs).strip())] if pairs else []


def split_of(seed: int, source: str, doc_id: str, val: float, test: float) -> str:
    """A document's split from a seeded hash: stable across runs and independent of order."""
    h = hashlib.sha256(f"{seed}\x00{source}\x00{doc_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def _source_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints); of a folder: every file's relative path,
    size and bytes, in name order."""
    h = hashlib.sha256()
    for f in _source_files(path):
        if path.is_dir():
            h.update(f"{f.relative_to(path)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


HASH_LIMIT = 100 * 2**20      # sources up to this size are also known by content in the fingerprint


def source_state(path: Path) -> dict:
    """What a source file or folder is known by: each file's relative path, size and mtime, and a
    sha256 of the content when the whole source is under HASH_LIMIT (an edit that keeps the size
    and the mtime still shows). Larger sources go by size and mtime alone: hashing them on every
    re-run would cost more than the check is worth."""
    files = []
    for f in _source_files(path):
        st = f.stat()
        files.append([str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    small = sum(size for _, size, _ in files) < HASH_LIMIT
    return {"files": files, "sha256": file_sha256(path) if small else None}


def source_states(project: Project) -> list[list[dict]]:
    """source_state of each source's path (and gold_path), in order."""
    return [[source_state(project.resolve(p)) for p in (src.path, src.gold_path) if p] for src in project.sources]


def fingerprint(project: Project, states: list[list[dict]] | None = None) -> str:
    """What prepare's output depends on: the settings and every source's files (source_states, given
    or read now). A match means a re-run can reuse the finished work."""
    d = project.to_dict()
    keep = {k: d[k] for k in ("seed", "task", "sources", "noise", "split", "tokenizer")}
    keep["source_files"] = source_states(project) if states is None else states
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):                  # missing, or cut short: the data is rebuilt
        return None
    return manifest if isinstance(manifest, dict) else None


def _sha256_or_none(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def prepare(project: Project, force: bool = False, options=None) -> dict:
    """Build RUN/data, RUN/tokenizer/tokenizer.json and RUN/task.json, or reuse them when the project
    and its sources have not changed (see already_prepared). The build runs as datatrove jobs
    (prepare_pipeline.PrepareOptions: executor, workers, ...) into a staging folder that replaces the
    previous data whole at the end, so a failed or killed (re)build leaves it exactly as it was; a
    killed build re-run with the same command resumes its unfinished tasks.

    A project with generic sources first runs `nichelm select` on the same executor (a selection that
    is up to date is reused); on Slurm, whose tasks are only submitted here, prepare stops there and the
    same command, run again once they have ended, goes on."""
    from nichelm.prepare_pipeline import prepare_with_pipeline
    submitted = select_first(project, options)
    if submitted is not None:
        return submitted
    return prepare_with_pipeline(with_selection(project), force=force, options=options)


def select_first(project: Project, options=None) -> dict | None:
    """prepare's first stage for a project with generic sources: the selection (nichelm.selection),
    on prepare's executor and workers (its own task count: prepare's --tasks counts pieces of the task
    data). Returns {"submitted": ...} when Slurm was given the selection's tasks, else None."""
    if not any(s.role == "generic" for s in project.sources):
        return None
    from nichelm.prepare_pipeline import ExecutorOptions, log
    from nichelm.selection import select_project
    executor = None
    if options is not None:
        shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(ExecutorOptions)}
        executor = ExecutorOptions(**{**shared, "tasks": 0})
    report = select_project(project, options=executor)
    if "submitted" in report:
        log(f"prepare: {report['submitted']}; run this command again once they have ended")
        return {"submitted": True, "selection": report["submitted"]}
    if not report.get("reused"):
        log(f"prepare: selected {report.get('selected', {}).get('documents', '?')} generic documents "
            f"({project.run_path / 'select' / 'selection.json'})")
    return None


def with_selection(project: Project) -> Project:
    """The project as prepare builds it: generic and target sources are not task data; the selection
    `nichelm select` made from them (RUN/select/selected.jsonl) comes in as one clean source instead.
    A project without generic sources is returned as it is."""
    from nichelm.selection import selected_source
    if not any(s.role in ("generic", "target") for s in project.sources):
        return project
    selected = selected_source(project)            # a UserError when not selected yet, or out of date
    # names fixed before sources are dropped: the split hash and calibrate_on use them
    kept = [dataclasses.replace(s, name=source_name(s, i)) for i, s in enumerate(project.sources)
            if s.role in ("pairs", "clean")]
    return dataclasses.replace(project, sources=kept + ([selected] if selected else []))


def already_prepared(project: Project, fp: str) -> dict | None:
    """The manifest of RUN/data when it was built for this fingerprint and the tokenizer and task.json
    beside it are the ones it records; else None."""
    run = project.run_path
    old = _read_manifest(run / "data" / "manifest.json")
    if (old and old.get("fingerprint") == fp
            and old.get("tokenizer_sha256") == _sha256_or_none(run / "tokenizer" / "tokenizer.json")
            and old.get("task_sha256") == _sha256_or_none(run / "task.json")):
        return old
    return None


def _clean_leftovers(run: Path) -> None:
    """Staging folders of a prepare that was killed, and old data a swap did not get to delete."""
    for p in list(run.glob(".data.staging-*")) + list(run.glob(".data.old-*")):
        shutil.rmtree(p, ignore_errors=True)


def _swap_in(staging: Path, run: Path) -> None:
    """Put a finished build in place: tokenizer.json and task.json first, the data folder (with the
    manifest, which records both files' sha256) last. A crash between these renames leaves a
    manifest that does not match the tokenizer or task.json, so the next prepare rebuilds."""
    fsync_tree(staging)
    (run / "tokenizer").mkdir(parents=True, exist_ok=True)
    os.replace(staging / "tokenizer.json", run / "tokenizer" / "tokenizer.json")
    fsync_dir(run / "tokenizer")
    os.replace(staging / "task.json", run / "task.json")
    fsync_dir(run)
    replace_dir(staging, run / "data")


# Rows of the measured confusion table the noise draws from. Real multi-character errors are a
# long tail (BLN600: the 60 most frequent cover 2% of them, 2,000 rows cover 24%; substitutions
# 94%, deletions 88%, insertions 86%); the manifest shows the top MANIFEST_CONFUSIONS and the whole
# fit is written to data/noise_fit.json.
NOISE_TABLE_ROWS = 2000
MANIFEST_CONFUSIONS = 60


def calibration_pairs(doc: Document, fmt: str, window_chars: int) -> list[tuple[str, str]]:
    """(OCR, gold) pairs of one document for fitting the noise: rows for csv/jsonl, else aligned windows.

    Windows keep the quadratic alignment of whole ICDAR documents out of the fit.
    """
    if fmt in ("csv", "jsonl"):
        return scoring_units(doc, fmt)
    return [(w.input, w.output) for w in pair_segments_to_windows(doc, window_chars) if w.input is not None]


def fit_summary(fit: dict) -> dict:
    """What the manifest records of a noise fit (the whole table is in data/noise_fit.json)."""
    return {"cer": fit["target_cer"], "weights": fit["weights"], "pairs": fit["pairs"],
            "gold_chars": fit["gold_chars"], "error_events": fit["error_events"],
            "confusion_rows": len(fit["confusions"]), "table": "noise_fit.json",
            "top_confusions": fit["confusions"][:MANIFEST_CONFUSIONS]}


def encode_examples(tokenizer, examples: list[Example], template: str, end_marker: str) -> np.ndarray:
    """prompt + output + end marker per example, marker-safe: a marker string quoted in an input or
    output stays text, so the loss mask read off the markers (data/loader.py) stays right."""
    end_id = tokenizer.token_to_id(end_marker)
    prompts = prompt_ids_batch(tokenizer, template, [e.input for e in examples])
    outputs = encode_texts(tokenizer, [e.output for e in examples])
    flat: list[int] = []
    for p, o in zip(prompts, outputs):
        flat += p
        flat += o
        flat.append(end_id)
    return np.asarray(flat, dtype=np.uint32)


def _chars_per_token(tokenizer, examples: list[Example]) -> float | None:
    text = [e.output for e in examples]
    n_tok = sum(map(len, encode_texts(tokenizer, text)))
    return round(sum(map(len, text)) / n_tok, 3) if n_tok else None


def _all_pairs_score(records: list[dict]) -> dict | None:
    pairs = [r["raw_ocr"] for r in records if "raw_ocr" in r]
    if not pairs:
        return None
    chars = sum(p["gold_chars"] for p in pairs)
    errs = sum(p["cer"] * p["gold_chars"] for p in pairs)
    return {"cer": errs / chars if chars else 0.0, "gold_chars": chars}
