"""`nichelm plan`: which small specialized model to train, and how, for given budgets.

Grangier, Katharopoulos, Ablin and Hannun, "Need a Small Specialized Language Model? Plan Early!"
(arXiv 2402.01093; v1 was titled "Specialized Language Models with Cheap Inference from Limited Domain Data")
answers that question from four variables: the specialist (in-domain) data size, the pre-training budget
(spent before a target is known), the specialization budget (spent once it is), and the inference budget.
`recommend` encodes its findings as a short decision list, each step citing the finding it rests on.

Sources, and what could be read of them. The paper's Figure 1 (its decision chart) could not be read
from here: the stored copies of the arXiv pages give their abstracts and first pages only. The rules below
therefore follow what could be read, listed in FINDINGS with where each comes from:
  - the v2 abstract (arxiv.org/html/2402.01093v2): two scenarios, (i) one can afford pre-training a model
    for each specialization -> importance sampling (resample the pre-training set to imitate the specialist
    data, train a small model on it: SLM-is); (ii) one pre-trained model adapted cheaply to each task ->
    projected networks (SLM-pn), a large network linearly projected into a small one;
  - the v1 abstract (huggingface.co/papers/2402.01093): "hyper-networks and mixture of experts have better
    perplexity for large pretraining budgets, while small models trained on importance sampled datasets are
    attractive for large specialization budgets";
  - the paper's Table 8 as issue 14 quotes it (nine Pile domains, 400 GPU-hours, 1M specialist tokens):
    SLM 18.22, SLM-mix 17.56, SLM-pn 17.17, LLM 15.03 perplexity; SLM-nopt (specialist data only) 227.
Where the paper gives no threshold ("large" budget, "small" data), nichelm uses two outside rules of thumb,
marked as such: ~20 training tokens per parameter is compute-optimal (Hoffmann et al. 2022, "Chinchilla"),
and up to ~4 epochs of repeated data are worth nearly as much as fresh data (Muennighoff et al. 2023); and
two thresholds of its own (IS_SHARE, MAX_TOKENS_PER_PARAM), which the reasons name as nichelm's.
The pre-training budget is taken as spendable either once, shared, or split across the specializations
when their data is at hand before pre-training ("Plan early!"): the number of specializations decides which.

Budgets become tokens through one FLOPs-per-token estimate (model.GPT.flops_per_token: 6N + attention for
training, a third of it for a forward pass) and the throughputs INFERENCE_FLOPS and TRAIN_FLOPS. The model
is built on torch's meta device to count it: no memory, no weights.

With `--pilot` (nichelm.pilot), a few minutes of CPU measure on the project's own generic corpus and target
what the choice hinges on, and `with_pilot` adds them to the reasons (finding "pilot"): whether a selection
beats random generic text for a tiny model (bits per byte on held-out target text; under PILOT_MIN_GAP of the
random arm's, SLM-is gets the runner-up SLM for a reason), and how concentrated the target is among the
selection's clusters (a top share of MIX_TOP_SHARE or more: one expert, SLM-mix, is SLM-pn's runner-up).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field

from nichelm.errors import UserError

# Finding id -> (what it says, where it comes from). Every reason in a plan cites one of these.
FINDINGS = {
    "scope": ("small models are good only when their scope is limited to a domain, and the inference budget "
              "bounds the model size", "Grangier et al., arXiv 2402.01093v2, abstract"),
    "is": ("with a budget to pre-train a model for each specialization, resampling the generic corpus to "
           "imitate the specialist data and training a small model on it (SLM-is) is the effective solution",
           "Grangier et al., arXiv 2402.01093v2, abstract; v1 abstract: 'small models trained on importance "
           "sampled datasets are attractive for large specialization budgets'"),
    "shared": ("with one pre-training shared by many specializations, each adapted cheaply, mixtures of experts "
               "and hyper-networks (projected networks) beat a plain small model for large pre-training budgets",
               "Grangier et al., arXiv 2402.01093v1 abstract; v2 abstract (projected networks)"),
    "table8": ("at 400 GPU-hours and 1M specialist tokens, perplexity SLM 18.22, SLM-mix 17.56, SLM-pn 17.17, "
               "LLM 15.03", "Grangier et al., arXiv 2402.01093v2, Table 8 (as quoted in issue 14)"),
    "nopt": ("trained on 1M specialist tokens alone, a small model reaches perplexity 227 against 18.22 when "
             "pre-trained first: pre-training is what makes scarce specialist data usable",
             "Grangier et al., arXiv 2402.01093v2, Table 8 (as quoted in issue 14)"),
    "chinchilla": ("about 20 training tokens per parameter is compute-optimal: a model the budget cannot feed "
                   "that many tokens is too big for it (a rule of thumb nichelm adds; not from the paper)",
                   "Hoffmann et al. 2022, arXiv 2203.15556"),
    "cap": ("a plan spends at most 2,000 pre-training tokens per parameter, about what Llama 3 8B was trained on "
            "(15T tokens); past it the budget is left unspent (a cap nichelm sets; not from the paper)",
            "nichelm; Meta, Llama 3 model card"),
    "pilot": ("pilot runs on this project's own generic corpus and target: a tiny model pre-trained on a "
              "clusters selection and on random generic text, scored on held-out target text",
              "measured here on your data by --pilot"),
    "epochs": ("up to about 4 epochs of repeated data are worth nearly as much as fresh data (a rule of thumb "
               "nichelm adds; not from the paper)", "Muennighoff et al. 2023, arXiv 2305.16264"),
}

# FLOP/s one inference device sustains. cpu: the quickstart's nano model (0.77M parameters, 1.94 MFLOP a
# forward token by flops_per_token / 3) decodes 5,775 tokens/s on the 2-core machine of BENCHMARKS.md -> 1.1e10.
# gpu: an H100; decoding is memory-bound, so only 10% of peak is counted (an assumption, not a measurement).
INFERENCE_FLOPS = {"cpu": 1.1e10, "gpu": 0.10 * 989e12}
TRAIN_FLOPS = 0.40 * 989e12  # budgets are GPU-hours: an H100 at 40% MFU (assumed; llm.c-like GPT-2 runs reach it)
TOKENS_PER_PARAM = 20       # "chinchilla"
MAX_EPOCHS = 4              # "epochs": the most a specialist set is repeated
FINETUNE_SHARE = 0.1        # SLM-is: at most this share of its budget fine-tunes; the rest pre-trains
# Thresholds the paper does not give, chosen by nichelm (and named in the plan's reasons):
IS_SHARE = 0.5              # SLM-is when one specialization's own pre-training gets at least half the tokens a
                            # shared one would (importance-sampled tokens are worth more than generic ones)
MAX_TOKENS_PER_PARAM = 2000 # pre-training spends at most this (Llama 3 8B: 15T tokens, ~1,900 per parameter);
                            # past it a budget is left unspent rather than spent on ever smaller returns
MAX_CLUSTERS = 64
PILOT_MIN_GAP = 0.02        # a selection pays when it beats random generic text by at least 2% of the random
                            # arm's bits/byte in the pilot (a tiny model, a few steps: less is within its noise)
MIX_TOP_SHARE = 0.5         # one expert (SLM-mix) covers a target when its largest cluster holds half of it


@dataclass
class Scenario:
    """The budgets of one planning question (units in the field comments)."""
    specialist_tokens: int               # tokens of specialist (in-domain) training text
    specializations: int                 # how many specialized models are needed (targets)
    pretrain_gpu_hours: float            # pre-training, in all: spent once and shared by every specialization,
                                         # or split across them when their data is at hand first (SLM-is)
    specialize_gpu_hours: float          # each specialization, once its data is at hand
    inference_tokens_per_s: float        # tokens/s one inference device must generate
    hardware: str = "cpu"                # the inference device: cpu | gpu
    arch: str = "llama"                  # the model family and shape settings (a project's, when one is given)
    vocab_size: int = 512
    block_size: int = 256


@dataclass
class Reason:
    text: str
    finding: str                         # a key of FINDINGS

    def cite(self) -> str:
        return f"{self.text} [{FINDINGS[self.finding][1]}]"


@dataclass
class Plan:
    method: str                          # slm-nopt | slm | slm-is | slm-mix | slm-pn
    preset: str                          # a key of config.PRESETS
    params: int                          # the model's parameters (model.GPT.num_params)
    inference_tokens_per_s: float        # what that model is estimated to decode on the inference hardware
    pretrain_tokens: int                 # slm/-mix/-pn: the shared pre-training; slm-is: each specialization's
    finetune_tokens: int                 # each specialization's fine-tuning (slm-nopt: its whole training)
    selection_tokens: int                # slm-is: the selection's size in model tokens (one pass, no repeats)
    clusters: int                        # slm-mix / slm-pn: generic clusters, one expert each; else 0
    phases: str                          # the [[train.phases]] (and related keys) to paste into a project file
    reasons: list[Reason] = field(default_factory=list)
    alternative: str = ""                # the runner-up method, when the findings name one
    gpu_hours: float = 0.0               # what the plan spends in all (pre-training + K x specialization)
    scenario: Scenario | None = None
    pilot: dict | None = None            # nichelm.pilot's figures, when the plan was made with --pilot

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reasons"] = [{"text": r.text, "finding": r.finding, "source": FINDINGS[r.finding][1]}
                        for r in self.reasons]
        return d


def model_size(preset: str, s: Scenario) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of a preset, counted by model.py itself on the meta device."""
    import torch
    from nichelm.config import PRESETS
    from nichelm.model import GPT, ModelConfig
    with torch.device("meta"):
        model = GPT(ModelConfig(arch=s.arch, vocab_size=s.vocab_size, block_size=s.block_size,
                                **PRESETS[preset]))
    return model.num_params(), model.flops_per_token(s.block_size)


