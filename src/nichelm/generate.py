"""Batched greedy decoding with a preallocated KV cache, and beam search.

`generate` keeps `batch_size` rows decoding at once (continuous batching): prompts are taken
shortest first, a row whose output ends (end marker or its own length bound) takes the next
prompt at once, and every row has its own positions and KV-cache slots (model.SlotCache), so
rows never wait for each other and a row computes exactly what it would alone.

Copy drafts (draft_tokens > 0): a corrected text is mostly its input again, so each step
guesses a row's next few tokens by copying them from its source (the input it corrects) where
the output so far is aligned to it, and one forward pass checks them all: the guesses the
model agrees with are kept, plus the model's own next token. This is speculative decoding with
the source as the draft model ("prompt lookup"): the output is the greedy output, in fewer
forward passes.

Scores (score=True, for the guard of nichelm.inference): each output's log-probability comes
from the decoding itself (the greedy token's log-softmax at every step), and the log-probability
of the row's source copied unchanged from the prompt's own forward (the source and the end marker
follow the prompt in the prefill). The guard then needs no second, teacher-forced pass for most
windows: on the quickstart model that pass cost as much CPU as decoding (BENCHMARKS.md). That copy
is also a draft of the whole output checked in the same forward: its leading tokens the model would
write itself are the output's first tokens, already in the cache; the slots after them are
overwritten by the output before any query sees them, as padding is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from nichelm.model import GPT, KVCache, SlotCache


@dataclass
class Generation:
    tokens: list[int]
    hit_limit: bool          # stopped by the length bound, not by the end marker
    # with generate(score=True), summed log-probs (nats): of `tokens` and the end marker when reached,
    # and of the source then the end marker after the prompt (None: not asked, or past the context)
    logprob: float | None = None
    source_logprob: float | None = None


DRAFT_TOKENS = 3           # copy-draft length for correction (BENCHMARKS.md); 0: one token a step
# Where a copy draft looks for the source token that the output's last token copies: this many
# positions before and after where the alignment so far expects it (wider windows find more
# spurious matches: chosen on the quickstart's validation windows, BENCHMARKS.md).
ALIGN_BEFORE, ALIGN_AFTER = 4, 4
REPLACES_AT_MOST = 4       # source tokens one output token may stand for, when re-aligning by characters
SCORE_LOGITS = 1 << 25     # logits one scoring forward may hold (rows x positions x vocabulary): 128 MB fp32


@dataclass
class Rows:
    """The decoding state of every row of a batch, one tensor each (a row holds one prompt at a time).

    A row's prompt fills cache slots 0..len-1; output token t goes to slot len + t. `last` is the
    newest output token, not yet in the cache: the next step feeds it at slot `pos`."""
    out: torch.Tensor        # (B, longest budget + drafts + 1) output tokens; the first n_out count
    n_out: torch.Tensor      # (B,) output tokens so far (the end marker included once reached)
    limits: torch.Tensor     # (B,) each row's budget in tokens
    done: torch.Tensor       # (B,) finished, or holding no prompt
    last: torch.Tensor       # (B,) newest output token
    pos: torch.Tensor        # (B,) the slot (= position) `last` goes to
    src: torch.Tensor        # (B, S) what the output copies (its source), end markers after it
    src_ok: torch.Tensor     # (B, S) true on the source's own tokens
    prev: torch.Tensor       # (B,) the token before `last` (prompt's last token at first)
    expect: torch.Tensor     # (B,) where in src `last` is expected
    token_chars: torch.Tensor | None = None    # (vocab,) characters of each token, for re-aligning
    logp: torch.Tensor | None = None           # (B,) summed log-probs of the output so far (score=True)


    def take(self, rows: torch.Tensor) -> "Rows":
        """These rows' state (copies), for a step of only them; put() writes it back."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rows(**{name: v[rows] if torch.is_tensor(v) and name not in SHARED else v for name, v in state.items()})

    def put(self, rows: torch.Tensor, part: "Rows") -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v) and f.name not in SHARED:
                v[rows] = getattr(part, f.name)


