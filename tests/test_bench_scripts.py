"""The benchmark scripts run end to end on CPU (their figures are taken on real machines; here only
that they work and report what they say: same outputs across engines, token counts that add up)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.test_apply import build_run
from tests.test_backends import make_ending_run

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run whose windows partly end early and partly run to their budget."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    return make_ending_run(build_run(root / "trained", "llama"), root / "run")


def _import(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_decode_throughput_smoke_on_cpu(tiny_run):
    bench = _import("decode_throughput")
    result = bench.main([str(tiny_run), "--device", "cpu", "--preset", "nano", "--arch", "gpt2", "--block-size",
                         "96", "--windows", "10", "--new-tokens", "6", "--batch-size", "4",
                         "--engines", "nichelm-eager,vllm"])
    eager = result["engines"]["nichelm-eager"]
    assert result["params"] > 100_000 and result["windows"] == 10
    assert 0 < eager["generated_tokens"] <= 10 * 6 and eager["tokens_per_s"] > 0
    vllm = result["engines"]["vllm"]
    if importlib.util.find_spec("vllm") is None:      # no vLLM here: the JSON says why instead of a figure
        assert "pip install vllm" in vllm["skipped"]
    else:                                             # a figure, or why there is none (e.g. no GPU)
        assert vllm.get("skipped") or vllm["generated_tokens"] > 0, vllm


def test_apply_throughput_smoke_on_cpu(tiny_run):
    """Every engine decodes the same windows (transformers too, from the hf export: same tokens as
    nichelm); copy drafts change nothing; the token count is what the rows needed and the speedups
    are ratios of the engines' own tokens/s."""
    import nichelm
    from nichelm.generate import generate
    bench = _import("apply_throughput")
    result = bench.main([str(tiny_run), "--threads", "1", "--batch-size", "4", "--windows", "12", "--rounds", "1",
                         "--draft-tokens", "3", "--engines", "nichelm,nichelm-copy,transformers"])
    engines = result["engines"]
    assert set(engines) == {"nichelm", "nichelm-copy", "transformers"} and result["windows"] == 12
    assert engines["nichelm-copy"]["same_as_nichelm"] == engines["transformers"]["same_as_nichelm"] == 1.0
    # Each row's tokens up to its budget, plus its end marker where it ended: counted here from
    # nichelm's own Generations over the windows and budgets the script says it uses.
    corrector = nichelm.load(tiny_run)
    texts = bench.windows_for(tiny_run, 12)
    prompts = [corrector._prompt_ids(t) for t in texts]
    gens = generate(corrector.model, prompts, bench.budgets(corrector, prompts, texts), corrector.end_id,
                    torch.device("cpu"))
    assert {g.hit_limit for g in gens} == {True, False}
    needed = sum(len(g.tokens) + (not g.hit_limit) for g in gens)
    assert engines["nichelm"]["tokens"] == engines["nichelm-copy"]["tokens"] == engines["transformers"]["tokens"] \
        == needed > 0
    for e in engines.values():
        assert len(e["tokens_per_s_each_round"]) == 1
        # tokens over the timed seconds (rounded to 1 ms in the JSON)
        low, high = e["tokens"] / (e["seconds"] + 5e-4), e["tokens"] / (e["seconds"] - 5e-4)
        assert low - 0.05 <= e["tokens_per_s"] <= high + 0.05, e
    speedup, base = result["speedup_vs_transformers"], engines["transformers"]["tokens_per_s"]
    assert set(speedup) == set(engines)
    for name in ("nichelm", "nichelm-copy"):
        assert speedup[name] == pytest.approx(engines[name]["tokens_per_s"] / base, abs=0.006), name


def test_copy_drafts_counts_on_cpu(tiny_run):
    bench = _import("copy_drafts")
    result = bench.main([str(tiny_run), "--split", "val", "--windows", "8", "--batch-size", "4", "--drafts", "0,2"])
    runs = result["runs"]
    assert [(r["draft_tokens"], r["realign_by_length"]) for r in runs] == [(0, False), (2, False), (2, True)]
    assert all(r["same_as_one_token_steps"] for r in runs) and result["output_tokens"] > 0
    assert runs[0]["tokens_per_row_step"] == 1.0 and runs[0]["steps"] > 0
