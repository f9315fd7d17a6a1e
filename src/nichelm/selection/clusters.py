"""What cluster importance sampling (SLM-is) needs besides k-means: embeddings and quotas.

Embeddings work offline. The default is a hashed uni+bigram TF-IDF of each window reduced by a
truncated SVD (scikit-learn), fit on the generic sample and the target (with select.partition, on the
generic sample alone, so the clusters do not depend on the target); with select.embedding
naming the folder of a local sentence-transformers model, that model embeds the windows instead.
Long documents are cut into windows of select.window_chars at whitespace; a document's embedding
is the normalised mean of its windows'.

Assigning runs on select's tasks too (nichelm.selection.parallel): ClusterScoring holds what it needs
once the parent has fit (the TF-IDF + SVD as arrays, applied with numpy and scipy exactly as
scikit-learn applies them; the k-means centres; the quotas), and a document's cluster (nearest())
depends on that document only, so every task assigns it the same one.

The partition (select.partition): every document that passes min_tokens also goes, as a line like
selected.jsonl's, into its cluster's file. Each process appends its documents to part files of its own
(PartWriter: RUN/select/.work/parts/PART/cluster-NNNN.jsonl, in the order it reads them, a bounded buffer
between), the parts travel with the shares (ClusterShare.parts: the parent's first, then the tasks' in
rank order) and write_partition concatenates them into RUN/select/clusters/cluster-NNNN.jsonl, staged and
swapped in whole, beside the fit (fit.npz + fit.json) that assigns a new text to the same clusters
(ClusterFit). The parent's part holds the fit sample, then (in one process) the rest: each file holds the
fit sample's documents of its cluster, then the others', each in corpus order, whatever the tasks.
Nothing in a partition depends on the target (its lines have no weight; the fit is the generic sample's):
two projects with the same generic sources, select settings and seed write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nichelm.config import SelectConfig
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, fsync_tree, replace_dir, staging_dir
from nichelm.selection.core import BudgetHeap, Pick, Progress, _log, chunks, uniform
from nichelm.selection.features import NgramBatch, TokenHashes, tokenize
from nichelm.selection.records import Record, record_row

EMBED_BUCKETS = 1 << 15      # hashed n-gram features of the TF-IDF embedding (the SVD costs in proportion)
EMBED_DIMS = 64               # SVD components (the SVD costs about dims squared)
MAX_K = 1024                 # the paper's k on c4


def default_k(n_docs: int) -> int:
    """About sqrt(documents) clusters, from 2 to the paper's 1,024."""
    return max(2, min(MAX_K, round(math.sqrt(n_docs))))


