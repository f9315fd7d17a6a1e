"""Training batches from token shards, with the loss mask of the task format.

Rows start at the beginning of an example (its input marker), so a row holds
whole examples plus at most one cut at its end; a row never crosses the end of
its shard. The loss mask is read off the token stream itself: a target counts
when the most recent marker at or before its position is the output marker (the
model learns to write the output and the end marker, not to predict the input).
Shards stay plain llm.c token files, read row by row (shards.Split).

Order. The examples of a split are numbered in file order (shard by shard, the
starts of each shard from its cached index), n in all. Global row g is example
permute(g mod n) of epoch g div n, where permute is a bijection of [0, n) chosen
by (seed, epoch): a Feistel network over the smallest power of four >= n with
cycle walking (values that land in [n, 4^k) are permuted again until they fall
inside [0, n); on average fewer than four times). So:
  - each epoch visits every example exactly once, in a shuffle over the whole split
    (a batch mixes all shards), and each epoch differs;
  - the order is a pure function of (seed, g): a resumed run sees exactly the batches
    it would have seen, and under torchrun rank r takes its own disjoint slice of
    every global batch;
  - no per-epoch array: g -> (shard, start) costs O(1) memory, a binary search over the
    shard offsets and one read of the shard's cached index, where a stored permutation of
    all starts would cost 8 bytes per example per rank (GBs at 10B tokens).
A shard permutation plus block permutations inside shards would read the disk more
sequentially, but batches would then come from one shard at a time; a row is one small
read, which local disks and the page cache serve well.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from nichelm.data.shards import Split, example_starts
from nichelm.errors import UserError

FEISTEL_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def loss_mask(rows: np.ndarray, input_id: int, output_id: int, end_id: int) -> np.ndarray:
    """rows (B, T): True where the token at t is inside an output (so target t+1 is trained)."""
    marks = np.zeros(rows.shape, dtype=np.int8)
    marks[rows == output_id] = 1
    marks[(rows == input_id) | (rows == end_id)] = -1
    pos = np.where(marks != 0, np.arange(rows.shape[1])[None, :], -1)
    last = np.maximum.accumulate(pos, axis=1)                       # index of the latest marker
    state = np.take_along_axis(marks, np.maximum(last, 0), axis=1)
    return (state == 1) & (last >= 0)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A bijection of [0, n) chosen by (seed, epoch), applied to the positions i (see the module notes)."""
    half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))       # 2 * half bits cover [0, n)
    mask = (np.uint64(1) << half) - np.uint64(1)
    keys = np.random.default_rng([seed, epoch]).integers(0, 2**63, size=FEISTEL_ROUNDS, dtype=np.uint64)

    def rounds(x):
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << half) | right

    x = rounds(np.asarray(i, dtype=np.uint64))
    while (outside := x >= n).any():                                 # cycle walking
        x[outside] = rounds(x[outside])
    return x.astype(np.int64)


class TaskBatches:
    def __init__(self, split: Split, seq_len: int, input_id: int, output_id: int, end_id: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.split, self.seq_len = split, seq_len
        self.ids = (input_id, output_id, end_id)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Each shard's starts whose whole row (seq_len + 1 tokens) fits in the shard: the starts are
        # sorted and distinct, so only the last seq_len + 1 of them can be too late.
        self.starts, counts = [], []
        for path, tokens in zip(split.paths, split.shards):
            starts = example_starts(path, input_id)
            tail = starts[max(0, len(starts) - seq_len - 1):len(starts)]
            counts.append(len(starts) - int((tail > len(tokens) - seq_len - 1).sum()))
            self.starts.append(starts)
        self.offsets = np.cumsum([0] + counts)      # the example number of each shard's first start
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise UserError(f"{split}: no example of {seq_len + 1} tokens fits in a shard ({split.tokens} tokens in "
                            f"{len(split.paths)} shard(s)); lower model.block_size or add data")
        self.load_seconds = 0.0

    def __len__(self) -> int:
        return self.n

    def locate(self, example: int) -> tuple[int, int]:
        """Example number (file order) -> (shard index, start of its row in that shard)."""
        k = int(np.searchsorted(self.offsets, example, side="right")) - 1
        return k, int(self.starts[k][example - self.offsets[k]])

    def order(self, global_rows: np.ndarray) -> np.ndarray:
        """Global row numbers -> example numbers: epoch g // n, a seeded permutation of the rest."""
        epochs, within = np.divmod(np.asarray(global_rows, dtype=np.int64), self.n)
        examples = np.empty_like(within)
        for epoch in np.unique(epochs):                                # a batch spans at most a few epochs
            sel = epochs == epoch
            examples[sel] = permute(within[sel], self.n, self.seed, int(epoch))
        return examples

    def _rows(self, examples) -> np.ndarray:
        rows = []
        for example in examples:
            k, start = self.locate(int(example))
            rows.append(self.split.shards[k][start:start + self.seq_len + 1])
        return np.stack(rows).astype(np.int64)

    def rows(self, first_global_row: int, batch_size: int) -> np.ndarray:
        return self.rows_at(np.arange(first_global_row, first_global_row + batch_size))

    def rows_at(self, global_rows: np.ndarray) -> np.ndarray:
        return self._rows(self.order(global_rows))

    def get(self, step: int, micro: int, grad_accum: int, batch_size: int):
        """The micro-batch `micro` of optimizer step `step` for this rank: (x, y, mask) CPU tensors."""
        t0 = time.perf_counter()
        global_batch = batch_size * self.world_size
        first = (step * grad_accum + micro) * global_batch + self.rank * batch_size
        batch = self._tensors(self.rows(first, batch_size))
        self.load_seconds += time.perf_counter() - t0
        return batch

    def pop_load_seconds(self) -> float:
        """Seconds spent in get() (reading and masking rows) since the last call."""
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds

    def fixed(self, index: int, batch_size: int):
        """Deterministic validation batches: examples in file order."""
        return self._tensors(self._rows((index * batch_size + np.arange(batch_size)) % self.n))

    def _tensors(self, rows: np.ndarray):
        mask = loss_mask(rows[:, :-1], *self.ids)
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:].copy()), torch.from_numpy(mask)