SHARED = {"token_chars"}     # Rows fields that are not per row


def align_to_source(src, src_ok, last, prev, expect, token_chars=None):
    """(B,) the position in src (B, S) that each row's last output token copies.

    Candidates are positions within [expect - ALIGN_BEFORE, expect + ALIGN_AFTER] holding `last`;
    one whose predecessor is `prev` (a bigram match) beats any that is not, then the nearest to
    `expect` wins (ahead before behind). With no candidate, `last` is a correction that stands for
    the source tokens from `expect` on: as many of them (0 to REPLACES_AT_MOST) as best match its
    length in characters (token_chars; "_again" for "_o|g|ain"), else one; the copy goes on after them.
    """
    at = torch.arange(src.shape[1], device=src.device)[None]
    offset = at - expect[:, None]
    hit = src_ok & (src == last[:, None]) & (offset >= -ALIGN_BEFORE) & (offset <= ALIGN_AFTER)
    bigram = torch.zeros_like(hit)
    bigram[:, 1:] = src[:, :-1] == prev[:, None]
    cost = offset.abs() * 2 + (offset < 0).long() + 4 * (max(ALIGN_BEFORE, ALIGN_AFTER) + 1) * (~bigram).long()
    best = cost.masked_fill(~hit, 1 << 30).argmin(dim=1)
    replaced = expect
    if token_chars is not None:
        n = torch.arange(REPLACES_AT_MOST + 1, device=src.device)
        ahead = (expect[:, None] + n[:-1]).clamp(max=src.shape[1] - 1)
        chars = token_chars[src.gather(1, ahead)] * src_ok.gather(1, ahead)
        spanned = torch.cat([torch.zeros_like(chars[:, :1]), chars.cumsum(dim=1)], dim=1)    # chars of n tokens
        fit = (spanned - token_chars[last][:, None]).abs() * (REPLACES_AT_MOST + 2) + (n - 1).abs()
        replaced = expect - 1 + fit.argmin(dim=1)
    return torch.where(hit.any(dim=1), best, replaced)


def prefill_step(model: GPT, cache: SlotCache, rows: torch.Tensor, tokens: torch.Tensor, at: torch.Tensor,
                 scored: torch.Tensor):
    """Run prompts `tokens` (R, L, right-padded) into cache rows `rows`. at (R, K): the prompt's last
    position, then those of the `scored` (R,) tokens after it (the source copy and the end marker; 0:
    none). Returns the greedy token and its log-prob at every `at` (R, K), the token each `at` is
    followed by in `tokens` (R, K), and the summed log-probs of the scored tokens (R,). Padding and
    scored tokens write slots past a prompt's end, which its own output tokens overwrite before any
    query could see them (causal), unless the output is that copy (see _admit)."""
    R, L = tokens.shape
    positions = torch.arange(L, device=tokens.device)[None].expand(R, L)
    cache.rows, cache.slots, cache.prefill = rows[:, None], positions, True
    logits, _ = model(tokens, positions=positions, cache=cache, logits_at=at)       # (R, K, V)
    cache.rows, cache.prefill = cache.all_rows, False
    following = tokens.gather(1, (at + 1).clamp(max=L - 1))
    logp = torch.log_softmax(logits, dim=-1)
    counted = torch.arange(at.shape[1], device=at.device)[None] < scored[:, None]
    top, pred = logp.max(dim=-1)
    copy_logp = (logp.gather(-1, following[..., None])[..., 0] * counted).sum(dim=1)
    return pred, top, following, copy_logp


