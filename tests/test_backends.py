"""Decoding backends (nichelm.backends): CTranslate2 decodes like nichelm's own engine, vLLM gets token-id
prompts, greedy parameters and per-row budgets (checked with a fake `vllm` module: vLLM is GPU-only),
and a missing engine is one line naming the fix."""

import shutil
import sys
import types

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


@pytest.fixture(scope="module")
def ending_run(run, tmp_path_factory):
    """The run with its end-marker logit scaled up until some windows end early and some hit their budget
    (the barely trained model never ends on its own), so both outcomes are compared."""
    from safetensors.torch import load_file, save_file

    from nichelm.checkpoint import latest_checkpoint
    out = tmp_path_factory.mktemp("ending") / "run"
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
    return out


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
    """Stands in for vLLM: records what nichelm passes and decodes greedily with nichelm's own engine on
    the hf export vLLM was pointed at, answering in vLLM's shapes (finish_reason, token_ids)."""

    def __init__(self, keep_stop_token: bool = True):
        self.keep_stop_token, self.calls, self.init = keep_stop_token, [], None
        self.module = types.ModuleType("vllm")
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.init = kwargs
                self.engine = nichelm.load(kwargs["model"])         # an hf export: nichelm.json, safetensors

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                ids = [p["prompt_token_ids"] for p in prompts]
                gens = self.engine.backend.generate(ids, [p.kwargs["max_tokens"] for p in params])
                stop = params[0].kwargs["stop_token_ids"]
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    token_ids=tuple(g.tokens + (stop if fake.keep_stop_token and not g.hit_limit else [])),
                    finish_reason="length" if g.hit_limit else "stop")]) for g in gens]

        self.module.SamplingParams, self.module.LLM = SamplingParams, LLM


@pytest.mark.parametrize("keep_stop_token", [True, False])
def test_vllm_backend_plumbing_with_a_fake_vllm(ending_run, monkeypatch, keep_stop_token):
    pytest.importorskip("transformers")                   # a run is exported to hf for vLLM
    fake = FakeVLLM(keep_stop_token)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    ours = nichelm.load(ending_run, guard_max_change=-1)
    vllm = nichelm.load(ending_run, guard_max_change=-1, backend="vllm")
    assert vllm.backend.name == "vllm" and fake.init["model"] == fake.init["tokenizer"]
    prompts, budgets = windows_of(ours)
    expected = ours.backend.generate(prompts, budgets)
    assert vllm.backend.generate(prompts, budgets) == expected and {g.hit_limit for g in expected} == {True, False}
    sent, params = fake.calls[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert [p.kwargs for p in params] == [{"temperature": 0.0, "max_tokens": b, "stop_token_ids": [ours.end_id]}
                                          for b in budgets]
    docs = [noisy(i) for i in range(6)]
    assert vllm.correct(docs) == ours.correct(docs)
    with pytest.raises(UserError, match="greedily only"):
        nichelm.load(ending_run, backend="vllm", beams=2)


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
