"""The benchmark scripts run end to end on CPU (their figures are taken on real machines; here only
that they work and report what they say: same outputs across engines, token counts that add up)."""

import sys
from pathlib import Path

import pytest
import torch

from tests.test_apply import build_run

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("bench"), "llama")


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
    try:
        import vllm  # noqa: F401
    except ImportError:                  # no vLLM here: the JSON says why instead of a figure
        assert "pip install vllm" in result["engines"]["vllm"]["skipped"]


def test_apply_throughput_smoke_on_cpu(tiny_run):
    """Every engine decodes the same windows; copy drafts change nothing (same tokens as nichelm)."""
    bench = _import("apply_throughput")
    result = bench.main([str(tiny_run), "--threads", "1", "--batch-size", "4", "--windows", "12", "--rounds", "1",
                         "--draft-tokens", "3", "--engines", "nichelm,nichelm-copy,transformers"])
    engines = result["engines"]
    assert set(engines) == {"nichelm", "nichelm-copy", "transformers"} and result["windows"] == 12
    assert engines["nichelm-copy"]["same_as_nichelm"] == 1.0
    assert engines["nichelm-copy"]["tokens"] == engines["nichelm"]["tokens"] > 0
    assert all(len(e["tokens_per_s_each_round"]) == 1 for e in engines.values())
    assert result["speedup_vs_transformers"]["transformers"] == 1.0


def test_copy_drafts_counts_on_cpu(tiny_run):
    bench = _import("copy_drafts")
    result = bench.main([str(tiny_run), "--split", "val", "--windows", "8", "--batch-size", "4", "--drafts", "0,2"])
    runs = result["runs"]
    assert [(r["draft_tokens"], r["realign_by_length"]) for r in runs] == [(0, False), (2, False), (2, True)]
    assert all(r["same_as_one_token_steps"] for r in runs) and result["output_tokens"] > 0
    assert runs[0]["tokens_per_row_step"] == 1.0 and runs[0]["steps"] > 0
