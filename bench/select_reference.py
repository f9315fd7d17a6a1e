"""nichelm's dsir against the reference implementation (package data-selection): same selection, faster?

    python bench/select_reference.py [--docs 2000] [--select 400] [--targets health,legislation,arxiv]

Inputs: a pool of --docs generic documents, equal parts of several domains of ../shared/data/generic
(a seeded sample of each), written to one jsonl file; for each target domain, a target of other
documents of that domain. Both implementations read the same files with the same features
(wordpunct uni+bigrams, 10,000 buckets, documents under 100 tokens never chosen) and choose the
--select top-weighted documents (top_k mode: no noise): the reference as its README runs it
(HashedNgramDSIR: fit_importance_estimator on all tokens, compute_importance_weights, resample
top_k) in one process (num_proc=1), nichelm with select_corpus. Reported per target: the overlap of
the two selections (share of the reference's documents nichelm also chose; criterion >= 0.95), and
documents/s per core of each (documents of the pool / CPU seconds of the process, so other load on
the machine counts less than in wall time; criterion: nichelm >= 5x). Prints one JSON object.

Needs the package data-selection (pip install data-selection; a benchmark dependency only).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "generic"
POOL_DOMAINS = ("arxiv", "health", "legislation", "wikipedia", "stackexchange")


def _key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{doc_id}".encode()).hexdigest()


def skipped_without(root: Path) -> dict | None:
    """What a selection bench prints and returns when the shared generic corpus is absent; None when present."""
    if root.is_dir():
        return None
    result = {"skipped": f"{root} not present (fresh clone without ../shared): nothing to measure"}
    print(json.dumps(result))
    return result


def read_domain(domain: str, root: Path = SHARED) -> list[dict]:
    with gzip.open(root / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def split_domain(docs: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """The documents in a seeded order, cut in two halves (pool side, target side)."""
    ordered = sorted(docs, key=lambda d: _key(seed, d["id"]))
    return ordered[::2], ordered[1::2]


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"], "domain": d["domain"]}, ensure_ascii=False) + "\n")


def run_reference(pool: Path, target: Path, k: int, work: Path) -> tuple[list[str], float]:
    from data_selection import HashedNgramDSIR
    t0 = time.process_time()
    dsir = HashedNgramDSIR([str(pool)], [str(target)], cache_dir=str(work / "cache"), num_proc=1,
                           ngrams=2, num_buckets=10_000, tokenizer="wordpunct", min_example_length=100)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    dsir.resample(out_dir=str(work / "out"), num_to_sample=k, cache_dir=str(work / "resample"), top_k=True)
    cpu = time.process_time() - t0
    ids = [json.loads(line)["id"] for p in sorted((work / "out").glob("*.jsonl")) for line in p.open()]
    return ids, cpu


def run_nichelm(pool: Path, target: Path, k: int) -> tuple[list[str], float]:
    from nichelm.config import SelectConfig
    from nichelm.selection import select_corpus
    from nichelm.selection.core import iter_picks
    from nichelm.selection.records import iter_records
    t0 = time.process_time()
    corpus = lambda: iter_records(pool, "jsonl", name="pool", id_field="id")      # noqa: E731
    target_texts = [r.text for r in iter_records(target, "jsonl", name="target", id_field="id")]
    cfg = SelectConfig(method="dsir", mode="top_k", documents=k, buckets=10_000, min_tokens=100,
                       fit_chars=10**12)                    # fit on every token, as the reference here
    selection = select_corpus(corpus, target_texts, cfg, seed=0, log=lambda msg: None)
    ids = [rec.id for rec, _ in iter_picks(corpus, selection)]
    return ids, time.process_time() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000, help="generic pool size (equal parts of 5 domains)")
    ap.add_argument("--select", type=int, default=400, help="documents to choose")
    ap.add_argument("--target-docs", type=int, default=400, help="target documents")
    ap.add_argument("--targets", default="health,legislation,arxiv", help="target domains, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(SHARED), help="the shared generic corpus folder")
    args = ap.parse_args(argv)
    root = Path(args.data)
    skipped = skipped_without(root)
    if skipped:
        return skipped
    per = args.docs // len(POOL_DOMAINS)
    halves = {d: split_domain(read_domain(d, root), args.seed) for d in POOL_DOMAINS}
    pool = [doc for d in POOL_DOMAINS for doc in halves[d][0][:per]]
    result = {"pool_documents": len(pool), "pool_chars": sum(len(d["text"]) for d in pool), "select": args.select,
              "features": "wordpunct uni+bigrams, 10000 buckets, min 100 tokens, top_k", "targets": {}}
    with tempfile.TemporaryDirectory(prefix="select-ref-") as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "pool.jsonl", pool)
        for domain in args.targets.split(","):
            target = halves[domain][1][:args.target_docs]
            write_jsonl(tmp / f"target-{domain}.jsonl", target)
            work = tmp / domain
            work.mkdir()
            ref_ids, ref_cpu = run_reference(tmp / "pool.jsonl", tmp / f"target-{domain}.jsonl", args.select, work)
            our_ids, our_cpu = run_nichelm(tmp / "pool.jsonl", tmp / f"target-{domain}.jsonl", args.select)
            overlap = len(set(ref_ids) & set(our_ids)) / max(len(ref_ids), 1)
            domain_of = {d["id"]: d["domain"] for d in pool}
            result["targets"][domain] = {
                "overlap": round(overlap, 4), "reference_selected": len(ref_ids), "nichelm_selected": len(our_ids),
                "reference_docs_per_s_per_core": round(len(pool) / ref_cpu, 1),
                "nichelm_docs_per_s_per_core": round(len(pool) / our_cpu, 1),
                "speedup": round(ref_cpu / our_cpu, 2),
                "target_domain_share": {name: sum(domain_of[i] == domain for i in ids) / max(len(ids), 1)
                                        for name, ids in (("reference", ref_ids), ("nichelm", our_ids))},
            }
            print(f"{domain}: {result['targets'][domain]}", file=sys.stderr)
    targets = result["targets"].values()
    result["min_overlap"] = min(t["overlap"] for t in targets)
    result["min_speedup"] = min(t["speedup"] for t in targets)
    result["criteria"] = {"overlap >= 0.95": result["min_overlap"] >= 0.95, "speedup >= 5": result["min_speedup"] >= 5}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
