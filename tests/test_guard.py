"""The calibrated do-no-harm guard (nichelm.inference, nichelm.backends, nichelm.evaluate, nichelm.apply).

- Every engine's score() is the mean log-probability per continuation token, checked against a direct
  computation with the model (torch exactly; ct2 and a fake vLLM too).
- Margin +inf gives every input back byte for byte; margin -inf is the length-capped guard as it was.
- `nichelm evaluate` chooses the margin on the val split, stores it in RUN/guard.json; apply, an hf
  export and nichelm.load all use it.
- `nichelm evaluate` rebuilds test documents, draws them with the seed, and cuts them as apply does.
- apply reports the share of changes kept and the input surprisal, and warns about a corpus unlike
  the validation data.
"""

import json
import math
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import nichelm
from nichelm.apply import GuardFigures, apply
from nichelm.backends import TorchBackend, score_torch
from nichelm.data.tokenizer import encode_text
from nichelm.evaluate import calibrate_margin, evaluate_project, project_documents, sample_documents
from nichelm.generate import Generation
from nichelm.inference import Correction, Corrector, DocumentTests, cut_windows
from nichelm.metrics import char_distance
from tests.conftest import ROOT, SENTENCES
from tests.test_apply import build_run, tree
from tests.test_windows import END, PROMPT, by_word, fix_word, random_text, tokenizer


def tiny(arch: str = "llama", block: int = 96):
    from nichelm.model import GPT, ModelConfig
    torch.manual_seed(1)
    return GPT(ModelConfig(arch=arch, vocab_size=tokenizer().get_vocab_size(), block_size=block, n_layer=2,
                           n_head=2, n_embd=32)).eval()


def direct_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    """Mean log-prob per continuation token, one unpadded sequence at a time."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + continuation]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(continuation)) / len(continuation)


def some_rows(n: int = 23):
    tok, rng = tokenizer(), random.Random(0)
    end = tok.token_to_id(END)
    from nichelm.data.tokenizer import prompt_ids
    prompts, conts = [], []
    for i in range(n):
        text = random_text(rng, rng.randint(1, 8)).strip() or "a"
        prompts.append(prompt_ids(tok, PROMPT, text))
        conts.append(encode_text(tok, by_word(fix_word)(text) if i % 2 else text) + [end])
    return prompts, conts


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_torch_score_is_the_models_log_probability(arch):
    torch.set_num_threads(1)
    model = tiny(arch)
    prompts, conts = some_rows()
    assert len({len(p) + len(c) for p, c in zip(prompts, conts)}) > 5       # padding really happens
    for batch_size in (1, 4, 64):
        got = score_torch(model, prompts, conts, "cpu", batch_size)
        want = [direct_logprob(model, p, c) for p, c in zip(prompts, conts)]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def ends_often(model, end: int, weight: float = 0.2):
    """The model, made to predict the end marker at some positions (random weights rarely do): for a
    good share of the rows of some_rows() with these tiny models (0.2 for llama, 1.0 for gpt2)."""
    with torch.no_grad():
        model.lm_head.weight[end] = 0
        model.lm_head.weight[end, 0] = weight
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoding_scores_are_the_models_log_probability(arch):
    """generate(score=True): each output's summed log-prob (its tokens, then the end marker when it came) and its
    source's (copied after the prompt, then the end marker; None where that passes the context) are the model's,
    as a direct forward gives them; the tokens are generate()'s without scores, with and without copy drafts,
    in batches that refill."""
    from nichelm.generate import generate
    torch.set_num_threads(1)
    block, end = 48, tokenizer().token_to_id(END)
    model = ends_often(tiny(arch, block=block), end, {"llama": 0.2, "gpt2": 1.0}[arch])
    prompts, conts = some_rows(40)
    keep = [i for i, p in enumerate(prompts) if len(p) < block - 2]
    prompts, sources = [prompts[i] for i in keep], [conts[i][:-1] for i in keep]
    budgets = [min(len(s) + 8, block - len(p)) for p, s in zip(prompts, sources)]
    for draft, batch in ((0, 4), (3, 4), (3, 64)):
        plain = generate(model, prompts, budgets, end, "cpu", batch, draft_tokens=draft, sources=sources)
        scored = generate(model, prompts, budgets, end, "cpu", batch, draft_tokens=draft, sources=sources, score=True)
        assert [(g.tokens, g.hit_limit) for g in scored] == [(g.tokens, g.hit_limit) for g in plain]
        assert {g.hit_limit for g in scored} == {True, False}                  # both kinds of rows are checked
        for p, s, g in zip(prompts, sources, scored):
            out = g.tokens + ([] if g.hit_limit else [end])
            assert g.logprob == pytest.approx(direct_logprob(model, p, out) * len(out), abs=1e-4)
            if len(p) + len(s) + 1 > block:
                assert g.source_logprob is None
            else:
                assert g.source_logprob == pytest.approx(direct_logprob(model, p, s + [end]) * (len(s) + 1), abs=1e-4)
        assert sum(g.source_logprob is None for g in scored) not in (0, len(scored))   # both kinds here too
        assert all(g.logprob is None and g.source_logprob is None for g in plain)


def test_the_guard_takes_the_decodings_scores_and_scores_only_the_rest(monkeypatch):
    """The guard's gains and surprisals are the same (1e-5) whether the decoding scored the windows or a
    teacher-forced pass did, and the decoding leaves that pass only what it could not score."""
    torch.set_num_threads(1)
    tok = tokenizer()
    rng = random.Random(5)
    windows = [random_text(rng, rng.randint(2, 12)) for _ in range(30)]
    runs = {}
    for decoded_scores in (True, False):
        corrector = Corrector(ends_often(tiny(block=96), tok.token_to_id(END)), tok,
                              {"prompt_template": PROMPT, "end_marker": END, "window_chars": 60},
                              guard_max_change=-1, guard_margin=0.0)
        generate, score, rows = corrector.backend.generate, corrector.backend.score, []
        if not decoded_scores:
            monkeypatch.setattr(corrector.backend, "generate", lambda p, m, s=None, score=False: generate(p, m, s))
        monkeypatch.setattr(corrector.backend, "score", lambda p, c: rows.extend(c) or score(p, c))
        runs[decoded_scores] = corrector.correct_windows(windows), rows
    (fast, fast_rows), (slow, slow_rows) = runs[True], runs[False]
    assert [c.text for c in fast] == [c.text for c in slow]
    for a, b in zip(fast, slow):
        assert (a.gain is None) == (b.gain is None) and (a.surprisal is None) == (b.surprisal is None)
        if a.gain is not None:
            assert a.gain == pytest.approx(b.gain, abs=1e-5)
        if a.surprisal is not None:
            assert a.surprisal == pytest.approx(b.surprisal, abs=1e-5)
    # the decoding scored every input copy (all fit the context here); what is left to the teacher-forced pass
    # is corrections whose text does not encode back to the decoded tokens (common with random weights)
    copies = [encode_text(tok, w) + [tok.token_to_id(END)] for w in windows]
    assert sum(c.gain is not None for c in fast) > 5
    assert not any(row in copies for row in fast_rows) and all(c in slow_rows for c in copies)
    assert len(fast_rows) <= len(slow_rows) - len(copies) and fast_rows
    # a correction whose text encodes back to its decoded tokens takes the decoding's figures, unscored again
    rows.clear()
    raw = [w.replace("e", "c") + " x" for w in windows[:3]]
    decoded = [(r, False) for r in raw]
    gens = [Generation(encode_text(tok, r), False, logprob=-3.0 * (len(encode_text(tok, r)) + 1),
                       source_logprob=-1.0 * (len(encode_text(tok, w)) + 1)) for w, r in zip(windows, raw)]
    assert [sc[0] for sc in corrector._scores(windows[:3], decoded, gens)] == [-2.0] * 3 and rows == []


class FakeVLLMScoring:
    """Stands in for vLLM's prompt_logprobs: the log-prob of each prompt token under `model` (entry 0 is
    None, as in vLLM), in a dict keyed by token id, with the Logprob objects' .logprob."""

    def __init__(self, model):
        self.module = types.ModuleType("vllm")
        self.params = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                fake.params.append(kwargs)

        class LLM:
            def __init__(self, **kwargs):
                pass

            def generate(self, prompts, params, use_tqdm=True):
                outs = []
                for p in prompts:
                    ids = p["prompt_token_ids"]
                    with torch.no_grad():
                        logp = F.log_softmax(model(torch.tensor([ids]))[0][0].double(), dim=-1)
                    lps = [None] + [{ids[t]: types.SimpleNamespace(logprob=float(logp[t - 1, ids[t]]))}
                                    for t in range(1, len(ids))]
                    outs.append(types.SimpleNamespace(prompt_logprobs=lps, outputs=[]))
                return outs

        self.module.SamplingParams, self.module.LLM = SamplingParams, LLM