def decode_step(model: GPT, cache: SlotCache, rows: Rows, keys: int, end_id: int, draft_len: int,
                active: torch.Tensor | None = None):
    """One step for every row, in one function so torch.compile makes it one graph.

    Each row feeds its last token and, with draft_len > 0, a draft of draft_len tokens copied
    from its source after the position aligned with that token (align_to_source). The model's
    argmax at each fed position is its greedy next token there, so the leading drafts it agrees
    with are accepted and its token after them comes free: 1 to draft_len + 1 new tokens a row.
    `keys` is how many cache slots the step may see (past every row's last fed slot).
    active: the rows that step, when the others are idle (end of a batch): the forward then runs
    only those, with the same results. Updates `rows` in place."""
    if active is not None:
        part = rows.take(active)
        cache.rows = active[:, None]
        decode_step(model, cache, part, keys, end_id, draft_len)
        cache.rows = cache.all_rows
        rows.put(active, part)
        return
    j = torch.arange(draft_len + 1, device=rows.last.device)
    if draft_len:
        anchor = align_to_source(rows.src, rows.src_ok, rows.last, rows.prev, rows.expect, rows.token_chars)
        draft = rows.src.gather(1, (anchor[:, None] + 1 + j[:-1]).clamp(max=rows.src.shape[1] - 1))
        feed = torch.cat([rows.last[:, None], draft], dim=1)           # (B, draft_len + 1)
    else:
        feed = rows.last[:, None]
    slots = (rows.pos[:, None] + j).clamp(max=cache.k[0].shape[2] - 1)
    cache.slots = slots
    allowed = torch.arange(keys, device=slots.device)[None, None] <= slots[:, :, None]      # causal
    bias = torch.zeros(allowed.shape, dtype=cache.k[0].dtype, device=slots.device).masked_fill_(~allowed, float("-inf"))
    logits, _ = model(feed, positions=slots.clamp(max=model.cfg.block_size - 1), cache=cache, mask=bias[:, None])
    pred = logits.argmax(dim=-1)                                        # (B, draft_len + 1)
    if draft_len:
        accepted = (draft == pred[:, :-1]).long().cumprod(dim=1).sum(dim=1)   # leading drafts the model agrees with
    else:
        accepted = torch.zeros_like(rows.n_out)
    is_end = (pred == end_id) & (j[None] <= accepted[:, None])
    until_end = torch.where(is_end.any(dim=1), is_end.long().argmax(dim=1) + 1, draft_len + 2)
    running = ~rows.done
    emit = torch.minimum(torch.minimum(accepted + 1, until_end), rows.limits - rows.n_out).masked_fill(~running, 0)
    rows.out.scatter_(1, (rows.n_out[:, None] + j).clamp(max=rows.out.shape[1] - 1), pred)
    if rows.logp is not None:        # the greedy token's log-prob at each fed position: max - logsumexp
        top = logits.max(dim=-1).values - logits.logsumexp(dim=-1)
        rows.logp += (top * (j[None] < emit[:, None])).sum(dim=1)
    rows.done |= (until_end <= emit) | (rows.n_out + emit >= rows.limits)
    rows.n_out += emit
    rows.pos += emit
    if draft_len:
        rows.prev.copy_(torch.where(running, feed.gather(1, accepted[:, None])[:, 0], rows.prev))
        rows.expect.copy_(torch.where(running, anchor + accepted + 1, rows.expect))
    rows.last.copy_(torch.where(running, pred.gather(1, accepted[:, None])[:, 0], rows.last))


@dataclass(frozen=True)
class Steps:
    """What runs a prompt (`prefill`) and a decoding step (`decode`): eager by default,
    compile_for_decoding() compiles both."""
    prefill: Callable = prefill_step
    decode: Callable = decode_step


def compile_for_decoding() -> Steps:
    """The decoding steps under torch.compile with dynamic shapes, for `step=` below: one graph for
    prompts and one for steps (per draft length), whatever the batch size and lengths. Compiling
    takes ~15-30 s on a 2-core CPU and then decodes faster (BENCHMARKS.md), so it pays on corpora,
    not on a few windows. A machine without a working compiler falls back to eager."""
    from torch import _dynamo
    _dynamo.config.suppress_errors = True
    return Steps(torch.compile(prefill_step, dynamic=True), torch.compile(decode_step, dynamic=True))


