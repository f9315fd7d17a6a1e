"""Plan Early at CPU scale: the paper's five ways to a small specialized model, side by side.

    python bench/plan_early.py [--domains arxiv,health,legislation] [--out FILE] [--work DIR] [--quick]

"Need a Small Specialized Language Model? Plan Early!" (Grangier et al.) compares, at equal pre-training
tokens, five ways to get a small model for a specialist domain of which only a little text exists:

  SLM-nopt  no pre-training: train on the specialist text alone (the specialization budget);
  SLM       pre-train on a random sample of the generic corpus, then fine-tune on the specialist text;
  SLM-is    pre-train on the generic documents `nichelm select` (method clusters) picks for the target,
            then fine-tune (the selection and its pre-training are paid per target);
  SLM-mix   pre-train one small model per k-means cluster of the generic corpus (each the budget / k), once;
            for a target, fine-tune the expert of the cluster holding most of it;
  SLM-pn    pre-train one projected network ([model.projected]) on all clusters at once, once; for a
            target, `nichelm specialize --mixture` instantiates the mixture of experts of its cluster
            histogram as a plain model, then fine-tune.

Data (../shared/data/generic, README there). The targets (--domains) are held out of the generic pool: the
pool is --pool-chars of each OTHER domain (--generic), so every target is new to every pre-training and the
target-independent pre-trainings (SLM, SLM-mix's experts, SLM-pn) are done once and reused for every target.
Per target, from its documents in a seeded order: --heldout documents (the first --heldout-chars of each) of
held-out text, scored only, then the specialist train set: documents up to --specialist-tokens tokens of the
shared tokenizer (1M as in the paper's Table 8, or the largest the domain allows).

One tokenizer for every run: the SLM project trains it on the pool (prepare) and every other project reuses it
(tokenizer.from), so fine-tuning can start from any pre-trained model and the token perplexities compare.
Every run is a project file written under --work and run as a user runs it, in-process: nichelm.selection
(select), nichelm.prepare.prepare, nichelm.train.train, nichelm.specialize, nichelm.perplexity; task type
"language-model" (plain text in windows of --window-chars, the loss on every token). Fine-tuning is a plain
run on the specialist train set with train.init_from = the pre-trained run, --finetune-steps steps (SLM-nopt:
the same steps from scratch). The k-means partition (select.partition) comes from the first target's
selection; every target's cluster histogram is computed over those clusters with that partition's k-means fit
(what `nichelm specialize --partition FOLDER` does for any target; the partition's fit is the generic sample's
alone since the commit "select.partition is target-independent ...", after the run recorded in BENCHMARKS.md,
whose partition was fit on the generic sample and the first target): SLM-mix picks by it (`nichelm specialize
--pick-expert`'s rule; the command itself for the first target) and SLM-pn instantiates its mixture.

Costs are CPU seconds of this process and its children (getrusage), per pre-training (with its selection and
preparation) and per specialization (picking or instantiating, and fine-tuning). Scores: specialized
perplexity (token level; one tokenizer, so they compare) and bits per byte of the held-out text, per target
and macro-averaged (exp of the mean NLL per token; bits per byte: the mean of the targets').

The run is resumable: each finished arm's figures are kept in WORK/results/NAME.json and a re-run with the
same settings reuses them (and prepare / select / train reuse or resume their own work); other
fine-tuning settings (--finetune-steps, --finetune-lr) fine-tune again from the same pre-trainings, in
folders of their own; any other setting needs another --work. Defaults are the recorded run
(BENCHMARKS.md: about 20 CPU-minutes; 35 minutes on a busy 2-core machine); --quick is a smoke test of
well under a minute. Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_reference import SHARED, skipped_without  # noqa: E402
from lm_project import lm_project_file  # noqa: E402

ARMS = ("SLM-nopt", "SLM", "SLM-is", "SLM-mix", "SLM-pn")
LICENCE = "per document (shared generic corpus)"
KEEP = ("id", "text", "domain", "licence", "source")
# Table 8 of the paper at 1M specialist tokens (specialized perplexity; SLM-is: best with a large
# specialization budget, its row there is not comparable at this budget)
PAPER = {"SLM-nopt": 227.0, "SLM": 18.22, "SLM-mix": 17.56, "SLM-pn": 17.17}

QUICK = {"pool_chars": 120_000, "specialist_tokens": 40_000, "heldout": 6, "heldout_chars": 1500, "k": 2,
         "pretrain_steps": 12, "finetune_steps": 6, "select_tokens": 15_000, "batch": 8, "block": 64,
         "window_chars": 200, "vocab": 320, "pn_m": 2, "pn_h": 2, "val_fraction": 0.2}


# ---------------------------------------------------------------- data

def _key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{doc_id}".encode()).hexdigest()


def read_domain(domain: str, root: Path, seed: int) -> list[dict]:
    """The domain's documents in a seeded order."""
    with gzip.open(root / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return sorted(docs, key=lambda d: _key(seed, d["id"]))


def take_chars(docs: list[dict], chars: int) -> list[dict]:
    out, n = [], 0
    for d in docs:
        if n >= chars:
            break
        out.append(d)
        n += len(d["text"])
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write the rows, unless the file already holds exactly them: its mtime then stays, so a re-run reuses the
    selections and prepared data (their fingerprints include mtimes)."""
    text = "".join(json.dumps({k: r[k] for k in KEEP if k in r}, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- project files

CLEAN = """[[sources]]
name = "{name}"
path = "{path}"
format = "jsonl"
role = "clean"
input_field = ""
output_field = "text"
id_field = "id"
licence = "{licence}"
"""

SELECT = """[[sources]]
name = "pool"
path = "{pool}"
format = "jsonl"
role = "generic"
id_field = "id"
licence = "{licence}"

[[sources]]
name = "target"
path = "{target}"
format = "jsonl"
role = "target"
split = "train"
id_field = "id"
licence = "{licence}"

[select]
method = "clusters"
k = {k}
partition = true
tokens = {tokens}
"""

def project_file(path: Path, run: Path, sources: str, args, *, steps: int, lr: float, tokenizer_from: Path | None,
                 init_from: Path | None = None, projected: str = "", phases: str = "") -> Path:
    """Write one project file (its sources are read beside it)."""
    return lm_project_file(path, run, sources, seed=args.seed, window=args.window_chars, val=args.val_fraction,
                           vocab=args.vocab, preset=args.preset, block=args.block, steps=steps, batch=args.batch,
                           lr=lr, threads=args.threads, tokenizer_from=tokenizer_from, init_from=init_from,
                           projected=projected, phases=phases)


# ---------------------------------------------------------------- running and measuring

def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (select's and prepare's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    """CPU and wall seconds of a stretch of work."""

    def __enter__(self):
        self.cpu0, self.wall0 = cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = round(cpu_seconds() - self.cpu0, 1), round(time.monotonic() - self.wall0, 1)


def say(msg: str) -> None:
    print(f"[plan_early {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cached(work: Path, name: str, make) -> dict:
    """WORK/results/NAME.json if an earlier run of the same settings finished it; else make() and keep it."""
    path = work / "results" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return result


def prepare_and_train(toml: Path) -> dict:
    """nichelm prepare + nichelm train of a project (both reuse or resume finished work); its summary."""
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train
    project = load_project(toml)
    with Clock() as prep:
        manifest = prepare(project)
    with Clock() as tr:
        summary = train(project)
    return {"prepare_cpu_s": prep.cpu, "train_cpu_s": tr.cpu, "train_wall_s": tr.wall,
            "train_examples": (manifest.get("examples") or {}).get("train") if isinstance(manifest, dict) else None,
            "steps": summary.get("step") if isinstance(summary, dict) else None,
            "tokens": summary.get("tokens") if isinstance(summary, dict) else None,
            "final_train_loss": _round(summary, "train_loss"), "val_loss": _round(summary, "val_loss")}


def _round(summary, key):
    value = summary.get(key) if isinstance(summary, dict) else None
    return round(value, 4) if isinstance(value, (int, float)) else None


def score(run: Path, heldout: list[str], domain: str) -> dict:
    """Specialized perplexity of the run's newest checkpoint on the held-out text."""
    from nichelm.perplexity import load_model, perplexity_report
    model, tokenizer, first_id = load_model(run)
    g = perplexity_report(model, tokenizer, {domain: heldout}, first_id)["groups"][domain]
    return {"perplexity": round(g["perplexity"], 3), "nll": round(g["nll"], 5),
            "bits_per_byte": round(g["bits_per_byte"], 4), "heldout_tokens": g["tokens"]}


def copy_prepared(src: Path, dst: Path) -> None:
    """A prepared run's data, tokenizer and task.json into another run folder whose project has the same
    prepare fingerprint (run_dir is not in it): prepare there then reuses them instead of building again."""
    if (dst / "data" / "manifest.json").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for rel in ("tokenizer", "data"):
        shutil.copytree(src / rel, dst / rel)
    shutil.copyfile(src / "task.json", dst / "task.json")


# ---------------------------------------------------------------- the pre-trainings shared by every target

def pretrain_generic(work: Path, args) -> tuple[Path, dict]:
    """SLM's pre-training on the generic pool; its prepare trains the tokenizer every run reuses."""
    toml = project_file(work / "slm.toml", work / "slm", CLEAN.format(name="pool", path="pool.jsonl",
                                                                     licence=LICENCE),
                        args, steps=args.pretrain_steps, lr=args.lr, tokenizer_from=None)
    say("SLM: pre-training on the generic pool")
    return work / "slm", cached(work, "pretrain-SLM", lambda: prepare_and_train(toml))


def train_experts(work: Path, partition: dict, tokenizer: Path, args) -> tuple[Path, dict]:
    """SLM-mix: one plain model per cluster file of the partition, each pre-trained for pretrain_steps / k
    steps (the same total tokens as SLM); their prepared data are also SLM-pn's parts."""
    experts = work / "experts"
    steps = max(1, args.pretrain_steps // len(partition["clusters"]))
    out = {"steps_each": steps, "experts": {}}
    for row in partition["clusters"]:
        name = f"cluster-{row['cluster']:04d}"
        data = Path(partition["folder"]) / row["file"]
        toml = project_file(experts / f"{name}.toml", experts / name,
                            CLEAN.format(name=name, path=data, licence=LICENCE), args, steps=steps, lr=args.lr,
                            tokenizer_from=tokenizer)
        say(f"SLM-mix: expert {name} ({row['documents']} documents, {row['tokens']} tokens)")
        out["experts"][name] = cached(work, f"pretrain-SLM-mix-{name}", lambda toml=toml: prepare_and_train(toml))
    out["prepare_cpu_s"] = round(sum(e["prepare_cpu_s"] for e in out["experts"].values()), 1)
    out["cpu_s"] = round(out["prepare_cpu_s"] + sum(e["train_cpu_s"] for e in out["experts"].values()), 1)
    return experts, out


def pretrain_projected(work: Path, slm: Path, experts: Path, partition: dict, args) -> dict:
    """SLM-pn: one projected network on all clusters at once, one phase mixing the experts' prepared data
    (cluster i = part i) in the clusters' shares of the generic tokens, for pretrain_steps steps."""
    rows = partition["clusters"]
    total = sum(r["tokens"] for r in rows)
    data = ", ".join(json.dumps(str(experts / f"cluster-{r['cluster']:04d}")) for r in rows)
    weights = ", ".join(f"{r['tokens'] / total:.6f}" for r in rows)
    projected = f"\n[model.projected]\nclusters = {len(rows)}\nm = {args.pn_m}\nh = {args.pn_h}\n"
    phases = (f'[[train.phases]]\nname = "pretrain"\ndata = [{data}]\nweights = [{weights}]\n'
              f"steps = {args.pretrain_steps}\n")
    # the same sources and tokenizer settings as SLM's project: its prepared pool is this run's own data
    toml = project_file(work / "pn.toml", work / "pn", CLEAN.format(name="pool", path="pool.jsonl", licence=LICENCE),
                        args, steps=args.pretrain_steps, lr=args.lr, tokenizer_from=None, projected=projected,
                        phases=phases)
    copy_prepared(slm, work / "pn")
    say("SLM-pn: pre-training the projected network")
    return cached(work, "pretrain-SLM-pn", lambda: prepare_and_train(toml))


# ---------------------------------------------------------------- per target

def select_for(work: Path, dwork: Path, tokenizer: Path, args) -> tuple[Path, dict]:
    """The target's `nichelm select` (clusters, with the partition): SLM-is's pre-training data and the
    target's cluster histogram."""
    from nichelm.config import load_project
    from nichelm.selection import select_project
    toml = project_file(dwork / "is.toml", dwork / "is",
                        SELECT.format(pool=work / "pool.jsonl", target="target.jsonl", licence=LICENCE, k=args.k,
                                      tokens=args.select_tokens),
                        args, steps=args.pretrain_steps, lr=args.lr, tokenizer_from=tokenizer)

    def run():
        with Clock() as c:
            report = select_project(load_project(toml), log=lambda msg: None)
        return {"select_cpu_s": c.cpu, "selected_tokens": report["selected"]["tokens"],
                "selected_documents": report["selected"]["documents"],
                "kl_reduction": round(report["kl"]["reduction"], 4)}
    say(f"{dwork.name}: selecting (clusters, partition)")
    return toml, cached(work, f"{dwork.name}-select", run)


def histogram(partition: dict, texts: list[str]) -> list[float]:
    """The target's share of each cluster of the experts' partition, placed with its k-means fit (fit.npz) as
    select placed its own target (nichelm.specialize.partition_histogram does the same from a project)."""
    from nichelm.selection.clusters import ClusterFit
    return [float(h) for h in ClusterFit.load(Path(partition["folder"])).histogram(texts)]


FINETUNE_KEYS = ("finetune_steps", "finetune_lr")      # settings of the specialization only


def finetune_dir(dwork: Path, args) -> Path:
    """Where a target's fine-tunings of these settings go: other --finetune-steps / --finetune-lr get folders
    (and kept results) of their own and reuse the pre-trainings, which do not depend on them."""
    return dwork / f"ft-{args.finetune_steps}-lr{args.finetune_lr:g}"


def finetune(dwork: Path, arm: str, init_from: Path | None, tokenizer: Path, args) -> dict:
    """Fine-tune (SLM-nopt: train from scratch) on the target's specialist train set."""
    name, folder = arm.lower(), finetune_dir(dwork, args)
    toml = project_file(folder / f"{name}.toml", folder / name,
                        CLEAN.format(name="specialist", path=dwork / "target.jsonl", licence=LICENCE), args,
                        steps=args.finetune_steps, lr=args.finetune_lr if init_from else args.lr,
                        tokenizer_from=tokenizer, init_from=init_from)
    if arm != "SLM-nopt":
        copy_prepared(folder / "slm-nopt", folder / name)     # the same specialist data: prepared once, by SLM-nopt
    return prepare_and_train(toml)


def specialist_set(docs: list[dict], dwork: Path, tokenizer: Path, args) -> tuple[list[dict], int]:
    """The target's specialist train set (DWORK/target.jsonl): its documents after the held-out ones, up to
    specialist_tokens tokens of the shared tokenizer (run folder `tokenizer`); (them, their tokens)."""
    from nichelm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer / "tokenizer" / "tokenizer.json")
    target, n = [], 0
    for d in docs[args.heldout:]:
        if n >= args.specialist_tokens:
            break
        target.append(d)
        n += len(tok.encode(d["text"]).ids)
    write_jsonl(dwork / "target.jsonl", target)
    return target, n


def run_target(domain: str, docs: list[dict], work: Path, shared: dict, args) -> dict:
    from nichelm.specialize import specialize
    dwork = work / domain
    tokenizer = shared["tokenizer"]
    heldout = [d["text"][:args.heldout_chars] for d in docs[:args.heldout]]
    target, n = specialist_set(docs, dwork, tokenizer, args)
    row = {"heldout_documents": len(heldout), "heldout_chars": sum(len(t) for t in heldout),
           "specialist_documents": len(target), "specialist_tokens": n,
           "specialist_chars": sum(len(d["text"]) for d in target), "arms": {}}

    is_toml, sel = select_for(work, dwork, tokenizer, args)
    hist = histogram(shared["partition"], [d["text"] for d in target])
    row["target_histogram"] = [round(h, 4) for h in hist]
    own = dwork / "is" / "select" / "selection.json"
    if own.parent.parent == shared["partition_run"]:      # the experts' own partition: select's histogram too
        from nichelm.specialize import target_histogram
        row["histogram_as_select"] = max(abs(a - b) for a, b in zip(hist, target_histogram(own.parents[1], len(hist))))

    def arm(name: str, pretrained: Path | None, pretrain_cost: dict, specialize_step=None) -> dict:
        def make():
            out = {"pretrain": pretrain_cost}
            start = pretrained
            with Clock() as c:
                if specialize_step is not None:
                    start, out["picked"] = specialize_step()
            out["specialize_cpu_s"] = c.cpu
            if start is not None:
                out["before_finetune"] = score(start, heldout, domain)
            say(f"{domain} {name}: fine-tuning" if start else f"{domain} {name}: training on the specialist data")
            out["finetune"] = finetune(dwork, name, start, tokenizer, args)
            out.update(score(finetune_dir(dwork, args) / name.lower(), heldout, domain))
            out["specialization_cpu_s"] = round(out["specialize_cpu_s"] + out["finetune"]["prepare_cpu_s"]
                                                + out["finetune"]["train_cpu_s"], 1)
            return out
        result = cached(work, f"{domain}-{finetune_dir(dwork, args).name}-{name}", make)
        say(f"{domain} {name}: perplexity {result['perplexity']}, {result['bits_per_byte']} bits/byte")
        return result

    row["arms"]["SLM-nopt"] = arm("SLM-nopt", None, {"cpu_s": 0.0})
    row["arms"]["SLM"] = arm("SLM", shared["slm"], {"cpu_s": shared["slm_cpu_s"], "shared": True})

    def pretrain_is():
        say(f"{domain} SLM-is: pre-training on the selection")
        return prepare_and_train(is_toml)
    is_run = cached(work, f"{domain}-pretrain-SLM-is", pretrain_is)
    row["arms"]["SLM-is"] = arm("SLM-is", dwork / "is", {
        "cpu_s": round(sel["select_cpu_s"] + is_run["prepare_cpu_s"] + is_run["train_cpu_s"], 1), "shared": False,
        **sel, **is_run})

    def pick():
        # `nichelm specialize --pick-expert`'s rule: the cluster holding the largest share of the target (a tie:
        # the lower cluster). The command itself reads the project's own partition, so it serves the target
        # whose selection made the experts' partition; another target is placed among the experts' clusters
        # with that partition's fit (histogram above), and the same rule picks.
        c = max(range(len(hist)), key=lambda i: (hist[i], -i))
        picked = {"cluster": c, "target_share": round(hist[c], 4)}
        if dwork / "is" == shared["partition_run"]:
            from nichelm.config import load_project
            from nichelm.specialize import SPECIALIZED_JSON, pick_expert
            out = pick_expert(load_project(is_toml), shared["experts"], out=dwork / "mix-picked")
            picked["by"] = "nichelm specialize --pick-expert"
            picked["command_picked"] = json.loads((out / SPECIALIZED_JSON).read_text(encoding="utf-8"))["cluster"]
            return out, picked
        picked["by"] = "the same rule on the experts' partition fit"
        return shared["experts"] / f"cluster-{c:04d}", picked
    row["arms"]["SLM-mix"] = arm("SLM-mix", None, {"cpu_s": shared["mix_cpu_s"], "shared": True}, pick)

    def instantiate():
        # `nichelm specialize PN --mixture <this target's histogram>` (--target reads the projected run's own
        # selection.json; the projected network serves every target, so the histogram is given)
        from nichelm.config import load_project
        out = specialize(load_project(work / "pn.toml"), mixture=hist, out=dwork / "pn-specialized")
        return out, {"mixture": [round(h, 4) for h in hist]}
    row["arms"]["SLM-pn"] = arm("SLM-pn", None, {"cpu_s": shared["pn_cpu_s"], "shared": True}, instantiate)
    return row


# ---------------------------------------------------------------- the whole comparison

def summarize(result: dict) -> None:
    """Macro averages per arm, ranks, and the ordering set beside the paper's."""
    domains = result["domains"]
    macro = {}
    for arm in ARMS:
        nlls = [domains[d]["arms"][arm]["nll"] for d in domains]
        bpb = [domains[d]["arms"][arm]["bits_per_byte"] for d in domains]
        macro[arm] = {"perplexity": round(math.exp(sum(nlls) / len(nlls)), 3),
                      "bits_per_byte": round(sum(bpb) / len(bpb), 4)}
    result["macro"] = macro
    order = sorted(ARMS, key=lambda a: macro[a]["perplexity"], reverse=True)
    result["ordering_worst_to_best"] = order
    paper = ["SLM-nopt", "SLM", "SLM-mix", "SLM-pn"]
    ours = [a for a in order if a in paper]
    result["paper_table8_1M"] = PAPER
    result["paper_order_worst_to_best"] = paper
    result["agrees_with_paper"] = {
        f"{a} > {b}": macro[a]["perplexity"] > macro[b]["perplexity"] for a, b in zip(paper, paper[1:])}
    result["agrees_with_paper"]["whole order (nopt > SLM > mix > pn)"] = ours == paper
    result["per_domain_order_worst_to_best"] = {
        d: sorted(ARMS, key=lambda a: domains[d]["arms"][a]["perplexity"], reverse=True) for d in domains}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="arxiv,health,legislation", help="the target domains (held out of the pool)")
    ap.add_argument("--generic", default="", help="the pool's domains (default: every other domain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-chars", type=int, default=2_000_000, help="characters of each generic domain in the pool")
    ap.add_argument("--specialist-tokens", type=int, default=1_000_000, help="specialist train set, in tokens")
    ap.add_argument("--heldout", type=int, default=40, help="held-out target documents (perplexity)")
    ap.add_argument("--heldout-chars", type=int, default=4000, help="characters scored of each held-out document")
    ap.add_argument("--k", type=int, default=4, help="k-means clusters: SLM-mix's experts, SLM-pn's clusters")
    ap.add_argument("--select-tokens", type=int, default=400_000, help="SLM-is: select.tokens (wordpunct tokens)")
    ap.add_argument("--pretrain-steps", type=int, default=600, help="each pre-training's steps (SLM-mix: / k each)")
    ap.add_argument("--finetune-steps", type=int, default=150, help="each specialization's steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="pre-training (and SLM-nopt) peak lr")
    ap.add_argument("--finetune-lr", type=float, default=3e-3, help="fine-tuning peak lr")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--window-chars", type=int, default=400, help="task.window_chars")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--pn-m", type=int, default=4, help="model.projected.m")
    ap.add_argument("--pn-h", type=int, default=4, help="model.projected.h")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of training (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="a smoke test at toy sizes (minutes)")
    ap.add_argument("--work", default="/tmp/plan-early")
    ap.add_argument("--data", default=str(SHARED), help="the shared generic corpus folder")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    root = Path(args.data)
    skipped = skipped_without(root)
    if skipped:
        return skipped
    work = Path(args.work).resolve()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "data")}
    _check_settings(work, {k: v for k, v in settings.items() if k not in FINETUNE_KEYS})
    targets = args.domains.split(",")
    names = sorted(p.name.removesuffix(".jsonl.gz") for p in root.glob("*.jsonl.gz"))
    generic = args.generic.split(",") if args.generic else [d for d in names if d not in targets]
    if set(generic) & set(targets):
        raise SystemExit(f"plan_early: --generic and --domains share {sorted(set(generic) & set(targets))}: "
                         "a target must be held out of the pool")
    t0 = time.monotonic()
    pool = [d for g in generic for d in take_chars(read_domain(g, root, args.seed), args.pool_chars)]
    write_jsonl(work / "pool.jsonl", pool)
    result = {"settings": settings, "generic_domains": generic,
              "pool": {"documents": len(pool), "chars": sum(len(d["text"]) for d in pool)},
              "pretrain_tokens_per_arm": args.pretrain_steps * args.batch * args.block,
              "finetune_tokens_per_arm": args.finetune_steps * args.batch * args.block,
              "metric": "specialized perplexity of the held-out target text (one shared tokenizer); bits per "
                        "byte beside it; macro = exp of the mean NLL per token over the targets",
              "cost": "CPU seconds (process + children, getrusage) of pre-training (with its selection and "
                      "preparation) and of each specialization (pick / instantiate + fine-tune)"}

    slm, slm_cost = pretrain_generic(work, args)
    docs = {d: read_domain(d, root, args.seed) for d in targets}
    # the partition the experts and the projected network train on: the first target's selection (the
    # clusters are fit on the pool alone; every target's selection is checked to hold the same ones)
    tok, dwork = slm, work / targets[0]
    specialist_set(docs[targets[0]], dwork, tok, args)
    select_for(work, dwork, tok, args)
    partition = json.loads((dwork / "is" / "select" / "selection.json").read_text(encoding="utf-8"))["partition"]
    experts, mix_cost = train_experts(work, partition, tok, args)
    pn_cost = pretrain_projected(work, slm, experts, partition, args)
    # SLM-pn's per-cluster data are the experts' prepared data: their preparation counts for it too
    shared = {"tokenizer": tok, "slm": slm, "experts": experts, "partition": partition, "partition_run": dwork / "is",
              "slm_cpu_s": round(slm_cost["prepare_cpu_s"] + slm_cost["train_cpu_s"], 1),
              "mix_cpu_s": mix_cost["cpu_s"],
              "pn_cpu_s": round(mix_cost["prepare_cpu_s"] + pn_cost["prepare_cpu_s"] + pn_cost["train_cpu_s"], 1)}
    result["shared_pretraining"] = {"SLM": slm_cost, "SLM-mix": mix_cost, "SLM-pn": pn_cost,
                                    "partition": [{k: r[k] for k in ("cluster", "documents", "tokens")}
                                                  for r in partition["clusters"]]}
    result["domains"] = {d: run_target(d, docs[d], work, shared, args) for d in targets}
    summarize(result)
    result["seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


def _check_settings(work: Path, settings: dict) -> None:
    """WORK serves one set of settings (fine-tuning's aside: finetune_dir): kept results would mix with another's."""
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(f"plan_early: {work} holds a run with other settings ({', '.join(changed)}); "
                             "give another --work or remove it")
        return
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
