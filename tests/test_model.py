"""The decoder and its KV-cache decoding."""

import collections
import itertools

import numpy as np
import pytest
import torch

from nichelm.data.loader import loss_mask
from nichelm.generate import Generation, Steps, align_to_source, compile_for_decoding, decode_step, generate
from nichelm.model import GPT, ModelConfig

CPU = torch.device("cpu")


def uncached_greedy(model, prompt, budget, end_id=0):
    """The reference: full forward passes over the growing sequence, one row alone."""
    x, ref = torch.tensor([prompt]), []
    for _ in range(budget):
        nxt = int(model(x)[0][0, -1].argmax())
        ref.append(nxt)
        if nxt == end_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return ref[:-1] if ref and ref[-1] == end_id else ref


def random_prompts(n, seed=1, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (int(k),), generator=gen).tolist() for k in torch.randint(3, 30, (n,), generator=gen)]
    return prompts, [int(b) for b in torch.randint(1, 25, (n,), generator=gen)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_greedy_equals_uncached(arch):
    """More prompts than rows: finished rows take the next prompt (continuous batching) and every
    output is what the row would decode alone, without a cache."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompts, budgets = random_prompts(11)
    prompts[:3] = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
    gens = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=3)
    assert len(gens) == len(prompts)
    for prompt, budget, gen in zip(prompts, budgets, gens):
        ref = uncached_greedy(model, prompt, budget)
        assert gen.tokens == ref
        assert gen.hit_limit == (len(ref) == budget)


def counting_steps():
    """Eager steps that count the decoding steps (forward passes after the prompts) in `calls`."""
    calls = []

    def decode(*args):
        calls.append(1)
        return decode_step(*args)
    return Steps(decode=decode), calls


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_copy_drafts_never_change_the_output(arch):
    """Drafts come from a source; whatever the source, the output is the greedy output. With the
    greedy output itself as the source nearly every draft is accepted (far fewer steps); edited
    sources (tokens deleted, replaced, inserted) exercise rejection and re-alignment."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4,
                            n_kv_head=2 if arch == "llama" else None, n_embd=64)).eval()
    prompts, budgets = random_prompts(23, seed=2)
    plain = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=5)
    truth = [g.tokens + ([] if g.hit_limit else [0]) for g in plain]
    rng = torch.Generator().manual_seed(3)

    def edited(seq):
        seq = list(seq)
        for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
            i, what = int(torch.randint(0, len(seq) + 1, (1,), generator=rng)), int(torch.randint(0, 3, (1,), generator=rng))
            if what == 0 and i < len(seq):
                del seq[i]
            elif what == 1 and i < len(seq):
                seq[i] = int(torch.randint(1, 300, (1,), generator=rng))
            else:
                seq.insert(i, int(torch.randint(1, 300, (1,), generator=rng)))
        return seq

    steps, one_token = counting_steps()
    generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=5, step=steps)
    chars = torch.randint(1, 5, (300,), generator=rng).tolist()         # token lengths, for re-aligning
    for k in (1, 3, 8):
        for name, sources, lengths in (("exact", truth, None), ("edited", [edited(t) for t in truth], None),
                                       ("edited", [edited(t) for t in truth], chars), ("prompt", None, chars)):
            steps, calls = counting_steps()
            gens = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=5, draft_tokens=k,
                            sources=sources, token_chars=lengths, step=steps)
            assert [g.tokens for g in gens] == [g.tokens for g in plain], (k, name)
            assert [g.hit_limit for g in gens] == [g.hit_limit for g in plain], (k, name)
            if name == "exact":
                assert len(calls) < len(one_token) * {1: 0.6, 3: 0.35, 8: 0.25}[k], (k, len(calls), len(one_token))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_copy_the_model_agrees_with_comes_from_the_prompts_own_forward(arch):
    """With score=True each row's source follows its prompt in the prefill (the guard scores the copy there),
    and the leading source tokens the model would write itself are taken from that forward, as drafts are.
    Sources equal to the greedy outputs: every row is done by its prompt's forward, no decoding step at all;
    sources cut short or edited: the same outputs and the same log-probs, however much is taken."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompts, budgets = random_prompts(23, seed=2)
    unended = generate(model, prompts, budgets, end_id=-1, device=CPU, batch_size=5)
    end = collections.Counter(t for g in unended for t in g.tokens).most_common(1)[0][0]   # so some rows end
    plain = generate(model, prompts, budgets, end_id=end, device=CPU, batch_size=5)
    truth = [g.tokens for g in plain]
    assert {g.hit_limit for g in plain} == {True, False}
    logprobs = None
    for k in (0, 3):
        for name, sources in (("exact", truth), ("half", [t[:len(t) // 2] for t in truth]),
                              ("edited", [t[:len(t) // 2] + [7] + t[len(t) // 2:] for t in truth])):
            steps, calls = counting_steps()
            gens = generate(model, prompts, budgets, end_id=end, device=CPU, batch_size=5, draft_tokens=k,
                            sources=sources, score=True, step=steps)
            assert [(g.tokens, g.hit_limit) for g in gens] == [(g.tokens, g.hit_limit) for g in plain], (k, name)
            if name == "exact":
                assert calls == [], (k, len(calls))
                logprobs = [g.logprob for g in gens]
            else:
                assert calls, (k, name)
                assert [g.logprob for g in gens] == pytest.approx(logprobs, abs=1e-4), (k, name)
                # what the prefill took is never decoded again, and drafts go on from where it stopped
                unscored_steps, unscored_calls = counting_steps()
                generate(model, prompts, budgets, end_id=end, device=CPU, batch_size=5, draft_tokens=k,
                         sources=sources, step=unscored_steps)
                assert len(calls) < len(unscored_calls), (k, name, len(calls), len(unscored_calls))


def test_the_longest_draft_allowed_decodes_like_one_token_steps():
    """16 drafts (the most eval.draft_tokens and --draft-tokens take): 17 queries a row, same output."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompts, budgets = random_prompts(9, seed=4)
    plain = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=4)
    gens = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=4, draft_tokens=16)
    assert [g.tokens for g in gens] == [g.tokens for g in plain]


