"""`nichelm plan --pilot PROJECT`: a few minutes of CPU that measure, on the user's own generic corpus and
target, what the plan's choice hinges on (nichelm.plan.with_pilot turns the figures into reasons).

1. Does importance sampling pay for this target? A seeded share of the target's documents (the train-split
   target `nichelm select PROJECT` matches) is held out; the rest is the target of a `clusters` selection of
   the generic sources (the project's [select] settings, the pilot's size); a seeded random sample of the
   generic documents of as many wordpunct tokens is the other arm. The same tiny model (llama, PilotSettings)
   is pre-trained on each (the language-model task, same steps) and scored in bits per byte on the held-out
   text (nichelm.perplexity): comparable across the arms' own tokenizers.
2. How concentrated is the target among the selection's k-means clusters: the largest cluster's share,
   the effective number of clusters (exp of the histogram's entropy) and KL(target || generic) over
   clusters: what decides between one expert (SLM-mix) and a mixture (SLM-pn).

bench/select_pays.py runs the same pipeline as a benchmark. Everything lands in RUN/plan-pilot/: the target
file, the random sample, one project file per arm (selected.toml, random.toml: runs any nichelm command can
read again) with its run folder, and pilot.json (the figures and a fingerprint of the inputs: reused while
they are unchanged, re-run with force).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from nichelm.config import Project, load_project, source_name
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text

FOLDER = "plan-pilot"        # under the project's run_dir
MIN_TARGET_DOCUMENTS = 5     # the held-out share needs at least one, the selection the rest
VAL_DOCUMENTS = 5            # each arm's val split is sized to hold about this many documents at least


@dataclass
class PilotSettings:
    """The pilot's size: small enough for minutes of CPU (select_pays' recorded run: ~9 s a training)."""
    tokens: int = 100_000          # select.tokens of the selection (wordpunct tokens); the random arm matches it
    steps: int = 60                # training steps of each arm
    batch: int = 16
    block: int = 128               # tokens per row (model.block_size)
    vocab: int = 512
    preset: str = "nano"           # llama
    window_chars: int = 400        # task.window_chars: characters per language-model example
    val_fraction: float = 0.1      # of each arm's documents, for its val loss
    heldout_share: float = 0.2     # of the target's documents, scored only
    max_heldout: int = 40          # held-out documents at most ...
    heldout_chars: int = 4000      # ... and characters scored of each
    max_generic_documents: int = 20_000   # read of each generic source at most (its first ones): minutes, not hours


def run_pilot(project: Project, settings: PilotSettings | None = None, force: bool = False, log=None) -> dict:
    """Run (or reuse) the pilot of a project; returns pilot.json's figures."""
    from nichelm.selection import _fingerprint, select_project
    s = settings or PilotSettings()
    log = log or _log
    if s.tokens < 1 or s.steps < 1:
        raise UserError(f"--pilot-tokens {s.tokens}, --pilot-steps {s.steps}: give 1 or more of each")
    out = project.run_path / FOLDER
    generic = [(i, src) for i, src in enumerate(project.sources) if src.role == "generic"]
    if not generic:
        raise UserError(f"{project.source_file}: --pilot needs a generic corpus: add a [[sources]] entry with "
                        "role = \"generic\" (jsonl, text or parquet) that the pilot can select from")
    fp = _json_sha({"inputs": _fingerprint(project), "settings": asdict(s)})
    done = out / "pilot.json"
    if not force and _read_json(done).get("fingerprint") == fp:
        log(f"reused {done} (same sources and settings; --force runs it again)")
        return {**_read_json(done), "reused": True}

    t0 = time.monotonic()
    # 1. the target in two: held out (scored only) and the rest (what select matches)
    seed = project.seed
    names, to_select, heldout = _split_target(project, s)
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "target.jsonl", [{"id": f"{r.source}/{r.id}", "text": r.text} for r in to_select])
    log(f"target: {len(to_select):,} documents to select against, {len(heldout):,} held out to score")

    # 2. the selection arm: the generic sources + that target, [select] clusters at the pilot's size. Both arms
    # validate on the same share of their documents: enough for ~5 val documents (prepare needs one), estimated
    # from a random sample of the pilot's size (select's split settings are in its fingerprint: set them first)
    estimate = len(_random_sample(project, s.tokens, seed, s))
    val = round(min(0.5, max(s.val_fraction, VAL_DOCUMENTS / max(estimate, 1))), 3)
    chosen = {**project.to_dict()["select"], "method": "clusters", "tokens": s.tokens, "documents": 0,
              "fraction": 0.0, "partition": False}
    sources = [_generic_source(project, i, src, s) for i, src in generic]
    sources.append({"name": "pilot-target", "path": str(out / "target.jsonl"), "format": "jsonl", "role": "target",
                    "split": "train", "id_field": "id", "licence": "the project's target"})
    selected = _arm_project(project, out, "selected", sources, chosen, val, s)
    log(f"selecting {s.tokens:,} tokens of the generic corpus (clusters) ...")
    report = select_project(selected, force=force, log=lambda msg: log(f"select: {msg}"))
    sel_tokens = report["selected"]["tokens"]

    # 3. the random arm: generic documents select could choose (min_tokens), in a seeded order, as many tokens
    random_docs = _random_sample(project, sel_tokens, seed, s)
    _write_if_changed(out / "random.jsonl", random_docs)
    random_arm = _arm_project(project, out, "random", [{
        "name": "random", "path": str(out / "random.jsonl"), "format": "jsonl", "role": "clean", "input_field": "",
        "output_field": "text", "id_field": "id", "licence": "per document (the project's generic sources)"}],
        None, val, s)

    arms = {}
    for name, arm in (("selected", selected), ("random", random_arm)):
        log(f"{name}: prepare and train {s.preset} for {s.steps} steps ...")
        arms[name] = _train_and_score(arm, heldout, force)
        log(f"{name}: {arms[name]['bits_per_byte']:.4f} bits/byte on the held-out target text")
    arms["selected"].update(documents=report["selected"]["documents"], tokens=sel_tokens)
    arms["random"].update(documents=len(random_docs), tokens=sum(d["tokens"] for d in random_docs))
    rnd, sel = arms["random"]["bits_per_byte"], arms["selected"]["bits_per_byte"]
    result = {
        "fingerprint": fp, "folder": str(out), "settings": asdict(s),
        "target": {"sources": names, "documents": len(to_select), "heldout_documents": len(heldout),
                   "heldout_chars": sum(len(t) for t in heldout)},
        "arms": arms, "gap_bits_per_byte": rnd - sel, "relative_gap": (rnd - sel) / rnd if rnd else 0.0,
        "clusters": concentration(report["clusters"]),
        "seconds": round(time.monotonic() - t0, 1),
    }
    atomic_write_json(done, result)
    return result