@functools.lru_cache(maxsize=16)
def _presets(arch: str, vocab_size: int, block_size: int) -> tuple[tuple[str, int, float], ...]:
    """Distinct preset shapes, smallest first: (name, parameters, training FLOPs per token)."""
    from nichelm.config import PRESETS
    s = Scenario(0, 0, 0, 0, 0, arch=arch, vocab_size=vocab_size, block_size=block_size)
    seen, out = set(), []
    for name, shape in PRESETS.items():
        key = tuple(sorted(shape.items()))
        if key not in seen:                                  # "mini" and "d6" are one shape
            seen.add(key)
            out.append((name, *model_size(name, s)))
    return tuple(sorted(out, key=lambda t: t[1]))


def _tokens(gpu_hours: float, flops_per_token: float) -> int:
    return int(gpu_hours * 3600 * TRAIN_FLOPS / flops_per_token)


def check(s: Scenario) -> None:
    """One-line UserErrors for budgets that mean nothing."""
    def bad(flag, value, want):
        raise UserError(f"--{flag} {value}: {want}")
    for flag, value in (("pretrain-gpu-hours", s.pretrain_gpu_hours),
                        ("specialize-gpu-hours", s.specialize_gpu_hours),
                        ("inference-tokens-per-s", s.inference_tokens_per_s)):
        if not math.isfinite(value) or value < 0:
            bad(flag, value, "give a finite number, 0 or more")
    if s.specialist_tokens < 1:
        bad("specialist-tokens", s.specialist_tokens, "give the tokens of specialist training text, 1 or more")
    if s.specializations < 1:
        bad("specializations", s.specializations, "give how many specialized models you need, 1 or more")
    if s.inference_tokens_per_s <= 0:
        bad("inference-tokens-per-s", s.inference_tokens_per_s, "give the tokens/s inference must reach, above 0")
    if s.pretrain_gpu_hours == 0 and s.specialize_gpu_hours == 0:
        raise UserError("--pretrain-gpu-hours and --specialize-gpu-hours are both 0: give a training budget "
                        "in GPU-hours to at least one of them")
    if s.hardware not in INFERENCE_FLOPS:
        bad("hardware", s.hardware, f"use one of {', '.join(INFERENCE_FLOPS)}")


