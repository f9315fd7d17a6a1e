"""Label-constrained decoding: score every allowed label after a prompt, take the best.

The score of label l for prompt p is the teacher-forced log-probability of l's tokens followed by
the end marker, given p: sum over t of log P(c_t | p, c_<t) with c = label ids + [end id]. The end
marker makes "1830s" and a longer label starting with it different sequences, and the sum is the
model's probability of writing exactly that label and stopping. The prediction is the argmax over
the set, so it is always one of the labels, whatever the model is.

Every (prompt, label) pair is one row of a batch, right-padded: a causal model's logits at a row's
real positions do not depend on padding after them, so batching does not change a score (beyond
the rounding of fp32 matmuls of another shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.inference_mode()
def label_scores(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], end_id: int,
                 batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), len(label_ids)) float64 log-probabilities of each label (+ end marker) after each
    prompt. `model(idx)` returns (logits (B, T, V), _) as nichelm.model.GPT does."""
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise ValueError("every label needs at least one token")
    conts = [list(ids) + [end_id] for ids in label_ids]
    block = getattr(getattr(model, "cfg", None), "block_size", None)
    longest = max(map(len, conts))
    for n, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {n} is empty")
        if block is not None and len(p) + longest > block:
            raise ValueError(f"prompt {n} has {len(p)} tokens; with the longest label ({longest} tokens) it passes "
                             f"the model's context of {block}: cut the text into shorter windows")
    device = next(model.parameters()).device
    pairs = [(n, k) for n in range(len(prompts)) for k in range(len(conts))]
    scores = torch.empty(len(prompts), len(conts), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [list(prompts[n]) + conts[k] for n, k in chunk]
        T = max(map(len, rows))
        idx = torch.full((len(rows), T), end_id, dtype=torch.long)
        scored = torch.zeros(len(rows), T - 1, dtype=torch.bool)     # position t predicts token t + 1
        for r, ((n, k), row) in enumerate(zip(chunk, rows)):
            idx[r, :len(row)] = torch.tensor(row)
            scored[r, len(prompts[n]) - 1:len(row) - 1] = True
        logits, _ = model(idx.to(device))
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).cpu()
        token_logp = logp.gather(2, idx[:, 1:, None]).squeeze(2)
        sums = torch.where(scored, token_logp, 0.0).sum(1)     # where, not *: -inf x 0 is nan
        for (n, k), s in zip(chunk, sums.tolist()):
            scores[n, k] = s
    return scores


def best_labels(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], end_id: int,
                batch_size: int = 64) -> list[int]:
    """Index of the best-scoring label for each prompt (ties: the first label)."""
    if not prompts:
        return []
    return label_scores(model, prompts, label_ids, end_id, batch_size).argmax(dim=1).tolist()
