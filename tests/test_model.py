"""The decoder and its KV-cache decoding."""

import numpy as np
import pytest
import torch

from nichelm.data.loader import loss_mask
from nichelm.generate import compile_for_decoding, generate
from nichelm.model import GPT, ModelConfig


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_greedy_equals_uncached(arch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
    gens = generate(model, prompts, [10, 10, 10], end_id=0, device=torch.device("cpu"), batch_size=8)
    for prompt, gen in zip(prompts, gens):
        x, ref = torch.tensor([prompt]), []
        for _ in range(10):
            logits, _ = model(x)
            nxt = int(logits[0, -1].argmax())
            ref.append(nxt)
            if nxt == 0:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
        assert gen.tokens == (ref[:-1] if ref[-1] == 0 else ref)


def test_compiled_decoding_equals_eager():
    """torch.compile with dynamic shapes: same tokens as eager, over batches of different sizes and
    lengths (one compiled graph for prompts, one for steps; no recompiling per length)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=64)).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 300, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 30, (23,), generator=gen)]
    budgets = [int(b) for b in torch.randint(1, 25, (23,), generator=gen)]
    eager = generate(model, prompts, budgets, end_id=0, device=torch.device("cpu"), batch_size=8)
    compiled = generate(model, prompts, budgets, end_id=0, device=torch.device("cpu"), batch_size=8,
                        step=compile_for_decoding())
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
    manual = torch.nn.functional.cross_entropy(model(x, x)[0][:, 8:].reshape(-1, 384), x[:, 8:].reshape(-1))
    assert torch.allclose(loss_masked, manual, atol=1e-5)


def test_loss_mask_follows_markers():
    IN, OUT, END = 1, 2, 0
    row = np.array([[IN, 5, 6, OUT, 7, 8, END, IN, 9, OUT, 10]])
    mask = loss_mask(row, IN, OUT, END)[0].tolist()
    # trained: the positions from the output marker through the last output token (which predicts END)
    assert mask == [False, False, False, True, True, True, False, False, False, True, True]


def test_beam_search_with_one_beam_is_greedy_and_wider_beams_score_higher():
    from nichelm.generate import beam_search
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompt, cpu = [5, 6, 7, 8, 9], torch.device("cpu")
    greedy = generate(model, [prompt], [10], end_id=0, device=cpu)[0]
    assert beam_search(model, prompt, 10, 0, cpu, beams=1).tokens == greedy.tokens

    def logprob(seq, end):
        x = torch.tensor([prompt + seq + ([0] if end else [])])
        lp = torch.log_softmax(model(x)[0][0], -1)
        return sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq + ([0] if end else [])))

    wide = beam_search(model, prompt, 10, 0, cpu, beams=4, length_penalty=0.0)   # raw log-probability
    if not wide.hit_limit and not greedy.hit_limit:
        assert logprob(wide.tokens, True) >= logprob(greedy.tokens, True) - 1e-4