def recommend(s: Scenario) -> Plan:
    """The method, model and recipe the findings point to for these budgets, with the reasons."""
    check(s)
    K, N = s.specializations, s.specialist_tokens
    presets = _presets(s.arch, s.vocab_size, s.block_size)
    # a forward pass costs a third of a training step's 6N + attention
    speed = {name: INFERENCE_FLOPS[s.hardware] / (fpt / 3) for name, _, fpt in presets}
    reasons: list[Reason] = []

    # 1. The inference budget bounds the model: the largest preset fast enough.
    fits = [p for p in presets if speed[p[0]] >= s.inference_tokens_per_s]
    if not fits:
        name = presets[0][0]
        raise UserError(f"--inference-tokens-per-s {s.inference_tokens_per_s:g}: even the smallest preset ({name}) "
                        f"decodes only ~{speed[name]:,.0f} tokens/s on --hardware {s.hardware}; ask for fewer "
                        "tokens/s or use faster hardware")
    inference_cap = fits[-1]

    # 2. The training budget bounds it too: no bigger than the budget can feed ~20 tokens per parameter. The
    # most one specialization's model can be trained on is the shared pre-training, or its share of it plus
    # its own budget when pre-trained for it alone (SLM-is).
    per_spec_hours = s.pretrain_gpu_hours / K + s.specialize_gpu_hours
    most_hours = max(s.pretrain_gpu_hours, per_spec_hours)
    feedable = [p for p in fits if _tokens(most_hours, p[2]) >= TOKENS_PER_PARAM * p[1]]
    preset, params, fpt = feedable[-1] if feedable else fits[0]
    inference_bound = preset == inference_cap[0]
    if not feedable:
        reasons.append(Reason(f"The training budget ({most_hours:,.3g} GPU-hours at most for one model) feeds "
                              f"even {preset}, the smallest preset, fewer than {TOKENS_PER_PARAM} tokens per "
                              "parameter: expect an undertrained model, or raise the budget.", "chinchilla"))
    elif inference_bound:
        reasons.append(Reason(f"The inference budget ({s.inference_tokens_per_s:,.0f} tokens/s on {s.hardware}) "
                              f"allows at most {preset} ({params / 1e6:,.1f}M parameters, ~{speed[preset]:,.0f} "
                              "tokens/s): a small model, so it must be specialized.", "scope"))
    else:
        reasons.append(Reason(f"The inference budget would allow {inference_cap[0]}, but the training budget "
                              f"({most_hours:,.3g} GPU-hours at most for one model) feeds at most {preset} "
                              f"({params / 1e6:,.1f}M parameters) {TOKENS_PER_PARAM} tokens per parameter.",
                              "chinchilla"))
        reasons.append(Reason("Where inference allows a larger model, the larger one wins (LLM 15.03 against "
                              "17.17-18.22 for the small ones): take the largest the budgets allow.", "table8"))

    optimal = TOKENS_PER_PARAM * params                      # tokens that train this model compute-optimally
    useful = MAX_TOKENS_PER_PARAM * params                   # the most pre-training tokens a plan spends
    shared_tokens, per_spec_tokens = _tokens(s.pretrain_gpu_hours, fpt), _tokens(per_spec_hours, fpt)
    spec_tokens = _tokens(s.specialize_gpu_hours, fpt)

    def plan(method, pretrain, finetune, phases, selection=0, clusters=0, alternative="", cap=0):
        if cap and pretrain >= cap:
            reasons.append(Reason(f"Pre-training stops at {pretrain:,} tokens ({MAX_TOKENS_PER_PARAM:,} per "
                                  "parameter" + (" of each expert" if clusters else "") + "); the rest of the "
                                  "budget is not needed.", "cap"))
        per_spec = pretrain if method == "slm-is" else 0      # SLM-is pre-trains once per specialization
        shared = 0 if method == "slm-is" else pretrain
        hours = (shared + K * (per_spec + finetune)) * fpt / TRAIN_FLOPS / 3600
        return Plan(method=method, preset=preset, params=params, inference_tokens_per_s=speed[preset],
                    pretrain_tokens=pretrain, finetune_tokens=finetune, selection_tokens=selection,
                    clusters=clusters, phases=phases, reasons=reasons, alternative=alternative,
                    gpu_hours=hours, scenario=s)

    # 3. Enough specialist data to train the model on it alone (<= 4 epochs): no pre-training needed.
    if N * MAX_EPOCHS >= optimal and spec_tokens >= optimal:
        tokens = min(spec_tokens, N * MAX_EPOCHS)
        reasons.append(Reason(f"{N:,} specialist tokens, repeated at most {MAX_EPOCHS} times, give {preset} the "
                              f"{optimal:,} tokens it needs, and each specialization's budget pays for them.",
                              "epochs"))
        reasons.append(Reason("Pre-training matters when specialist data is scarce (227 perplexity on 1M tokens "
                              "alone); with this much, training on it alone is enough.", "nopt"))
        return plan("slm-nopt", 0, tokens, _phases_nopt(tokens))
    reasons.append(Reason(f"{N:,} specialist tokens cannot train {preset} alone ({optimal:,} needed, at most "
                          f"{MAX_EPOCHS} epochs): pre-train on generic data first.", "nopt"))

    # 4. A pre-training per specialization about as large as a shared one would be: importance sampling.
    if per_spec_tokens >= IS_SHARE * min(shared_tokens, useful):
        finetune = min(N * MAX_EPOCHS, int(per_spec_tokens * FINETUNE_SHARE))
        pretrain = min(per_spec_tokens - finetune, useful)
        who = "The specialization" if K == 1 else f"Each of the {K} specializations"
        reasons.append(Reason(f"{who} can have its own pre-training "
                              f"({per_spec_hours:,.3g} GPU-hours: its share of the pre-training budget plus its "
                              f"own, {per_spec_tokens:,} tokens, at least {IS_SHARE:g} of what a shared one would "
                              "use: nichelm's threshold): resample the generic corpus to look like the "
                              "specialist data and pre-train on that (SLM-is).", "is"))
        return plan("slm-is", pretrain, finetune, _phases_is(pretrain, finetune), selection=pretrain,
                    alternative="slm", cap=useful)

    finetune = min(N * MAX_EPOCHS, spec_tokens)
    reasons.append(Reason(f"{K} specializations share the pre-training: {per_spec_hours:,.3g} GPU-hours each "
                          f"would pre-train {preset} on {per_spec_tokens:,} tokens, against {shared_tokens:,} "
                          "for one shared pre-training: pre-train once and specialize cheaply.", "shared"))
    if finetune == 0:
        reasons.append(Reason("No specialization budget: the pre-trained model is used as it is.", "shared"))

    # 5. Shared pre-training larger than the small model can absorb: spend it on mixture capacity.
    if inference_bound and shared_tokens >= 2 * optimal:
        clusters = max(2, min(MAX_CLUSTERS, shared_tokens // optimal))
        pretrain = min(shared_tokens, useful * clusters)
        reasons.append(Reason(f"The shared budget ({shared_tokens:,} tokens) is {shared_tokens // optimal:,}x "
                              f"what trains {preset} compute-optimally, and inference allows no bigger model: "
                              f"spend it on {clusters} cluster experts, of which each specialization keeps one "
                              "small model.", "shared"))
        reasons.append(Reason("Of the methods that pre-train once, projected networks did best (SLM-pn 17.17, "
                              "SLM-mix 17.56, SLM 18.22).", "table8"))
        return plan("slm-pn", pretrain, finetune, _phases_pn(pretrain, finetune, clusters), clusters=clusters,
                    alternative="slm-mix", cap=useful * clusters)

    # 6. Otherwise: one model pre-trained on generic data, fine-tuned per specialization.
    pretrain = min(shared_tokens, useful)
    if inference_bound:
        why = (f"The shared budget ({shared_tokens:,} tokens) is under 2x what trains {preset} compute-optimally "
               f"({2 * optimal:,}); mixtures pay for large pre-training budgets only")
    else:
        why = ("The training budget, not inference, limits the model: no compute is left for mixture experts "
               "(the paper's LLM is this recipe at a larger size)")
    reasons.append(Reason(f"{why}: pre-train one model on generic text and fine-tune it.", "shared"))
    return plan("slm", pretrain, finetune, _phases_slm(pretrain, finetune), cap=useful)


def with_pilot(plan: Plan, pilot: dict) -> Plan:
    """The plan with the pilot's measurements (nichelm.pilot.run_pilot) among its reasons: the method stays
    the findings' choice; the runner-up follows what the pilot measured on this project's data."""
    sel, rnd = pilot["arms"]["selected"], pilot["arms"]["random"]
    gap, rel, c = pilot["gap_bits_per_byte"], pilot["relative_gap"], pilot["clusters"]
    s = pilot["settings"]
    pays = rel >= PILOT_MIN_GAP
    reasons = [Reason(f"pilot: pre-training a {s['preset']} model for {s['steps']} steps on a clusters selection of "
                      f"your generic corpus ({sel['tokens']:,} words) reached {sel['bits_per_byte']:.4f} bits/byte "
                      f"on held-out target text vs {rnd['bits_per_byte']:.4f} for random generic text of the same "
                      f"size (gap {gap:+.4f}, {rel:+.1%} of random's).", "pilot"),
               Reason(f"pilot: the target's largest cluster (of {c['k']}) holds {c['top_share']:.0%} of it; effective "
                      f"number of clusters {c['effective_clusters']:.1f}; KL(target || generic) over clusters "
                      f"{c['kl_target_generic']:.2f} nats.", "pilot")]
    threshold = f"nichelm's threshold is {PILOT_MIN_GAP:.0%} of the random arm's bits/byte"
    alternative = plan.alternative
    if plan.method == "slm-is" and not pays:
        alternative = "slm"
        reasons.append(Reason(f"pilot: the selection beat random text by less than {PILOT_MIN_GAP:.0%} "
                              f"({threshold}): on this target it may not pay for a pre-training per "
                              "specialization; the runner-up, one generic pre-training fine-tuned (slm), costs "
                              "less for nearly as much.", "pilot"))
    elif plan.method == "slm-is":
        reasons.append(Reason(f"pilot: the selection beat random text by {rel:.1%} ({threshold}): importance "
                              "sampling pays for this target, as SLM-is assumes.", "pilot"))
    elif plan.method == "slm" and pays:
        alternative = "slm-is"
        reasons.append(Reason(f"pilot: the selection beat random text by {rel:.1%} ({threshold}): with a "
                              "pre-training budget per specialization, importance sampling (slm-is) would pay "
                              "here.", "pilot"))
    elif plan.method == "slm-pn":           # (recommend names slm-mix only as SLM-pn's runner-up)
        if c["top_share"] >= MIX_TOP_SHARE:
            alternative = "slm-mix"
            why = (f"one cluster holds {c['top_share']:.0%} of the target (at least {MIX_TOP_SHARE:.0%}, nichelm's "
                   "threshold): its one expert (SLM-mix, `specialize --pick-expert`) covers most of it at a small "
                   "model's cost")
        else:
            alternative = "slm"
            why = (f"no cluster holds {MIX_TOP_SHARE:.0%} of the target (nichelm's threshold; the largest "
                   f"{c['top_share']:.0%}): one expert (SLM-mix) would miss most of it, so a mixture "
                   "(`specialize --target`) fits, and the runner-up is one generic model (slm)")
        reasons.append(Reason(f"pilot: {why}.", "pilot"))
    return dataclasses.replace(plan, reasons=plan.reasons + reasons, alternative=alternative, pilot=pilot)


# The snippets: paths are placeholders (../NAME/runs/NAME) for the user's own projects.
FINETUNE_PHASE = """[[train.phases]]
name = "specialize"            # your specialist data (this project's own sources)
data = ""
tokens = {tokens}             # at most {epochs} epochs; patience stops it early on the val loss
patience = 3                   # needs train.eval_every > 0
"""


def _finetune(tokens: int) -> str:
    return FINETUNE_PHASE.format(tokens=tokens, epochs=MAX_EPOCHS) if tokens else ""


def _phases_nopt(tokens: int) -> str:
    return FINETUNE_PHASE.replace('"specialize"', '"specialist"').format(tokens=tokens, epochs=MAX_EPOCHS)


def _phases_is(pretrain: int, finetune: int) -> str:
    words = int(pretrain * 0.75)
    return f"""# 1. a selection project: your generic sources (role = "generic") and specialist text
#    (role = "target"), with
#      [select]
#      method = "clusters"
#      tokens = {words}        # select.tokens counts words, ~0.75 per model token
#    then `nichelm select` and `nichelm prepare` it (its run: ../selection/runs/selection).
# 2. this project: tokenizer.from = "../selection/runs/selection", and
[[train.phases]]
name = "pretrain"              # the importance-sampled generic text (SLM-is)
data = "../selection/runs/selection"
tokens = {pretrain}
""" + _finetune(finetune)


def _phases_slm(pretrain: int, finetune: int) -> str:
    return f"""# 1. once: a generic project (random generic text) trained on
[[train.phases]]
name = "pretrain"
data = ""
tokens = {pretrain}
# 2. each specialization: tokenizer.from and, in [train], init_from = "../generic/runs/generic", then
""" + _finetune(finetune)


def _phases_pn(pretrain: int, finetune: int, clusters: int) -> str:
    return f"""# 1. once: cluster the generic corpus into one file per cluster (select.method = "clusters",
#    select.k = {clusters}, select.partition = true: RUN/select/clusters/cluster-NNNN.jsonl), prepare each,
#    and train a projected network ([model.projected] clusters = {clusters}) for {pretrain} tokens with one
#    phase whose data lists the {clusters} prepared folders, cluster 0 first (each row runs its cluster's
#    expert). SLM-mix instead: one small model per cluster file, {pretrain // clusters} tokens each
#    (examples/slm_mix).
# 2. each specialization: `nichelm specialize PROJECT --target` makes its target's mix of experts a plain
#    model (SLM-mix: `--pick-expert EXPERTS`, the expert of its most frequent cluster); set init_from =
#    that run in [train], then
""" + _finetune(finetune)


_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_number(flag: str, text: str | None, integer: bool = False) -> float | int:
    """A command-line number: 1000000, 1e6, 1_000_000, 1M, 2.5k. A one-line UserError when it is none."""
    if text is None:
        raise UserError(f"give --{flag}")
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise UserError(f"--{flag} {text!r}: give a number, e.g. 1000000, 1e6 or 1M")
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(value):
        raise UserError(f"--{flag} {text!r}: give a finite number")
    if integer:
        if value != int(value):
            raise UserError(f"--{flag} {text!r}: give a whole number")
        return int(value)
    return value


def format_plan(plan: Plan) -> str:
    """The plan as a person reads it: method, model, tokens, reasons with their sources, the snippet."""
    s = plan.scenario
    lines = [f"method    {plan.method}" + (f"   (runner-up: {plan.alternative})" if plan.alternative else ""),
             f"model     preset {plan.preset} ({s.arch}, {plan.params / 1e6:,.1f}M parameters): "
             f"~{plan.inference_tokens_per_s:,.0f} tokens/s on one {s.hardware} (needed: "
             f"{s.inference_tokens_per_s:,.0f})"]
    if plan.method == "slm-is":
        lines.append(f"pretrain  {plan.pretrain_tokens:,} tokens for each specialization, on a selection of the "
                     f"generic corpus of {plan.selection_tokens:,} tokens (one pass)")
    elif plan.pretrain_tokens:
        lines.append(f"pretrain  {plan.pretrain_tokens:,} tokens, once, shared by the {s.specializations} "
                     "specialization(s)" + (f"; {plan.clusters} clusters" if plan.clusters else ""))
    label = "train    " if plan.method == "slm-nopt" else "finetune "
    lines.append(f"{label} {plan.finetune_tokens:,} tokens of specialist data per specialization")
    given = s.pretrain_gpu_hours + s.specializations * s.specialize_gpu_hours
    lines.append(f"cost      ~{plan.gpu_hours:,.3g} GPU-hours in all, of {given:,.4g} given "
                 f"({s.pretrain_gpu_hours:,.4g} pre-training + {s.specializations} x "
                 f"{s.specialize_gpu_hours:,.4g} specializing)")
    lines.append("\nwhy")
    lines += [f"  - {r.cite()}" for r in plan.reasons]
    lines.append("\nphases (paste into the project file; ../NAME paths are placeholders)")
    lines += ["  " + line if line else "" for line in plan.phases.rstrip("\n").split("\n")]
    if plan.pilot is None:
        lines.append("\nNo pilot runs: this plan follows the paper's findings, not measurements on your data "
                     "(--pilot measures them).")
    else:
        lines.append(f"\npilot     {plan.pilot['folder']} (pilot.json: the figures; selected.toml, random.toml: "
                     "its two runs)")
    return "\n".join(lines)
