"""Importance resampling of a generic corpus towards a target: DSIR and cluster importance sampling.

Both methods run the same passes over the generic corpus, each a stream with bounded memory:

A. *Sample*: read every document once (no featurizing) and keep a seeded sample of about
   `fit_chars` characters: the documents with the smallest keys u(seed, source, id), held in a
   bounded heap. The generic distribution (DSIR) or the clusters (k-means) are fit on it.
B. *Score*: every document gets a key, and a bounded heap keeps the best keys up to the
   requested size (documents or tokens), so memory grows with the selection, never the corpus.
   - dsir: log w = sum over the document's hashed uni+bigrams of log p_target - log p_generic
     (the reference's weights); key = log w + Gumbel noise (sampling without replacement:
     Gumbel top-k), or log w alone in mode top_k.
   - clusters: the document's cluster c (k-means on embeddings); cluster c has a quota
     size x P(c | target), filled with a uniform seeded sample of its documents, repeated when it
     has too few (with replacement, as in the paper); weight P(c | target) / P(c | generic).
   What scoring needs once fit is plain arrays (DsirScoring, clusters.ClusterScoring), so pass B can
   run in other processes (nichelm.selection.parallel), each over a share of the documents.
C. *Read out* (iter_picks): the chosen documents, in corpus order, with their weight and cluster.

Every random draw is a hash of (seed, source, document id), not a stream of random numbers, so
the selection depends on the seed and the corpus only, not on batch sizes or reading order, and
heaps filled by separate workers merge into the same selection.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nichelm.config import SelectConfig
from nichelm.errors import UserError
from nichelm.selection.features import NgramBatch, TokenHashes, compact_buckets, compact_doc_sums, log_ratio
from nichelm.selection.records import Corpus, Record

# characters featurized at once: a batch holds ~40 bytes per character (token strings, numpy arrays), and
# every scoring task holds one (peak of one scoring process: 210 MB with 4 MB batches, 99 MB with 1 MB)
BATCH_CHARS = 1_000_000
LOG_EVERY_S = 30.0
WORK = ".work"           # RUN/select/.work: the tasks' files and the partition's parts, removed once select is done


@dataclass(slots=True)
class Pick:
    """A chosen document: its log importance weight, wordpunct tokens, cluster (-1: none), copies."""
    weight: float
    n_tokens: int
    cluster: int = -1
    copies: int = 1


class BudgetHeap:
    """The items with the highest keys whose sizes add up to `budget`: the fewest best ones that reach
    it (size 1 each: the `budget` best). A min-heap, so memory follows the budget, not the stream.
    Ties go to the lower ordinal, so the result does not depend on the order of pushes."""

    def __init__(self, budget: float):
        self.budget = budget
        self.total = 0.0
        self.heap: list[tuple] = []

    def push(self, key: float, ordinal: int, size: float, payload=None) -> None:
        if self.budget <= 0:
            return
        item = (key, -ordinal, size, payload)
        if self.total >= self.budget and item[:2] <= self.heap[0][:2]:
            return                                   # full, and no better than the worst kept
        heapq.heappush(self.heap, item)
        self.total += size
        while self.total - self.heap[0][2] >= self.budget:
            self.total -= heapq.heappop(self.heap)[2]

    def items(self) -> list[tuple[float, int, float, object]]:
        """(key, ordinal, size, payload), best first."""
        return [(k, -o, s, p) for k, o, s, p in sorted(self.heap, reverse=True)]


def uniform(seed: int, salt: str, source: str, doc_id: str) -> float:
    """A number in (0, 1) drawn by hashing: the same document always gets the same one."""
    h = hashlib.blake2b(f"{seed}\x00{salt}\x00{source}\x00{doc_id}".encode("utf-8", "surrogatepass"),
                        digest_size=8).digest()
    return (int.from_bytes(h, "big") + 0.5) / 2.0**64


def gumbel(u: float) -> float:
    return -math.log(-math.log(u))


@dataclass
class Selection:
    picks: dict[int, Pick]               # corpus ordinal -> pick
    generic_counts: np.ndarray           # hashed n-gram counts (select.buckets) of the generic fit sample ...
    target_counts: np.ndarray | None = None   # ... and of the target: DSIR's KL measure compares them
    facts: dict = field(default_factory=dict)
    clusters: list[dict] | None = None   # clusters: per cluster target/generic shares, weight, quota
    partition: dict | None = None        # select.partition: the cluster files written (clusters.write_partition)


class Progress:
    def __init__(self, what: str, log):
        self.what, self.log, self.t0, self.last = what, log, time.monotonic(), time.monotonic()
        self.docs = self.chars = 0

    def add(self, docs: int, chars: int) -> None:
        self.docs += docs
        self.chars += chars
        if time.monotonic() - self.last >= LOG_EVERY_S:
            self.last = time.monotonic()
            rate = self.chars / max(self.last - self.t0, 1e-9) / 1e6
            self.log(f"{self.what}: {self.docs:,} documents ({rate:.1f} MB/s)")


def _log(msg: str) -> None:
    print(f"select: {msg}", file=sys.stderr, flush=True)


def numbered(corpus: Corpus) -> Iterator[tuple[int, Record]]:
    return enumerate(corpus())


def chunks(items: Iterable[tuple[int, Record]], batch_chars: int = 0) -> Iterator[list[tuple[int, Record]]]:
    """Lists of (ordinal, record) of about batch_chars (default BATCH_CHARS) characters, at least one record each."""
    batch_chars = batch_chars or BATCH_CHARS
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[1].text)
        if size >= batch_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ------------------------------------------------------------------ pass A: the fit sample

def fit_sample(corpus: Corpus, fit_chars: int, seed: int, log=_log) -> tuple[list[tuple[int, Record]], dict]:
    """(ordinal, record) of a seeded sample of about fit_chars characters, in corpus order, and the
    corpus's counts: documents and characters, per source too, and documents per domain (records that have one)."""
    heap = BudgetHeap(fit_chars)
    docs, chars, domains = Counter(), Counter(), Counter()
    progress = Progress("reading the generic corpus", log)
    for ordinal, rec in numbered(corpus):
        docs[rec.source] += 1
        chars[rec.source] += len(rec.text)
        if rec.domain:
            domains[rec.domain] += 1
        heap.push(-uniform(seed, "fit", rec.source, rec.id), ordinal, len(rec.text), rec)
        progress.add(1, len(rec.text))
    sample = sorted((o, rec) for _, o, _, rec in heap.items())
    facts = {"generic_documents": sum(docs.values()), "generic_chars": sum(chars.values()),
             "generic_documents_per_source": dict(docs), "generic_documents_per_domain": dict(domains),
             "fit_sample_documents": len(sample),
             "fit_sample_chars": sum(len(r.text) for _, r in sample)}
    return sample, facts


