"""Does selection pay? Pre-train the same small model on a `clusters` selection, a `dsir` selection and a
random generic sample of the same size, then compare their specialized perplexity on the target.

    python bench/select_pays.py [--domains arxiv,health,legislation] [--steps 60] [--out FILE]

The defaults are the recorded run (BENCHMARKS.md): 9 trainings of 60 steps x 16 rows x 128 tokens, about
30 minutes on a busy 2-core CPU (1-4 minutes a training there; far less alone).

For each target domain D of ../shared/data/generic (README there), from D's documents in a seeded order:
--heldout documents of held-out target text (perplexity only), --target-chars of target text (the
`role = "target"` source select matches), then --pool-chars of D in the generic pool; every other domain
adds --pool-chars of its own documents to the pool. Three training sets of the same size are drawn from
the pool: `nichelm select` with method clusters and with method dsir (a project file with the pool as the
`role = "generic"` source and the target as the `role = "target"` source, select.tokens = --select-tokens),
and a seeded random sample of the pool's documents (those of at least select.min_tokens words, as select
requires) with as many wordpunct tokens as the dsir selection. Each set then trains the same model for the
same steps of the same rows (--steps x batch_size x block_size tokens) through the normal path (a project
file, nichelm.prepare.prepare, nichelm.train.train) and is scored with nichelm.perplexity on the held-out
text: token perplexity (each run has its own tokenizer, trained on its own data, as prepare does) and
bits per byte of the text (comparable across tokenizers; the criterion).

Plain-text pre-training through the project format: a project has no language-model task (every example is
prompt(input) + output, and prepare drops examples with an empty input), so each document is cut into
windows of about --window-chars characters at whitespace and each window becomes a `pairs` example whose
input is a unique 6-character tag (meaningless, no domain in it) and whose output is the text: the loss
counts output tokens only, so the model learns p(text | tag), language-model pre-training on the text.

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

ARMS = ("clusters", "dsir", "random")


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
    the bench in the same --work folder reuses the selections: select's fingerprint includes mtimes)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def windows(text: str, size: int) -> list[str]:
    """The text cut into pieces of at most about `size` characters, at whitespace when there is some."""
    out, start = [], 0
    text = text.strip()
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            cut = max(cut, text.rfind("\n", start + size // 2, end))
            end = cut if cut > start else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


def lm_examples(docs: list[dict], size: int) -> list[dict]:
    """`pairs` rows of plain-text pre-training: input a unique tag, output a window of the text."""
    rows = []
    for d in docs:
        for w, piece in enumerate(windows(d["text"], size)):
            tag = hashlib.blake2b(f"{d['id']}\x00{w}".encode(), digest_size=3).hexdigest()
            rows.append({"id": f"{d['id']}#{w}", "input": tag, "output": piece})
    return rows


SELECT_TOML = """run_dir = "{run}"
seed = {seed}

[[sources]]
name = "pool"
path = "pool.jsonl"
format = "jsonl"
role = "generic"
id_field = "id"
licence = "per document (shared generic corpus)"

[[sources]]
name = "target"
path = "target.jsonl"
format = "jsonl"
role = "target"
split = "train"
id_field = "id"
licence = "per document (shared generic corpus)"

[select]
method = "{method}"
tokens = {tokens}
"""

LM_TOML = """run_dir = "{run}"
seed = {seed}

[task]
window_chars = {window}

[[sources]]
name = "{arm}"
path = "{data}"
format = "jsonl"
role = "pairs"
id_field = "id"
licence = "per document (shared generic corpus)"

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
threads = {threads}
compile = false
"""


def select_arm(work: Path, method: str, tokens: int, seed: int) -> tuple[list[dict], dict]:
    """`nichelm select` on the pool: the chosen documents (copies included) and selection.json."""
    from nichelm.config import load_project
    from nichelm.selection import select_project
    toml = work / f"select-{method}.toml"
    toml.write_text(SELECT_TOML.format(run=work / f"select-{method}", seed=seed, method=method, tokens=tokens),
                    encoding="utf-8")
    report = select_project(load_project(toml), log=lambda msg: None)
    with open(report["output"], encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return docs, report


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


def train_arm(work: Path, arm: str, docs: list[dict], heldout: list[str], domain: str, args) -> dict:
    """prepare + train the LM project of one training set; its perplexity on the held-out text."""
    from nichelm.config import load_project
    from nichelm.perplexity import load_model, perplexity_report
    from nichelm.prepare import prepare
    from nichelm.train import train
    data = work / f"lm-{arm}.jsonl"
    write_jsonl(data, lm_examples(docs, args.window_chars))
    toml = work / f"lm-{arm}.toml"
    toml.write_text(LM_TOML.format(run=work / f"lm-{arm}", seed=args.seed, window=args.window_chars + 200, arm=arm,
                                   data=data.name, vocab=args.vocab, preset=args.preset, block=args.block,
                                   steps=args.steps, batch=args.batch, warmup=max(1, args.steps // 10),
                                   threads=args.threads, val=args.val_fraction),
                    encoding="utf-8")
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


def run_domain(domain: str, all_docs: dict[str, list[dict]], root: Path, args) -> dict:
    work = Path(args.work) / domain
    work.mkdir(parents=True, exist_ok=True)
    mine = all_docs[domain]
    heldout = mine[:args.heldout]
    target, i = take_chars(mine, args.heldout, args.target_chars)
    pool, _ = take_chars(mine, i, args.pool_chars)
    for other, docs in all_docs.items():
        if other != domain:
            pool += take_chars(docs, 0, args.pool_chars)[0]
    keep = ("id", "text", "domain", "licence", "source")
    write_jsonl(work / "pool.jsonl", [{k: d[k] for k in keep if k in d} for d in pool])
    write_jsonl(work / "target.jsonl", [{k: d[k] for k in keep if k in d} for d in target])
    heldout_texts = [d["text"][:args.heldout_chars] for d in heldout]
    row = {"pool_documents": len(pool), "pool_chars": sum(len(d["text"]) for d in pool),
           "pool_domain_share": round(sum(d["domain"] == domain for d in pool) / len(pool), 4),
           "target_documents": len(target), "heldout_documents": len(heldout),
           "heldout_chars": sum(len(t) for t in heldout_texts), "arms": {}}
    sets = {}
    for method in ("clusters", "dsir"):
        docs, report = select_arm(work, method, args.select_tokens, args.seed)
        sets[method] = docs
        row["arms"][method] = {"selected_tokens": report["selected"]["tokens"],
                               "domain_share": round(report["per_domain"].get(domain, {}).get("share", 0.0), 4),
                               "kl_reduction": round(report["kl"]["reduction"], 4)}
    sets["random"] = random_arm(pool, row["arms"]["dsir"]["selected_tokens"], 100, args.seed)
    from nichelm.selection.features import tokenize
    row["arms"]["random"] = {"selected_tokens": sum(len(tokenize(d["text"])) for d in sets["random"]),
                             "domain_share": round(sum(d["domain"] == domain for d in sets["random"])
                                                   / max(len(sets["random"]), 1), 4)}
    for arm in ARMS:
        row["arms"][arm].update(train_arm(work, arm, sets[arm], heldout_texts, domain, args))
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
    ap.add_argument("--window-chars", type=int, default=400, help="characters of text per training example")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--val-fraction", type=float, default=0.02, help="training windows kept for the val loss")
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
        result["domains"][domain] = run_domain(domain, all_docs, root, args)
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