def test_align_to_source():
    src = torch.tensor([[7, 1, 2, 3, 1, 2, 9, 5, 5, 8, 8]])
    ok = torch.ones_like(src, dtype=torch.bool)

    def anchor(last, prev, expect, chars=None):
        return int(align_to_source(src, ok, torch.tensor([last]), torch.tensor([prev]), torch.tensor([expect]),
                                   chars)[0])
    assert anchor(2, 1, 2) == 2          # where expected
    assert anchor(2, 1, 4) == 5          # the nearest, ahead before behind
    assert anchor(2, 1, 3) == 2          # the nearest, even behind
    assert anchor(1, 0, 2) == 1 and anchor(1, 0, 3) == 4   # 1 behind vs 2 ahead; 2 behind vs 1 ahead
    assert anchor(9, 2, 2) == 6          # further ahead (a deletion in the output)
    assert anchor(9, 2, 1) == 1          # too far ahead: not a match (a replacement of src[1])
    assert anchor(5, 9, 8) == 7          # the bigram (9, 5) beats the nearer unigram at 8
    assert anchor(4, 3, 3) == 3          # not in the source: a replacement, keep the expected place
    # with token lengths: token 4 (3 characters) stands for src[3:5] (tokens 3 and 1: 1 + 2 characters)
    chars = torch.tensor([1, 2, 1, 1, 3, 1, 1, 1, 1, 1])
    assert anchor(4, 2, 3, chars) == 4
    assert anchor(6, 2, 3, chars) == 3   # same length as src[3]: one for one
    ok[0, 5] = False
    assert anchor(2, 1, 4) == 2          # only the source's own tokens count


