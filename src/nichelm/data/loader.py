"""Training batches from token shards, with the loss mask of the task format.

Rows start at the beginning of an example (its input marker), so a row holds
whole examples plus at most one cut at its end. The loss mask is read off the
token stream itself: a target counts when the most recent marker at or before
its position is the output marker (the model learns to write the output and the
end marker, not to predict the input). Shards stay plain llm.c token files.

Order is a fixed function of (seed, global row index): an epoch-wise permutation
of example starts. So a resumed run sees exactly the batches it would have seen,
and under torchrun rank r takes its own disjoint slice of every global batch.
"""

from __future__ import annotations

import numpy as np
import torch


def loss_mask(rows: np.ndarray, input_id: int, output_id: int, end_id: int) -> np.ndarray:
    """rows (B, T): True where the token at t is inside an output (so target t+1 is trained)."""
    marks = np.zeros(rows.shape, dtype=np.int8)
    marks[rows == output_id] = 1
    marks[(rows == input_id) | (rows == end_id)] = -1
    pos = np.where(marks != 0, np.arange(rows.shape[1])[None, :], -1)
    last = np.maximum.accumulate(pos, axis=1)                       # index of the latest marker
    state = np.take_along_axis(marks, np.maximum(last, 0), axis=1)
    return (state == 1) & (last >= 0)


class TaskBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, input_id: int, output_id: int, end_id: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len = tokens, seq_len
        self.ids = (input_id, output_id, end_id)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        limit = len(tokens) - seq_len - 1
        self.starts = np.flatnonzero(np.asarray(tokens[:max(limit, 0)]) == input_id)
        if len(self.starts) == 0:
            raise ValueError(f"no example of {seq_len + 1} tokens fits the data ({len(tokens)} tokens); "
                             "lower model.block_size or add data")
        self._perm_epoch, self._perm = -1, None

    def _start(self, global_row: int) -> int:
        n = len(self.starts)
        epoch, i = divmod(global_row, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self.starts[self._perm[i]])

    def rows(self, first_global_row: int, batch_size: int) -> np.ndarray:
        return np.stack([self.tokens[s:s + self.seq_len + 1]
                         for s in (self._start(first_global_row + i) for i in range(batch_size))]).astype(np.int64)

    def get(self, step: int, micro: int, grad_accum: int, batch_size: int):
        """The micro-batch `micro` of optimizer step `step` for this rank: (x, y, mask) CPU tensors."""
        global_batch = batch_size * self.world_size
        first = (step * grad_accum + micro) * global_batch + self.rank * batch_size
        return self._tensors(self.rows(first, batch_size))

    def fixed(self, index: int, batch_size: int):
        """Deterministic validation batches: example starts in file order."""
        n = len(self.starts)
        picks = [(index * batch_size + i) % n for i in range(batch_size)]
        rows = np.stack([self.tokens[self.starts[p]:self.starts[p] + self.seq_len + 1] for p in picks]).astype(np.int64)
        return self._tensors(rows)

    def _tensors(self, rows: np.ndarray):
        mask = loss_mask(rows[:, :-1], *self.ids)
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:].copy()), torch.from_numpy(mask)