def mix_counts(weights: list[float], rows: int) -> list[int]:
    """Rows of each part in a step of `rows` rows: rows x share, rounded by largest remainder (ties: the
    earlier part), so they add up to `rows`."""
    exact = [rows * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[:rows - sum(counts)]:
        counts[k] += 1
    return counts


class MixedBatches:
    """Training batches drawn from several splits in fixed shares (a training phase's data mix).

    Every optimizer step's R global rows (batch_size x grad_accum x processes) take counts[k] rows from
    part k (mix_counts: exact shares, the same every step), so the order stays a function of the step
    alone, as TaskBatches': a resumed run reads what an uninterrupted one would. Which of the step's R
    positions come from which part is a seeded shuffle of the positions (every micro-batch and rank gets
    a mix); part k's rows continue from step to step in its own seeded order (step s reads its global
    rows s x counts[k] ... (s + 1) x counts[k] - 1). The parts are TaskBatches of one process (rank 0 of 1):
    the rank's slice is taken here."""

    def __init__(self, parts: list[TaskBatches], weights: list[float], seed: int, rank: int = 0,
                 world_size: int = 1):
        self.parts, self.weights, self.seed = parts, weights, seed
        self.rank, self.world_size = rank, world_size
        self._layouts: dict[int, tuple] = {}
        self.load_seconds = 0.0

    def layout(self, rows: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(rows per part, the part of each position of a step, its row number within that part's share)."""
        if rows not in self._layouts:
            counts = mix_counts(self.weights, rows)
            part = np.random.default_rng([self.seed, rows]).permutation(np.repeat(np.arange(len(counts)), counts))
            within = np.empty(rows, dtype=np.int64)
            for k, count in enumerate(counts):
                within[part == k] = np.arange(count)
            self._layouts[rows] = (counts, part, within)
        return self._layouts[rows]

    def _positions(self, micro: int, batch_size: int) -> np.ndarray:
        """This rank's positions, among its step's rows, of micro-batch `micro`."""
        global_batch = batch_size * self.world_size
        return np.arange(batch_size) + micro * global_batch + self.rank * batch_size

    def parts_of(self, step: int, micro: int, grad_accum: int, batch_size: int) -> np.ndarray:
        """The part each row of get()'s micro-batch comes from (the same for every step). A projected network
        trains on one part per cluster (part k = cluster k): these are the rows' clusters, its experts."""
        _, part, _ = self.layout(batch_size * self.world_size * grad_accum)
        return part[self._positions(micro, batch_size)]

    def get(self, step: int, micro: int, grad_accum: int, batch_size: int):
        """The micro-batch `micro` of optimizer step `step` for this rank: (x, y, mask) CPU tensors."""
        t0 = time.perf_counter()
        counts, part, within = self.layout(batch_size * self.world_size * grad_accum)
        positions = self._positions(micro, batch_size)
        rows = np.empty((batch_size, self.parts[0].seq_len + 1), dtype=np.int64)
        for k, source in enumerate(self.parts):
            sel = part[positions] == k
            if sel.any():
                rows[sel] = source.rows_at(step * counts[k] + within[positions[sel]])
        batch = self.parts[0]._tensors(rows)
        self.load_seconds += time.perf_counter() - t0
        return batch

    def pop_load_seconds(self) -> float:
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds
