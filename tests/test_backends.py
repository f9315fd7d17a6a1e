"""Decoding backends (nichelm.backends): CTranslate2 decodes like nichelm's own engine, vLLM gets token-id
prompts, greedy parameters and per-row budgets and its answers decode like nichelm's engine (checked with
a fake `vllm` module that decodes with transformers: vLLM is GPU-only), and a missing engine is one line
naming the fix."""

import shutil
import sys
import types

import hashlib
import json
import pytest
import torch

import nichelm
from nichelm.apply import apply
from nichelm.errors import UserError
from tests.test_apply import OPTS, build_run, make_corpus, noisy, tree


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("backends_run"), "llama")


def windows_of(corrector, n_docs: int = 12) -> tuple[list[list[int]], list[int]]:
    """Prompts and nichelm's per-row budgets for the windows of n_docs noisy documents."""
    from nichelm.inference import cut_windows
    texts = [c for i in range(n_docs) for c, _ in cut_windows(noisy(i), corrector.window_chars)]
    prompts = [corrector._prompt_ids(t) for t in texts]
    budgets = [min(int(len(corrector.tokenizer.encode(t).ids) * corrector.max_new_tokens_ratio) + 8,
                   corrector.model.cfg.block_size - len(p)) for t, p in zip(texts, prompts)]
    return prompts, budgets


def make_ending_run(run, out):
    """A copy of `run` at `out` with its end-marker logit scaled up until some windows end early and
    some hit their budget (the barely trained model never ends on its own), so both outcomes are compared."""
    from safetensors.torch import load_file, save_file

    from nichelm.checkpoint import latest_checkpoint
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("export"))
    corrector = nichelm.load(out, guard_max_change=-1)
    prompts, budgets = windows_of(corrector)
    row = corrector.model.lm_head.weight[corrector.end_id]
    original = row.detach().clone()
    for scale in (1.02, 1.04, 1.06, 1.08, 1.1, 1.15, 1.2, 1.3):
        with torch.no_grad():
            row.copy_(original * scale)
        gens = corrector.backend.generate(prompts, budgets)
        ended = sum(not g.hit_limit for g in gens)
        if 3 <= ended <= len(gens) - 3 and len({len(g.tokens) for g in gens if not g.hit_limit}) >= 3:
            break
    else:
        pytest.fail("no end-marker scale gives both ended and unfinished windows")
    path = latest_checkpoint(out) / "model.safetensors"
    weights = load_file(str(path))
    weights["lm_head.weight"][corrector.end_id] *= scale
    save_file(weights, str(path))
    # weights changed on purpose: record their new checksum, as a save would (else the load refuses them)
    marker = path.parent / "COMPLETE"
    head, sums = marker.read_text().split("\n", 1)
    sums = json.loads(sums)
    sums["sha256"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker.write_text(head + "\n" + json.dumps(sums) + "\n")
    return out


@pytest.fixture(scope="module")
def ending_run(run, tmp_path_factory):
    return make_ending_run(run, tmp_path_factory.mktemp("ending") / "run")


def test_ct2_backend_decodes_like_the_torch_backend(ending_run, tmp_path):
    pytest.importorskip("ctranslate2")
    ours = nichelm.load(ending_run, guard_max_change=-1)
    ct2 = nichelm.load(ending_run, guard_max_change=-1, backend="ct2")
    assert ct2.backend.name == "ct2" and ct2.model.lm_head.weight.is_meta      # no second copy of the weights
    prompts, budgets = windows_of(ours)
    ours.batch_size = ct2.backend.batch_size = 8                                # several length-sorted batches
    expected = ours.backend.generate(prompts, budgets)
    assert {g.hit_limit for g in expected} == {True, False}
    assert ct2.backend.generate(prompts, budgets) == expected
    docs = [noisy(i) for i in range(12)]
    assert ct2.correct(docs, guard=False) == ours.correct(docs, guard=False)

    corpus = make_corpus(tmp_path / "in", 4, n_lines=3)                        # the same through apply
    torch_report = apply(ending_run, [corpus], tmp_path / "torch", **OPTS)
    ct2_report = apply(ending_run, [corpus], tmp_path / "ct2", backend="ct2", **OPTS)
    assert tree(tmp_path / "ct2") == tree(tmp_path / "torch")
    assert ct2_report.kept_hit_limit == torch_report.kept_hit_limit
    with pytest.raises(UserError, match="backend = 'ct2', now None"):          # resuming with another engine
        apply(ending_run, [corpus], tmp_path / "ct2", **OPTS)


def test_ct2_backend_takes_a_ct2_export_folder(run):
    pytest.importorskip("ctranslate2")
    from nichelm.export import export
    folder = export(run, "ct2")
    docs = [noisy(i) for i in range(4)]
    assert (nichelm.load(folder, backend="ct2", guard_max_change=-1).correct(docs, guard=False)
            == nichelm.load(run, guard_max_change=-1).correct(docs, guard=False))
    with pytest.raises(UserError, match="runs only with --backend ct2"):
        nichelm.load(folder)


class FakeVLLM:
    """Stands in for vLLM (GPU only) without using nichelm's engine: records what nichelm passes, loads
    transformers' model from the hf export vLLM is pointed at, and decodes as vLLM does for these
    SamplingParams: greedy, one plain uncached forward pass over the whole sequence per token, stopping
    at a stop token (finish_reason "stop"; vLLM versions differ on keeping it in token_ids, hence
    keep_stop_token) or after max_tokens tokens ("length"); with prompt_logprobs, each prompt token's
    log-probability from one forward pass."""

    def __init__(self, keep_stop_token: bool = True):
        self.keep_stop_token, self.calls, self.init, self.raw = keep_stop_token, [], None, []
        self.module = types.ModuleType("vllm")
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                from transformers import AutoModelForCausalLM
                fake.init = kwargs
                self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                if not isinstance(params, list):            # one SamplingParams for every prompt
                    params = [params] * len(prompts)
                assert len(params) == len(prompts)
                outputs = []
                for prompt, p in zip(prompts, params):
                    assert p.kwargs["temperature"] == 0.0, "this fake decodes greedily only"
                    ids, new, reason = list(prompt["prompt_token_ids"]), [], "length"
                    prompt_logprobs = None
                    if p.kwargs.get("prompt_logprobs") is not None:    # each prompt token's log-prob (not the 1st)
                        with torch.no_grad():
                            lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
                        prompt_logprobs = [None] + [{t: types.SimpleNamespace(logprob=float(lp[i, t]))}
                                                    for i, t in enumerate(ids[1:])]
                    while len(new) < p.kwargs["max_tokens"]:
                        with torch.no_grad():
                            new.append(int(self.model(torch.tensor([ids + new])).logits[0, -1].argmax()))
                        if new[-1] in (p.kwargs.get("stop_token_ids") or []):
                            reason = "stop"
                            new = new if fake.keep_stop_token else new[:-1]
                            break
                    fake.raw.append((new, reason))
                    outputs.append(types.SimpleNamespace(prompt_logprobs=prompt_logprobs, outputs=[
                        types.SimpleNamespace(token_ids=tuple(new), finish_reason=reason)]))
                return outputs

        self.module.SamplingParams, self.module.LLM = SamplingParams, LLM


@pytest.mark.parametrize("keep_stop_token", [True, False])
def test_vllm_backend_plumbing_with_a_fake_vllm(ending_run, monkeypatch, keep_stop_token):
    """Token-id prompts, greedy parameters and per-row budgets go in; what comes back (with or without
    the end token, ended or cut at the budget) decodes like nichelm's own engine."""
    pytest.importorskip("transformers")                   # a run is exported to hf for vLLM
    fake = FakeVLLM(keep_stop_token)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    ours = nichelm.load(ending_run, guard_max_change=-1)
    vllm = nichelm.load(ending_run, guard_max_change=-1, backend="vllm")
    assert vllm.backend.name == "vllm" and fake.init["model"] == fake.init["tokenizer"]
    prompts, budgets = windows_of(ours)
    expected = ours.backend.generate(prompts, budgets)
    assert {g.hit_limit for g in expected} == {True, False}
    got = vllm.backend.generate(prompts, budgets)
    sent, params = fake.calls[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert [p.kwargs for p in params] == [{"temperature": 0.0, "max_tokens": b, "stop_token_ids": [ours.end_id]}
                                          for b in budgets]
    raw = fake.raw[-len(prompts):]
    assert {reason for _, reason in raw} == {"stop", "length"}
    assert any(ours.end_id in tokens for tokens, _ in raw) == keep_stop_token
    assert got == expected
    # teacher-forced scores (the guard's margin test) agree too: each row's output, within its budget
    conts = [g.tokens + ([] if g.hit_limit else [ours.end_id]) for g in expected]
    assert vllm.backend.score(prompts, conts) == pytest.approx(ours.backend.score(prompts, conts), abs=1e-4)
    docs = [noisy(i) for i in range(6)]
    assert vllm.correct(docs) == ours.correct(docs)
    with pytest.raises(UserError, match="greedily only"):
        nichelm.load(ending_run, backend="vllm", beams=2)


def test_vllm_backend_reads_each_finish_reason(monkeypatch, tmp_path):
    """VLLMBackend on canned engine answers (end marker 0): the end token kept or left out of token_ids,
    a row cut at its budget, an end token in the budget's last place, an engine that overshoots."""
    from nichelm.backends import VLLMBackend
    from nichelm.generate import Generation
    answers = {(5,): ([7, 8, 0], "stop"), (6,): ([7, 8], "stop"), (7,): ([7, 8, 9], "length"),
               (8,): ([7, 8, 9, 9], "length"), (9,): ([7, 8], "stop"), (10,): ([], "stop")}
    calls = []

    class LLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(prompts)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                token_ids=answers[tuple(p["prompt_token_ids"])][0],
                finish_reason=answers[tuple(p["prompt_token_ids"])][1])]) for p in prompts]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    backend = VLLMBackend(tmp_path, end_id=0)
    got = backend.generate([[5], [6], [7], [8], [9], [10]], [8, 8, 3, 3, 3, 4])
    assert got == [Generation([7, 8], False), Generation([7, 8], False), Generation([7, 8, 9], True),
                   Generation([7, 8, 9], True), Generation([7, 8], False), Generation([], False)]
    assert backend.generate([], []) == [] and len(calls) == 1      # nothing to decode: the engine is not called


def test_a_missing_backend_is_one_line_naming_the_fix(run, tmp_path, monkeypatch, capsys):
    from nichelm.cli import main
    monkeypatch.setitem(sys.modules, "vllm", None)        # import vllm -> ImportError
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    corpus = make_corpus(tmp_path / "in", 1)
    assert main(["apply", "--model", str(run), "--input", str(corpus), "--output", str(tmp_path / "out"),
                 "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--backend vllm needs vLLM" in err and "pip install vllm" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="pip install ctranslate2"):
        nichelm.load(run, backend="ct2")
    with pytest.raises(UserError, match="use one of torch, ct2, vllm"):
        nichelm.load(run, backend="onnx")


def test_compiled_torch_engine_applies_like_eager(ending_run, tmp_path):
    """apply --compile on: torch.compile'd decoding writes the same outputs as eager decoding, with
    windows that end early and windows that hit their budget."""
    corpus = make_corpus(tmp_path / "in", 4, n_lines=3)
    eager = apply(ending_run, [corpus], tmp_path / "eager", compile=False, **OPTS)
    compiled = apply(ending_run, [corpus], tmp_path / "compiled", compile=True, **OPTS)
    assert tree(tmp_path / "compiled") == tree(tmp_path / "eager")
    assert compiled.kept_hit_limit == eager.kept_hit_limit and eager.kept_hit_limit > 0


def test_copy_drafts_apply_like_one_token_steps(ending_run, tmp_path):
    """apply --draft-tokens: the copy-draft engine writes what one-token steps write."""
    corpus = make_corpus(tmp_path / "in", 4, n_lines=3)
    apply(ending_run, [corpus], tmp_path / "plain", compile=False, draft_tokens=0, **OPTS)
    for k in (None, 8):
        apply(ending_run, [corpus], tmp_path / f"drafts{k}", compile=False, draft_tokens=k, **OPTS)
        assert tree(tmp_path / f"drafts{k}") == tree(tmp_path / "plain")
