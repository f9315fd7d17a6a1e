"""Does selection pay? Pre-train the same small model on a `clusters` selection, a `dsir` selection and a
random generic sample of the same size, then compare their specialized perplexity on the target.

    python bench/select_pays.py [--domains arxiv,health,legislation] [--steps 60] [--out FILE]

The defaults are the recorded run (BENCHMARKS.md): 9 trainings of 60 steps x 16 rows x 128 tokens, about
2 minutes on a 2-core CPU with one torch thread (~9 s a training); up to 30 minutes when the machine is busy.

For each target domain D of ../shared/data/generic (README there), from D's documents in a seeded order:
--heldout documents of held-out target text (perplexity only), --target-chars of target text (the
`role = "target"` source select matches), then --pool-chars of D in the generic pool; every other domain
adds --pool-chars of its own documents to the pool.

Each arm is one pre-training project, run as a user runs it (nichelm.selection.select_project, then
nichelm.prepare.prepare and nichelm.train.train): task type "language-model" (plain text, every window
of --window-chars characters an example with an empty input, the loss on all of its tokens), and the same
tokenizer size, model, steps and rows (--steps x batch_size x block_size tokens) for all. The two selection
arms give the pool as the `role = "generic"` source and the target as the `role = "target"` source with
[select] method = clusters or dsir, select.tokens = --select-tokens: select writes RUN/select/selected.jsonl
and prepare reads that selection as the project's one clean source (prepare.with_selection; the target
itself is not training text). The random arm's one clean source is a seeded random sample of the pool's
documents (those of at least select.min_tokens words, as select requires) with as many wordpunct tokens as
the dsir selection. Each run is scored with nichelm.perplexity on the held-out text: token perplexity (each
run has its own tokenizer, trained on its own data, as prepare does) and bits per byte of the text
(comparable across tokenizers; the criterion).

Criterion (issue 13, "It pays"): for >= 3 target domains, clusters and dsir both below random in bits per
byte. Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_reference import SHARED, skipped_without  # noqa: E402
from lm_project import lm_project_file  # noqa: E402

ARMS = ("clusters", "dsir", "random")
LICENCE = "per document (shared generic corpus)"


def _key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{doc_id}".encode()).hexdigest()


def read_domain(domain: str, root: Path, seed: int) -> list[dict]:
    """The domain's documents in a seeded order."""
    with gzip.open(root / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return sorted(docs, key=lambda d: _key(seed, d["id"]))


def take_chars(docs: list[dict], start: int, chars: int) -> tuple[list[dict], int]:
    """Documents from `start` until `chars` characters are reached; (them, the next index)."""
    out, n, i = [], 0, start
    while i < len(docs) and n < chars:
        out.append(docs[i])
        n += len(docs[i]["text"])
        i += 1
    return out, i


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write the rows, unless the file already holds exactly them (its mtime then stays, so a re-run of
    the bench in the same --work folder reuses the selections and prepared data: their fingerprints
    include mtimes)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# the two selection arms: select reads the pool and the target, prepare then reads only the selection
SELECTED_SOURCES = f"""[[sources]]
name = "pool"
path = "pool.jsonl"
format = "jsonl"
role = "generic"
id_field = "id"
licence = "{LICENCE}"

[[sources]]
name = "target"
path = "target.jsonl"
format = "jsonl"
role = "target"
split = "train"
id_field = "id"
licence = "{LICENCE}"

[select]
method = "{{method}}"
tokens = {{tokens}}
"""

# the random arm: its sample, as clean text (the fields select's output is read with)
RANDOM_SOURCES = f"""[[sources]]
name = "random"
path = "random.jsonl"
format = "jsonl"
role = "clean"
input_field = ""
output_field = "text"
id_field = "id"
licence = "{LICENCE}"
"""

def write_project(work: Path, arm: str, sources: str, args) -> Path:
    """RUN's project file of one arm (relative source paths are read beside it, in `work`)."""
    return lm_project_file(work / f"lm-{arm}.toml", work / f"lm-{arm}", sources, seed=args.seed,
                           window=args.window_chars, val=args.val_fraction, vocab=args.vocab, preset=args.preset,
                           block=args.block, steps=args.steps, batch=args.batch, lr=3e-3, threads=args.threads,
                           log_every=10)


def select_arm(work: Path, method: str, args) -> tuple[Path, list[dict], dict]:
    """The arm's project file, the documents `nichelm select` chose from the pool (copies included) and
    selection.json. prepare, run next on the same project, finds this selection up to date and reuses it."""
    from nichelm.config import load_project
    from nichelm.selection import select_project
    toml = write_project(work, method, SELECTED_SOURCES.format(method=method, tokens=args.select_tokens), args)
    report = select_project(load_project(toml), log=lambda msg: None)
    with open(report["output"], encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return toml, docs, report


def random_arm(pool: list[dict], tokens: int, min_tokens: int, seed: int) -> list[dict]:
    """Pool documents of at least min_tokens words in a seeded order, until `tokens` wordpunct tokens."""
    from nichelm.selection.features import tokenize
    order = list(pool)
    random.Random(seed).shuffle(order)
    out, n = [], 0
    for d in order:
        k = len(tokenize(d["text"]))
        if k < min_tokens:
            continue
        out.append(d)
        n += k
        if n >= tokens:
            break
    return out


def train_arm(toml: Path, docs: list[dict], heldout: list[str], domain: str) -> dict:
    """prepare + train one arm's language-model project; its perplexity on the held-out text."""
    from nichelm.config import load_project
    from nichelm.perplexity import load_model, perplexity_report
    from nichelm.prepare import prepare
    from nichelm.train import train
    project = load_project(toml)
    t0 = time.monotonic()
    manifest = prepare(project)                  # reused when the data and settings are unchanged
    t1 = time.monotonic()
    shutil.rmtree(project.run_path / "checkpoints", ignore_errors=True)   # a re-run trains from scratch,
    summary = train(project)                                              # not on from an earlier run
    t2 = time.monotonic()
    model, tokenizer, first_id = load_model(project.run_path)
    ppl = perplexity_report(model, tokenizer, {domain: heldout}, first_id)
    g = ppl["groups"][domain]
    return {"documents": len(docs), "chars": sum(len(d["text"]) for d in docs),
            "train_examples": _train_examples(manifest), "final_train_loss": _last(summary, "train_loss"),
            "val_loss": _last(summary, "val_loss"), "perplexity": round(g["perplexity"], 3),
            "bits_per_byte": round(g["bits_per_byte"], 4), "heldout_tokens": g["tokens"],
            "prepare_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1), "eval_s": round(time.monotonic() - t2, 1)}


def _train_examples(manifest) -> int | None:
    try:
        return int(manifest["examples"]["train"])
    except (KeyError, TypeError, ValueError):
        return None


def _last(summary, key):
    value = summary.get(key) if isinstance(summary, dict) else None
    return round(value, 4) if isinstance(value, (int, float)) else None


KEEP = ("id", "text", "domain", "licence", "source")


def run_domain(domain: str, all_docs: dict[str, list[dict]], args) -> dict:
    work = Path(args.work) / domain
    work.mkdir(parents=True, exist_ok=True)
    mine = all_docs[domain]
    heldout = mine[:args.heldout]
    target, i = take_chars(mine, args.heldout, args.target_chars)
    pool, _ = take_chars(mine, i, args.pool_chars)
    for other, docs in all_docs.items():
        if other != domain:
            pool += take_chars(docs, 0, args.pool_chars)[0]
    write_jsonl(work / "pool.jsonl", [{k: d[k] for k in KEEP if k in d} for d in pool])
    write_jsonl(work / "target.jsonl", [{k: d[k] for k in KEEP if k in d} for d in target])
    heldout_texts = [d["text"][:args.heldout_chars] for d in heldout]
    row = {"pool_documents": len(pool), "pool_chars": sum(len(d["text"]) for d in pool),
           "pool_domain_share": round(sum(d["domain"] == domain for d in pool) / len(pool), 4),
           "target_documents": len(target), "heldout_documents": len(heldout),
           "heldout_chars": sum(len(t) for t in heldout_texts), "arms": {}}
    projects, sets = {}, {}
    for method in ("clusters", "dsir"):
        projects[method], sets[method], report = select_arm(work, method, args)
        row["arms"][method] = {"selected_tokens": report["selected"]["tokens"],
                               "domain_share": round(report["per_domain"].get(domain, {}).get("share", 0.0), 4),
                               "kl_reduction": round(report["kl"]["reduction"], 4)}
    sets["random"] = random_arm(pool, row["arms"]["dsir"]["selected_tokens"], 100, args.seed)
    write_jsonl(work / "random.jsonl", [{k: d[k] for k in KEEP if k in d} for d in sets["random"]])
    projects["random"] = write_project(work, "random", RANDOM_SOURCES, args)
    from nichelm.selection.features import tokenize
    row["arms"]["random"] = {"selected_tokens": sum(len(tokenize(d["text"])) for d in sets["random"]),
                             "domain_share": round(sum(d["domain"] == domain for d in sets["random"])
                                                   / max(len(sets["random"]), 1), 4)}
    for arm in ARMS:
        row["arms"][arm].update(train_arm(projects[arm], sets[arm], heldout_texts, domain))
        print(f"{domain} {arm}: {row['arms'][arm]}", file=sys.stderr, flush=True)
    rnd = row["arms"]["random"]["bits_per_byte"]
    row["pays"] = {m: row["arms"][m]["bits_per_byte"] < rnd for m in ("clusters", "dsir")}
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="arxiv,health,legislation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=40, help="held-out target documents (perplexity)")
    ap.add_argument("--heldout-chars", type=int, default=4000, help="characters scored of each held-out document")
    ap.add_argument("--target-chars", type=int, default=400_000, help="target text select matches")
    ap.add_argument("--pool-chars", type=int, default=1_000_000, help="characters of each domain in the pool")
    ap.add_argument("--select-tokens", type=int, default=100_000, help="select.tokens (wordpunct tokens)")
    ap.add_argument("--window-chars", type=int, default=400, help="task.window_chars: characters per example")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--vocab", type=int, default=512)
    # the split is by document (the tag trick's was by window): 10% keeps 9+ val documents in every arm of the
    # recorded run (at 2% or 5% of its ~130 documents the random arm of health had none: prepare refuses that)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="documents kept for the val loss")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of training (0: torch's default)")
    ap.add_argument("--work", default="/tmp/select-pays")
    ap.add_argument("--data", default=str(SHARED), help="the shared generic corpus folder")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    root = Path(args.data)
    skipped = skipped_without(root)
    if skipped:
        return skipped
    names = sorted(p.name.removesuffix(".jsonl.gz") for p in root.glob("*.jsonl.gz"))
    all_docs = {d: read_domain(d, root, args.seed) for d in names}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "data")}
    result = {"settings": settings, "train_tokens_per_run": args.steps * args.batch * args.block,
              "metric": "bits per byte of the held-out target text (each run has its own tokenizer); "
                        "token perplexity beside it", "domains": {}}
    t0 = time.monotonic()
    for domain in args.domains.split(","):
        result["domains"][domain] = run_domain(domain, all_docs, args)
    result["criterion"] = {m: sum(r["pays"][m] for r in result["domains"].values()) for m in ("clusters", "dsir")}
    result["pays"] = all(n >= min(3, len(result["domains"])) for n in result["criterion"].values())
    result["seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