def test_vllm_score_reads_prompt_logprobs(monkeypatch, tmp_path):
    from nichelm.backends import VLLMBackend
    model = tiny()
    fake = FakeVLLMScoring(model)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    backend = VLLMBackend(tmp_path, end_id=tokenizer().token_to_id(END))
    prompts, conts = some_rows(9)
    got = backend.score(prompts, conts)
    want = [direct_logprob(model, p, c) for p, c in zip(prompts, conts)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    assert fake.params[-1]["prompt_logprobs"] == 0 and fake.params[-1]["max_tokens"] == 1


# ---------------------------------------------------------------- the guard's rule


class Scripted(TorchBackend):
    """Decodes by a function of the window text (so changes are known); scores with the real model."""
    fn = staticmethod(by_word(fix_word))

    def generate(self, prompts, max_new, sources=None, score=False):
        tok = self.corrector.tokenizer
        return [Generation(tokens=encode_text(tok, self.fn(tok.decode(s))), hit_limit=False) for s in sources]


def scripted_corrector(monkeypatch, **kwargs) -> Corrector:
    monkeypatch.setattr("nichelm.inference.TorchBackend", Scripted)
    return Corrector(tiny(block=2048), tokenizer(), {"prompt_template": PROMPT, "end_marker": END,
                                                      "window_chars": 30}, **kwargs)


def texts_with_layout(n: int = 6) -> list[str]:
    rng = random.Random(11)
    return [random_text(rng, rng.randint(5, 40), long_words=True) for _ in range(n)] + ["", " \n", "tlie"]


@pytest.mark.parametrize("overlap", [0, 12])
def test_infinite_margin_gives_every_input_back_byte_for_byte(monkeypatch, overlap):
    torch.set_num_threads(1)
    texts = texts_with_layout()
    corrector = scripted_corrector(monkeypatch, guard_margin=math.inf, window_overlap=overlap)
    assert corrector.correct(texts) == texts
    assert corrector.correct(texts, guard=False) != texts                    # the model did change things
    st = corrector.stats
    assert st.changed > 0 and st.corrected == 0 and st.kept_low_margin == st.changed - st.kept_too_different
    assert st.input_surprisal is not None and st.input_surprisal > 0


def old_guard(text: str, fn, window_chars: int, max_change: float) -> str:
    """The length-capped guard as it was, computed independently: per window, the model's output unless
    it changes more than max_change of the window."""
    out = []
    for chunk, sep in cut_windows(text, window_chars):
        fixed = fn(chunk).strip() if chunk.strip() else chunk
        keep = max_change >= 0 and chunk.strip() and char_distance(fixed, chunk) > max_change * max(len(chunk), 1)
        out.append((chunk if keep else fixed) + sep)
    return "".join(out)


def test_no_margin_is_the_length_guard_as_it_was(monkeypatch):
    torch.set_num_threads(1)
    texts = texts_with_layout()
    for max_change in (0.15, -1):
        corrector = scripted_corrector(monkeypatch, guard_margin=-math.inf, guard_max_change=max_change)
        assert corrector.correct(texts) == [old_guard(t, Scripted.fn, 30, max_change) for t in texts]
        assert corrector.stats.kept_low_margin == 0
    default = scripted_corrector(monkeypatch)                        # an uncalibrated model: no margin test
    assert default.guard_margin == -math.inf
    assert default.correct(texts) == [old_guard(t, Scripted.fn, 30, 0.15) for t in texts]


def test_a_finite_margin_keeps_exactly_the_corrections_that_win_by_it(monkeypatch):
    torch.set_num_threads(1)
    corrector = scripted_corrector(monkeypatch, guard_margin=-math.inf, guard_max_change=-1)
    windows = [c for t in texts_with_layout() for c, _ in cut_windows(t, 30) if c.strip()]
    results = corrector.correct_windows(windows)
    tok, end = corrector.tokenizer, corrector.end_id
    gains = []
    for w, r in zip(windows, results):
        if r.raw == w:
            assert r.gain is None
            continue
        prompt = corrector._prompt_ids(w)
        want = (direct_logprob(corrector.model, prompt, encode_text(tok, r.raw) + [end])
                - direct_logprob(corrector.model, prompt, encode_text(tok, w) + [end]))
        assert r.gain == pytest.approx(want, abs=1e-5)
        assert r.surprisal == pytest.approx(-direct_logprob(corrector.model, prompt, encode_text(tok, w) + [end]),
                                            abs=1e-5)
        gains.append(r.gain)
    assert len(gains) >= 6
    margin = sorted(gains)[len(gains) // 2]
    corrector.guard_margin = margin
    again = corrector.correct_windows(windows)
    for w, r, g in zip(windows, again, results):
        assert r.text == (g.raw if g.gain is None or g.gain >= margin else w)
        assert r.kept_input == ("" if r.text == r.raw else "low_margin")
    assert 0 < sum(r.kept_input == "low_margin" for r in again) < len(gains)


# ---------------------------------------------------------------- choosing the margin


def fake_corrections(gains_and_fixes):
    """One window per document: input 'a b c' (reference 'a b x'), output right ('a b x') or wrong."""
    docs, fixed = [], []
    for gain, right in gains_and_fixes:
        c = Correction("", "a b x" if right else "a b y z", "", "a b c", gain)
        docs.append({"input": "a b c", "output": "a b x"})
        fixed.append([(c, "")])
    return docs, fixed


def test_calibration_takes_the_best_margin_within_the_worse_share():
    # Each document starts with 1 error; a right correction leaves 0 (-1), a wrong one 3 (+2, and worse).
    docs, fixed = fake_corrections([(3, True), (2, False), (1, True), (0.5, True), (0.2, True)])
    # errors as the margin falls past each gain: 5 -> 4 -> 6 -> 5 -> 4 -> 3
    none_worse = calibrate_margin(docs, fixed, 0.0)
    assert none_worse["margin"] == 2.5 and none_worse["corrections_let_through"] == 1    # halfway to the next gain
    one_worse = calibrate_margin(docs, fixed, 0.2)
    assert one_worse["margin"] == 0.2 and one_worse["corrections_let_through"] == 5     # the lowest gain itself
    docs, fixed = fake_corrections([(3, False), (2, False)])
    assert calibrate_margin(docs, fixed, 1.0)["margin"] == 4.0          # nothing helps: above every gain
    docs, fixed = fake_corrections([(1, True), (1, False), (1, True), (1, True)])
    assert calibrate_margin(docs, fixed, 0.25)["margin"] == 1 and calibrate_margin(docs, fixed, 0.2)["margin"] == 2


def test_calibration_bounds_the_clean_documents_and_scores_both():
    """evaluate's calibration: the worse-share bound holds for the clean copies (input = gold, any change is
    harm), not for the noisy documents, whose corpus CER is the objective together with the clean ones'."""
    docs, fixed = fake_corrections([(3, True), (2.5, True), (2, False), (1.5, True), (1.2, True), (1.1, True)])
    clean = [Correction("", "a b q", "", "a b x", g) for g in (1.0, 0.5)]        # each change: 0 errors -> 1
    docs += [{"input": "a b x", "output": "a b x"}] * 2
    fixed += [[(c, "")] for c in clean]
    bounded = [False] * 6 + [True] * 2
    # errors (6 noisy at 1 each) as the margin falls past each gain: 6 -> 5 -> 4 -> 6 (a noisy document
    # made worse) -> 5 -> 4 -> 3 (margin halfway to 1.0) -> 4 (a clean one changed) -> 5
    assert calibrate_margin(docs, fixed, 0.0, bounded)["margin"] == 1.05
    assert calibrate_margin(docs, fixed, 0.5, bounded)["margin"] == 1.05        # a changed clean one costs too
    assert calibrate_margin(docs, fixed, 0.0)["margin"] == 2.25                 # bounding all: stop at 4
    fixed[6][0][0].gain = 4.0              # a clean document changed before any correction: no margin helps
    assert calibrate_margin(docs, fixed, 0.0, bounded)["margin"] == 5.0
    assert calibrate_margin(docs, fixed, 0.5, bounded)["margin"] == pytest.approx(0.8)    # 1 of 2 may change


def test_an_unfamiliar_document_keeps_its_input_whole():
    """A document keeps its input whole when so few of its changed windows pass the margin that a
    document whose changes pass as often as on val would show as few with probability under 1%."""
    from nichelm.evaluate import stitch
    from nichelm.inference import DOC_ALPHA, binomial_cdf
    familiar_at = DocumentTests(passed_share=0.8)        # val: 80% of changes pass

    def doc(changed: int, passing: int, same: int = 3):
        cs = [Correction("", f"fix{i}", "", f"src{i}", 2.0 if i < passing else 0.1) for i in range(changed)]
        return cs + [Correction("", f"same{i}", "", f"same{i}") for i in range(same)]
    # val: 80% of changes pass. 3 of 12 passing: P(X <= 3 | 12, 0.8) = 0.0006 -> unfamiliar
    assert binomial_cdf(3, 12, 0.8) == pytest.approx(sum(math.comb(12, i) * 0.8 ** i * 0.2 ** (12 - i)
                                                         for i in range(4)))
    assert familiar_at.unfamiliar(doc(12, 3), 1.0)
    assert binomial_cdf(7, 12, 0.8) > DOC_ALPHA and not familiar_at.unfamiliar(doc(12, 7), 1.0)
    assert not familiar_at.unfamiliar(doc(12, 0), 1.0)          # nothing passed: nothing to undo
    assert not familiar_at.unfamiliar(doc(12, 12), 1.0)
    assert not DocumentTests().unfamiliar(doc(12, 3), 1.0)      # not calibrated: no such test
    assert not familiar_at.unfamiliar(doc(2, 1), 1.0)           # 1 of 2: P = 0.36, proves nothing
    # the normal approximation for long documents agrees with the exact sum where both apply
    exact = sum(math.exp(math.lgamma(2001) - math.lgamma(i + 1) - math.lgamma(2001 - i) + i * math.log(0.3)
                         + (2000 - i) * math.log(0.7)) for i in range(571))
    assert binomial_cdf(570, 2000, 0.3) == pytest.approx(exact, abs=0.01)
    pieces = [(c, " ") for c in doc(12, 3)]
    assert stitch(pieces, 1.0, familiar_at) == "".join(c.source + " " for c, _ in pieces)
    assert stitch(pieces, 1.0) == "".join((c.raw if c.gain == 2.0 or c.gain is None else c.source) + " "
                                                for c, _ in pieces)


def test_the_corrector_applies_the_document_test(monkeypatch):
    torch.set_num_threads(1)
    words = " ".join(SENTENCES).split()
    text = " ".join(f"tlie {w} c0rn" for w in words[:60])        # every window has something to change
    corrector = scripted_corrector(monkeypatch, guard_margin=-math.inf, guard_max_change=-1)
    fixed = corrector.correct([text])[0]
    results = corrector.correct_pieces([cut_windows(text, corrector.window_chars)])
    assert fixed != text and len(results) >= 12 and all(c.raw != c.source for c in results)
    gains = sorted(c.gain for c in results)
    corrector.guard_margin = gains[len(gains) * 3 // 4]      # about 1/4 of the changes pass
    corrector.document_tests = DocumentTests(passed_share=0.25)     # as on val: familiar
    quarter = corrector.correct([text])[0]
    assert quarter not in (text, fixed) and corrector.stats.documents_out_of_domain == 0
    # stitching (inference.stitch replays the rule) agrees with each window's own final text, joined by hand
    cut = cut_windows(text, corrector.window_chars)
    windows = corrector.correct_pieces([cut])
    assert quarter == "".join(c.text + sep for c, (_, sep) in zip(windows, cut))
    corrector.document_tests = DocumentTests(passed_share=0.95)     # nearly all passed on val: kept whole
    corrector.stats = type(corrector.stats)()
    assert corrector.correct([text])[0] == text
    assert corrector.stats.documents_out_of_domain == 1 and corrector.stats.corrected == 0
    assert corrector.stats.kept_out_of_domain > 0


def test_a_correction_that_deletes_letters_in_one_place_keeps_the_input(monkeypatch):
    """guard_max_deleted_letters: a small model drops words; a correction removing that many letters or
    more in one place (net of what it puts there) keeps its input, as the length cap does."""
    from nichelm.inference import deleted_letters
    assert deleted_letters("The wife of the ex- mayor of the city", "The wife of the city") == 12
    assert deleted_letters("tbe cele- .brated case", "the celebrated case") == 0     # punctuation only
    assert deleted_letters("the the cat", "the cat") == 3
    assert deleted_letters("s4-e magi& trates have", "some magistrates have") == 0   # replaced, not lost
    torch.set_num_threads(1)
    corrector = scripted_corrector(monkeypatch, guard_margin=-math.inf, guard_max_change=0.9)
    assert corrector.guard_max_deleted_letters == 0                    # not calibrated: no such limit
    source = "The wife of the ex- mayor of the city"
    assert corrector._guard(source, "The wife of the city", False).text == "The wife of the city"
    corrector.guard_max_deleted_letters = 4
    kept = corrector._guard(source, "The wife of the city", False)
    assert kept.text == source and kept.kept_input == "too_different"
    assert corrector._guard("the the cat", "the cat", False).text == "the cat"        # 3 < 4
    corrector.guard_max_change = -1                                    # the cap off: this limit off too
    assert corrector._guard(source, "The wife of the city", False).text == "The wife of the city"


def test_the_compression_threshold_lets_all_but_the_share_of_val_documents_through():
    from nichelm.evaluate import unfamiliar_threshold

    def doc(chars: int, tokens: int):
        return [(Correction("", "x" * chars, "", "x" * chars, None, 0.5, tokens + 1), "")]     # + the end marker
    val = [doc(100, t) for t in range(40, 90)]          # 50 documents, 2.5 down to 1.12 characters/token
    figures = sorted(100 / t for t in range(40, 90))
    assert unfamiliar_threshold(val, 0.02) == figures[1]        # 1 of 50 below it
    assert unfamiliar_threshold(val, 0.1) == figures[5]
    assert unfamiliar_threshold(val, 0.0) is None and unfamiliar_threshold([], 0.02) is None
    assert unfamiliar_threshold(val[:10], 0.02) == min(figures[-10:])     # few documents: the lowest, none below


def test_a_document_the_tokenizer_compresses_badly_keeps_its_input_whole(monkeypatch):
    """The second document test: characters per token of the input (as scored, end marker included)
    under min_chars_per_token means text unlike the training data, whatever passed the margin."""
    from nichelm.inference import chars_per_token, stitch

    def doc(chars: int, tokens: int, n: int = 4):
        return [Correction("", "y" * chars, "", "x" * chars, 2.0, 0.5, tokens) for _ in range(n)]
    assert chars_per_token(doc(10, 5)) == 2.5                                  # 4 tokens + the end marker
    assert chars_per_token([Correction("", "y", "", "x")]) is None            # nothing scored: no figure
    assert DocumentTests(min_chars_per_token=2.1).unfamiliar(doc(10, 6), 1.0)       # 2.0 < 2.1
    assert not DocumentTests(min_chars_per_token=2.1).unfamiliar(doc(10, 5), 1.0)   # 2.5: familiar
    assert not DocumentTests().unfamiliar(doc(10, 6), 1.0)                          # no reference: no test
    pieces = [(c, " ") for c in doc(10, 6)]
    assert stitch(pieces, 1.0, DocumentTests(min_chars_per_token=2.1)) == ("x" * 10 + " ") * 4
    assert stitch(pieces, 1.0, DocumentTests(min_chars_per_token=1.9)) == ("y" * 10 + " ") * 4
    # the Corrector applies it with the figure it loaded; a text that compresses well is corrected
    torch.set_num_threads(1)
    words = " ".join(SENTENCES).split()
    text = " ".join(f"tlie {w} c0rn" for w in words[:60])
    corrector = scripted_corrector(monkeypatch, guard_margin=-math.inf, guard_max_change=-1)
    fixed = corrector.correct([text])[0]
    figure = chars_per_token(corrector.correct_pieces([cut_windows(text, corrector.window_chars)]))
    corrector.document_tests = DocumentTests(min_chars_per_token=figure * 0.9)
    assert corrector.correct([text])[0] == fixed
    corrector.document_tests = DocumentTests(min_chars_per_token=figure * 1.1)
    corrector.stats = type(corrector.stats)()
    assert corrector.correct([text])[0] == text and corrector.stats.documents_out_of_domain == 1


# ---------------------------------------------------------------- a real run: evaluate, then apply and export


class ScriptedRun(TorchBackend):
    """Decodes a run's windows with a fixed rule (undo the 'e' -> 'c' noise of build_run's pairs, which
    also breaks words that have a real 'c'), records the windows it was given, and scores with the run's
    real model: a margin chosen on val then separates something."""
    seen: list[str] = []

    def generate(self, prompts, max_new, sources=None, score=False):
        tok = self.corrector.tokenizer
        texts = [tok.decode(s) for s in sources]
        ScriptedRun.seen += texts
        return [Generation(tokens=encode_text(tok, t.replace("c", "e", 1)), hit_limit=False) for t in texts]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("guard_run"), "llama")


@pytest.fixture
def evaluated(run, monkeypatch):
    """The run evaluated with the scripted decoder: RUN/guard.json holds the margin chosen on val."""
    from nichelm.config import load_project
    monkeypatch.setattr("nichelm.inference.TorchBackend", ScriptedRun)
    project = load_project(run.parent / "project.toml", ["eval.max_examples=40", "eval.max_worse_share=0.2"])
    ScriptedRun.seen = []
    report = evaluate_project(project)
    return project, report


def in_order(pieces: list[str], text: str) -> bool:
    at = 0
    for p in pieces:
        at = text.find(p, at)
        if at < 0:
            return False
        at += len(p)
    return True


def test_documents_are_rebuilt_from_their_windows(run):
    """Each document's windows joined by a space: the whole document where prepare kept every window
    (it drops a val/test window whose text also appears in an earlier split), else its pieces in order."""
    rows = [json.loads(line) for split in ("val", "test")
            for line in (run / "data" / f"examples.{split}.jsonl").read_text().splitlines()]
    docs = project_documents(run / "data" / "examples.test.jsonl") + project_documents(
        run / "data" / "examples.val.jsonl")
    for d in docs:
        mine = [r for r in rows if r["doc_id"] == d["id"] and r["source"] == d["source"]]
        assert d["input"] == " ".join(r["input"] for r in mine) and d["output"] == " ".join(r["output"] for r in mine)
        if d["source"] == "pairs":          # one line of the jsonl each: OCR side and gold side
            i = int(d["id"].removeprefix("p"))
            gold = SENTENCES[i % len(SENTENCES)] + f" No. {i}."
        else:                               # a .txt file of 20 lines
            n = int(d["id"].removesuffix(".txt").removeprefix("doc"))
            gold = " ".join(SENTENCES[(n + i) % len(SENTENCES)] + f" Item {n}.{i}." for i in range(20))
        assert in_order([r["output"] for r in mine], gold)
    assert {d["source"] for d in docs} == {"pairs", "clean"}


def test_windows_joined_by_a_space_give_a_single_spaced_document_back(tmp_path):
    """prepare's windows (pair_segments_to_windows) are cut between words and stripped: a document whose
    only whitespace is single spaces (a verse, a line of a csv) comes back exactly, on both sides."""
    from nichelm.data.readers import Document, Segment, pair_segments_to_windows
    rng = random.Random(5)
    rows, texts = [], {}
    for n in range(30):
        gold = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))
        if n % 3:           # OCR pairs: several segments, each ending in a space but the last
            words = gold.split(" ")
            cuts = sorted(rng.sample(range(1, len(words)), min(2, len(words) - 1)))
            parts = [" ".join(words[a:b]) for a, b in zip([0] + cuts, cuts + [len(words)])]
            segs = [Segment(p.replace("e", "c", 1) + (" " if k + 1 < len(parts) else ""),
                            p + (" " if k + 1 < len(parts) else "")) for k, p in enumerate(parts)]
        else:               # clean text
            segs = [Segment(None, gold)]
        texts[str(n)] = ("".join(s.input or s.output for s in segs), gold)
        for w in pair_segments_to_windows(Document(str(n), segs), 60):
            rows.append({"input": w.input or w.output, "output": w.output, "source": "s", "doc_id": str(n)})
    assert len(rows) > 2 * len(texts)
    (tmp_path / "examples.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = project_documents(tmp_path / "examples.test.jsonl")
    assert [(d["input"], d["output"]) for d in docs] == list(texts.values())


def test_document_sample_is_seeded_and_within_the_budget(run):
    docs = project_documents(run / "data" / "examples.val.jsonl")
    assert len(docs) >= 6
    windows = lambda sample: sum(len(cut_windows(d["input"], 60)) for d in sample)     # noqa: E731
    a, b = sample_documents(docs, 10, 3, 60), sample_documents(docs, 10, 3, 60)
    assert a == b and 0 < windows(a) <= 10 and len(a) < len(docs)
    assert [docs.index(d) for d in a] == sorted(docs.index(d) for d in a)          # kept in split order
    others = [sample_documents(docs, 10, seed, 60) for seed in range(4, 12)]
    assert any(o != a for o in others)
    assert sample_documents(docs, 0, 3, 60) == docs


def test_evaluate_cuts_documents_as_apply_does(run, evaluated, tmp_path):
    project, report = evaluated
    assert report["unit"] == "document" and report["sample"]["seed"] == project.seed
    docs = sample_documents(project_documents(run / "data" / "examples.test.jsonl"), 40, project.seed, 60)
    assert [e["id"] for e in report["examples"]] == [d["id"] for d in docs]
    assert report["sample"]["windows"] == sum(len(cut_windows(d["input"], 60)) for d in docs)
    assert len(docs) > 1 and (report["sample"]["windows"] <= 40 or len(docs) == 1)
    test_windows = [c for d in docs for c, _ in cut_windows(d["input"], 60) if c.strip()]
    assert ScriptedRun.seen[-len(test_windows):] == test_windows         # never the gold alignment's windows
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d["input"])
    apply(run, [folder], tmp_path / "out", batch_size=8, threads=1)
    out = tree(tmp_path / "out")
    assert [out[f"{i:03d}.txt"].decode() for i in range(len(docs))] == [e["output"] for e in report["examples"]]


def test_margin_chosen_on_val_is_stored_and_used_everywhere(run, evaluated, tmp_path):
    from nichelm.export import export
    project, report = evaluated
    guard = json.loads((run / "guard.json").read_text())
    margin = report["margin_guard"]["margin"]
    assert guard["margin"] == margin and guard["chosen_on"] == "val" and math.isfinite(margin)
    # the compression threshold (unfamiliar_threshold, from the val documents) is stored and loaded with it
    assert guard["min_chars_per_token"] > 0 and report["margin_guard"]["min_chars_per_token"] == guard["min_chars_per_token"]
    assert nichelm.load(run).document_tests.min_chars_per_token == guard["min_chars_per_token"]
    assert guard["max_deleted_letters"] == project.eval.guard_max_deleted_letters
    val = report["margin_guard"]["calibration"]["val"]
    assert val["worse_fraction"] <= 0.2 and val["cer_after"] <= val["cer_before"]
    assert report["margin_guard"]["kept_low_margin"] + report["margin_guard"]["corrected"] > 0
    assert nichelm.load(run).guard_margin == margin
    folder = export(run, "hf")
    assert json.loads((folder / "task.json").read_text())["guard"]["margin"] == margin
    assert nichelm.load(folder).guard_margin == margin
    texts = [SENTENCES[i].replace("e", "c", 1) + " " + SENTENCES[i + 1] for i in range(4)]
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, t in enumerate(texts):
        (corpus / f"{i}.txt").write_text(t)
    rep = apply(folder, [corpus], tmp_path / "out", batch_size=8, threads=1)
    assert rep.guard_margin == margin and set(rep.per_file) == {f"{i}.txt" for i in range(4)}
    assert [tree(tmp_path / "out")[f"{i}.txt"].decode() for i in range(4)] == nichelm.load(run).correct(texts)
    ledger = [json.loads(line) for line in (tmp_path / "out" / ".nichelm-ledger.shard-0-of-1.jsonl")
              .read_text().splitlines()]
    assert ledger[0]["settings"]["guard_margin"] == margin
    # the stitched outputs at the stored margin differ from those without one somewhere in the run
    assert report["cer_after"] != report["cer_after_no_margin"] or report["margin_guard"]["kept_low_margin"] == 0