def _split_target(project: Project, s: PilotSettings) -> tuple[list[str], list, list[str]]:
    """(the target's source names, the documents to select against, the held-out texts): the train-split
    target `nichelm select` matches, a seeded share of its documents held out (capped in number and length)."""
    from nichelm.selection import target_records
    from nichelm.selection.core import uniform
    target = target_records(project, "train")
    names = sorted({r.source for r in target}) or [src.name or src.path for src in project.sources
                                                   if src.role in ("target", "pairs", "clean")]
    if len(target) < MIN_TARGET_DOCUMENTS:
        raise UserError(f"{project.source_file}: target sources {', '.join(names)}: {len(target)} train-split "
                        f"documents; the pilot holds out {s.heldout_share:.0%} of the target to score and selects "
                        f"against the rest, so it needs at least {MIN_TARGET_DOCUMENTS}: add target text (a source "
                        "with role = \"target\") or lower split.val_fraction / split.test_fraction")
    target.sort(key=lambda r: uniform(project.seed, "pilot-heldout", r.source, r.id))
    n_held = min(s.max_heldout, max(1, round(s.heldout_share * len(target))))
    return names, target[n_held:], [r.text[:s.heldout_chars] for r in target[:n_held]]


def concentration(table: list[dict]) -> dict:
    """From select's per-cluster table: the target's largest cluster and its share, the effective number of
    clusters (exp of the entropy of the target's histogram) and KL(target || generic) over clusters, in nats
    (a generic share of 0 counts as half the smallest one seen, so KL stays finite)."""
    p = [row["target_share"] for row in table]
    q = [row["generic_share"] for row in table]
    floor = min((x for x in q if x > 0), default=1.0) / 2
    top = max(range(len(p)), key=lambda c: p[c])
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    kl = sum(x * math.log(x / max(y, floor)) for x, y in zip(p, q) if x > 0)
    return {"k": len(table), "top_cluster": table[top]["cluster"], "top_share": p[top],
            "effective_clusters": math.exp(entropy), "kl_target_generic": kl}


