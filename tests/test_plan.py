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


# --- --pilot: measured on the project's own generic corpus and target ------------------------------------------

def _pilot_project(tmp_path, target_docs=30, generic=True, target=True):
    """A generic pool of three synthetic domains (law, med, code) and a target that is clearly one of them (med)."""
    import gzip
    import random
    from tests.test_select import make_doc, make_pool
    with gzip.open(tmp_path / "generic.jsonl.gz", "wt") as f:
        for r in make_pool({"law": 60, "med": 30, "code": 60}):
            f.write(json.dumps({"id": r.id, "text": r.text, "domain": r.domain}) + "\n")
    rng = random.Random(5)
    (tmp_path / "target.jsonl").write_text("".join(json.dumps({"text": make_doc("med", rng)}) + "\n"
                                                   for _ in range(target_docs)))
    pool = ('[[sources]]\nname = "web"\npath = "generic.jsonl.gz"\nformat = "jsonl"\nrole = "generic"\n'
            'id_field = "id"\nlicence = "mixed"\n')
    mine = '[[sources]]\nname = "mine"\npath = "target.jsonl"\nformat = "jsonl"\nrole = "target"\n'
    proj = tmp_path / "project.toml"
    proj.write_text(f"""run_dir = "{tmp_path / 'run'}"
{pool if generic else ''}
{mine if target else ''}
[split]
val_fraction = 0.1
test_fraction = 0.1
[select]
min_tokens = 0
k = 3
tokens = 3000
""")
    return proj


PILOT = ["--pilot", "--pilot-tokens", "4000", "--pilot-steps", "3"]


