"""What cluster importance sampling (SLM-is) needs besides k-means: embeddings and quotas.

Embeddings work offline. The default is a hashed uni+bigram TF-IDF of each window reduced by a
truncated SVD (scikit-learn), fit on the generic sample and the target; with select.embedding
naming the folder of a local sentence-transformers model, that model embeds the windows instead.
Long documents are cut into windows of select.window_chars at whitespace; a document's embedding
is the normalised mean of its windows'.

Assigning runs on select's tasks too (nichelm.selection.parallel): ClusterScoring holds what it needs
once the parent has fit (the TF-IDF + SVD as arrays, applied with numpy and scipy exactly as
scikit-learn applies them; the k-means centres; the quotas), and a document's cluster (nearest())
depends on that document only, so every task assigns it the same one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from nichelm.config import SelectConfig
from nichelm.errors import UserError
from nichelm.selection.core import BudgetHeap, Pick, Progress, _log, chunks, uniform
from nichelm.selection.features import NgramBatch, TokenHashes, tokenize

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


class ClusterShare:
    """What assigning documents adds up: per cluster with a quota, a heap of its documents with the
    smallest uniform draws (BudgetHeap of the quota), and the generic units (documents or tokens) per cluster."""

    def __init__(self, quota: np.ndarray):
        self.heaps = {c: BudgetHeap(q) for c, q in enumerate(quota) if q > 0}
        self.units = np.zeros(len(quota))


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
    embedder: object = field(default=None, repr=False, compare=False)    # the fitted one, in the parent

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"centres": self.centres, "quota": np.asarray(self.quota, np.float64),
                  "skip": np.asarray(self.skip, np.int64), **{f"embed_{k}": v for k, v in self.embed.items()}}
        settings = {"method": self.method, "embedding": self.embedding, "window_chars": self.window_chars,
                    "seed": self.seed, "min_tokens": self.min_tokens, "by_tokens": self.by_tokens}
        return arrays, settings

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], settings: dict) -> "ClusterScoring":
        embed = {k.removeprefix("embed_"): v for k, v in arrays.items() if k.startswith("embed_")}
        return cls(settings["embedding"], settings["window_chars"], embed, arrays["centres"], arrays["quota"],
                   arrays["skip"], settings["seed"], settings["min_tokens"], settings["by_tokens"])

    def new_share(self) -> ClusterShare:
        return ClusterShare(self.quota)

    def consider(self, share: ClusterShare, stats: Counter, ordinal: int, source: str, doc_id: str, c: int,
                 n: int) -> None:
        if n < self.min_tokens:
            stats["too_short"] += 1
            return
        stats["scored"] += 1
        units = n if self.by_tokens else 1
        share.units[c] += units
        if c in share.heaps:
            share.heaps[c].push(uniform(self.seed, "cluster", source, doc_id), ordinal, units, Pick(0.0, n, c))

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
                self.consider(share, stats, o, r.source, r.id, int(c), int(n))
            progress.add(len(chunk), sum(len(t) for t in texts))
        return share, stats

    def share_arrays(self, share: ClusterShare, stats: Counter) -> dict[str, np.ndarray]:
        items = [(k, o, s, p) for heap in share.heaps.values() for k, o, s, p in heap.items()]
        return {"keys": np.array([k for k, _, _, _ in items], np.float64),
                "ordinals": np.array([o for _, o, _, _ in items], np.int64),
                "sizes": np.array([s for _, _, s, _ in items], np.float64),
                "tokens": np.array([p.n_tokens for _, _, _, p in items], np.int64),
                "clusters": np.array([p.cluster for _, _, _, p in items], np.int64),
                "units": share.units, "stats": np.array([stats["scored"], stats["too_short"]], np.int64)}

    def merge_share(self, z, share: ClusterShare) -> Counter:
        """Add a share saved by share_arrays (an npz, or the dict) into `share`; its counts."""
        for k, o, s, n, c in zip(z["keys"], z["ordinals"], z["sizes"], z["tokens"], z["clusters"]):
            share.heaps[int(c)].push(float(k), int(o), float(s), Pick(0.0, int(n), int(c)))
        share.units += z["units"]               # whole numbers in float64: exact in any order
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