def test_a_calibration_for_another_checkpoint_is_not_used(run, evaluated, tmp_path, capsys):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    guard = json.loads((copy / "guard.json").read_text())
    (copy / "guard.json").write_text(json.dumps({**guard, "checkpoint": "step_0000001"}))
    assert nichelm.load(copy).guard_margin == -math.inf
    assert "calibrated for step_0000001" in capsys.readouterr().err


def test_the_length_cap_the_margin_was_chosen_with_comes_with_it(run, evaluated, tmp_path):
    """A margin is only right with the length cap it was chosen under: every load uses guard.json's
    max_change unless the caller gives one (apply's ledger records the one used)."""
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    guard = json.loads((copy / "guard.json").read_text())
    (copy / "guard.json").write_text(json.dumps({**guard, "max_change": 0.4, "max_deleted_letters": 5}))
    assert nichelm.load(copy).guard_max_change == 0.4 and nichelm.load(copy).guard_max_deleted_letters == 5
    assert nichelm.load(copy, guard_max_change=0.1).guard_max_change == 0.1
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SENTENCES[0].replace("e", "c", 1))
    apply(copy, [corpus], tmp_path / "out", batch_size=8, threads=1)
    ledger = (tmp_path / "out" / ".nichelm-ledger.shard-0-of-1.jsonl").read_text().splitlines()
    assert json.loads(ledger[0])["settings"]["guard_max_change"] == 0.4
    (copy / "guard.json").unlink()
    assert nichelm.load(copy).guard_max_change == 0.15                  # no guard.json: the default cap