def selection_size(cfg: SelectConfig, generic_documents: int) -> tuple[float, bool]:
    """(size, in tokens?): documents, tokens, or a fraction of the generic documents."""
    if cfg.tokens:
        return float(cfg.tokens), True
    if cfg.documents:
        return float(cfg.documents), False
    if cfg.fraction:
        return float(round(cfg.fraction * generic_documents)), False
    raise UserError("select: no selection size; set select.documents, select.tokens or select.fraction")


def featurize_counts(texts: list[str], n_buckets: int, hashes: TokenHashes) -> tuple[np.ndarray, np.ndarray]:
    """(bucket counts of all texts, tokens of each text), in batches."""
    counts, n_tokens = np.zeros(n_buckets), []
    batch: list[str] = []
    size = 0
    for text in [*texts, None]:
        if text is not None:
            batch.append(text)
            size += len(text)
        if batch and (text is None or size >= BATCH_CHARS):
            b = NgramBatch(batch, hashes)
            counts += b.counts(n_buckets)
            n_tokens.append(b.n_tokens)
            batch, size = [], 0
    return counts, (np.concatenate(n_tokens) if n_tokens else np.zeros(0, np.int64))


# ------------------------------------------------------------------ the two methods

def select_corpus(corpus: Corpus, target: list[str], cfg: SelectConfig, seed: int, log=_log,
                  scorer=None, partition: Path | None = None) -> Selection:
    """Choose documents of `corpus` (re-readable) that look like the `target` texts.

    cfg gives the method, size (documents / tokens / fraction), mode, buckets, k and the rest
    (config.SelectConfig); `seed` is the seed to use (the caller resolves select.seed = -1).
    `scorer(corpus, spec, into, log) -> stats` scores the documents outside the fit sample into `into`
    (spec: DsirScoring, into its heap; clusters.ClusterScoring, into its per-cluster heaps) (default
    local_scorer: this process; nichelm.selection.parallel: datatrove tasks).
    partition (method clusters only): a folder to write every document that passes min_tokens into, one
    jsonl per cluster (clusters.write_partition); the processes' parts wait in partition.parent/.work/parts,
    which the caller removes (select_project removes .work)."""
    if partition is not None and cfg.method != "clusters":
        raise UserError("select.partition = true needs select.method = \"clusters\" (the partition is by k-means "
                        "cluster): set method = \"clusters\" or remove partition")
    t0 = time.monotonic()
    hashes = TokenHashes()
    target_counts, target_tokens = featurize_counts(target, cfg.buckets, hashes)
    if not target_tokens.sum():
        raise UserError("select: the target text has no words; check the target sources")
    sample, facts = fit_sample(corpus, cfg.fit_chars, seed, log)
    if not sample:
        raise UserError("select: the generic sources hold no documents; check their paths, formats and text_field")
    size, by_tokens = selection_size(cfg, facts["generic_documents"])
    facts.update({"method": cfg.method, "mode": cfg.mode if cfg.method == "dsir" else "sample",
                  "seed": seed, "buckets": cfg.buckets, "min_tokens": cfg.min_tokens,
                  "size": {"tokens" if by_tokens else "documents": int(size)},
                  "target_documents": len(target), "target_tokens": int(target_tokens.sum()),
                  "seconds_sample": round(time.monotonic() - t0, 3)})
    log(f"{facts['generic_documents']:,} generic documents; fitting on a sample of {len(sample):,}; "
        f"target {len(target):,} documents")
    if cfg.method == "dsir":
        selection = _dsir(corpus, sample, target_counts, cfg, seed, size, by_tokens, hashes, log,
                          scorer or local_scorer)
    else:
        selection = _clusters(corpus, sample, target, target_tokens, cfg, seed, size, by_tokens, hashes, log,
                              scorer or local_scorer, partition)
    selection.target_counts = target_counts
    selection.facts = {**facts, **selection.facts, "seconds": round(time.monotonic() - t0, 3)}
    return selection


