"""`nichelm prepare`: sources -> task examples -> tokenizer -> token shards + manifest.

The steps, each a small function:
  read      every source into Documents (readers.py), with its filters
  split     whole documents into train/val/test by a seeded hash (never a document across splits)
  calibrate optionally fit the noise on the train-split pairs of noise.calibrate_on (noise.fit_noise)
  window    documents into examples that fit the context
  noise     clean examples get a synthetic OCR input (noise.py), seeded per example
  dedupe    val/test examples whose text also occurs in train are dropped
  write     examples.{train,val,test}.jsonl, tokenizer.json, {train,val}_NNNNNN.bin, manifest.json
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nichelm.config import Project, SourceConfig
from nichelm.config import source_name as source_name   # re-exported: prepare.source_name is public
from nichelm.data.noise import OCRNoise, fit_noise
from nichelm.data.readers import Document, pair_segments_to_windows, read_documents
from nichelm.data.shards import write_shards
from nichelm.data.tokenizer import save_tokenizer, special_tokens, train_tokenizer
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_jsonl
from nichelm.metrics import CorpusScore, score_pairs

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


def _apply_filters(doc: Document, names: list[str], where: str) -> Document:
    for name in names:
        if name not in FILTERS:
            raise UserError(f"{where}: unknown filter {name!r}; known filters: {', '.join(FILTERS)}")
        fn = FILTERS[name]
        for seg in doc.segments:
            seg.output = fn(seg.output)
            if seg.input is not None:
                seg.input = fn(seg.input)
    return doc


# ------------------------------------------------------------------ steps

def read_source(project: Project, src: SourceConfig, index: int) -> list[Document]:
    path = project.resolve(src.path)
    docs = read_documents(
        path, src.format,
        input_field="" if src.role == "clean" and src.format == "csv" else src.input_field,
        output_field=src.output_field, text_field=src.text_field, id_field=src.id_field or None,
        gold_path=project.resolve(src.gold_path) if src.gold_path else None)
    if src.max_documents:
        docs = docs[: src.max_documents]
    where = f"{project.source_file}: sources[{index}]"
    docs = [_apply_filters(d, src.filters, where) for d in docs]
    if src.role == "clean":      # the gold side only; noise comes later
        for d in docs:
            for seg in d.segments:
                seg.input = None
    elif not any(seg.input is not None for d in docs for seg in d.segments):
        raise UserError(f"{where}: role = 'pairs' but {path} has no input (OCR) side; "
                        "set role = 'clean' to generate noisy inputs")
    return docs


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(project: Project) -> str:
    """What prepare's output depends on; a match means a re-run can reuse the finished work."""
    d = project.to_dict()
    keep = {k: d[k] for k in ("seed", "task", "sources", "noise", "split", "tokenizer")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(project: Project, force: bool = False) -> dict:
    run = project.run_path
    data_dir = run / "data"
    manifest_path = data_dir / "manifest.json"
    fp = fingerprint(project)
    if manifest_path.is_file() and not force:
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fp and (run / "tokenizer" / "tokenizer.json").is_file():
            log(f"{manifest_path}: data already prepared for this project (use --force to rebuild)")
            return old
    split_cfg = project.split
    loaded = []      # (index, source, name, path, [(document, split)]): every source read and split first
    for i, src in enumerate(project.sources):
        name = source_name(src, i)
        path = project.resolve(src.path)
        log(f"reading {name} ({src.format}, {src.role}) from {path}")
        docs = read_source(project, src, i)
        splits = [src.split if src.split != "auto" else split_of(
            project.seed, name, doc.doc_id, split_cfg.val_fraction, split_cfg.test_fraction) for doc in docs]
        loaded.append((i, src, name, path, list(zip(docs, splits))))
    noise, fit = make_noise(project, loaded, data_dir)
    target_cer = noise.target_cer
    examples: dict[str, list[Example]] = {s: [] for s in SPLITS}
    source_records = []
    for i, src, name, path, docs_split in loaded:
        docs = [doc for doc, _ in docs_split]
        raw_score = CorpusScore()
        counts = Counter()
        for doc, split in docs_split:
            counts[f"documents_{split}"] += 1
            if src.role == "pairs":
                for ocr, gold in scoring_units(doc, src.format):
                    raw_score.add(ocr, gold)
            for w_index, window in enumerate(pair_segments_to_windows(doc, project.task.window_chars)):
                synthetic = window.input is None
                source_text = noise.corrupt(window.output, f"{name}\x00{doc.doc_id}\x00{w_index}") if synthetic else window.input
                if not source_text.strip() or not window.output.strip():
                    counts["windows_empty_dropped"] += 1
                    continue
                examples[split].append(Example(source_text, window.output, name, doc.doc_id, synthetic))
                counts[f"examples_{split}"] += 1
        record = {"name": name, "path": str(path), "format": src.format, "role": src.role,
                  "licence": src.licence or "unspecified", "sha256": file_sha256(path),
                  "filters": src.filters, "documents": len(docs), **dict(sorted(counts.items()))}
        if src.role == "pairs":
            record["raw_ocr"] = {"cer": raw_score.cer, "wer": raw_score.wer,
                                 "gold_chars": raw_score.chars, "gold_words": raw_score.words}
            log(f"  {name}: {len(docs)} documents, raw OCR corpus CER {100 * raw_score.cer:.2f}% "
                f"WER {100 * raw_score.wer:.2f}% over {raw_score.chars:,} gold characters")
        else:
            how = "calibrated" if fit else "synthetic"
            log(f"  {name}: {len(docs)} documents (clean; {how} noise at target CER {100 * target_cer:.2f}%)")
        source_records.append(record)

    dropped = _dedupe(examples)
    if not examples["train"]:
        raise UserError(f"{project.source_file}: no training examples; check the sources and split fractions")
    rng = random.Random(project.seed)
    rng.shuffle(examples["train"])       # mix sources in the token stream
    for split in SPLITS:
        atomic_write_jsonl(data_dir / f"examples.{split}.jsonl", (e.to_json() for e in examples[split]))

    specials = special_tokens(project.task.prompt_template, project.task.end_marker)
    texts = (t for e in examples["train"] for t in (e.input, e.output))
    tokenizer = train_tokenizer(texts, project.tokenizer.vocab_size, specials, project.tokenizer.min_frequency)
    save_tokenizer(tokenizer, run / "tokenizer" / "tokenizer.json")
    atomic_write_json(run / "task.json", {"name": project.task.name, "prompt_template": project.task.prompt_template,
                                          "end_marker": project.task.end_marker,
                                          "window_chars": project.task.window_chars})
    token_counts = {}
    for split in ("train", "val"):
        tokens = encode_examples(tokenizer, examples[split], project.task.prompt_template, project.task.end_marker)
        for old in (data_dir / "shards").glob(f"{split}_*.bin"):
            old.unlink()
        write_shards(data_dir / "shards", split, tokens, tokenizer.get_vocab_size())
        token_counts[split] = int(len(tokens))
    synth = [e for e in examples["train"] if e.synthetic]
    manifest = {
        "fingerprint": fp,
        "sources": source_records,
        "examples": {s: len(examples[s]) for s in SPLITS},
        "tokens": token_counts,
        "chars_per_token": _chars_per_token(tokenizer, examples["train"][:2000]),
        "tokenizer": {"vocab_size": tokenizer.get_vocab_size(), "type": "byte-level BPE (HF tokenizers)",
                      "special_tokens": specials},
        "noise": {"target_cer": target_cer, "profile": project.noise.profile,
                  "measured_cer_train": score_pairs((e.input, e.output) for e in synth).cer if synth else None,
                  **({"calibrated_on": project.noise.calibrate_on, "fit": fit_summary(fit)} if fit else {})},
        "filters": {"dedupe_dropped": dropped, "split": "by document (seeded hash)",
                    "window_chars": project.task.window_chars},
        "raw_ocr_all_pairs": _all_pairs_score(source_records),
    }
    atomic_write_json(manifest_path, manifest)
    log(f"prepared {run}: examples train/val/test = {manifest['examples']['train']}/"
        f"{manifest['examples']['val']}/{manifest['examples']['test']}, "
        f"{token_counts['train']:,} train tokens, vocabulary {tokenizer.get_vocab_size()}")
    return manifest


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


def make_noise(project: Project, loaded: list, data_dir: Path) -> tuple[OCRNoise, dict | None]:
    """The noise for clean sources: the profile at target_cer, or fitted on noise.calibrate_on's train pairs."""
    cfg = project.noise
    if not cfg.calibrate_on:
        (data_dir / "noise_fit.json").unlink(missing_ok=True)     # from an earlier calibrated run
        return OCRNoise(target_cer=cfg.target_cer, seed=project.seed, profile=cfg.profile), None
    wanted = set(cfg.calibrate_on)
    pairs = [pair for _, src, name, _, docs_split in loaded if name in wanted
             for doc, split in docs_split if split == "train"          # never val/test: they measure the model
             for pair in calibration_pairs(doc, src.format, project.task.window_chars)]
    if not any(gold.strip() for _, gold in pairs):
        raise UserError(f"{project.source_file}: 'noise.calibrate_on' = {cfg.calibrate_on}: these sources have "
                        "no train-split pairs to fit the noise on; check their split setting")
    fit = fit_noise(pairs, profile=cfg.profile, top=NOISE_TABLE_ROWS)
    if fit["target_cer"] >= 1:
        raise UserError(f"{project.source_file}: 'noise.calibrate_on' = {cfg.calibrate_on}: the OCR of these pairs "
                        f"has a corpus CER of {fit['target_cer']:.0%}; check input_field/output_field")
    atomic_write_json(data_dir / "noise_fit.json", fit)
    shares = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(fit["weights"].items(), key=lambda kv: -kv[1]) if v)
    log(f"noise fitted on {fit['pairs']:,} train pairs of {', '.join(cfg.calibrate_on)}: "
        f"CER {100 * fit['target_cer']:.2f}% over {fit['gold_chars']:,} gold characters; {shares}")
    return OCRNoise.from_fit(fit, seed=project.seed), fit