# ---------------------------------------------------------------- the out-of-domain warning


def test_domain_warning_compares_with_the_validation_figures():
    ref = {"input_surprisal": 1.0, "kept_share": 0.8}
    like = GuardFigures(windows=500, changed=100, corrected=75, input_tokens=1000, input_mnats=1_200_000)
    assert like.domain_warning(ref) is None
    far = GuardFigures(windows=500, changed=100, corrected=75, input_tokens=1000, input_mnats=2_000_000)
    assert "input surprisal 2.00 nats/token vs 1.00" in far.domain_warning(ref)
    unsure = GuardFigures(windows=500, changed=100, corrected=20, input_tokens=1000, input_mnats=1_000_000)
    assert "kept 20% of the model's changes vs 80%" in unsure.domain_warning(ref)
    assert GuardFigures(windows=50, changed=10, corrected=0, input_tokens=100, input_mnats=900_000).domain_warning(
        ref) is None                                                     # too few windows to say
    assert far.domain_warning({}) is None                                # no calibration: nothing to compare


def test_apply_reports_the_guard_per_file_and_overall(run, evaluated, tmp_path):
    from nichelm.apply import print_report
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(" ".join(SENTENCES[(i + j) % 6].replace("e", "c", 1) for j in range(3)))
    rep = apply(run, [corpus], tmp_path / "out", batch_size=8, threads=1)
    per = rep.per_file
    assert sum(f["windows"] for f in per.values()) == rep.windows == rep.guard["windows"]
    assert sum(f["changed"] for f in per.values()) == rep.guard["changed"] > 0
    assert rep.guard["input_surprisal"] > 0 and all(f["input_surprisal"] > 0 for f in per.values())
    import io
    text = io.StringIO()
    print_report(rep, file=text)
    assert "corrections kept" in text.getvalue() and "surprisal of the input" in text.getvalue()