@dataclass
class DsirScoring:
    """What scoring documents needs once the weights are fit: every field is plain numbers, so the
    parent can hand it to other processes (nichelm.selection.parallel saves it as npz + json).
    clusters.ClusterScoring has the same interface: arrays / from_arrays, new_share, score,
    share_arrays / merge_share."""
    method = "dsir"
    log_diff: np.ndarray          # per bucket, log p_target - log p_generic
    skip: np.ndarray              # sorted ordinals already scored (the fit sample's)
    seed: int
    mode: str                     # sample | top_k
    min_tokens: int
    size: float                   # the selection's budget, in documents or tokens ...
    by_tokens: bool               # ... tokens when True

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"log_diff": self.log_diff.astype(np.float64), "skip": self.skip.astype(np.int64)}
        settings = {"method": self.method, "seed": self.seed, "mode": self.mode, "min_tokens": self.min_tokens,
                    "size": self.size, "by_tokens": self.by_tokens}
        return arrays, settings

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], settings: dict) -> "DsirScoring":
        return cls(arrays["log_diff"], arrays["skip"], settings["seed"], settings["mode"], settings["min_tokens"],
                   settings["size"], settings["by_tokens"])

    def new_share(self, part: str = "") -> BudgetHeap:
        return BudgetHeap(self.size)         # part: a partition's, which only clusters writes

    def score(self, items: Iterable[tuple[int, Record]], log=_log, into: BudgetHeap | None = None,
              what: str = "scoring") -> tuple[BudgetHeap, Counter]:
        return score_share(items, self, log, into, what)

    def share_arrays(self, heap: BudgetHeap, stats: Counter) -> dict[str, np.ndarray]:
        items = heap.items()
        return {"keys": np.array([k for k, _, _, _ in items], np.float64),
                "ordinals": np.array([o for _, o, _, _ in items], np.int64),
                "sizes": np.array([s for _, _, s, _ in items], np.float64),
                "weights": np.array([p.weight for _, _, _, p in items], np.float64),
                "tokens": np.array([p.n_tokens for _, _, _, p in items], np.int64),
                "stats": np.array([stats["scored"], stats["too_short"]], np.int64)}

    def merge_share(self, z, heap: BudgetHeap) -> Counter:
        """Push a share saved by share_arrays (an npz, or the dict) into `heap`; its counts."""
        merge_into(heap, ((float(k), int(o), float(s), Pick(float(w), int(n)))
                          for k, o, s, w, n in zip(z["keys"], z["ordinals"], z["sizes"], z["weights"], z["tokens"])))
        scored, too_short = (int(x) for x in z["stats"])
        return Counter(scored=scored, too_short=too_short)


