"""nichelm plan: the paper's recommendations for its Figure 1 scenarios, bad arguments, the CLI."""

import json
import re
import tomllib

import pytest

from nichelm.cli import main
from nichelm.config import load_project
from nichelm.errors import UserError
from nichelm.plan import FINDINGS, Scenario, format_plan, parse_number, recommend

# The paper's SLM is ~100M parameters: on one GPU, 300k tokens/s allows d12 (86M) and not d24.
SMALL_GPU = dict(hardware="gpu", inference_tokens_per_s=300_000)


def scenario(**kw):
    base = dict(specialist_tokens=1_000_000, specializations=1, pretrain_gpu_hours=0.0, specialize_gpu_hours=0.0,
                inference_tokens_per_s=1000.0, hardware="cpu")
    return Scenario(**{**base, **kw})


def findings(plan):
    return {r.finding for r in plan.reasons}


# --- Figure 1's three branches -----------------------------------------------------------------------

def test_pretraining_per_specialization_affordable_gives_importance_sampling():
    """(i) One target, the pre-training budget spendable on it: SLM-is, a selection sized to its pre-training."""
    plan = recommend(scenario(pretrain_gpu_hours=400, **SMALL_GPU))
    assert plan.method == "slm-is" and plan.preset == "d12"
    assert plan.selection_tokens == plan.pretrain_tokens > 0
    assert 0 < plan.finetune_tokens <= 4 * 1_000_000
    assert {"is", "scope", "nopt"} <= findings(plan)


def test_many_specializations_large_shared_budget_gives_projected_networks():
    """(ii) 100 targets, little budget each, a large shared pre-training, a small model: SLM-pn (Table 8's best
    pre-train-once method), SLM-mix the runner-up."""
    plan = recommend(scenario(specializations=100, pretrain_gpu_hours=400, specialize_gpu_hours=0.1, **SMALL_GPU))
    assert (plan.method, plan.alternative, plan.preset) == ("slm-pn", "slm-mix", "d12")
    assert plan.clusters >= 2 and plan.selection_tokens == 0
    assert {"shared", "table8"} <= findings(plan)


def test_large_inference_budget_gives_a_larger_model_pre_trained_once():
    """A large inference budget: the largest model the training budget can feed (the paper's LLM row wins
    when inference allows it), pre-trained once and fine-tuned; no mixture capacity."""
    plan = recommend(scenario(specializations=100, pretrain_gpu_hours=100, specialize_gpu_hours=1,
                              hardware="gpu", inference_tokens_per_s=10))
    assert plan.method == "slm" and plan.preset in ("d24", "d36", "d48")
    small = recommend(scenario(specializations=100, pretrain_gpu_hours=100, specialize_gpu_hours=1, **SMALL_GPU))
    assert small.preset == "d12" and plan.params > 5 * small.params
    assert {"table8", "chinchilla"} <= findings(plan)


def test_the_number_of_specializations_decides_between_them():
    """Same budgets: one target -> its own pre-training (SLM-is); a hundred -> shared (SLM-pn)."""
    budgets = dict(pretrain_gpu_hours=400, specialize_gpu_hours=0.1, **SMALL_GPU)
    assert recommend(scenario(specializations=1, **budgets)).method == "slm-is"
    assert recommend(scenario(specializations=100, **budgets)).method == "slm-pn"


def test_small_shared_budget_gives_plain_pretraining():
    """Mixtures pay only for large pre-training budgets (v1 abstract): below 2x compute-optimal, plain SLM."""
    plan = recommend(scenario(specializations=100, pretrain_gpu_hours=1, specialize_gpu_hours=0.01, **SMALL_GPU))
    assert plan.method == "slm" and plan.preset == "d12" and plan.clusters == 0


def test_plenty_of_specialist_data_needs_no_pretraining():
    plan = recommend(scenario(specialist_tokens=5_000_000_000, specialize_gpu_hours=100))
    assert plan.method == "slm-nopt" and plan.pretrain_tokens == 0
    assert plan.finetune_tokens <= 4 * 5_000_000_000
    # the same budgets with 1M tokens: pre-training first (Table 8: 227 perplexity on 1M tokens alone)
    assert recommend(scenario(specialize_gpu_hours=100)).method != "slm-nopt"


# --- Budgets, model size and what the plan spends ---------------------------------------------------------

def test_inference_budget_bounds_the_model():
    slow = recommend(scenario(pretrain_gpu_hours=10, inference_tokens_per_s=100))
    fast = recommend(scenario(pretrain_gpu_hours=10, inference_tokens_per_s=5000))
    assert slow.params > fast.params
    assert fast.inference_tokens_per_s >= 5000 and slow.inference_tokens_per_s >= 100


def test_cpu_speed_matches_the_measured_quickstart_decoding():
    """The cpu figure is calibrated on BENCHMARKS.md: the quickstart's nano model decodes 5,775 tokens/s."""
    plan = recommend(scenario(pretrain_gpu_hours=10, inference_tokens_per_s=5000))
    assert plan.preset == "nano"
    assert plan.inference_tokens_per_s == pytest.approx(5775, rel=0.05)


@pytest.mark.parametrize("k,x,y,z,hw", [(1, 400, 0, 300_000, "gpu"), (100, 400, 0.1, 300_000, "gpu"),
                                        (100, 100, 1, 10, "gpu"), (100, 1, 0.01, 300_000, "gpu"),
                                        (3, 0, 100, 1000, "cpu"), (20, 5, 0, 50, "cpu")])