def test_compiled_decoding_equals_eager():
    """torch.compile with dynamic shapes: same tokens as eager, over batches of different sizes and
    lengths, with and without copy drafts (one graph for prompts, one for steps per draft length)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=64)).eval()
    prompts, budgets = random_prompts(23)
    eager = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=8)
    step = compile_for_decoding()
    for k in (0, 3):
        compiled = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=8, step=step, draft_tokens=k)
        assert [g.tokens for g in compiled] == [g.tokens for g in eager]
        assert [g.hit_limit for g in compiled] == [g.hit_limit for g in eager]


def test_vocab_padded_and_loss_masked():
    model = GPT(ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.wte.weight.shape[0] == 384
    x = torch.randint(0, 300, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 8:] = True
    _, loss_masked = model(x, x, mask)
    logits, _ = model(x)
    assert logits.shape[-1] == 300                   # the padding is storage, not vocabulary
    manual = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 300), x[:, 8:].reshape(-1))
    assert torch.allclose(loss_masked, manual, atol=1e-5)


def test_loss_mask_follows_markers():
    IN, OUT, END = 1, 2, 0
    row = np.array([[IN, 5, 6, OUT, 7, 8, END, IN, 9, OUT, 10]])
    mask = loss_mask(row, IN, OUT, END)[0].tolist()
    # trained: the positions from the output marker through the last output token (which predicts END)
    assert mask == [False, False, False, True, True, True, False, False, False, True, True]


def test_beam_search_with_one_beam_is_greedy_when_no_row_ends():
    """A 300-token vocabulary and an untrained model: the end marker is never among the two best
    candidates, so one beam follows the greedy path to the budget (the hit-limit return)."""
    from nichelm.generate import beam_search
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompt = [5, 6, 7, 8, 9]
    greedy = generate(model, [prompt], [10], end_id=0, device=CPU)[0]
    assert greedy.hit_limit and len(greedy.tokens) == 10
    assert beam_search(model, prompt, 10, 0, CPU, beams=1) == greedy


def ending_model(arch: str):
    """A 4-token vocabulary (token 0 = end) and weights scaled up from their small initial values, so
    hypotheses end often, have clearly different scores, and depend on all their earlier tokens (a
    beam that continued another beam's cache would score differently): beam search can be compared
    with exhaustive search over all outputs."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=4, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_({"gpt2": 20, "llama": 3}[arch])
    return model


def sequence_logprobs(model, prompt, seqs):
    """log P(seq | prompt) for each seq, from one plain forward pass (no cache) over the right-padded
    batch: causal attention, so the padding after a sequence changes none of its positions."""
    width = len(prompt) + max(map(len, seqs))
    x = torch.tensor([prompt + s + [0] * (width - len(prompt) - len(s)) for s in seqs])
    with torch.no_grad():
        lp = torch.log_softmax(model(x)[0], -1)
    return [sum(lp[row, len(prompt) - 1 + i, t].item() for i, t in enumerate(s)) for row, s in enumerate(seqs)]


ENDING_PROMPTS = [[1, 2, 3], [3, 3, 1, 2], [2, 1], [1, 1, 1, 2, 3], [3, 2, 1], [2, 2, 3, 1], [1, 3, 3, 2, 2, 1],
                  [3, 1]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_with_rows_that_end_equals_uncached(arch):
    """The untrained 300-token models above never emit the end marker; this one often does, so rows
    end at the marker (and free their slot) as well as at their budget, with and without copy drafts."""
    model = ending_model(arch)
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(2, 9, (40,), generator=gen)
    prompts = [torch.randint(1, 4, (int(n),), generator=gen).tolist() for n in lengths]
    budgets = torch.randint(1, 11, (40,), generator=gen).tolist()
    refs = [uncached_greedy(model, p, b) for p, b in zip(prompts, budgets)]
    ended = [len(r) < b for r, b in zip(refs, budgets)]
    assert 5 <= sum(ended) <= 35, sum(ended)
    for k in (0, 3):
        gens = generate(model, prompts, budgets, end_id=0, device=CPU, batch_size=4, draft_tokens=k, sources=prompts)
        assert [g.tokens for g in gens] == refs, k
        assert [not g.hit_limit for g in gens] == ended, k


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_wide_enough_is_exhaustive_search(arch, length_penalty):
    """Budget 5 over 3 non-end tokens: 3**5 beams never fill up with ended hypotheses before the budget,
    so beam search must return the best of all 121 ended outputs, scored as it documents
    (log-probability / length**length_penalty), the log-probabilities taken without a cache."""
    from nichelm.generate import beam_search
    model, budget = ending_model(arch), 5
    for prompt in ENDING_PROMPTS:
        # every output of n tokens, n + 1 (the end marker) <= budget
        bodies = [body for n in range(budget) for body in itertools.product((1, 2, 3), repeat=n)]
        logprobs = sequence_logprobs(model, prompt, [list(body) + [0] for body in bodies])
        scores = {body: lp / max(len(body), 1) ** length_penalty for body, lp in zip(bodies, logprobs)}
        ranked = sorted(scores, key=scores.get, reverse=True)
        assert scores[ranked[0]] - scores[ranked[1]] > 1e-3, "a near tie: pick another prompt"
        found = beam_search(model, prompt, budget, 0, CPU, beams=3 ** budget, length_penalty=length_penalty)
        assert found == Generation(tokens=list(ranked[0]), hit_limit=False), (prompt, scores[ranked[0]])


def test_beam_search_with_one_beam_is_greedy_when_rows_end():
    """As transformers does, an end marker ranked below the beams among the candidates should not end a
    hypothesis; then one beam is greedy decoding, end marker included."""
    from nichelm.generate import beam_search
    model = ending_model("llama")
    for prompt in ENDING_PROMPTS:
        greedy = generate(model, [prompt], [5], end_id=0, device=CPU)[0]
        assert beam_search(model, prompt, 5, 0, CPU, beams=1) == greedy, prompt


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_loss_is_over_the_real_vocabulary_only(arch):
    """The vocabulary is padded to a multiple of 128; the padded rows are no tokens, so the loss is the
    cross-entropy over the tokenizer's own vocabulary (they once took part in the softmax: +2.6% loss)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    assert model.cfg.padded_vocab_size > 300
    with torch.no_grad():
        model.lm_head.weight[300:] += 5.0           # padded rows that would dominate a softmax over them
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    logits, _ = model(x)                            # inference logits: the real vocabulary
    assert logits.shape[-1] == 300
    _, loss = model(x, y, torch.ones_like(y, dtype=torch.bool))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), y.reshape(-1))
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_projected_network_costs_per_token_what_its_plain_model_does(arch):
    """FLOPs per token (MFU, nichelm plan) count one expert's MLP, not the basis tensors it is made from."""
    from nichelm.model import Projection, instantiate
    cfg = ModelConfig(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64,
                      projected=Projection(clusters=3, m=2, h=4))
    projected = GPT(cfg)
    plain = instantiate(projected, cluster=1)
    assert projected.num_params() > plain.num_params()                     # the basis is stored ...
    assert projected.flops_per_token(64) == plain.flops_per_token(64)      # ... but not run per token