def _consider(spec: DsirScoring, heap: BudgetHeap, stats: Counter, ordinal: int, source: str, doc_id: str,
              w: float, n: int) -> None:
    if n < spec.min_tokens:
        stats["too_short"] += 1
        return
    stats["scored"] += 1
    key = w if spec.mode == "top_k" else w + gumbel(uniform(spec.seed, "gumbel", source, doc_id))
    heap.push(key, ordinal, n if spec.by_tokens else 1, Pick(float(w), int(n)))


def score_share(items: Iterable[tuple[int, Record]], spec: DsirScoring, log=_log, heap: BudgetHeap | None = None,
                what: str = "scoring") -> tuple[BudgetHeap, Counter]:
    """Score the (ordinal, record) items outside spec.skip (the whole corpus, or a task's share of it) into
    `heap` (default: a new one of the selection's budget). Every key is a function of the document and
    the seed, so heaps of the shares merged (merge_into) hold what one heap over the whole corpus would."""
    heap = spec.new_share() if heap is None else heap
    stats, hashes = Counter(), TokenHashes()
    skip = set(spec.skip.tolist())           # the fit sample: bounded by select.fit_chars
    progress = Progress(what, log)
    for chunk in chunks((o, r) for o, r in items if o not in skip):
        batch = NgramBatch([r.text for _, r in chunk], hashes)
        for (o, r), w, n in zip(chunk, batch.doc_sums(spec.log_diff), batch.n_tokens):
            _consider(spec, heap, stats, o, r.source, r.id, w, n)
        progress.add(len(chunk), sum(len(r.text) for _, r in chunk))
    return heap, stats


def merge_into(heap: BudgetHeap, items: Iterable[tuple[float, int, float, object]]) -> None:
    """Push (key, ordinal, size, payload) items, e.g. another heap's items(), into heap."""
    for key, ordinal, size, payload in items:
        heap.push(key, ordinal, size, payload)


def local_scorer(corpus: Corpus, spec, into, log) -> Counter:
    """The default scorer: the whole rest of the corpus in this process, into `into` (spec.new_share()'s kind:
    dsir's heap, or clusters' per-cluster heaps)."""
    return spec.score(numbered(corpus), log, into)[1]


def _dsir(corpus: Corpus, sample, target_counts, cfg: SelectConfig, seed: int, size: float, by_tokens: bool,
          hashes: TokenHashes, log, scorer) -> Selection:
    # fit p_generic on the sample, keeping its buckets (compact) to score it without featurizing twice
    generic_counts, kept = np.zeros(cfg.buckets), []
    for chunk in chunks(sample):
        batch = NgramBatch([r.text for _, r in chunk], hashes)
        generic_counts += batch.counts(cfg.buckets)
        kept.append(([(o, r.source, r.id) for o, r in chunk], compact_buckets(batch, cfg.buckets)))
    spec = DsirScoring(log_ratio(target_counts, generic_counts), np.array(sorted(o for o, _ in sample), np.int64),
                       seed, cfg.mode, cfg.min_tokens, size, by_tokens)
    heap, stats = BudgetHeap(size), Counter()
    for docs, (n_tokens, buckets) in kept:
        for (o, source, doc_id), w, n in zip(docs, compact_doc_sums(n_tokens, buckets, spec.log_diff), n_tokens):
            _consider(spec, heap, stats, o, source, doc_id, w, n)
    del kept
    sample.clear()                       # the caller's list too: the sample's texts are not needed any more
    stats.update(scorer(corpus, spec, heap, log))
    picks = {o: p for _, o, _, p in heap.items()}
    return Selection(picks, generic_counts, facts={"eligible_documents": stats["scored"],
                                                   "too_short_documents": stats["too_short"]})


