"""Hashed word n-gram features as DSIR computes them, vectorised over a batch of documents.

The reference (package `data-selection`, hashed_ngram_dsir.py) lowercases a document, splits it
into wordpunct tokens (nltk's WordPunctTokenizer: the regex below), and adds one count per unigram
and per bigram to bucket int(sha256(ngram)) % buckets, one Python call per n-gram. Here:

- unigrams land in exactly the reference's buckets: the sha256 of each distinct token is computed
  once and cached (words repeat, so most tokens of a batch are looked up, not hashed);
- a bigram's bucket comes from its two tokens' 64-bit hashes mixed in numpy (splitmix64), instead of
  the sha256 of "a b": the same kind of uniform hash, but computed for a whole batch at once;
- per-document sums (log importance weights) and corpus counts are numpy bincounts over the batch,
  so no per-document vector is ever built unless a caller asks for the sparse matrix.
"""

from __future__ import annotations

import hashlib
import re
from itertools import chain

import numpy as np

# nltk.tokenize.WordPunctTokenizer: runs of word characters, or of other non-space characters
TOKEN = re.compile(r"\w+|[^\w\s]+")

# The reference's smoothing of both distributions before taking logs (and of DSIR's KL measure).
EPS = 1e-8

_MASK64 = (1 << 64) - 1
_K0, _K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def tokenize(text: str) -> list[str]:
    """Lowercased wordpunct tokens, as the reference featurizes a document."""
    return TOKEN.findall(text.lower())


class TokenHashes:
    """sha256 of tokens as integers (the reference's bucket is this % buckets), cached.

    Bounded: the cache is emptied when it would pass `max_entries` (a corpus's rare tokens,
    numbers and OCR debris would otherwise grow it without limit)."""

    def __init__(self, max_entries: int = 500_000):
        self.max_entries = max_entries
        self.cache: dict[str, int] = {}

    def get(self, tokens: list[str]) -> list[int]:
        """Hashes of distinct tokens, in order."""
        cache = self.cache
        new = [t for t in tokens if t not in cache]
        if len(cache) + len(new) > self.max_entries:
            cache.clear()
            new = tokens
        for t in new:
            cache[t] = int.from_bytes(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest(), "big")
        return [cache[t] for t in tokens]


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One 64-bit hash of an ordered pair of 64-bit hashes (splitmix64's finaliser; wraps mod 2**64)."""
    x = a * _K0 + b
    x ^= x >> _S30
    x *= _K1
    x ^= x >> _S27
    x *= _K2
    x ^= x >> _S31
    return x


class NgramBatch:
    """The unigram and bigram occurrences of a batch of documents, ready to be bucketed.

    n_tokens[d] is document d's wordpunct token count (the reference's example length: its
    min_example_length filter compares it). Bigrams never cross documents."""

    def __init__(self, texts: list[str], hashes: TokenHashes):
        toks = [tokenize(t) for t in texts]
        self.n_docs = len(toks)
        self.n_tokens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
        flat = list(chain.from_iterable(toks))
        distinct = list(set(flat))
        index = dict(zip(distinct, range(len(distinct))))
        self._ids = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
        self._sha = hashes.get(distinct)
        h64 = np.fromiter((s & _MASK64 for s in self._sha), dtype=np.uint64, count=len(distinct))
        tok_hash = h64[self._ids]
        pair = np.ones(max(len(flat) - 1, 0), dtype=bool)       # token i pairs with token i+1 ...
        starts = np.cumsum(self.n_tokens) - self.n_tokens
        cut = starts[(starts > 0) & (starts < len(flat))] - 1
        pair[cut] = False                                      # ... unless i+1 starts a document
        self._bigram = _mix(tok_hash[:-1][pair], tok_hash[1:][pair]) if len(flat) > 1 else np.zeros(0, np.uint64)
        self._buckets: dict[int, np.ndarray] = {}

    def buckets(self, n_buckets: int) -> np.ndarray:
        """The bucket of every n-gram occurrence: all unigrams in order, then all bigrams in order."""
        if n_buckets not in self._buckets:
            uni = np.fromiter((s % n_buckets for s in self._sha), dtype=np.int64, count=len(self._sha))[self._ids]
            bi = (self._bigram % np.uint64(n_buckets)).astype(np.int64)
            self._buckets[n_buckets] = np.concatenate([uni, bi])
        return self._buckets[n_buckets]

    def doc_index(self) -> np.ndarray:
        """The document of every n-gram occurrence, in the order of buckets()."""
        docs = np.arange(self.n_docs)
        return np.concatenate([np.repeat(docs, self.n_tokens), np.repeat(docs, np.maximum(self.n_tokens - 1, 0))])

    def counts(self, n_buckets: int, doc_weights: np.ndarray | None = None) -> np.ndarray:
        """Bucket counts of the whole batch (each document counted doc_weights[d] times if given)."""
        weights = None if doc_weights is None else np.asarray(doc_weights, dtype=np.float64)[self.doc_index()]
        return np.bincount(self.buckets(n_buckets), weights=weights, minlength=n_buckets).astype(np.float64)

    def doc_sums(self, values: np.ndarray) -> np.ndarray:
        """Per document, the sum of values[bucket] over its n-grams: the reference's dot product of a
        document's count vector with `values` (log importance ratios), without building the vector."""
        return np.bincount(self.doc_index(), weights=values[self.buckets(len(values))], minlength=self.n_docs)

    def matrix(self, n_buckets: int):
        """Documents x buckets sparse count matrix (scipy CSR), for TF-IDF embeddings."""
        from scipy.sparse import csr_matrix
        b = self.buckets(n_buckets)
        return csr_matrix((np.ones(len(b), dtype=np.float32), (self.doc_index(), b)),
                          shape=(self.n_docs, n_buckets))


def compact_buckets(batch: NgramBatch, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_tokens, buckets) of a batch in the smallest dtype, to score it again later from memory."""
    dtype = np.uint16 if n_buckets <= 1 << 16 else np.uint32
    return batch.n_tokens.copy(), batch.buckets(n_buckets).astype(dtype)


def compact_doc_sums(n_tokens: np.ndarray, buckets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """NgramBatch.doc_sums for a batch kept by compact_buckets."""
    docs = np.arange(len(n_tokens))
    index = np.concatenate([np.repeat(docs, n_tokens), np.repeat(docs, np.maximum(n_tokens - 1, 0))])
    return np.bincount(index, weights=values[buckets.astype(np.int64)], minlength=len(n_tokens))


def distribution(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))


def log_ratio(target_counts: np.ndarray, generic_counts: np.ndarray) -> np.ndarray:
    """DSIR's per-bucket log importance ratio, log p_target - log p_generic, smoothed as the reference."""
    return np.log(distribution(target_counts) + EPS) - np.log(distribution(generic_counts) + EPS)


def kl(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """KL(p || q) of two hashed n-gram distributions (natural log), with the same smoothing."""
    p, q = distribution(p_counts), distribution(q_counts)
    return float(np.sum(p * (np.log(p + EPS) - np.log(q + EPS))))
