"""Batched greedy decoding with a preallocated KV cache.

Prompts of different lengths are sorted by length, batched, and left-padded; each
row carries its own positions and an attention mask that hides its padding, so a
padded row computes exactly what it would alone. Decoding stops per row at the
end marker or at its own length bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nichelm.model import GPT, KVCache


@dataclass
class Generation:
    tokens: list[int]
    hit_limit: bool          # stopped by the length bound, not by the end marker


def _mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q_len, K) boolean: causal over the last q_len keys, and never a padding key.

    A query on a padding position would see no key at all (NaN); it may see itself.
    """
    B, K = valid.shape
    q_pos = torch.arange(K - q_len, K, device=valid.device)[:, None]
    k_pos = torch.arange(K, device=valid.device)[None, :]
    causal = k_pos <= q_pos
    allowed = causal[None] & valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], max_new: list[int], end_id: int,
                   device: torch.device) -> list[Generation]:
    B, L = len(prompts), max(len(p) for p in prompts)
    steps = max(max_new)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    x = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
    total = L + steps
    valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    valid[:, :L] = torch.arange(L, device=device)[None] >= pad[:, None]
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device, dtype)

    positions = (torch.arange(L, device=device)[None] - pad[:, None]).clamp(min=0)
    logits, _ = model(x, positions=positions, cache=cache, mask=_mask(valid[:, :L], L))
    limits = torch.tensor(max_new, device=device)
    out = torch.zeros((B, steps), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    for t in range(steps):
        nxt = logits[:, -1].argmax(dim=-1)
        out[:, t] = nxt
        n_out += (~done).long()
        done |= (nxt == end_id) | (n_out >= limits)
        if bool(done.all()) or t == steps - 1:
            break
        valid[:, L + t] = True
        # A row that already finished keeps stepping with the batch; clamp its position so it never
        # runs past the position tables (its tokens are discarded anyway).
        positions = (L + t - pad).clamp(max=model.cfg.block_size - 1)[:, None]
        logits, _ = model(nxt[:, None], positions=positions, cache=cache, mask=_mask(valid[:, :L + t + 1], 1))
    results = []
    for i in range(B):
        seq = out[i, : int(n_out[i])].tolist()
        ended = bool(seq) and seq[-1] == end_id
        results.append(Generation(tokens=seq[:-1] if ended else seq, hit_limit=not ended))
    return results


def generate(model: GPT, prompts: list[list[int]], max_new: list[int], end_id: int, device: torch.device,
             batch_size: int = 64) -> list[Generation]:
    """Greedy continuations for many prompts; batches group prompts of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gens = generate_batch(model, [prompts[i] for i in idx], [max_new[i] for i in idx], end_id, device)
        for i, g in zip(idx, gens):
            results[i] = g
    return results