REFILL_SHARE = 8      # refill finished rows once 1/REFILL_SHARE of the batch (or all of it) is free
IDLE_SHARE = 4        # a step runs only the busy rows once 1/IDLE_SHARE of the batch is idle


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new: list[int], end_id: int, device: torch.device,
             batch_size: int = 64, step: Steps | None = None, draft_tokens: int = 0,
             sources: list[list[int]] | None = None, token_chars: list[int] | None = None,
             score: bool = False) -> list[Generation]:
    """Greedy continuations of many prompts; row i stops at the end marker or after max_new[i] tokens.

    step: the step functions (default eager; compile_for_decoding() to compile).
    draft_tokens: > 0 checks that many tokens copied from the row's source per forward pass: the
    same output, in fewer passes where the output copies its source (DRAFT_TOKENS suits correction).
    sources: what each output copies (for correction, the input's tokens); default: the prompt.
    token_chars: characters of each token id; drafts then re-align after corrections that change
    the number of tokens (fewer steps, same output).
    score: fill each Generation's logprob and source_logprob (see the module's docstring)."""
    steps = Steps() if step is None else step
    if not prompts:
        return []
    sources = prompts if sources is None else sources
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar lengths prefill together
    B, k = min(batch_size, len(prompts)), max(0, draft_tokens)
    capacity = max(len(p) + m for p, m in zip(prompts, max_new)) + k + 1  # drafts may run k past a budget
    if score:                                       # a prompt's prefill may hold its source and end marker
        capacity = max(capacity, min(model.cfg.block_size, max(len(p) + len(s) + 1 for p, s in zip(prompts, sources))))
    cache = SlotCache(model.cfg, B, capacity, device, next(model.parameters()).dtype)
    rows = _empty_rows(B, max(max_new) + k + 1, max(map(len, sources)) + k + 1, device)
    source_logp: list[float | None] | None = [None] * len(prompts) if score else None
    if score:
        rows.logp = torch.zeros(B, device=device)
    if token_chars is not None and k:
        rows.token_chars = torch.tensor(token_chars, device=device)
    holds: list[int | None] = [None] * B           # the prompt each row decodes
    done, pos = [True] * B, [0] * B                 # the host's copy of rows.done and rows.pos
    results: list[Generation | None] = [None] * len(prompts)
    queue, waiting = iter(order), len(order)
    while True:
        free = [r for r in range(B) if holds[r] is None]
        if waiting and (len(free) * REFILL_SHARE >= B or len(free) == B):
            take = [(r, next(queue)) for r in free[:waiting]]
            waiting -= len(take)
            _admit(steps.prefill, model, cache, rows, take, prompts, max_new, sources, end_id, source_logp)
            admitted_done, admitted_pos = rows.done.tolist(), rows.pos.tolist()   # after accepted copies
            for r, i in take:
                holds[r], done[r], pos[r] = i, admitted_done[r], admitted_pos[r]
        running = [r for r in range(B) if holds[r] is not None and not done[r]]
        if running:                                 # keys: past every running row's last fed slot
            # a quarter or more of the rows idle (the batch's tail): step only the others (BENCHMARKS.md)
            active = torch.tensor(running, device=device) if len(running) * IDLE_SHARE <= B * (IDLE_SHARE - 1) \
                else None
            steps.decode(model, cache, rows, min(max(pos[r] for r in running) + k + 1, capacity), end_id, k, active)
        elif all(h is None for h in holds):
            break
        done, pos = rows.done.tolist(), rows.pos.tolist()       # the one wait for the device per step
        finished = [r for r in range(B) if holds[r] is not None and done[r]]
        if finished:
            counts = rows.n_out.tolist()
            logps = rows.logp.tolist() if score else None
            for r in finished:
                seq, i = rows.out[r, :counts[r]].tolist(), holds[r]
                ended = bool(seq) and seq[-1] == end_id
                results[i] = Generation(tokens=seq[:-1] if ended else seq, hit_limit=not ended)
                if score:
                    results[i].logprob, results[i].source_logprob = logps[r], source_logp[i]
                holds[r] = None
    return results


