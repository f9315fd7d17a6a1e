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


def _prefill_bias(valid: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask for the prompt: causal, and never a padding key.

    A query on a padding position would see no key at all (NaN); it may see itself.
    """
    L = valid.shape[1]
    pos = torch.arange(L, device=valid.device)
    allowed = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=valid.device)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, float("-inf"))[:, None]


def greedy_step(model: GPT, tokens, positions, cache: KVCache, mask, done, n_out, limits, end_id: int):
    """One forward pass and its bookkeeping, in one function so torch.compile makes it one graph:
    returns each row's next token; counts it for rows still running (n_out) and marks rows that
    reach the end marker or their budget (done). Both updates are in place."""
    logits, _ = model(tokens, positions=positions, cache=cache, mask=mask)
    nxt = logits[:, -1].argmax(dim=-1)
    n_out += (~done).long()
    done |= (nxt == end_id) | (n_out >= limits)
    return nxt


@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], max_new: list[int], end_id: int,
                   device: torch.device, step=None) -> list[Generation]:
    step = greedy_step if step is None else step           # or compile_for_decoding()
    B, L = len(prompts), max(len(p) for p in prompts)
    steps = max(max_new)
    total = L + steps
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    x = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device, dtype)
    valid = torch.arange(L, device=device)[None] >= pad[:, None]
    # One additive mask serves every decoding step: -inf on the prompt's padding, 0 elsewhere
    # (generated positions are never padding). Step t sees its first L + t + 1 columns.
    bias = torch.zeros((B, 1, 1, total), dtype=dtype, device=device)
    bias[:, 0, 0, :L].masked_fill_(~valid, float("-inf"))
    limits = torch.tensor(max_new, device=device)
    out = torch.zeros((B, steps), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    # Asking whether every row is done makes the host wait for the device; on a GPU ask every 8 steps.
    check_every = 8 if device.type == "cuda" else 1

    positions = (torch.arange(L, device=device)[None] - pad[:, None]).clamp(min=0)
    nxt = step(model, x, positions, cache, _prefill_bias(valid, dtype), done, n_out, limits, end_id)
    # A row that already finished keeps stepping with the batch; clamp its position so it never
    # runs past the position tables (its tokens are discarded anyway).
    positions = (L - pad)[:, None]
    for t in range(steps):
        out[:, t] = nxt
        if t == steps - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        nxt = step(model, nxt[:, None], positions.clamp(max=model.cfg.block_size - 1), cache,
                   bias[..., :L + t + 1], done, n_out, limits, end_id)
        positions += 1
    results = []
    for i in range(B):
        seq = out[i, : int(n_out[i])].tolist()
        ended = bool(seq) and seq[-1] == end_id
        results.append(Generation(tokens=seq[:-1] if ended else seq, hit_limit=not ended))
    return results


def compile_for_decoding():
    """greedy_step under torch.compile with dynamic shapes, for `step=` below: two graphs (prompt
    and step) whatever the batch size and lengths. Compiling takes ~10-20 s on a 2-core CPU and then
    decodes ~2x faster (BENCHMARKS.md), so it pays on corpora, not on a few windows. A machine
    without a working compiler falls back to eager."""
    from torch import _dynamo
    _dynamo.config.suppress_errors = True
    return torch.compile(greedy_step, dynamic=True)


def generate(model: GPT, prompts: list[list[int]], max_new: list[int], end_id: int, device: torch.device,
             batch_size: int = 64, step=None) -> list[Generation]:
    """Greedy continuations for many prompts; batches group prompts of similar length.

    step: what runs one decoding step (default greedy_step; compile_for_decoding() to compile)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gens = generate_batch(model, [prompts[i] for i in idx], [max_new[i] for i in idx], end_id, device,
                              step)
        for i, g in zip(idx, gens):
            results[i] = g
    return results


@torch.no_grad()
def beam_search(model: GPT, prompt: list[int], max_new: int, end_id: int, device: torch.device,
                beams: int = 4, length_penalty: float = 1.0) -> Generation:
    """Beam search for one prompt (the beams are the batch). Finished hypotheses are ranked by
    log-probability / length**length_penalty; stops once `beams` hypotheses have ended."""
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, beams, len(prompt) + max_new, device, dtype)
    x = torch.tensor([prompt], dtype=torch.long, device=device).repeat(beams, 1)
    logits, _ = model(x, cache=cache)                          # causal prefill, no padding
    scores = torch.full((beams,), float("-inf"), device=device)
    scores[0] = 0.0                                            # all beams start identical: keep one
    seqs: list[list[int]] = [[] for _ in range(beams)]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_new):
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        vocab = logp.shape[-1]
        top = (scores[:, None] + logp).view(-1).topk(2 * beams)
        keep = []
        for score, index in zip(top.values.tolist(), top.indices.tolist()):
            beam, token = divmod(index, vocab)
            if score == float("-inf"):
                break
            if token == end_id:
                finished.append((score / max(len(seqs[beam]), 1) ** length_penalty, seqs[beam]))
            elif len(keep) < beams:
                keep.append((score, beam, token))
        if len(finished) >= beams or not keep:
            break
        while len(keep) < beams:                               # pad with a dead copy
            keep.append((float("-inf"), keep[0][1], keep[0][2]))
        source = torch.tensor([b for _, b, _ in keep], device=device)
        cache.reorder(source)
        seqs = [seqs[b] + [t] for _, b, t in keep]
        scores = torch.tensor([s for s, _, _ in keep], device=device)
        step = torch.tensor([[t] for _, _, t in keep], dtype=torch.long, device=device)
        see_all = torch.ones((beams, 1, 1, cache.length + 1), dtype=torch.bool, device=device)
        logits, _ = model(step, cache=cache, mask=see_all)
    if finished:
        return Generation(tokens=max(finished, key=lambda f: f[0])[1], hit_limit=False)
    best = int(scores.argmax())
    return Generation(tokens=seqs[best], hit_limit=True)