def windows(text: str, size: int) -> list[str]:
    """text cut into pieces of at most about `size` characters, only at whitespace (so no word is
    split: a piece is longer when a run has no whitespace)."""
    out, start, n = [], 0, len(text)
    while n - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        if cut <= start:                            # no whitespace in range: the next one after it
            nxt = [i for i in (text.find(" ", end), text.find("\n", end)) if i >= 0]
            if not nxt:
                break
            cut = min(nxt)
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _windows_of(texts: list[str], size: int) -> tuple[list[str], np.ndarray]:
    wins, owner = [], []
    for d, text in enumerate(texts):
        w = windows(text, size)
        wins.extend(w)
        owner.extend([d] * len(w))
    return wins, np.asarray(owner, dtype=np.int64)


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _mean_per_doc(emb: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    out = np.zeros((n_docs, emb.shape[1]), dtype=np.float64)
    np.add.at(out, owner, emb)
    return _normalize(out).astype(np.float32)


class TfidfEmbedder:
    """Hashed uni+bigram TF-IDF (sublinear tf) + truncated SVD, L2-normalised."""

    def __init__(self, window_chars: int, seed: int, hashes: TokenHashes, dims: int = EMBED_DIMS):
        self.window_chars, self.seed, self.hashes, self.dims = window_chars, seed, hashes, dims
        self.last_tokens: np.ndarray | None = None    # wordpunct tokens of each document of the last embed()

    def _matrix(self, wins: list[str]):
        from scipy.sparse import vstack
        parts, tokens = [], []
        step = 2000
        for i in range(0, len(wins), step):
            batch = NgramBatch(wins[i:i + step], self.hashes)
            parts.append(batch.matrix(EMBED_BUCKETS))
            tokens.append(batch.n_tokens)
        return vstack(parts).tocsr(), np.concatenate(tokens)

    def fit(self, texts: list[str]) -> "TfidfEmbedder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfTransformer
        x, _ = self._matrix(_windows_of(texts, self.window_chars)[0])
        columns = np.unique(x.indices)               # buckets the fit text uses: the SVD's cost follows their number
        x = x[:, columns]
        tfidf = TfidfTransformer(sublinear_tf=True).fit(x)
        dims = max(1, min(self.dims, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=dims, random_state=self.seed).fit(tfidf.transform(x))
        return self.load({"columns": columns, "idf": tfidf.idf_, "components": svd.components_})

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted transform as plain arrays (saved as npz for the assigning tasks; load() takes them back)."""
        return {"columns": self.columns, "idf": self.idf, "components": self.components}

    def load(self, arrays: dict[str, np.ndarray]) -> "TfidfEmbedder":
        """Set the fitted transform from its arrays. fit() goes through here too, so the parent and every task
        embed with the same code."""
        self.columns, self.idf, self.components = (np.asarray(arrays[k]) for k in ("columns", "idf", "components"))
        return self

    def _transform(self, x):
        """scikit-learn's TfidfTransformer(sublinear_tf=True).transform then TruncatedSVD.transform, redone in
        numpy and scipy to the bit (tests/test_select.py compares them), so that the tasks need not import
        scikit-learn (~75 MB a process). x: windows x columns counts (float32 CSR), changed in place."""
        np.log(x.data, x.data)
        x.data += 1.0
        x.data *= self.idf[x.indices]
        _l2_rows(x)
        return x @ self.components.T

    def embed(self, texts: list[str]) -> np.ndarray:
        wins, owner = _windows_of(texts, self.window_chars)
        x, win_tokens = self._matrix(wins)
        x = x[:, self.columns]
        self.last_tokens = np.bincount(owner, weights=win_tokens, minlength=len(texts)).astype(np.int64)
        emb = _normalize(self._transform(x))
        return _mean_per_doc(emb, owner, len(texts))


def _l2_rows(x, block: int = 256) -> None:
    """Each row of CSR x divided by its L2 norm, in place, as scikit-learn's inplace_csr_row_normalize_l2:
    the squares (in x's precision) summed in stored order in float64, the quotient rounded back to x's
    dtype, rows of norm 0 left alone. The in-order sums: a cumulative sum along zero-padded rows."""
    lengths = np.diff(x.indptr)
    for r in range(0, len(lengths), block):
        a, b = x.indptr[r], x.indptr[min(r + block, len(lengths))]
        if a == b:
            continue
        n = lengths[r:r + block]
        rows = np.repeat(np.arange(len(n)), n)
        data = x.data[a:b]
        padded = np.zeros((len(n), n.max()))
        padded[rows, np.arange(b - a) - (x.indptr[r:r + len(n)] - a)[rows]] = data * data
        norms = np.sqrt(np.cumsum(padded, axis=1)[:, -1])[rows]
        x.data[a:b] = np.where(norms > 0, data / np.where(norms > 0, norms, 1.0), data)


class SentenceEmbedder:
    """A local sentence-transformers model (a folder; nothing is downloaded)."""

    def __init__(self, path: str, window_chars: int):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError(f"select.embedding = {path!r} needs sentence-transformers; pip install "
                            "sentence-transformers, or use embedding = \"tfidf\"") from None
        self.model = SentenceTransformer(str(path), local_files_only=True)
        self.window_chars = window_chars
        self.last_tokens = None                       # not counted here: the caller tokenizes

    def fit(self, texts: list[str]) -> "SentenceEmbedder":
        return self                                   # a pre-trained model: nothing to fit

    def arrays(self) -> dict[str, np.ndarray]:
        return {}                                     # the model folder is the whole transform

    def load(self, arrays: dict[str, np.ndarray]) -> "SentenceEmbedder":
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        wins, owner = _windows_of(texts, self.window_chars)
        emb = np.asarray(self.model.encode(wins, batch_size=64, convert_to_numpy=True, show_progress_bar=False,
                                           normalize_embeddings=True), dtype=np.float32)
        return _mean_per_doc(emb, owner, len(texts))


def make_embedder(cfg: SelectConfig, seed: int, hashes: TokenHashes):
    return _embedder(cfg.embedding, cfg.window_chars, seed, hashes)


def _embedder(embedding: str, window_chars: int, seed: int, hashes: TokenHashes):
    if embedding == "tfidf":
        return TfidfEmbedder(window_chars, seed, hashes)
    return SentenceEmbedder(embedding, window_chars)


NEAREST_ROWS, NEAREST_CLUSTERS = 256, 64      # blocks of the distance computation: 8 MB of float64 at most


def nearest(emb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The nearest centre of each row (squared euclidean distance, ties to the lower cluster: k-means' rule).
    Differences and sums along each row only, in float64: no matrix product, whose rounding can depend on
    how many rows come with it (BLAS kernels), so a document gets the same cluster in whatever batch or task."""
    centres = np.asarray(centres, dtype=np.float64)
    labels = np.zeros(len(emb), dtype=np.int64)
    for r in range(0, len(emb), NEAREST_ROWS):
        x = np.asarray(emb[r:r + NEAREST_ROWS], dtype=np.float64)[:, None, :]
        best = np.full(len(x), np.inf)
        for c in range(0, len(centres), NEAREST_CLUSTERS):
            d = ((x - centres[None, c:c + NEAREST_CLUSTERS]) ** 2).sum(axis=2)
            j = d.argmin(axis=1)
            dist = d[np.arange(len(x)), j]
            better = dist < best                      # strictly: an equal later cluster does not win
            best[better], labels[r:r + len(x)][better] = dist[better], c + j[better]
    return labels


PART_FLUSH_BYTES = 8 << 20       # a PartWriter holds at most this much before appending to its files


def cluster_file(c: int) -> str:
    return f"cluster-{c:04d}.jsonl"


class PartWriter:
    """One process's part of the partition: per cluster, its documents as jsonl lines in the order they come,
    appended to FOLDER/cluster-NNNN.jsonl. Lines wait in memory up to PART_FLUSH_BYTES in all; each flush
    opens a file only to append to it (k may pass the limit of open files). The folder is emptied first, so a
    task run again starts afresh; close() puts the files on disk before the task's heaps say it is done."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.lines: defaultdict[int, list[bytes]] = defaultdict(list)
        self.held = 0

    def add(self, c: int, rec: Record) -> None:
        row = record_row(rec, c, None)
        del row["weight"]                       # the target's: a partition serves any target
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self.lines[c].append(line)
        self.held += len(line)
        if self.held >= PART_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for c in sorted(self.lines):
            with open(self.folder / cluster_file(c), "ab") as f:
                f.writelines(self.lines[c])
        self.lines.clear()
        self.held = 0

    def close(self) -> None:
        self.flush()
        fsync_tree(self.folder)


class ClusterShare:
    """What assigning documents adds up: per cluster with a quota, a heap of its documents with the
    smallest uniform draws (BudgetHeap of the quota); per cluster the generic units (documents or tokens), and
    its eligible documents and tokens; with a partition, the writer of this process's part and the names of
    the parts (under the partition's parts folder) that hold the documents counted here, in corpus order."""

    def __init__(self, quota: np.ndarray, writer: PartWriter | None = None):
        self.heaps = {c: BudgetHeap(q) for c, q in enumerate(quota) if q > 0}
        self.units = np.zeros(len(quota))
        self.documents = np.zeros(len(quota))
        self.tokens = np.zeros(len(quota))
        self.writer = writer
        self.parts = [writer.folder.name] if writer else []


@dataclass
class ClusterScoring:
    """What assigning documents to clusters needs once the parent has fit the embedding and k-means:
    plain arrays and settings, so the parent can hand it to other processes (nichelm.selection.parallel
    saves it as npz + json). The same interface as core.DsirScoring."""
    method = "clusters"
    embedding: str                  # tfidf | the folder of a local sentence-transformers model
    window_chars: int
    embed: dict[str, np.ndarray]    # the fitted embedding (TfidfEmbedder.arrays(); none for a model folder)
    centres: np.ndarray             # k x dims: the k-means centres
    quota: np.ndarray               # per cluster, the documents or tokens to choose
    skip: np.ndarray                # sorted ordinals already assigned (the fit sample's)
    seed: int
    min_tokens: int
    by_tokens: bool
    parts: str = ""                 # select.partition: the folder of the processes' part files; "" = no partition
    embedder: object = field(default=None, repr=False, compare=False)    # the fitted one, in the parent

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"centres": self.centres, "quota": np.asarray(self.quota, np.float64),
                  "skip": np.asarray(self.skip, np.int64), **{f"embed_{k}": v for k, v in self.embed.items()}}
        settings = {"method": self.method, "embedding": self.embedding, "window_chars": self.window_chars,
                    "seed": self.seed, "min_tokens": self.min_tokens, "by_tokens": self.by_tokens}
        if self.parts:
            settings["parts"] = self.parts
        return arrays, settings

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], settings: dict) -> "ClusterScoring":
        embed = {k.removeprefix("embed_"): v for k, v in arrays.items() if k.startswith("embed_")}
        return cls(settings["embedding"], settings["window_chars"], embed, arrays["centres"], arrays["quota"],
                   arrays["skip"], settings["seed"], settings["min_tokens"], settings["by_tokens"],
                   settings.get("parts", ""))

    def new_share(self, part: str = "main") -> ClusterShare:
        """An empty share; with a partition, its documents go to the part file folder PARTS/part."""
        return ClusterShare(self.quota, PartWriter(Path(self.parts) / part) if self.parts else None)

    def consider(self, share: ClusterShare, stats: Counter, ordinal: int, rec: Record, c: int, n: int) -> None:
        if n < self.min_tokens:
            stats["too_short"] += 1
            return
        stats["scored"] += 1
        units = n if self.by_tokens else 1
        share.units[c] += units
        share.documents[c] += 1
        share.tokens[c] += n
        if share.writer is not None:
            share.writer.add(c, rec)
        if c in share.heaps:
            share.heaps[c].push(uniform(self.seed, "cluster", rec.source, rec.id), ordinal, units, Pick(0.0, n, c))

    def score(self, items, log=_log, into: ClusterShare | None = None,
              what: str = "embedding and assigning clusters") -> tuple[ClusterShare, Counter]:
        """Embed and assign the (ordinal, record) items outside self.skip (the whole corpus, or a task's share
        of it), into `into` (default: a new share). An embedding depends on its document only, and the
        draws on (seed, source, id), so shares merged (merge_share) hold what one pass over the corpus would."""
        share = self.new_share() if into is None else into
        stats = Counter()
        embedder = self.embedder or _embedder(self.embedding, self.window_chars, self.seed, TokenHashes()).load(
            self.embed)
        skip = set(self.skip.tolist())           # the fit sample: bounded by select.fit_chars
        progress = Progress(what, log)
        for chunk in chunks((o, r) for o, r in items if o not in skip):
            texts = [r.text for _, r in chunk]
            emb = embedder.embed(texts)
            n_tokens = embedder.last_tokens if embedder.last_tokens is not None else [len(tokenize(t)) for t in texts]
            for (o, r), c, n in zip(chunk, nearest(emb, self.centres), n_tokens):
                self.consider(share, stats, o, r, int(c), int(n))
            progress.add(len(chunk), sum(len(t) for t in texts))
        if share.writer is not None:
            share.writer.close()
        return share, stats

    def share_arrays(self, share: ClusterShare, stats: Counter) -> dict[str, np.ndarray]:
        items = [(k, o, s, p) for heap in share.heaps.values() for k, o, s, p in heap.items()]
        return {"keys": np.array([k for k, _, _, _ in items], np.float64),
                "ordinals": np.array([o for _, o, _, _ in items], np.int64),
                "sizes": np.array([s for _, _, s, _ in items], np.float64),
                "tokens": np.array([p.n_tokens for _, _, _, p in items], np.int64),
                "clusters": np.array([p.cluster for _, _, _, p in items], np.int64),
                "units": share.units, "documents": share.documents, "cluster_tokens": share.tokens,
                "parts": np.array(share.parts, dtype=str),
                "stats": np.array([stats["scored"], stats["too_short"]], np.int64)}

    def merge_share(self, z, share: ClusterShare) -> Counter:
        """Add a share saved by share_arrays (an npz, or the dict) into `share`; its counts."""
        for k, o, s, n, c in zip(z["keys"], z["ordinals"], z["sizes"], z["tokens"], z["clusters"]):
            share.heaps[int(c)].push(float(k), int(o), float(s), Pick(0.0, int(n), int(c)))
        share.units += z["units"]               # whole numbers in float64: exact in any order
        share.documents += z["documents"]
        share.tokens += z["cluster_tokens"]
        share.parts.extend(str(p) for p in z["parts"])      # the tasks are merged in rank order: corpus order
        scored, too_short = (int(x) for x in z["stats"])
        return Counter(scored=scored, too_short=too_short)


def quotas(units: np.ndarray, size: float, integer: bool) -> np.ndarray:
    """size shared among clusters in proportion to `units` (the target's documents or tokens per
    cluster); whole documents by largest remainder when `integer`, so they add up to size."""
    total = units.sum()
    if total <= 0:
        raise UserError("select: no target document falls in a cluster with selectable generic documents; "
                        "lower select.min_tokens or add target text")
    exact = units / total * size
    if not integer:
        return exact
    q = np.floor(exact)
    rest = int(round(size - q.sum()))
    order = np.lexsort((np.arange(len(exact)), -(exact - q)))   # largest remainders first, then lowest cluster
    q[order[:rest]] += 1
    return q


def repeat_to_quota(items: list[tuple], quota: float) -> list[tuple[int, object]]:
    """(ordinal, pick) of a cluster's kept documents, best key first, with `copies` set so that they
    fill the quota: each once when they reach it, else all repeated evenly (with replacement)."""
    total = sum(size for _, _, size, _ in items)
    if total <= 0:
        return []
    full = int(quota // total) if total < quota else 0
    need = quota - full * total
    out = []
    for _, ordinal, size, pick in items:
        pick.copies = full
        if need > 0:
            pick.copies += 1
            need -= size
        if pick.copies:
            out.append((ordinal, pick))
    return out


# ------------------------------------------------------------------ the partition (select.partition)

FIT_NPZ, FIT_JSON = "fit.npz", "fit.json"


def write_partition(spec: ClusterScoring, share: ClusterShare, out: Path) -> dict:
    """RUN/select/clusters (out): cluster-NNNN.jsonl, the parts of share.parts joined in order, and the fit
    (fit.npz + fit.json); staged and swapped in whole. Returns the partition's table for selection.json."""
    parts = Path(spec.parts)
    for part in share.parts:
        if not (parts / part).is_dir():
            raise UserError(f"{parts / part}: a part of the partition is missing (an interrupted run?); remove "
                            f"{parts.parent} and run `nichelm select` again")
    staged = staging_dir(out.parent, f".{out.name}.tmp-")
    try:
        rows = []
        for c in range(len(spec.centres)):
            digest, docs = hashlib.sha256(), 0
            with open(staged / cluster_file(c), "wb") as f:
                for part in share.parts:
                    path = parts / part / cluster_file(c)
                    if not path.is_file():                  # no document of this cluster in that part
                        continue
                    with open(path, "rb") as lines:
                        for line in lines:
                            f.write(line)
                            digest.update(line)
                            docs += 1
            if docs != share.documents[c]:
                raise UserError(f"{parts}: cluster {c} has {docs} documents in the part files but "
                                f"{int(share.documents[c])} were assigned (files changed during the run?); remove "
                                f"{parts.parent} and run `nichelm select` again")
            rows.append({"cluster": c, "file": cluster_file(c), "documents": docs, "tokens": int(share.tokens[c]),
                         "sha256": digest.hexdigest()})
        ClusterFit(spec.embedding, spec.window_chars, spec.seed, spec.by_tokens, spec.embed,
                   np.asarray(spec.centres)).save(staged)
        fsync_tree(staged)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {"folder": str(out), "documents": int(share.documents.sum()), "tokens": int(share.tokens.sum()),
            "clusters": rows}


@dataclass
class ClusterFit:
    """The k-means fit of a partition (its folder's fit.npz + fit.json): the embedding and the centres.
    A text's cluster, and a target's histogram, are computed with it as select computed them, so a new
    target (another project) can be placed among the clusters its experts were trained on."""
    embedding: str
    window_chars: int
    seed: int
    by_tokens: bool                 # the histogram's unit: tokens (select.tokens) or documents
    embed: dict[str, np.ndarray]
    centres: np.ndarray

    def save(self, folder: Path) -> None:
        with open(folder / FIT_NPZ, "wb") as f:      # inside a staged folder: fsync'd with it
            np.savez(f, centres=self.centres, **{f"embed_{k}": v for k, v in self.embed.items()})
        atomic_write_json(folder / FIT_JSON, {"embedding": self.embedding, "window_chars": self.window_chars,
                                              "seed": self.seed, "by_tokens": self.by_tokens,
                                              "k": len(self.centres)})

    @classmethod
    def load(cls, folder: Path) -> "ClusterFit":
        folder = Path(folder)
        again = "give a partition folder RUN/select/clusters, or run `nichelm select` with select.partition = true"
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; {again}")
        try:
            settings = json.loads((folder / FIT_JSON).read_text(encoding="utf-8"))
            with np.load(folder / FIT_NPZ, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            embed = {k.removeprefix("embed_"): v for k, v in arrays.items() if k.startswith("embed_")}
            fit = cls(settings["embedding"], settings["window_chars"], settings["seed"], settings["by_tokens"], embed,
                      arrays["centres"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder}: no readable k-means fit ({FIT_JSON}, {FIT_NPZ}: {str(e).splitlines()[0]}); "
                            f"{again}") from None
        return fit

    def clusters(self, texts: list[str]) -> np.ndarray:
        embedder = _embedder(self.embedding, self.window_chars, self.seed, TokenHashes()).load(self.embed)
        return nearest(embedder.embed(texts), self.centres) if texts else np.zeros(0, np.int64)

    def histogram(self, texts: list[str]) -> np.ndarray:
        """Each cluster's share of the texts, in documents or (by_tokens) wordpunct tokens: select's target_share."""
        from nichelm.selection.core import featurize_counts
        tokens = featurize_counts(texts, 16, TokenHashes())[1] if self.by_tokens else None
        units = np.bincount(self.clusters(texts), weights=tokens, minlength=len(self.centres)).astype(np.float64)
        return units / max(units.sum(), 1e-12)
