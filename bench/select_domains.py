"""Does select find the domain? Each domain of ../shared/data/generic in turn is the target.

    python bench/select_domains.py [--others 1000] [--methods dsir,clusters] [--domains all] [--buckets N]

For each domain D: its documents in a seeded order are cut in two halves; one half goes into a
pool with --others documents (a seeded sample) of every other domain, the other half is the
target. select then chooses as many documents as the pool holds of D (default settings: Gumbel
top-k sampling for dsir, k scaled to the pool for clusters, seed 0), except min_tokens: 0 by default
here (--min-tokens), since with DSIR's 100 no selection could be all of D where D has shorter
documents (17% of legislation's sections are under 100 tokens). Reported per domain and
method: the share of the selection that is of domain D (criteria: dsir >= 0.95, clusters >= 0.90,
for every domain), DSIR's KL reduction over hashed n-grams, and CPU seconds. With --reference, the
reference implementation (package data-selection, Gumbel sampling, same min_tokens) runs on the
same pools too and its share is reported beside dsir's (slow: it featurizes in Python). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_reference import SHARED, _key, read_domain, skipped_without, split_domain, write_jsonl  # noqa: E402

CRITERIA = {"dsir": 0.95, "clusters": 0.90}


def run_domain(domain: str, docs: dict[str, list[dict]], others: int, method: str, seed: int,
               min_tokens: int = 0, buckets: int = 0, mode: str = "sample") -> dict:
    from nichelm.config import SelectConfig
    from nichelm.selection import Record, list_corpus, select_corpus, write_selection
    pool_half, target_half = split_domain(docs[domain], seed)
    pool = list(pool_half)
    for other, items in docs.items():
        if other != domain:
            pool += sorted(items, key=lambda d: _key(seed, d["id"]))[:others]
    records = [Record("pool", d["id"], d["text"], d.get("licence", ""), d["domain"]) for d in pool]
    corpus = list_corpus(records)
    cfg = SelectConfig(method=method, documents=len(pool_half), min_tokens=min_tokens, mode=mode)
    if buckets:                                   # else select.buckets' default
        cfg.buckets = buckets
    t0 = time.process_time()
    selection = select_corpus(corpus, [d["text"] for d in target_half], cfg, seed=seed, log=lambda msg: None)
    report = write_selection(corpus, selection, None, cfg)       # the report only: no file
    cpu = time.process_time() - t0
    share = report["per_domain"].get(domain, {}).get("share", 0.0)
    return {"target_domain_share": round(share, 4), "selected": report["selected"]["documents"],
            "distinct": report["selected"]["distinct_documents"], "pool_documents": len(pool),
            "pool_domain_documents": len(pool_half),
            "kl_reduction": round(report["kl"]["reduction"], 4), "kl_target_vs_generic":
            round(report["kl"]["target_vs_generic"], 4), "top_other_domains": Counter(
                {d: s["documents"] for d, s in report["per_domain"].items() if d != domain}).most_common(3),
            "buckets": cfg.buckets, "cpu_s": round(cpu, 1), **({"k": report["k"]} if "k" in report else {})}


def reference_share(domain: str, docs: dict[str, list[dict]], others: int, seed: int, min_tokens: int) -> float:
    """The reference's share of domain D on the pool run_domain builds (Gumbel sampling, numpy seeded)."""
    import tempfile

    import numpy as np
    from data_selection import HashedNgramDSIR
    pool_half, target_half = split_domain(docs[domain], seed)
    pool = list(pool_half)
    for other, items in docs.items():
        if other != domain:
            pool += sorted(items, key=lambda d: _key(seed, d["id"]))[:others]
    with tempfile.TemporaryDirectory(prefix="select-domains-") as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "pool.jsonl", pool)
        write_jsonl(tmp / "target.jsonl", target_half)
        np.random.seed(seed)
        dsir = HashedNgramDSIR([str(tmp / "pool.jsonl")], [str(tmp / "target.jsonl")], cache_dir=str(tmp / "cache"),
                               num_proc=1, min_example_length=min_tokens)
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
        dsir.resample(out_dir=str(tmp / "out"), num_to_sample=len(pool_half), cache_dir=str(tmp / "resample"))
        ids = [json.loads(line)["id"] for p in (tmp / "out").glob("*.jsonl") for line in p.open()]
    domain_of = {d["id"]: d["domain"] for d in pool}
    return round(sum(domain_of[i] == domain for i in ids) / max(len(ids), 1), 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--others", type=int, default=1000, help="documents of each other domain in the pool")
    ap.add_argument("--methods", default="dsir,clusters")
    ap.add_argument("--domains", default="all", help="comma-separated target domains (default: every domain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=0, help="documents shorter than this are never chosen")
    ap.add_argument("--buckets", type=int, default=0, help="dsir's hashed n-gram buckets (default 0: "
                                                          "select.buckets' default)")
    ap.add_argument("--mode", default="sample", choices=("sample", "top_k"),
                    help="dsir's select.mode: Gumbel top-k sampling (default) or deterministic top_k")
    ap.add_argument("--reference", action="store_true", help="also run data-selection's DSIR on each pool (slow)")
    ap.add_argument("--data", default=str(SHARED), help="the shared generic corpus folder")
    args = ap.parse_args(argv)
    root = Path(args.data)
    skipped = skipped_without(root)
    if skipped:
        return skipped
    names = sorted(p.name.removesuffix(".jsonl.gz") for p in root.glob("*.jsonl.gz"))
    docs = {d: read_domain(d, root) for d in names}
    targets = names if args.domains == "all" else args.domains.split(",")
    result = {"others_per_domain": args.others, "seed": args.seed, "min_tokens": args.min_tokens,
              "mode": args.mode, "methods": {}}
    for method in args.methods.split(","):
        rows = {}
        for domain in targets:
            rows[domain] = run_domain(domain, docs, args.others, method, args.seed, args.min_tokens, args.buckets,
                                        args.mode)
            if args.reference and method == "dsir":
                rows[domain]["reference_share"] = reference_share(domain, docs, args.others, args.seed,
                                                                  args.min_tokens)
            print(f"{method} {domain}: {rows[domain]}", file=sys.stderr)
        worst = min(r["target_domain_share"] for r in rows.values())
        result["methods"][method] = {"domains": rows, "min_share": worst,
                                     f"criterion >= {CRITERIA.get(method, 0.9)}": worst >= CRITERIA.get(method, 0.9)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