def test_a_plan_never_spends_more_than_given(k, x, y, z, hw):
    plan = recommend(scenario(specializations=k, pretrain_gpu_hours=x, specialize_gpu_hours=y,
                              inference_tokens_per_s=z, hardware=hw))
    assert 0 < plan.gpu_hours <= (x + k * y) * 1.0001
    assert plan.reasons and all(r.finding in FINDINGS for r in plan.reasons)


@pytest.mark.parametrize("budgets", [dict(pretrain_gpu_hours=400, **SMALL_GPU),
                                     dict(specializations=100, pretrain_gpu_hours=400, specialize_gpu_hours=0.1,
                                          **SMALL_GPU),
                                     dict(specializations=100, pretrain_gpu_hours=1, specialize_gpu_hours=0.01,
                                          **SMALL_GPU),
                                     dict(specialist_tokens=5_000_000_000, specialize_gpu_hours=100)])
def test_phases_paste_into_a_project(tiny_project, budgets):
    """The snippet is TOML that load_project accepts as [[train.phases]] (names, one length, patience)."""
    plan = recommend(scenario(**budgets))
    phases = tomllib.loads(plan.phases)["train"]["phases"]
    assert phases[-1]["data"] == "" and phases[-1]["tokens"] == plan.finetune_tokens
    text = tiny_project.read_text()
    tiny_project.write_text(text + "\n" + plan.phases)
    project = load_project(tiny_project)
    assert [p.name for p in project.train.phases] == [p["name"] for p in phases]


# --- Bad arguments: one line each ------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(specialist_tokens=0), "--specialist-tokens 0"),
    (dict(specializations=0), "--specializations 0"),
    (dict(pretrain_gpu_hours=-1.0), "--pretrain-gpu-hours -1"),
    (dict(specialize_gpu_hours=float("nan")), "--specialize-gpu-hours nan"),
    (dict(inference_tokens_per_s=0.0), "--inference-tokens-per-s 0"),
    (dict(hardware="tpu"), "--hardware tpu: use one of cpu, gpu"),
    (dict(pretrain_gpu_hours=0.0, specialize_gpu_hours=0.0), "both 0"),
    (dict(inference_tokens_per_s=1e9), "even the smallest preset"),
])
def test_bad_scenarios_are_one_line_user_errors(kw, match):
    base = dict(pretrain_gpu_hours=1.0)
    with pytest.raises(UserError, match=re.escape(match)) as e:
        recommend(scenario(**{**base, **kw}))
    assert "\n" not in str(e.value)


def test_parse_number():
    assert parse_number("x", "1M", integer=True) == 1_000_000
    assert parse_number("x", "1_000_000", integer=True) == 1_000_000
    assert parse_number("x", "1e6", integer=True) == 1_000_000
    assert parse_number("x", "2.5k") == 2500.0
    for text, match in (("lots", "give a number"), ("1.5", "whole number"), (None, "give --x"), ("-3", "number")):
        with pytest.raises(UserError, match=match) as e:
            parse_number("x", text, integer=True)
        assert "\n" not in str(e.value)


# --- The command --------------------------------------------------------------------------------------------

ARGS = ["plan", "--specialist-tokens", "1M", "--specializations", "100", "--pretrain-gpu-hours", "400",
        "--specialize-gpu-hours", "0.1", "--inference-tokens-per-s", "300k", "--hardware", "gpu"]


def test_cli_prints_the_method_and_its_reasons(capsys):
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    assert out.startswith("method    slm-pn")
    why = out.split("\nwhy\n")[1].split("\n\n")[0].splitlines()
    assert len(why) >= 3 and all(line.startswith("  - ") and "[" in line for line in why)
    assert "Grangier et al., arXiv 2402.01093" in out and "[[train.phases]]" in out


def test_cli_json(capsys):
    assert main(ARGS + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "slm-pn" and d["preset"] == "d12"
    assert all(r["source"] == FINDINGS[r["finding"]][1] for r in d["reasons"])


def test_cli_uses_the_projects_model_settings(tiny_project, capsys):
    """A project's arch and vocabulary change the count: a gpt2 model with a larger vocabulary is bigger."""
    assert main(ARGS + ["--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["plan", str(tiny_project), "--set", "model.arch=gpt2", "--set", "tokenizer.vocab_size=4096",
                 *ARGS[1:], "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert mine["scenario"]["arch"] == "gpt2" and mine["scenario"]["vocab_size"] == 4096
    assert mine["params"] != default["params"]


@pytest.mark.parametrize("args,match", [
    (["--specialist-tokens", "many"], "--specialist-tokens 'many': give a number"),
    (["--specialist-tokens", "1M", "--pretrain-gpu-hours", "1"], "give --inference-tokens-per-s"),
    (["--specialist-tokens", "1M", "--inference-tokens-per-s", "10"], "both 0"),
])
def test_cli_bad_arguments_one_line_exit_2(capsys, args, match):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nichelm: error: ") and match in err


def test_format_names_every_finding_it_uses():
    plan = recommend(scenario(specializations=100, pretrain_gpu_hours=400, specialize_gpu_hours=0.1, **SMALL_GPU))
    text = format_plan(plan)
    for r in plan.reasons:
        assert FINDINGS[r.finding][1] in text