def _clusters(corpus: Corpus, sample, target: list[str], target_tokens: np.ndarray, cfg: SelectConfig, seed: int,
              size: float, by_tokens: bool, hashes: TokenHashes, log, scorer, partition: Path | None) -> Selection:
    from sklearn.cluster import MiniBatchKMeans

    from nichelm.selection.clusters import (ClusterScoring, default_k, make_embedder, nearest, quotas, repeat_to_quota,
                                            write_partition)
    texts = [r.text for _, r in sample]
    generic_counts, sample_tokens = featurize_counts(texts, cfg.buckets, hashes)
    embedder = make_embedder(cfg, seed, hashes)
    # with a partition the fit is the generic sample's alone: the clusters (and their files) are then the same
    # for any target, so one set of experts serves every target (ClusterFit places each one); without one the
    # target helps shape the embedding, as it always has (selected.jsonl's bytes unchanged)
    embedder.fit(texts if partition is not None else texts + target)
    emb = embedder.embed(texts)
    k = min(cfg.k or default_k(len(sample)), len(sample))
    log(f"k-means: {k} clusters of {len(sample):,} sampled documents ({emb.shape[1]} dimensions)")
    centres = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=2048).fit(emb).cluster_centers_
    sample_clusters = nearest(emb, centres)
    target_clusters = nearest(embedder.embed(target), centres) if target else np.zeros(0, np.int64)
    target_units = np.bincount(target_clusters, weights=target_tokens if by_tokens else None, minlength=k)
    # clusters the sample shows no selectable generic document in cannot fill a quota: theirs goes to the rest
    selectable = np.bincount(sample_clusters[sample_tokens >= cfg.min_tokens], minlength=k) > 0
    quota = quotas(target_units * selectable, size, integer=not by_tokens)
    spec = ClusterScoring(cfg.embedding, cfg.window_chars, embedder.arrays(), centres, quota,
                          np.array(sorted(o for o, _ in sample), np.int64), seed, cfg.min_tokens, by_tokens,
                          str(partition.parent / WORK / "parts") if partition is not None else "", embedder=embedder)
    share, stats = spec.new_share(), Counter()
    for (o, r), c, n in zip(sample, sample_clusters, sample_tokens):
        spec.consider(share, stats, o, r, int(c), int(n))
    if share.writer is not None:
        share.writer.flush()             # the fit sample's part, before the tasks write theirs
    sample.clear()                       # the caller's list too: the sample's texts are not needed any more
    del texts, emb
    stats.update(scorer(corpus, spec, share, log))
    p_target = target_units / max(target_units.sum(), 1e-12)
    p_generic = share.units / max(share.units.sum(), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_w = np.where((p_target > 0) & (p_generic > 0), np.log(p_target) - np.log(p_generic), -np.inf)
    picks: dict[int, Pick] = {}
    for c, heap in share.heaps.items():
        for o, pick in repeat_to_quota(heap.items(), quota[c]):
            pick.weight = float(log_w[c])
            picks[o] = pick
    table = [{"cluster": c, "target_share": float(p_target[c]), "generic_share": float(p_generic[c]),
              "log_weight": float(log_w[c]) if np.isfinite(log_w[c]) else None, "quota": float(quota[c])}
             for c in range(k)]
    if partition is not None:
        log(f"writing the partition: {int(share.documents.sum()):,} documents into {k} cluster files in {partition}")
    return Selection(picks, generic_counts, clusters=table,
                     partition=write_partition(spec, share, partition) if partition is not None else None,
                     facts={"k": k, "embedding": cfg.embedding, "eligible_documents": stats["scored"],
                            "too_short_documents": stats["too_short"]})


# ------------------------------------------------------------------ pass C: read the selection out

def iter_picks(corpus: Corpus, selection: Selection) -> Iterator[tuple[Record, Pick]]:
    """The chosen documents in corpus order, each with its pick (a pick may ask for several copies)."""
    picks = selection.picks
    for ordinal, rec in numbered(corpus):
        pick = picks.get(ordinal)
        if pick is not None:
            yield rec, pick