# ------------------------------------------------------------------ the arms

def _generic_source(project: Project, index: int, src, s: PilotSettings) -> dict:
    """A generic source as the arm's project gives it: its own settings, its name, an absolute path, and at
    most the pilot's number of documents."""
    d = asdict(src)
    d.update(name=source_name(src, index), path=str(project.resolve(src.path)),
             max_documents=_max_documents(src, s))
    return d


ARM = """run_dir = {run}
seed = {seed}

[task]
type = "language-model"
window_chars = {window}

[split]
val_fraction = {val}
test_fraction = 0.0

[tokenizer]
vocab_size = {vocab}

[model]
arch = "llama"
preset = "{preset}"
block_size = {block}

[train]
max_steps = {steps}
batch_size = {batch}
lr = 3e-3
warmup_steps = {warmup}
eval_every = {steps}
eval_batches = 4
log_every = 10
device = "cpu"
compile = false
"""


def _arm_project(project: Project, out: Path, name: str, sources: list[dict], select: dict | None, val: float,
                 s: PilotSettings) -> Project:
    """Write RUN/plan-pilot/NAME.toml (a project like select_pays' arms) and load it."""
    text = ARM.format(run=_toml(str(out / name)), seed=project.seed, window=s.window_chars, val=val,
                      vocab=s.vocab, preset=s.preset, block=s.block, steps=s.steps, batch=s.batch,
                      warmup=max(1, s.steps // 10))
    for src in sources:
        text += "\n[[sources]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in src.items())
    if select is not None:
        text += "\n[select]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in select.items())
    path = out / f"{name}.toml"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return load_project(path)


def _toml(value) -> str:
    """A TOML value: strings, numbers, booleans and lists of them are written as JSON writes them (the same
    syntax), DEL escaped as TOML requires."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _max_documents(src, s: PilotSettings) -> int:
    return min(src.max_documents or s.max_generic_documents, s.max_generic_documents)


def _random_sample(project: Project, tokens: int, seed: int, s: PilotSettings) -> list[dict]:
    """Generic documents of at least select.min_tokens words (of each source the documents the pilot's
    selection reads), those with the highest seeded draws, until `tokens` wordpunct tokens: streamed, memory
    bounded by the sample (core.BudgetHeap)."""
    from nichelm.selection import GenericCorpus
    from nichelm.selection.core import BudgetHeap, uniform
    from nichelm.selection.features import tokenize
    corpus = GenericCorpus(project, [(i, replace(src, max_documents=_max_documents(src, s)))
                                     for i, src in enumerate(project.sources) if src.role == "generic"])
    heap = BudgetHeap(tokens)
    for ordinal, rec in enumerate(corpus()):
        n = len(tokenize(rec.text))
        if n >= project.select.min_tokens:
            heap.push(uniform(seed, "pilot-random", rec.source, rec.id), ordinal, n, rec)
    return [{"id": f"{rec.source}/{rec.id}", "text": rec.text, "source": rec.source, "licence": rec.licence,
             "tokens": int(n)} for _, _, n, rec in sorted(heap.items(), key=lambda item: item[1])]


def _train_and_score(arm: Project, heldout: list[str], force: bool) -> dict:
    """prepare (reused when up to date) + train from scratch + bits per byte on the held-out text."""
    from nichelm.perplexity import load_model, perplexity_report
    from nichelm.prepare import prepare
    from nichelm.train import train
    prepare(arm, force=force)
    shutil.rmtree(arm.run_path / "checkpoints", ignore_errors=True)    # the pilot's own runs: never resumed
    summary = train(arm)
    model, tokenizer, first_id = load_model(arm.run_path)
    g = perplexity_report(model, tokenizer, {"target": heldout}, first_id)["groups"]["target"]
    return {"bits_per_byte": g["bits_per_byte"], "perplexity": g["perplexity"], "heldout_tokens": g["tokens"],
            "val_loss": summary.get("val_loss") if isinstance(summary, dict) else None,
            "run": str(arm.run_path)}


def _write_if_changed(path: Path, rows: list[dict]) -> None:
    """Write the rows unless the file holds exactly them: its mtime then stays, so select and prepare, whose
    fingerprints include their sources' mtimes, reuse their work."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def _read_json(path: Path) -> dict:
    """A json file's object; {} when it is missing or unreadable (then the pilot runs again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _json_sha(obj) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _log(msg: str) -> None:
    print(f"plan --pilot: {msg}", file=sys.stderr, flush=True)