def test_pilot_measures_both_arms_and_the_plan_cites_them(tmp_path, capsys):
    """The target is all one domain: the selection beats random generic text on held-out target text, one cluster
    holds it (so SLM-pn's runner-up is the one expert of SLM-mix), the reasons cite "pilot"; a second run reuses
    RUN/plan-pilot, --force runs it again."""
    proj = _pilot_project(tmp_path)
    assert main(["plan", str(proj), *PILOT, *ARGS[1:], "--json"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)                                              # progress went to stderr, not into the JSON
    assert "plan --pilot: selected:" in err and "plan --pilot: random:" in err
    pilot = d["pilot"]
    sel, rnd = pilot["arms"]["selected"], pilot["arms"]["random"]
    assert sel["heldout_tokens"] > 0 and rnd["heldout_tokens"] > 0 and pilot["target"]["heldout_documents"] >= 1
    assert abs(rnd["tokens"] / sel["tokens"] - 1) < 0.2 and min(sel["tokens"], rnd["tokens"]) >= 4000
    assert 0 < sel["bits_per_byte"] < rnd["bits_per_byte"]          # the med selection fits med text better
    assert pilot["gap_bits_per_byte"] == pytest.approx(rnd["bits_per_byte"] - sel["bits_per_byte"])
    c = pilot["clusters"]
    assert c["k"] == 3 and c["top_share"] > 0.9 and c["effective_clusters"] < 1.5 and c["kl_target_generic"] > 0.5
    assert (d["method"], d["alternative"]) == ("slm-pn", "slm-mix")
    cited = [r["text"] for r in d["reasons"] if r["finding"] == "pilot"]
    assert len(cited) == 3 and f"{sel['bits_per_byte']:.4f} bits/byte" in cited[0]
    assert all(r["source"] == "measured here on your data by --pilot" for r in d["reasons"] if r["finding"] == "pilot")
    folder = tmp_path / "run" / "plan-pilot"
    assert pilot["folder"] == str(folder) and json.loads((folder / "pilot.json").read_text())["arms"] == pilot["arms"]
    written = (folder / "pilot.json").stat().st_mtime_ns
    assert main(["plan", str(proj), *PILOT, *ARGS[1:]]) == 0                # up to date: reused, in the text form
    out, err = capsys.readouterr()
    assert "reused" in err and (folder / "pilot.json").stat().st_mtime_ns == written
    assert "[measured here on your data by --pilot]" in out and "No pilot runs" not in out
    assert main(["plan", str(proj), *PILOT, *ARGS[1:], "--force"]) == 0
    assert "reused" not in capsys.readouterr().err and (folder / "pilot.json").stat().st_mtime_ns != written


def _pilot(rel_gap, top_share):
    rnd = 2.0
    return {"settings": {"preset": "nano", "steps": 60}, "folder": "RUN/plan-pilot",
            "arms": {"selected": {"bits_per_byte": rnd * (1 - rel_gap), "tokens": 100_000},
                     "random": {"bits_per_byte": rnd, "tokens": 100_100}},
            "gap_bits_per_byte": rnd * rel_gap, "relative_gap": rel_gap,
            "clusters": {"k": 8, "top_cluster": 3, "top_share": top_share, "effective_clusters": 2.0,
                         "kl_target_generic": 1.0}}


@pytest.mark.parametrize("budgets,rel_gap,top_share,alternative,says", [
    (dict(pretrain_gpu_hours=400, **SMALL_GPU), 0.01, 0.9, "slm", "by less than 2%"),          # SLM-is, no gain
    (dict(pretrain_gpu_hours=400, **SMALL_GPU), 0.10, 0.9, "slm", "pays for this target"),     # SLM-is, it pays
    (dict(specializations=100, pretrain_gpu_hours=400, specialize_gpu_hours=0.1, **SMALL_GPU), 0.1, 0.8,
     "slm-mix", "one cluster holds 80%"),                                                        # concentrated
    (dict(specializations=100, pretrain_gpu_hours=400, specialize_gpu_hours=0.1, **SMALL_GPU), 0.1, 0.3,
     "slm", "no cluster holds 50%"),                                                             # spread
    (dict(specializations=100, pretrain_gpu_hours=1, specialize_gpu_hours=0.01, **SMALL_GPU), 0.1, 0.9,
     "slm-is", "importance sampling (slm-is) would pay"),                                        # plain SLM
])
def test_pilot_figures_decide_the_runner_up_not_the_method(budgets, rel_gap, top_share, alternative, says):
    from nichelm.plan import with_pilot
    plan = recommend(scenario(**budgets))
    piloted = with_pilot(plan, _pilot(rel_gap, top_share))
    assert piloted.method == plan.method and piloted.alternative == alternative
    assert piloted.reasons[:len(plan.reasons)] == plan.reasons and piloted.pilot["relative_gap"] == rel_gap
    added = piloted.reasons[len(plan.reasons):]
    assert all(r.finding == "pilot" for r in added) and says in added[-1].text
    assert "measured here on your data by --pilot" in format_plan(piloted)


@pytest.mark.parametrize("case,match", [
    ("no project", "plan --pilot: give the project file"),
    ("no generic", 'needs a generic corpus: add a [[sources]] entry with role = "generic"'),
    ("small target", "train-split documents; the pilot holds out 20% of the target to score and selects against "
                     "the rest, so it needs at least 5: add target text"),
    ("no target", 'every source has role = "generic": select needs text to match; add a source with role = '
                  '"target"'),
    ("empty target", "target sources mine: 0 train-split documents;"),
    ("zero steps", "--pilot-steps 0: give 1 or more"),
])
def test_pilot_bad_inputs_are_one_line_errors(tmp_path, capsys, case, match):
    args = [*PILOT, *ARGS[1:]]
    if case == "no project":
        argv = ["plan", *args]
    elif case == "no generic":
        argv = ["plan", str(_pilot_project(tmp_path, generic=False)), *args]
    elif case == "small target":
        argv = ["plan", str(_pilot_project(tmp_path, target_docs=4)), *args]
    elif case == "no target":
        argv = ["plan", str(_pilot_project(tmp_path, target=False)), *args]
    elif case == "empty target":
        argv = ["plan", str(_pilot_project(tmp_path, target_docs=0)), *args]
    else:
        argv = ["plan", str(_pilot_project(tmp_path)), *args, "--pilot-steps", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nichelm: error: ") and match in err, err
    assert not (tmp_path / "run" / "plan-pilot" / "pilot.json").exists()
