"""`nichelm select`: resample the generic sources so that they look like the task's own text.

The methods (nichelm.selection.core): `dsir` (Xie et al. 2023: hashed n-gram importance weights,
Gumbel top-k) and `clusters` (Grangier et al., "Need a Small Specialized Language Model? Plan
Early!": k-means clusters, the target's cluster histogram). This module ties them to a project:

- the generic corpus: sources with role = "generic" (jsonl / text / parquet, streamed);
- the target: sources with role = "target", else the gold side of the task's pairs and clean
  sources; only documents of the train split (prepare's seeded split by document), so the
  held-out specialist text stays held out (perplexity is measured on the test split);
- the outputs, RUN/select/selected.jsonl (one chosen document a line: id, text, source, licence,
  cluster, weight = log importance weight, and the record's domain / origin when known; a
  document chosen k times, which only `clusters` does, is written k times, copies 2..k with id
  "ID~COPY") and RUN/select/selection.json (settings, per-source / per-domain / per-cluster shares,
  DSIR's KL reduction, samples), drawn as RUN/select/selection.html (nichelm.report; the evaluation
  report of the run shows the same section). A re-run with the same settings and sources reuses them.
- with select.partition (method clusters), RUN/select/clusters/: every generic document that passes
  min_tokens in its cluster's file, cluster-NNNN.jsonl (selected.jsonl's fields but the weight, which is
  the target's; the data of SLM-mix's experts and of SLM-pn's per-cluster parts), and the k-means fit
  (clusters.ClusterFit), fit on the generic sample alone: the same files for any target, which the fit places
  among them (`nichelm specialize --partition`); selection.json's "partition" lists each file's documents,
  tokens and sha256 beside the target's histogram (target_share).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from nichelm.config import Project, SelectConfig, SourceConfig, source_name
from nichelm.errors import UserError
from nichelm.io import atomic_file, atomic_write_json
from nichelm.selection.core import BATCH_CHARS, WORK, Pick, Selection, iter_picks, select_corpus
from nichelm.selection.features import NgramBatch, TokenHashes, kl
from nichelm.selection.records import Corpus, Cursor, Record, iter_records, list_corpus, record_row

__all__ = ["Record", "Selection", "list_corpus", "select_corpus", "select_project", "selected_source",
           "target_records", "generic_corpus", "write_selection"]

SAMPLE_CHARS = 300          # characters of each sample document shown in selection.json
SAMPLES = 3                 # sample documents per top cluster (dsir: top documents)
TOP = 5                     # top clusters / documents shown
TOP_GENERIC_DOMAINS = 50    # domains listed that the selection has no document of
PARTITION = "clusters"      # RUN/select/clusters: the partition (select.partition)


def _sources(project: Project, role: str) -> list[tuple[int, SourceConfig]]:
    return [(i, s) for i, s in enumerate(project.sources) if s.role == role]


CHECKPOINT_CHARS = 1 << 20      # a pass over the generic corpus notes where a record starts about this often ...
MAX_CHECKPOINTS = 4096          # ... and keeps every other one (doubling the step) past this many


class GenericCorpus:
    """Every role = "generic" source, streamed in project order (max_documents applies to each): a
    core.Corpus (each call a pass from the start), which also notes checkpoints as a pass goes: where a
    record starts (source, file, byte offset and line, or row), its ordinal and the characters before it.
    read_from(checkpoint, count) reads `count` records from one, so select's tasks (selection.parallel)
    each parse only their share of the sources, with the ordinals a whole pass gives them."""

    def __init__(self, project: Project, sources: list[tuple[int, SourceConfig]]):
        self.project, self.sources = project, sources
        self.checkpoints: list[dict] = []     # of the last whole pass, with its size: documents, chars
        self.documents = self.chars = 0

    def __call__(self) -> Iterator[Record]:
        return (rec for _, rec in self._records(None, None))

    def read_from(self, checkpoint: dict, count: int) -> Iterator[tuple[int, Record]]:
        """(ordinal, record) of `count` records from a checkpoint of a whole pass."""
        return self._records(checkpoint, count)

    def _records(self, start: dict | None, count: int | None) -> Iterator[tuple[int, Record]]:
        ordinal, chars, step = (start["ordinal"], start["chars"], 0) if start else (0, 0, CHECKPOINT_CHARS)
        checkpoints, next_at = [], 0
        if count == 0:
            return
        for k in range(start["source"] if start else 0, len(self.sources)):
            i, src = self.sources[k]
            here = start if start and k == start["source"] else None
            cursor = Cursor()
            it = iter_records(self.project.resolve(src.path), src.format, name=source_name(src, i),
                              licence=src.licence, text_field=src.text_field, id_field=src.id_field,
                              on_bad_record=src.on_bad_record, cursor=cursor,
                              start=Cursor(here["file"], here["offset"], here["line"]) if here else None)
            for n, rec in enumerate(it, here["n"] + 1 if here else 1):
                if step and chars >= next_at:          # a whole pass: note this record's place
                    checkpoints.append({"ordinal": ordinal, "chars": chars, "source": k, "n": n - 1,
                                        "file": cursor.file, "offset": cursor.offset, "line": cursor.line})
                    if len(checkpoints) > MAX_CHECKPOINTS:
                        checkpoints, step = checkpoints[::2], 2 * step
                    next_at = checkpoints[-1]["chars"] + step
                yield ordinal, rec
                ordinal += 1
                chars += len(rec.text)
                if count is not None and ordinal - start["ordinal"] >= count:
                    return
                if src.max_documents and n >= src.max_documents:
                    break
        if step:
            self.checkpoints, self.documents, self.chars = checkpoints, ordinal, chars

    def shares(self, tasks: int) -> list[tuple[dict, int]]:
        """(checkpoint, count) of `tasks` contiguous shares of about equal characters, from the checkpoints of
        the last whole pass (a share is empty when there are fewer checkpoints than tasks)."""
        if not self.checkpoints:
            raise RuntimeError("GenericCorpus.shares: no whole pass read yet")
        cuts = sorted({min(self.checkpoints, key=lambda c: abs(c["chars"] - t * self.chars / tasks))["ordinal"]
                       for t in range(tasks)} | {0})
        by_ordinal = {c["ordinal"]: c for c in self.checkpoints}
        ends = cuts[1:] + [self.documents]
        shares = [(by_ordinal[a], b - a) for a, b in zip(cuts, ends)]
        return shares + [(self.checkpoints[0], 0)] * (tasks - len(shares))


def generic_corpus(project: Project) -> GenericCorpus:
    """Every role = "generic" source as one re-readable corpus (GenericCorpus)."""
    sources = _sources(project, "generic")
    if not sources:
        raise UserError(f"{project.source_file}: no source with role = \"generic\"; select resamples generic "
                        "sources (jsonl, text or parquet) to match the target: add one")
    return GenericCorpus(project, sources)


def target_records(project: Project, split: str = "train") -> list[Record]:
    """The target's documents of one split: role = "target" sources, else the gold side of the pairs and
    clean sources (read as prepare reads them). The split is prepare's: fixed per source or by
    a seeded hash of (seed, source, document id)."""
    from nichelm.prepare import split_of
    chosen = _sources(project, "target") or [(i, s) for i, s in enumerate(project.sources)
                                             if s.role in ("pairs", "clean")]
    out = []
    for i, src in chosen:
        name = source_name(src, i)
        for rec in _source_documents(project, i, src):
            doc_split = src.split if src.split != "auto" else split_of(
                project.seed, name, rec.id, project.split.val_fraction, project.split.test_fraction)
            if doc_split == split:
                out.append(rec)
    return out


def _source_documents(project: Project, index: int, src: SourceConfig) -> list[Record]:
    name = source_name(src, index)
    if src.role == "target":
        docs = iter_records(project.resolve(src.path), src.format, name=name, licence=src.licence,
                            text_field=src.text_field, id_field=src.id_field, on_bad_record=src.on_bad_record)
        return list(docs)[: src.max_documents or None]
    from nichelm.data.readers import read_documents
    from nichelm.prepare import FILTERS
    docs = read_documents(
        project.resolve(src.path), src.format,
        input_field="" if src.role == "clean" and src.format == "csv" else src.input_field,
        output_field=src.output_field, text_field=src.text_field, id_field=src.id_field or None,
        gold_path=project.resolve(src.gold_path) if src.gold_path else None)[: src.max_documents or None]
    out = []
    for doc in docs:
        text = "".join(s.output for s in doc.segments)
        for f in src.filters:
            text = FILTERS[f](text)
        out.append(Record(name, doc.doc_id, text, src.licence))
    return out


# ------------------------------------------------------------------ outputs

def _fingerprint(project: Project) -> str:
    """Settings and source files (size, mtime) that the selection depends on."""
    def state(path: Path) -> list:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    used = [s for s in project.sources if s.role in ("generic", "target", "pairs", "clean")]
    select = project.to_dict()["select"]
    if not select["partition"]:
        del select["partition"]          # selections made before the setting existed stay up to date
    data = {"select": select, "seed": project.seed, "split": project.to_dict()["split"],
            "sources": [{**vars(s), "files": state(project.resolve(s.path))} for s in used]}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _seed(project: Project) -> int:
    return project.seed if project.select.seed < 0 else project.select.seed


def select_project(project: Project, force: bool = False, log=None, options=None) -> dict:
    """Run the selection of a project; write RUN/select/selected.jsonl and selection.json; return the report.

    options (prepare_pipeline.ExecutorOptions): dsir scores on datatrove tasks (nichelm.selection.parallel),
    `--workers` of them at once; None: in this process. The outputs do not depend on it. Slurm: returns
    {"submitted": message} once the tasks are submitted; the same call after they end makes the selection."""
    out = project.run_path / "select"
    fp = _fingerprint(project)
    done = out / "selection.json"
    partition = out / PARTITION if project.select.partition else None
    if (not force and done.is_file() and (out / "selected.jsonl").is_file()
            and (partition is None or partition.is_dir())):
        report = json.loads(done.read_text(encoding="utf-8"))
        if report.get("fingerprint") == fp:
            if not (out / "selection.html").is_file():
                _write_html(report, out / "selection.html")
            report["reused"] = True
            return report
    corpus = generic_corpus(project)
    target = target_records(project, "train")
    if not target:
        raise UserError(f"{project.source_file}: the target has no train-split document (role = \"target\" sources, "
                        "else pairs / clean sources); add target text or lower split.val_fraction / test_fraction")
    kwargs = {"log": log} if log else {}
    kwargs["partition"] = partition
    if options is not None:
        from nichelm.selection.parallel import Submitted, TaskScorer
        kwargs["scorer"] = TaskScorer(project, options, sum(_size(project.resolve(s.path))
                                                             for _, s in _sources(project, "generic")))
        try:
            selection = select_corpus(corpus, [r.text for r in target], project.select, _seed(project), **kwargs)
        except Submitted as e:
            return {"submitted": str(e)}
    else:
        selection = select_corpus(corpus, [r.text for r in target], project.select, _seed(project), **kwargs)
    report = write_selection(corpus, selection, out / "selected.jsonl", project.select)
    from nichelm.prepare import file_sha256
    # prepare's manifest records the sha256 of the selected.jsonl it read: this ties that file to this report
    report["output_sha256"] = file_sha256(out / "selected.jsonl")
    report["fingerprint"] = fp
    report["target_sources"] = sorted({r.source for r in target})
    domains = Counter(r.domain for r in target if r.domain)
    if domains:
        report["target"]["per_domain"] = {d: {"documents": n, "share": n / len(target)}
                                          for d, n in domains.most_common()}
    atomic_write_json(done, report)
    _write_html(report, out / "selection.html")
    # the scoring tasks' files (selection.parallel) and a partition's parts: the completion markers first, so
    # that an interrupted removal leaves no task marked done without its files
    shutil.rmtree(out / WORK / "logs", ignore_errors=True)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return report


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _write_html(report: dict, path: Path) -> None:
    from nichelm.report import write_selection_html     # matplotlib is imported only when a page is drawn
    write_selection_html(report, path)


def selected_source(project: Project) -> SourceConfig | None:
    """The selection as a clean jsonl source for prepare (name "selected"; each line's own licence is in
    the file; the generic sources' split when they all give the same), or None when the project has no generic source. A missing or out-of-date selection
    is a UserError that says to run `nichelm select`."""
    if not _sources(project, "generic"):
        return None
    out = project.run_path / "select"
    try:
        report = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if report is None or not (out / "selected.jsonl").is_file():
        raise UserError(f"{project.source_file}: the generic sources are not selected yet; run `nichelm select "
                        f"{project.source_file}` first")
    if report.get("fingerprint") != _fingerprint(project):
        raise UserError(f"{project.source_file}: {out / 'selection.json'} was made with other [select] settings or "
                        f"sources; run `nichelm select {project.source_file}` again")
    licences = Counter()
    for src in report["per_source"].values():
        licences.update(src["licences"])
    summary = "; ".join(f"{name} ({n:,} documents)" for name, n in licences.most_common())
    # The generic sources' own split when they agree (split = "train": selected text only trains, and the
    # val/test splits stay the task's real documents); else split by document like any source.
    splits = {s.split for _, s in _sources(project, "generic")}
    return SourceConfig(path=str(out / "selected.jsonl"), format="jsonl", role="clean", name="selected",
                        licence=f"per document (selected.jsonl 'licence'): {summary}", input_field="",
                        output_field="text", id_field="id", split=splits.pop() if len(splits) == 1 else "auto")


def _row(rec: Record, pick: Pick, copy: int) -> dict:
    row = record_row(rec, pick.cluster if pick.cluster >= 0 else None, pick.weight)
    if copy > 1:
        row["id"] = f"{rec.id}~{copy}"          # keeps its place, first
        row["copy"] = copy
    return row


def write_selection(corpus: Corpus, selection: Selection, path: Path | None, cfg: SelectConfig) -> dict:
    """Write the chosen documents (jsonl, atomically; path None: write nothing) and return the selection
    report: what was chosen, from where, under which licences, and how much closer to the target it is (DSIR's
    KL reduction over hashed n-grams: KL(target || generic) - KL(target || selected))."""
    t0 = time.monotonic()
    hashes = TokenHashes()
    selected_counts = np.zeros(cfg.buckets)
    per_source = defaultdict(Counter)
    licences = defaultdict(Counter)
    per_domain = Counter()
    per_cluster = Counter()                  # documents per cluster ...
    per_cluster_tokens = Counter()           # ... and tokens (the unit of the target's histogram with select.tokens)
    samples = defaultdict(list)              # cluster (or -1) -> [(weight, id, text start)]
    docs = tokens = 0
    batch, weights, batch_chars = [], [], 0

    def flush():
        nonlocal batch_chars
        if batch:
            selected_counts[:] += NgramBatch(batch, hashes).counts(cfg.buckets, weights)
            batch.clear()
            weights.clear()
            batch_chars = 0

    with atomic_file(path) if path is not None else nullcontext() as f:
        for rec, pick in iter_picks(corpus, selection):
            for copy in range(1, pick.copies + 1) if f is not None else ():
                f.write((json.dumps(_row(rec, pick, copy), ensure_ascii=False) + "\n").encode("utf-8"))
            n = pick.copies
            docs += n
            tokens += n * pick.n_tokens
            per_source[rec.source]["documents"] += n
            per_source[rec.source]["tokens"] += n * pick.n_tokens
            per_source[rec.source]["distinct_documents"] += 1
            licences[rec.source][rec.licence or "unspecified"] += n
            if rec.domain:
                per_domain[rec.domain] += n
            per_cluster[pick.cluster] += n
            per_cluster_tokens[pick.cluster] += n * pick.n_tokens
            samples[pick.cluster].append((pick.weight, rec.id, rec.text[:SAMPLE_CHARS]))
            if len(samples[pick.cluster]) > 4 * SAMPLES:           # keep the best few only
                samples[pick.cluster] = sorted(samples[pick.cluster], reverse=True)[:SAMPLES]
            batch.append(rec.text)
            weights.append(n)
            batch_chars += len(rec.text)
            if batch_chars >= BATCH_CHARS:
                flush()
        flush()
    facts = selection.facts
    kl_generic = kl(selection.target_counts, selection.generic_counts)
    kl_selected = kl(selection.target_counts, selected_counts) if docs else None
    report = {
        "method": facts["method"], "settings": {k: facts[k] for k in ("mode", "seed", "buckets", "min_tokens", "size")},
        "selected": {"documents": docs, "distinct_documents": len(selection.picks), "tokens": tokens},
        "generic": {"documents": facts["generic_documents"], "chars": facts["generic_chars"],
                    "eligible_documents": facts["eligible_documents"],
                    "too_short_documents": facts["too_short_documents"],
                    "fit_sample_documents": facts["fit_sample_documents"]},
        "target": {"documents": facts["target_documents"], "tokens": facts["target_tokens"]},
        "kl": {"target_vs_generic": kl_generic, "target_vs_selected": kl_selected,
               "reduction": None if kl_selected is None else kl_generic - kl_selected},
        "per_source": {name: {**c, "share": c["documents"] / docs if docs else 0.0,
                              "seen_documents": facts["generic_documents_per_source"].get(name, 0),
                              "licences": dict(licences[name])}
                       for name, c in sorted(per_source.items())},
        "per_domain": _per_domain(per_domain, docs, facts.get("generic_documents_per_domain", {})),
        "seconds": round(facts["seconds"] + time.monotonic() - t0, 3),
        "output": str(path) if path is not None else None,
    }
    if selection.clusters is not None:
        # shares in the unit the quotas were set in: tokens with select.tokens, else documents
        units, total = (per_cluster_tokens, tokens) if "tokens" in facts["size"] else (per_cluster, docs)
        table = [{**row, "selected_share": units[row["cluster"]] / total if total else 0.0}
                 for row in selection.clusters]
        report["k"], report["embedding"] = facts["k"], facts["embedding"]
        report["clusters"] = table
        ranked = sorted((r for r in table if r["log_weight"] is not None and per_cluster[r["cluster"]]),
                        key=lambda r: -r["log_weight"])[:TOP]
        report["top_clusters"] = [{"cluster": r["cluster"], "log_weight": r["log_weight"],
                                   "samples": [{"id": i, "text": t} for _, i, t in
                                               sorted(samples[r["cluster"]], reverse=True)[:SAMPLES]]}
                                  for r in ranked]
    else:
        best = sorted(samples[-1], reverse=True)[:TOP]
        report["top_documents"] = [{"id": i, "log_weight": w, "text": t} for w, i, t in best]
    if selection.partition is not None:
        report["partition"] = selection.partition
    return report


def _per_domain(selected: Counter, docs: int, generic: dict) -> dict:
    """Per domain (the records' own field): selected documents and share, beside the generic corpus's
    documents and share, so the report shows where the selection moved the mix; most selected first."""
    generic_total = sum(generic.values())
    # every selected domain, and of the others the generic corpus's largest few (a "domain" field may be a URL's)
    shown = set(selected) | {d for d, _ in Counter(generic).most_common(TOP_GENERIC_DOMAINS)}
    names = sorted(shown, key=lambda d: (-selected[d], -generic.get(d, 0), d))
    return {d: {"documents": selected[d], "share": selected[d] / docs if docs else 0.0,
                "generic_documents": generic.get(d, 0),
                "generic_share": generic.get(d, 0) / generic_total if generic_total else 0.0} for d in names}


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout              # looked up now: tests and callers may swap it
    if "submitted" in report:
        print(report["submitted"], file=file)
        return
    sel, gen = report["selected"], report["generic"]
    again = " (reused: same settings and sources)" if report.get("reused") else ""
    print(f"select ({report['method']}){again}: {sel['documents']:,} documents, {sel['tokens']:,} tokens "
          f"chosen from {gen['documents']:,} generic documents", file=file)
    kl_ = report["kl"]
    if kl_["reduction"] is not None:
        print(f"KL(target || generic) {kl_['target_vs_generic']:.4f} -> KL(target || selected) "
              f"{kl_['target_vs_selected']:.4f}: reduction {kl_['reduction']:.4f}", file=file)
    for name, s in report["per_source"].items():
        print(f"  {name}: {s['documents']:,} documents ({100 * s['share']:.1f}%)", file=file)
    for domain, s in [(d, s) for d, s in report["per_domain"].items() if s["documents"]][:10]:
        print(f"  domain {domain}: {100 * s['share']:.1f}%", file=file)
    print(f"selected: {report['output']}", file=file)