def fit_summary(fit: dict) -> dict:
    """What the manifest records of a noise fit (the whole table is in data/noise_fit.json)."""
    return {"cer": fit["target_cer"], "weights": fit["weights"], "pairs": fit["pairs"],
            "gold_chars": fit["gold_chars"], "error_events": fit["error_events"],
            "confusion_rows": len(fit["confusions"]), "table": "noise_fit.json",
            "top_confusions": fit["confusions"][:MANIFEST_CONFUSIONS]}


def _dedupe(examples: dict[str, list[Example]]) -> dict:
    """No identical text across splits: drop val/test examples whose input or output is in an earlier split."""
    seen = {e.output for e in examples["train"]} | {e.input for e in examples["train"]}
    dropped = {}
    for split in ("val", "test"):
        kept = [e for e in examples[split] if e.output not in seen and e.input not in seen]
        dropped[split] = len(examples[split]) - len(kept)
        examples[split] = kept
        seen |= {e.output for e in kept} | {e.input for e in kept}
    return dropped


def encode_examples(tokenizer, examples: list[Example], template: str, end_marker: str) -> np.ndarray:
    end_id = tokenizer.token_to_id(end_marker)
    prompts = tokenizer.encode_batch([template.format(input=e.input) for e in examples])
    outputs = tokenizer.encode_batch([e.output for e in examples])
    parts = []
    for p, o in zip(prompts, outputs):
        parts.append(np.asarray(p.ids + o.ids + [end_id], dtype=np.uint32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def _chars_per_token(tokenizer, examples: list[Example]) -> float | None:
    text = [e.output for e in examples]
    n_tok = sum(len(enc.ids) for enc in tokenizer.encode_batch(text))
    return round(sum(map(len, text)) / n_tok, 3) if n_tok else None


def _all_pairs_score(records: list[dict]) -> dict | None:
    pairs = [r["raw_ocr"] for r in records if "raw_ocr" in r]
    if not pairs:
        return None
    chars = sum(p["gold_chars"] for p in pairs)
    errs = sum(p["cer"] * p["gold_chars"] for p in pairs)
    return {"cer": errs / chars if chars else 0.0, "gold_chars": chars}