def _empty_rows(B: int, out_len: int, src_len: int, device) -> Rows:
    def zeros(*shape, dtype=torch.long):
        return torch.zeros(shape, dtype=dtype, device=device)
    return Rows(out=zeros(B, out_len), n_out=zeros(B), limits=zeros(B), done=torch.ones(B, dtype=torch.bool,
                device=device), last=zeros(B), pos=zeros(B), src=zeros(B, src_len),
                src_ok=zeros(B, src_len, dtype=torch.bool), prev=zeros(B), expect=zeros(B))


def _admit(prefill, model, cache, rows: Rows, take, prompts, max_new, sources, end_id: int,
           source_logp: list | None = None) -> None:
    """Prefill the prompts of `take` ((row, prompt index) pairs) into their rows and reset those rows.
    With source_logp (score=True), each prompt's source then the end marker follow it in the same
    forward where they fit the context, and their summed log-prob goes to source_logp[prompt]."""
    device, block, vocab = rows.out.device, model.cfg.block_size, model.cfg.vocab_size
    scored = [len(sources[i]) + 1 if source_logp is not None and len(prompts[i]) + len(sources[i]) < block
              else 0 for _, i in take]
    per_row = (max(scored) + 1) * vocab                     # logits one row of this prefill holds
    group = max(1, SCORE_LOGITS // per_row) if max(scored) else len(take)
    for g in range(0, len(take), group):
        part, n = take[g:g + group], scored[g:g + group]
        seqs = [prompts[i] + (sources[i] + [end_id] if k else []) for (_, i), k in zip(part, n)]
        lengths = [len(prompts[i]) for _, i in part]
        width, src_width, K = max(map(len, seqs)), rows.src.shape[1], max(n) + 1 if max(n) else 1
        # built on the host, then one copy each to the device
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs]).to(device)
        src = torch.tensor([sources[i] + [end_id] * (src_width - len(sources[i])) for _, i in part]).to(device)
        src_ok = (torch.arange(src_width)[None] < torch.tensor([[len(sources[i])] for _, i in part])).to(device)
        idx = torch.tensor([r for r, _ in part], device=device)
        length = torch.tensor(lengths, device=device)
        at = (length[:, None] - 1 + torch.arange(K, device=device)).clamp(max=width - 1)
        limits = torch.tensor([max_new[i] for _, i in part], device=device)
        pred, top, following, scores = prefill(model, cache, idx, tokens, at, torch.tensor(n, device=device))
        # The copy in the prefill is a draft of the whole output, checked in the same forward: the
        # leading copy tokens the model would write itself are accepted, with its own token after them,
        # as a decoding step accepts drafts; their cache slots already hold them. Same greedy output.
        j = torch.arange(K, device=device)[None]
        agrees = (pred == following) & (j < torch.tensor(n, device=device)[:, None])
        accepted = agrees.long().cumprod(dim=1).sum(dim=1)
        is_end = (pred == end_id) & (j <= accepted[:, None])
        until_end = torch.where(is_end.any(dim=1), is_end.long().argmax(dim=1) + 1, K + 1)
        emit = torch.minimum(torch.minimum(accepted + 1, until_end), limits).clamp(min=1)
        w = min(K, rows.out.shape[1])
        rows.out[idx, :w] = pred[:, :w]
        rows.n_out[idx] = emit
        rows.limits[idx] = limits
        rows.done[idx] = (until_end <= emit) | (emit >= limits)
        rows.last[idx] = pred.gather(1, emit[:, None] - 1)[:, 0]
        rows.pos[idx] = length + emit - 1
        rows.src[idx], rows.src_ok[idx] = src, src_ok
        rows.prev[idx] = tokens.gather(1, (length + emit - 2)[:, None])[:, 0]
        rows.expect[idx] = emit - 1
        if source_logp is not None:
            rows.logp[idx] = (top * (j < emit[:, None])).sum(dim=1)
            for (_, i), k, v in zip(part, n, scores.tolist()):
                source_logp[i] = v if k else None


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
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            beam, token = divmod(index, vocab)
            if score == float("-inf"):
                break
            if token == end_id:
                # only an end among the best `beams` candidates finishes a hypothesis (as in transformers):
                # one ranked lower would end beams that greedy decoding (beams = 1) never ends
                if rank < beams:
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
