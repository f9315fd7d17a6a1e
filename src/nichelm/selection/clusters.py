"""What cluster importance sampling (SLM-is) needs besides k-means: embeddings and quotas.

Embeddings work offline. The default is a hashed uni+bigram TF-IDF of each window reduced by a
truncated SVD (scikit-learn), fit on the generic sample and the target; with select.embedding
naming the folder of a local sentence-transformers model, that model embeds the windows instead.
Long documents are cut into windows of select.window_chars at whitespace; a document's embedding
is the normalised mean of its windows'.
"""

from __future__ import annotations

import math

import numpy as np

from nichelm.config import SelectConfig
from nichelm.errors import UserError
from nichelm.selection.features import NgramBatch, TokenHashes

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
        self.columns = np.unique(x.indices)          # buckets the fit text uses: the SVD's cost follows their number
        x = x[:, self.columns]
        self.tfidf = TfidfTransformer(sublinear_tf=True).fit(x)
        dims = max(1, min(self.dims, x.shape[0] - 1))
        self.svd = TruncatedSVD(n_components=dims, random_state=self.seed).fit(self.tfidf.transform(x))
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        wins, owner = _windows_of(texts, self.window_chars)
        x, win_tokens = self._matrix(wins)
        x = x[:, self.columns]
        self.last_tokens = np.bincount(owner, weights=win_tokens, minlength=len(texts)).astype(np.int64)
        emb = _normalize(self.svd.transform(self.tfidf.transform(x)))
        return _mean_per_doc(emb, owner, len(texts))


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

    def embed(self, texts: list[str]) -> np.ndarray:
        wins, owner = _windows_of(texts, self.window_chars)
        emb = np.asarray(self.model.encode(wins, batch_size=64, convert_to_numpy=True, show_progress_bar=False,
                                           normalize_embeddings=True), dtype=np.float32)
        return _mean_per_doc(emb, owner, len(texts))


def make_embedder(cfg: SelectConfig, seed: int, hashes: TokenHashes):
    if cfg.embedding == "tfidf":
        return TfidfEmbedder(cfg.window_chars, seed, hashes)
    return SentenceEmbedder(cfg.embedding, cfg.window_chars)


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