# ---------------------------------------------------------------- CTranslate2


def test_ct2_score_matches_the_torch_score(run):
    pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    ours = nichelm.load(run)
    ct2 = nichelm.load(run, backend="ct2")
    texts = [c for i in range(6) for c, _ in cut_windows(SENTENCES[i].replace("e", "c", 2), 60)]
    prompts = [ours._prompt_ids(t) for t in texts]
    conts = [encode_text(ours.tokenizer, t.replace("c", "e")) + [ours.end_id] for t in texts]
    a, b = ours.backend.score(prompts, conts), ct2.backend.score(prompts, conts)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


# ---------------------------------------------------------------- the benchmark script


def test_do_no_harm_bench_runs_and_checks_its_figures(run, evaluated, tmp_path):
    """bench/do_no_harm.py end to end on a tiny run and a two-document BLN600-format file: the clean
    part's CER is against the input itself, and the home part's gain share is its two CERs' ratio."""
    from tests.test_evaluate_external import write_bln600
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = __import__("do_no_harm")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    csv = tmp_path / "train.csv"
    write_bln600(csv)
    out = bench.main([str(run), "--bln600", str(csv), "--threads", "1", "--max-chars", "3000"])
    assert out["margin"] == json.loads((run / "guard.json").read_text())["margin"]
    ood = out["ood"]["bln600"]
    assert ood["documents"] == 2 and ood["pass"] == (ood["guard"]["cer_after"] <= ood["cer_before"]
                                                     and ood["guard"]["worse_share"] <= 0.05)
    for clean in out["clean"].values():
        assert clean["cer_before"] == 0 and clean["cer_vs_input"] == clean["guard"]["cer_after"]
    home = out["home"]
    gain, full = home["cer_before"] - home["guard"]["cer_after"], home["cer_before"] - home["no_margin"]["cer_after"]
    assert home["gain_kept"] == (gain / full if full > 0 else None)
    json.dumps(out)
