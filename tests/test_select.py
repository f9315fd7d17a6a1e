"""nichelm select (DSIR and cluster importance sampling) and specialized perplexity."""

import gzip
import hashlib
import json
import math
import random
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nichelm.cli import main
from nichelm.config import SelectConfig
from nichelm.selection import Record, list_corpus, select_corpus, write_selection
from nichelm.selection.clusters import quotas, repeat_to_quota, windows
from nichelm.selection.core import BudgetHeap, iter_picks
from nichelm.selection.features import NgramBatch, TokenHashes, log_ratio
from nichelm.selection.records import iter_records
from tests.conftest import ROOT

SHARED_GENERIC = ROOT.parent / "shared" / "data" / "generic"
BENCH = ROOT / "bench"

# Three synthetic "domains" with their own words, plus words they share.
VOCAB = {
    "law": "court statute section shall plaintiff defendant appeal council code provision enacted".split(),
    "med": "patient disease symptoms treatment clinical doctor cancer therapy diagnosis blood".split(),
    "code": "python function return import class module variable loop error string".split(),
}
COMMON = "the a of and to in is that for it with as on by".split()


def make_doc(domain: str, rng: random.Random, words: int = 150) -> str:
    own = VOCAB[domain]
    return " ".join(rng.choice(own) if rng.random() < 0.4 else rng.choice(COMMON) for _ in range(words)) + "."


def make_pool(per_domain: dict[str, int], seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    return [Record("pool", f"{d}-{i}", make_doc(d, rng, rng.randint(120, 260)), "lic", d)
            for d, n in per_domain.items() for i in range(n)]


def chosen(pool: list[Record], selection) -> list[str]:
    return [rec.id for rec, pick in iter_picks(list_corpus(pool), selection) for _ in range(pick.copies)]


def dsir(**kw) -> SelectConfig:
    return SelectConfig(**{"method": "dsir", "fit_chars": 10**9, **kw})


# ------------------------------------------------------------------ features


def test_unigram_buckets_are_the_reference_hash_and_bigrams_stay_in_their_document():
    text_a, text_b = "The Court, in section 2(b): shall appeal!", "Patient's blood -- tested"
    batch = NgramBatch([text_a, text_b], TokenHashes())
    tokens = ["the", "court", ",", "in", "section", "2", "(", "b", "):", "shall", "appeal", "!"]
    assert batch.n_tokens.tolist() == [12, 6]                  # patient ' s blood -- tested
    # the reference: int(sha256(token).hexdigest(), 16) % buckets, for each unigram
    ref = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10_000 for t in tokens]
    assert batch.buckets(10_000)[:12].tolist() == ref
    assert len(batch.buckets(10_000)) == 12 + 6 + 11 + 5          # unigrams, then bigrams within each document
    # a document scores the same alone as in a batch: no bigram joins the end of a to the start of b
    values = np.random.default_rng(0).normal(size=10_000)
    together = batch.doc_sums(values)
    alone = [NgramBatch([t], TokenHashes()).doc_sums(values)[0] for t in (text_a, text_b)]
    assert np.allclose(together, alone)
    assert NgramBatch(["", "word"], TokenHashes()).n_tokens.tolist() == [0, 1]


def test_top_k_mode_is_the_brute_force_top_k_of_the_log_ratio():
    pool = make_pool({"law": 40, "med": 40, "code": 40})
    target = [make_doc("med", random.Random(9 + i)) for i in range(20)]
    sel = select_corpus(list_corpus(pool), target, dsir(documents=25, mode="top_k", min_tokens=0), seed=1,
                        log=lambda m: None)
    hashes = TokenHashes()
    t_counts = NgramBatch(target, hashes).counts(10_000)
    g_counts = NgramBatch([r.text for r in pool], hashes).counts(10_000)
    weights = NgramBatch([r.text for r in pool], hashes).doc_sums(log_ratio(t_counts, g_counts))
    best = {pool[i].id for i in np.argsort(-weights)[:25]}
    assert set(chosen(pool, sel)) == best
    assert all(i.startswith("med-") for i in best)


# ------------------------------------------------------------------ selection behaviour


@pytest.mark.parametrize("method", ["dsir", "clusters"])
def test_finds_the_target_domain_in_a_synthetic_pool(method):
    pool = make_pool({"law": 60, "med": 30, "code": 60})
    target = [make_doc("med", random.Random(100 + i)) for i in range(30)]
    cfg = SelectConfig(method=method, documents=30, min_tokens=0)
    picked = chosen(pool, select_corpus(list_corpus(pool), target, cfg, seed=3, log=lambda m: None))
    assert len(picked) == 30
    assert sum(i.startswith("med-") for i in picked) >= 27, Counter(i.split("-")[0] for i in picked)


@pytest.mark.parametrize("method", ["dsir", "clusters"])
def test_same_seed_same_selection_whatever_the_order_and_batches(method, monkeypatch):
    pool = make_pool({"law": 40, "med": 40, "code": 40})
    target = [make_doc("code", random.Random(50 + i)) for i in range(15)]
    cfg = SelectConfig(method=method, documents=30, min_tokens=0, k=6)

    def run(records, seed):
        return sorted(chosen(records, select_corpus(list_corpus(records), target, cfg, seed, log=lambda m: None)))

    first = run(pool, 5)
    assert run(pool, 5) == first
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    import nichelm.selection.core as core
    monkeypatch.setattr(core, "BATCH_CHARS", 3000)                  # many small batches
    if method == "dsir":                                             # k-means itself depends on the data order
        assert run(shuffled, 5) == first
    assert run(pool, 5) == first
    if method == "clusters":                                         # uniform draws within clusters
        assert run(pool, 6) != first                                 # another seed, another sample


def test_gumbel_sampling_is_without_replacement_and_draws_by_seed():
    # 50 copies of one law text weigh the same: only the Gumbel noise, hence the seed, tells them apart
    rng = random.Random(0)
    law = make_doc("law", rng)
    pool = [Record("pool", f"law-{i}", law, "lic") for i in range(50)] + make_pool({"med": 50, "code": 50})
    target = [make_doc("law", random.Random(7 + i)) for i in range(20)]
    runs = []
    for seed in range(3):
        picked = chosen(pool, select_corpus(list_corpus(pool), target, dsir(documents=20, min_tokens=0), seed,
                                            log=lambda m: None))
        assert len(picked) == len(set(picked)) == 20 and all(i.startswith("law-") for i in picked)
        runs.append(set(picked))
    assert runs[0] != runs[1] != runs[2]
    again = chosen(pool[::-1], select_corpus(list_corpus(pool[::-1]), target, dsir(documents=20, min_tokens=0), 0,
                                       log=lambda m: None))
    assert set(again) == runs[0]                                       # the noise is the seed's, in any order
    top_k = chosen(pool, select_corpus(list_corpus(pool), target, dsir(documents=20, min_tokens=0, mode="top_k"), 0,
                                       log=lambda m: None))
    assert sorted(top_k) == sorted(f"law-{i}" for i in range(20))   # no noise: ties go to the first documents


def test_token_budget_is_the_fewest_best_documents_that_reach_it():
    pool = make_pool({"law": 30, "med": 30})
    target = [make_doc("law", random.Random(i)) for i in range(10)]
    sel = select_corpus(list_corpus(pool), target, dsir(tokens=2000, mode="top_k", min_tokens=0), 0,
                        log=lambda m: None)
    picks = sorted(sel.picks.values(), key=lambda p: p.weight)      # top_k: the key is the weight
    total = sum(p.n_tokens for p in picks)
    assert total >= 2000 > total - picks[0].n_tokens                 # without the worst one, short of the budget


def test_min_tokens_keeps_short_documents_out():
    pool = make_pool({"med": 20}) + [Record("pool", f"short-{i}", "patient disease cancer.", "lic") for i in range(30)]
    target = [make_doc("med", random.Random(i)) for i in range(5)]
    picked = chosen(pool, select_corpus(list_corpus(pool), target, dsir(documents=25, mode="top_k", min_tokens=20),
                                        0, log=lambda m: None))
    assert len(picked) == 20 and not any(i.startswith("short") for i in picked)


def test_clusters_match_the_target_histogram_with_replacement():
    # 6 med documents only, but the target is all med: their cluster must be drawn again and again
    pool = make_pool({"law": 60, "med": 6, "code": 60})
    target = [make_doc("med", random.Random(200 + i)) for i in range(20)]
    sel = select_corpus(list_corpus(pool), target, SelectConfig(method="clusters", documents=30, min_tokens=0, k=6),
                        seed=0, log=lambda m: None)
    picked = chosen(pool, sel)
    assert len(picked) == 30
    assert sum(i.startswith("med-") for i in picked) >= 27
    assert max(p.copies for p in sel.picks.values()) >= 4
    report = write_selection(list_corpus(pool), sel, None, SelectConfig(method="clusters"))
    top = max(sel.clusters, key=lambda c: c["target_share"])
    assert top["log_weight"] > 0 and report["selected"]["distinct_documents"] < 30
    assert abs(sum(c["selected_share"] for c in report["clusters"]) - 1) < 1e-9


def test_cluster_shares_of_a_token_budget_are_token_shares():
    """With select.tokens the target's cluster histogram counts tokens, so the selection's does too."""
    pool = make_pool({"law": 60, "med": 60, "code": 60})
    rng = random.Random(2)
    target = [make_doc("med", rng) for _ in range(20)] + [make_doc("law", rng, 400) for _ in range(20)]
    cfg = SelectConfig(method="clusters", tokens=8000, k=3, min_tokens=0, fit_chars=10**9)
    selection = select_corpus(list_corpus(pool), target, cfg, seed=0, log=lambda m: None)
    report = write_selection(list_corpus(pool), selection, None, cfg)
    tokens = Counter()
    for rec, pick in iter_picks(list_corpus(pool), selection):
        tokens[pick.cluster] += pick.copies * pick.n_tokens
    for row in report["clusters"]:
        assert row["selected_share"] == pytest.approx(tokens[row["cluster"]] / report["selected"]["tokens"])
    assert max(abs(r["selected_share"] - r["target_share"]) for r in report["clusters"]) < 0.1
    domains = report["per_domain"]
    assert domains["code"]["documents"] == 0 and domains["code"]["generic_share"] == pytest.approx(1 / 3)


def test_clusters_with_a_local_sentence_transformers_model(tmp_path, monkeypatch):
    """select.embedding = a model folder: the windows go to SentenceTransformer(folder).encode (a stand-in
    here: no model is downloaded in tests), a document is the mean of its windows."""
    import types
    calls = []

    class FakeModel:
        def __init__(self, path, local_files_only=False):
            calls.append((path, local_files_only))

        def encode(self, texts, normalize_embeddings=False, **kw):
            calls.append(len(texts))
            vecs = np.array([[t.count(w) for w in VOCAB["law"] + VOCAB["med"] + VOCAB["code"]] for t in texts], float)
            return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)

    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeModel))
    pool = make_pool({"law": 40, "med": 20, "code": 40})
    target = [make_doc("med", random.Random(300 + i)) for i in range(15)]
    cfg = SelectConfig(method="clusters", documents=20, min_tokens=0, k=4, embedding=str(tmp_path), window_chars=300)
    picked = chosen(pool, select_corpus(list_corpus(pool), target, cfg, seed=0, log=lambda m: None))
    assert calls[0] == (str(tmp_path), True)
    assert sum(n for n in calls[1:]) > len(pool) + len(target)          # long documents went in as several windows
    assert sum(i.startswith("med-") for i in picked) >= 18


def test_quotas_and_repeats_add_up():
    q = quotas(np.array([3.0, 1.0, 0.0, 2.0]), 10, integer=True)
    assert q.tolist() == [5, 2, 0, 3] and q.sum() == 10
    items = [(0.9, 7, 1, _pick()), (0.5, 3, 1, _pick())]
    out = repeat_to_quota(items, 5)
    assert sorted((o, p.copies) for o, p in out) == [(3, 2), (7, 3)]


def _pick():
    from nichelm.selection.core import Pick
    return Pick(0.0, 10)


def test_windows_cut_only_at_whitespace():
    text = "alpha beta gamma\ndelta " * 50 + "x" * 300
    parts = windows(text, 100)
    assert "".join(parts) == text
    assert all(len(p) <= 100 for p in parts[:-1]) and parts[-1].endswith("x" * 300)


# ------------------------------------------------------------------ streaming, bounded memory


def test_budget_heap_holds_the_budget_not_the_stream():
    heap = BudgetHeap(50)
    rng = random.Random(0)
    keys = [rng.random() for _ in range(20_000)]
    for i, k in enumerate(keys):
        heap.push(k, i, 1)
        assert len(heap.heap) <= 50
    assert sorted(k for k, *_ in heap.items()) == sorted(keys)[-50:]


def _lazy_corpus(n: int):
    def records():
        rng = random.Random(42)
        for i in range(n):
            domain = ("law", "med", "code")[i % 3]
            yield Record("gen", f"{domain}-{i}", make_doc(domain, rng, 100), "lic", domain)
    return records


def _peak(n: int, method: str) -> int:
    target = [make_doc("med", random.Random(i)) for i in range(10)]
    cfg = SelectConfig(method=method, documents=20, min_tokens=0, fit_chars=60_000, k=4)
    tracemalloc.start()
    sel = select_corpus(_lazy_corpus(n), target, cfg, seed=0, log=lambda m: None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(sel.picks) == 20
    return peak


@pytest.mark.parametrize("method", ["dsir", "clusters"])
def test_memory_does_not_grow_with_the_corpus(method, monkeypatch):
    import nichelm.selection.core as core
    monkeypatch.setattr(core, "BATCH_CHARS", 20_000)     # batches (1 MB in real runs) far smaller than the corpus
    _peak(100, method)                 # once untraced-by-the-figures: imports (scikit-learn: ~60 MB) and caches
    small, big = _peak(1000, method), _peak(4000, method)
    assert big < 1.3 * small, (small, big)


# ------------------------------------------------------------------ reading sources


def test_records_from_jsonl_gz_text_and_parquet(tmp_path):
    rows = [{"id": f"r{i}", "text": f"document {i} text", "licence": "CC0", "domain": "news"} for i in range(3)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    recs = list(iter_records(tmp_path / "a.jsonl.gz", "jsonl", name="s", licence="src", id_field="id"))
    assert [(r.id, r.licence, r.domain) for r in recs] == [("r0", "CC0", "news"), ("r1", "CC0", "news"),
                                                            ("r2", "CC0", "news")]
    long = tmp_path / "txt"
    long.mkdir()
    (long / "b.txt").write_text(("word " * 3000 + "\n\n") * 3)
    docs = list(iter_records(long, "text", name="t"))
    assert len(docs) == 2 and "".join(d.text for d in docs) == (long / "b.txt").read_text()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"text": ["one", "two"], "licence": ["L1", "L2"]}), tmp_path / "c.parquet")
    assert [(r.id, r.text, r.licence) for r in iter_records(tmp_path / "c.parquet", "parquet", name="p")] == \
        [("c.parquet:1", "one", "L1"), ("c.parquet:2", "two", "L2")]


def test_bad_jsonl_line_fails_with_its_line_or_is_skipped(tmp_path):
    from nichelm.errors import UserError
    path = tmp_path / "g.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n{"txt": "x"}\n')
    with pytest.raises(UserError, match=r"g.jsonl:2: not valid JSON"):
        list(iter_records(path, "jsonl", name="g"))
    counts = Counter()
    got = list(iter_records(path, "jsonl", name="g", on_bad_record="skip", counts=counts))
    assert [r.text for r in got] == ["fine"] and counts["bad_records"] == 2


def test_generic_corpus_shares_read_from_checkpoints_are_the_whole_pass(tmp_path, monkeypatch):
    """select's tasks each read a contiguous share from a checkpoint of the parent's whole pass (a byte offset
    in a .jsonl / .txt, decompressing a .gz up to it, a row of a parquet): the shares put together are the
    whole pass, with the same ordinals, ids and texts, across files, sources and max_documents."""
    import nichelm.selection as selection
    import nichelm.selection.records as records
    from nichelm.config import Project, SourceConfig
    monkeypatch.setattr(selection, "CHECKPOINT_CHARS", 700)
    monkeypatch.setattr(selection, "MAX_CHECKPOINTS", 16)           # thinned as the pass goes
    monkeypatch.setattr(records, "TEXT_DOC_CHARS", 300)             # text files cut into documents at blank lines
    rng = random.Random(3)
    (tmp_path / "j").mkdir()
    rows = [json.dumps({"text": make_doc("law", rng, 30)}) for _ in range(40)]
    rows[3], rows[7] = "", json.dumps({"text": "  "})              # a blank line and an empty text: no records
    (tmp_path / "j" / "a.jsonl").write_text("\ufeff" + "\n".join(rows) + "\n")
    with gzip.open(tmp_path / "j" / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": make_doc("med", rng, 30)}) + "\n" for _ in range(30)))
    (tmp_path / "t.txt").write_text("".join(make_doc("code", rng, 20) + ("\n\n" if i % 3 == 2 else "\n")
                                            for i in range(60)))
    sources = [SourceConfig(path="j", format="jsonl", role="generic", name="j"),
               SourceConfig(path="t.txt", format="text", role="generic", name="t"),
               SourceConfig(path="j", format="jsonl", role="generic", name="capped", max_documents=25)]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": [make_doc("med", rng, 25) for _ in range(50)]}), tmp_path / "p.parquet",
                       row_group_size=7)
        sources.insert(1, SourceConfig(path="p.parquet", format="parquet", role="generic", name="p"))
    except ImportError:
        pass
    corpus = selection.generic_corpus(Project(sources=sources, base_dir=tmp_path))
    whole = [(o, r.source, r.id, r.text) for o, r in enumerate(corpus())]
    assert len(corpus.checkpoints) <= 16 and corpus.documents == len(whole) and len({s for _, s, _, _ in whole}) >= 3
    assert any(c["offset"] > 0 and c["file"] == 1 for c in corpus.checkpoints)        # inside the .gz
    for tasks in (1, 3, 8):
        shares = corpus.shares(tasks)
        assert len(shares) == tasks and sum(n for _, n in shares) == len(whole)
        read = [(o, r.source, r.id, r.text) for cp, n in shares for o, r in corpus.read_from(cp, n)]
        assert read == whole, tasks
        if tasks > 1:
            assert sum(n > 0 for _, n in shares) >= min(tasks, 3)
    assert {c["source"] for c in corpus.checkpoints} == set(range(len(sources)))    # every source and format
    sizes = [sum(len(r.text) for _, r in corpus.read_from(cp, n)) for cp, n in corpus.shares(3)]
    assert max(sizes) < 1.5 * min(sizes), sizes                                    # about equal characters


# ------------------------------------------------------------------ project and CLI


def _project(tmp_path: Path, select: str = "documents = 20", extra_source: str = "") -> Path:
    pool = make_pool({"law": 40, "med": 20, "code": 40})
    with gzip.open(tmp_path / "generic.jsonl.gz", "wt") as f:
        for r in pool:
            f.write(json.dumps({"id": r.id, "text": r.text, "domain": r.domain, "licence": f"lic-{r.domain}"}) + "\n")
    rng = random.Random(5)
    (tmp_path / "target.jsonl").write_text("".join(json.dumps({"text": make_doc("med", rng)}) + "\n"
                                                   for _ in range(40)))
    proj = tmp_path / "project.toml"
    proj.write_text(f"""
run_dir = "{tmp_path / 'run'}"
[[sources]]
name = "web"
path = "generic.jsonl.gz"
format = "jsonl"
role = "generic"
id_field = "id"
licence = "mixed"
[[sources]]
name = "mine"
path = "target.jsonl"
format = "jsonl"
role = "target"
{extra_source}
[split]
val_fraction = 0.1
test_fraction = 0.2
[select]
min_tokens = 0
{select}
""")
    return proj


def test_select_command_writes_the_selection_and_reuses_it(tmp_path, capsys):
    proj = _project(tmp_path)
    assert main(["select", str(proj)]) == 0
    out = tmp_path / "run" / "select"
    rows = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and sum(r["domain"] == "med" for r in rows) >= 18
    assert {"id", "text", "source", "licence", "cluster", "weight"} <= set(rows[0])
    assert rows[0]["source"] == "web" and rows[0]["licence"].startswith("lic-")
    report = json.loads((out / "selection.json").read_text())
    assert report["per_source"]["web"]["documents"] == 20 and report["kl"]["reduction"] > 0
    assert report["target"]["documents"] < 40                      # the train split only: held-out text stays out
    before = (out / "selected.jsonl").stat().st_mtime_ns
    assert main(["select", str(proj)]) == 0 and "reused" in capsys.readouterr().out
    assert (out / "selected.jsonl").stat().st_mtime_ns == before
    assert main(["select", str(proj), "--set", "select.method=clusters", "--set", "select.k=3"]) == 0
    report = json.loads((out / "selection.json").read_text())
    assert report["method"] == "clusters" and len(report["clusters"]) == 3 and report["top_clusters"]
    page = (out / "selection.html").read_text()                 # the same report, drawn
    assert "per cluster" in page and "Samples of the most-weighted clusters" in page


# sha256 of selected.jsonl and of selection.json (less seconds, fingerprint, output path) that the code before
# the scoring went parallel wrote for these settings on _project's corpus: the tasks must not change a byte
BEFORE_PARALLEL = {
    "documents = 30\nfit_chars = 20000": (
        "bec70417c754af2bc8263d9b2222cdd272f5b19a5fb198811bc5d354cee7249f",
        "102b787c66dbb0545403745cd6ed90252b777b928bb87d189f4d1d246400b5f0"),
    'documents = 30\nfit_chars = 20000\nmode = "top_k"': (
        "bec70417c754af2bc8263d9b2222cdd272f5b19a5fb198811bc5d354cee7249f",
        "bf576d2ee1a83498a83bd03b06e4c12b9fac300ef9a0691759a2131c56cf4e9b"),
    "tokens = 3000\nfit_chars = 20000": (
        "33810ca08547a59be5f14b8b438f38a72ea8580c98c5a4a8b01c89e5c6e6a3ce",
        "f408b23fbfb9ddc0fd88a0c1064f65ab305fa03f73177131439584ecccbb5b4f"),
}
# the same for clusters, written by the code before the assigning went parallel (the 60 documents need copies:
# the corpus has 20 of the target's domain)
BEFORE_PARALLEL.update({
    'documents = 30\nfit_chars = 20000\nmethod = "clusters"\nk = 3': (
        "d3bd49a580649d9ec6fe19b0a3341696f962c9fcc76583208695abc88643d864",
        "12a851da8e1bbc0eb1b6221219c20d2280adc05b4b295c7400fc296e7df38e65"),
    'documents = 60\nfit_chars = 20000\nmethod = "clusters"\nk = 4': (
        "0bbe8fcef6bcbe61bdc12b48b7fc62408bb59f2019752b5431de31c79eae5c45",
        "c947ed55917118d8c65412b7c9a8168af7cae1ecf25d681d6f9a8065c18699a3"),
    'tokens = 3000\nfit_chars = 20000\nmethod = "clusters"\nk = 3': (
        "07bcb9911031989364446a4e22228ae04cd0b6750f98043b1ed2e3cbf630f7dc",
        "421f325c39e9b48063bfae97b673dccffde7f9c4325700cea7a3d99f487f8687"),
})


def _selection_digests(out: Path) -> tuple[str, str]:
    report = json.loads((out / "selection.json").read_text())
    for key in ("seconds", "fingerprint", "output"):
        report.pop(key)
    return (hashlib.sha256((out / "selected.jsonl").read_bytes()).hexdigest(),
            hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest())


@pytest.mark.parametrize("setting", list(BEFORE_PARALLEL))
def test_select_on_tasks_writes_the_bytes_of_one_process(tmp_path, capsys, monkeypatch, setting):
    """dsir's scoring and clusters' assigning shared out to datatrove tasks (each task a contiguous share of the
    corpus, read from a checkpoint of the parent's pass; heaps merged) write what one process writes, and what
    the code wrote before it had tasks."""
    import nichelm.selection as selection
    monkeypatch.setattr(selection, "CHECKPOINT_CHARS", 5000)      # the corpus is 130 kB: shares of ~25 documents
    proj = _project(tmp_path, select=setting + "\nbuckets = 10000")
    out = tmp_path / "run" / "select"
    for flags, tasks in ((["--workers", "1"], 0), (["--workers", "2"], 2), (["--workers", "2", "--tasks", "3"], 3)):
        assert main(["select", str(proj), "--force", *flags]) == 0
        assert (f" in {tasks} tasks;" in capsys.readouterr().err) == bool(tasks), flags
        assert _selection_digests(out) == BEFORE_PARALLEL[setting], flags
        assert not (out / ".work").exists()                        # the tasks' files go once the selection is written


def test_cluster_embedding_and_assignment_rebuilt_from_saved_arrays_are_identical():
    """The tasks rebuild the parent's fitted TF-IDF + SVD from npz arrays (no pickle) and apply them with numpy,
    and assign with nearest(): the embeddings are those of the fitted scikit-learn objects to the bit, and the
    clusters k-means' own."""
    import io

    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    from nichelm.selection.clusters import TfidfEmbedder, _windows_of, nearest
    pool = [r.text for r in make_pool({"law": 30, "med": 30, "code": 30})]
    fit_texts = pool[::2]
    fitted = TfidfEmbedder(300, 0, TokenHashes(), dims=16).fit(fit_texts)
    pool.append("Zyx qwv")                                   # no word the fit saw: a row of zeros
    buf = io.BytesIO()
    np.savez(buf, **fitted.arrays())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        rebuilt = TfidfEmbedder(300, 0, TokenHashes(), dims=16).load({k: z[k] for k in z.files})
    emb = fitted.embed(pool)
    assert np.array_equal(rebuilt.embed(pool), emb)
    # ... and they are what scikit-learn's fitted objects themselves compute (windows 300 chars: several a document)
    x, _ = fitted._matrix(_windows_of(fit_texts, 300)[0])
    x = x[:, np.unique(x.indices)]
    tfidf = TfidfTransformer(sublinear_tf=True).fit(x)
    svd = TruncatedSVD(n_components=16, random_state=0).fit(tfidf.transform(x))
    wins, owner = _windows_of(pool, 300)
    assert len(wins) > 2 * len(pool)
    direct = svd.transform(tfidf.transform(fitted._matrix(wins)[0][:, fitted.columns]))
    assert np.array_equal(rebuilt._transform(fitted._matrix(wins)[0][:, fitted.columns]), direct)
    kmeans = MiniBatchKMeans(n_clusters=5, random_state=0, n_init=1).fit(emb)
    labels = nearest(emb, kmeans.cluster_centers_)
    assert np.array_equal(labels, kmeans.predict(emb)) and len(set(labels.tolist())) == 5
    assert [int(nearest(emb[i:i + 1], kmeans.cluster_centers_)[0]) for i in range(len(emb))] == labels.tolist()


def test_select_tasks_never_reuse_results_of_another_fit(tmp_path):
    """A killed run leaves heaps and completion markers; a run with another fit (here: another seed) must
    score again, not merge them."""
    from nichelm.selection.parallel import heap_path
    setting = "documents = 30\nfit_chars = 20000"
    proj = _project(tmp_path, select=setting + "\nbuckets = 10000")
    work = tmp_path / "run" / "select" / ".work"
    assert main(["select", str(proj), "--workers", "2", "--set", "select.seed=7"]) == 0
    stale = {}
    import nichelm.selection.parallel as par
    original = par.TaskScorer.__call__

    def keep(self, corpus, spec, heap, log):                      # as if killed after the tasks: .work stays
        original(self, corpus, spec, heap, log)
        stale.update({rank: heap_path(work, rank).read_bytes() for rank in range(self.tasks)})
        raise KeyboardInterrupt
    par.TaskScorer.__call__ = keep
    try:
        assert main(["select", str(proj), "--workers", "2", "--force", "--set", "select.seed=7"]) == 130
    finally:
        par.TaskScorer.__call__ = original
    assert len(list((work / "logs" / "completions").glob("*"))) == 2 and stale
    assert main(["select", str(proj), "--workers", "2"]) == 0     # the project's seed: another fit
    assert _selection_digests(tmp_path / "run" / "select") == BEFORE_PARALLEL[setting]


def test_select_on_slurm_dry_run_writes_the_script_and_no_selection(tmp_path, capsys):
    proj = _project(tmp_path)
    assert main(["select", str(proj), "--executor", "slurm", "--partition", "cpu", "--dry-run"]) == 0
    assert "nothing submitted" in capsys.readouterr().out
    work = tmp_path / "run" / "select" / ".work"
    assert "launch_pickled_pipeline" in (work / "slurm" / "score.sbatch").read_text()
    assert (work / "spec.npz").is_file() and not (tmp_path / "run" / "select" / "selection.json").exists()


@pytest.mark.parametrize("setting, message", [
    ('method = "best"', "'select.method' is 'best'; use dsir or clusters"),
    ('documents = 5\nmethod = "clusters"\nmode = "top_k"', "top_k\" is for method dsir"),
    ("documents = 5\ntokens = 100", "select.documents and select.tokens are both set"),
    ("min_tokens = 0", "need a selection size"),
    ("fraction = 1.5", "'select.fraction' is 1.5; it must be from 0"),
    ("buckets = 3\ndocuments = 5", "'select.buckets' is 3"),
    ('documents = 5\nmethod = "clusters"\nembedding = "no/such/model"', "is not a folder"),
])
def test_bad_select_settings_are_one_line_errors(tmp_path, capsys, setting, message):
    proj = _project(tmp_path, select=setting.replace("min_tokens = 0", ""))
    assert main(["select", str(proj)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith(f"nichelm: error: {proj}")


def test_generic_source_of_a_format_select_cannot_read(tmp_path, capsys):
    proj = _project(tmp_path)
    proj.write_text(proj.read_text().replace('format = "jsonl"\nrole = "generic"', 'format = "csv"\nrole = "generic"'))
    assert main(["select", str(proj)]) == 2
    assert "'sources[0].format' is 'csv', which a generic source cannot have" in capsys.readouterr().err


# ------------------------------------------------------------------ against the reference and the shared corpus


def _bench(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def _needs_generic():
    if not SHARED_GENERIC.is_dir():
        pytest.skip("../shared/data/generic not present (fresh clone): the real-corpus checks need it")


@pytest.mark.shared
def test_dsir_chooses_what_the_reference_chooses():
    _needs_generic()
    pytest.importorskip("data_selection", reason="the reference (pip install data-selection) is not installed")
    result = _bench("select_reference").main(["--docs", "500", "--select", "100", "--target-docs", "150",
                                              "--targets", "health"])
    health = result["targets"]["health"]
    assert health["overlap"] >= 0.9, health
    assert health["nichelm_docs_per_s_per_core"] > health["reference_docs_per_s_per_core"]


@pytest.mark.shared
@pytest.mark.parametrize("method, share", [("dsir", 0.9), ("clusters", 0.85)])
def test_finds_each_domain_of_the_shared_corpus_small(method, share):
    _needs_generic()
    bench = _bench("select_domains")
    docs = {d: bench.read_domain(d)[:400] for d in ("arxiv", "health", "legislation", "stackexchange")}
    for domain in ("arxiv", "legislation"):
        row = bench.run_domain(domain, docs, 100, method, seed=0)
        assert row["target_domain_share"] >= share, (domain, row)
        assert row["kl_reduction"] > 0


# ------------------------------------------------------------------ specialized perplexity


@pytest.mark.shared
def test_select_pays_bench_runs_end_to_end_small(tmp_path):
    """bench/select_pays.py at a toy size: three training sets of one size through select, prepare and
    train, scored on the held-out target text (the figures themselves need the full-size run)."""
    _needs_generic()
    result = _bench("select_pays").main(
        ["--domains", "health", "--pool-chars", "60000", "--target-chars", "30000", "--select-tokens", "4000",
         "--heldout", "3", "--heldout-chars", "500", "--val-fraction", "0.2", "--steps", "2", "--batch", "2",
         "--block", "64", "--work", str(tmp_path), "--data", str(SHARED_GENERIC)])
    arms = result["domains"]["health"]["arms"]
    assert set(arms) == {"clusters", "dsir", "random"}
    assert arms["dsir"]["domain_share"] > arms["random"]["domain_share"]
    # random draws as many tokens as dsir chose, give or take a document; clusters fills per-cluster quotas
    # (at this toy size a few long documents overshoot them; at the bench's size they are within 2%)
    assert abs(arms["random"]["selected_tokens"] / arms["dsir"]["selected_tokens"] - 1) < 0.2
    assert min(a["selected_tokens"] for a in arms.values()) >= 4000
    assert all(a["bits_per_byte"] > 0 and a["heldout_tokens"] > 0 for a in arms.values())
    for arm in ("dsir", "random"):           # plain-text pre-training: the language-model task, the selection as
        assert json.loads((tmp_path / "health" / f"lm-{arm}" / "task.json").read_text())["type"] == "language-model"
    manifest = json.loads((tmp_path / "health" / "lm-dsir" / "data" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["selected"]         # its one clean source


def test_select_scale_bench_runs_end_to_end_small(tmp_path):
    """bench/select_scale.py at toy sizes on a small synthetic corpus: repeated, shuffled passes with unique
    ids, select run as a command with its memory and CPU measured (the figures need the 0.1 / 1 GB run)."""
    bench = _bench("select_scale")
    assert "skipped" in bench.main(["--data", str(tmp_path / "absent")])
    data = tmp_path / "data"
    data.mkdir()
    for domain in ("law", "med", "code"):
        with gzip.open(data / f"{domain}.jsonl.gz", "wt") as f:
            for r in make_pool({domain: 100}):
                f.write(json.dumps({"id": r.id, "text": r.text, "domain": r.domain, "licence": "lic"}) + "\n")
    result = bench.main(["--sizes", "0.001,0.003", "--methods", "dsir", "--target", "med", "--out",
                         str(tmp_path / "out"), "--data", str(data)])
    small, big = result["runs"]["dsir"]
    assert 0.5e6 < small["generic_mb"] * 1e6 <= 1e6 and big["generic_documents"] > 2 * small["generic_documents"]
    corpus = result["corpora"]["0.003"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / "generic_0.003gb.jsonl").open()]
    assert corpus["passes"] > 2 and len(ids) == len(set(ids)) == corpus["documents"] == big["generic_documents"]
    assert small["peak_rss_mb"] > 50 and big["cpu_s"] > 0 and big["kl_reduction"] > 0
    assert result["acceptance"]["dsir"]["big_peak_mb"] == big["peak_rss_mb"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch
    from tests.test_apply import build_run
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("ppl"), "llama")


def test_perplexity_windows_score_every_token_once():
    from nichelm.perplexity import windows as ppl_windows
    ids = list(range(100, 141))                       # a first id + 40 tokens to score
    for block in (8, 16, 64):
        scored = []
        for inp, tgt, n in ppl_windows(ids, block):
            assert len(inp) == len(tgt) <= block and tgt == ids[ids.index(inp[0]) + 1:][:len(tgt)]
            scored += tgt[len(tgt) - n:]
        assert scored == ids[1:]


def test_perplexity_of_a_tiny_model_is_its_mean_token_nll(tiny_run):
    import torch
    from nichelm.data.tokenizer import encode_text
    from nichelm.perplexity import load_model, perplexity_report, text_nll
    model, tok, first = load_model(tiny_run)
    text = "The committee met at the town hall on Monday evening."
    (nll, n), = text_nll(model, tok, [text], first)
    ids = [first, *encode_text(tok, text)]
    assert n == len(ids) - 1 and len(ids) <= model.cfg.block_size
    with torch.no_grad():                             # one forward pass over the whole text, by hand
        logits, _ = model(torch.tensor([ids[:-1]]))
        direct = -torch.log_softmax(logits[0].double(), -1)[torch.arange(n), torch.tensor(ids[1:])].sum()
    assert math.isclose(nll, float(direct), rel_tol=1e-5)
    # a long text goes through several windows and still scores each token once
    long = " ".join([text] * 40)
    (_, n_long), = text_nll(model, tok, [long], first)
    assert n_long == len(encode_text(tok, long)) > model.cfg.block_size
    report = perplexity_report(model, tok, {"a": [text], "b": [long, text]}, first)
    assert set(report["groups"]) == {"a", "b"} and report["tokens"] == n + n_long + n
    mean = (report["groups"]["a"]["nll"] + report["groups"]["b"]["nll"]) / 2
    assert math.isclose(report["macro_perplexity"], math.exp(mean))
    assert 1 < report["groups"]["a"]["perplexity"] < model.cfg.vocab_size


def test_evaluate_perplexity_cli_adds_to_report_json(tiny_run, tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in [
        ("The prisoner was brought up on remand.", "court"), ("A large number of persons assembled.", "town")]))
    out = tmp_path / "ev"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"cer_after": 0.1}))
    assert main(["evaluate", "--perplexity", "--data", str(data), "--model", str(tiny_run), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["cer_after"] == 0.1 and set(report["perplexity"]["groups"]) == {"court", "town"}
    assert "macro (exp mean NLL)" in capsys.readouterr().out
    page = (out / "report.html").read_text(encoding="utf-8")        # the HTML report shows the figures too
    section = page[page.index("<h2>Specialized perplexity</h2>"):]
    assert "<td>court</td>" in section and f"{report['perplexity']['macro_perplexity']:,.3f}" in section
    # a CER evaluation written into the same folder later keeps the perplexity it finds there
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "Tbe prisoner was brougbt up.", "output": "The prisoner was brought up."}) + "\n")
    assert main(["evaluate", "--data", str(pairs), "--format", "jsonl", "--model", str(tiny_run), "--out", str(out)]) == 0
    kept = json.loads((out / "report.json").read_text())
    assert "cer_before" in kept and kept["perplexity"] == report["perplexity"]
    assert main(["evaluate", "--perplexity", "--data", str(tmp_path / "nothing.jsonl"), "--model", str(tiny_run)]) == 2
    # a project without --data: the test split of its target (here the gold side of its clean and pairs sources)
    assert main(["evaluate", str(tiny_run.parent / "project.toml"), "--perplexity"]) == 0
    report = json.loads((tiny_run / "eval" / "report.json").read_text())["perplexity"]
    assert set(report["groups"]) == {"clean", "pairs"} and report["data"] == "the project's target, test split"


def test_selected_source_is_a_clean_source_prepare_can_read(tmp_path):
    from nichelm.config import load_project
    from nichelm.data.readers import read_documents
    from nichelm.errors import UserError
    from nichelm.selection import select_project, selected_source
    proj = _project(tmp_path)
    project = load_project(proj)
    with pytest.raises(UserError, match="not selected yet; run `nichelm select"):
        selected_source(project)
    select_project(project, log=lambda m: None)
    src = selected_source(project)
    assert src.role == "clean" and "lic-med" in src.licence
    docs = read_documents(Path(src.path), src.format, input_field=src.input_field, output_field=src.output_field,
                          id_field=src.id_field)
    assert len(docs) == 20 and all(seg.input is None for d in docs for seg in d.segments)
    with pytest.raises(UserError, match="other \\[select\\] settings or sources; run `nichelm select"):
        selected_source(load_project(proj, ["select.documents=25"]))


def test_selection_takes_the_generic_sources_split_when_they_agree(tmp_path):
    """split = "train" on the generic sources keeps selected text out of val/test (the task's real documents
    stay the measure); without it the selection is split by document like any source."""
    from nichelm.config import load_project
    from nichelm.selection import select_project, selected_source
    proj = _project(tmp_path)
    select_project(load_project(proj), log=lambda m: None)
    assert selected_source(load_project(proj)).split == "auto"
    pinned = load_project(proj, ["sources.0.split=train"])
    select_project(pinned, log=lambda m: None)
    assert selected_source(pinned).split == "train"


def test_prepare_uses_the_selection_not_the_generic_corpus(tmp_path, capsys):
    """prepare selects first (the same selection `nichelm select` makes, reused when up to date), then reads it
    as one clean source in place of the generic sources (never the whole generic corpus)."""
    proj = _project(tmp_path, extra_source='[[sources]]\nname = "pairs"\npath = "target.jsonl"\nformat = "jsonl"\n'
                                           'role = "clean"\noutput_field = "text"')
    assert main(["prepare", str(proj), "--workers", "2"]) == 0
    assert "prepare: selected 20 generic documents" in capsys.readouterr().err
    by_prepare = (tmp_path / "run" / "select" / "selected.jsonl").read_bytes()
    assert main(["select", str(proj), "--force"]) == 0                      # the command alone: the same bytes
    assert (tmp_path / "run" / "select" / "selected.jsonl").read_bytes() == by_prepare
    assert main(["prepare", str(proj)]) == 0
    assert "prepare: selected" not in capsys.readouterr().err                # up to date: reused, not redone
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["sources"]]
    assert names == ["pairs", "selected"]               # web and mine (generic, target) are not task data
    selected = next(s for s in manifest["sources"] if s["name"] == "selected")
    assert selected["documents"] == 20


def test_selection_provenance_reaches_the_manifest_and_the_model_card(tmp_path, capsys):
    """Each selected document keeps its source, id, cluster, weight and licence; the manifest records the
    sha256 of the selected.jsonl prepare read and selection.json names the same file; the model card lists
    the generic sources with their shares of the selection and the chosen documents' licences."""
    from nichelm.export import load_run, model_card
    proj = _project(tmp_path, select='documents = 20\nmethod = "clusters"\nk = 3',
                    extra_source='[[sources]]\nname = "pairs"\npath = "target.jsonl"\nformat = "jsonl"\n'
                                 'role = "clean"\noutput_field = "text"')
    assert main(["select", str(proj)]) == 0
    sel_dir, run = tmp_path / "run" / "select", tmp_path / "run"
    rows = [json.loads(line) for line in (sel_dir / "selected.jsonl").read_text().splitlines()]
    assert rows and all(r["source"] == "web" and r["id"] and isinstance(r["cluster"], int)
                        and isinstance(r["weight"], float) and r["licence"] == f"lic-{r['domain']}" for r in rows)
    assert main(["prepare", str(proj)]) == 0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    used = next(s for s in manifest["sources"] if s["name"] == "selected")
    report = json.loads((sel_dir / "selection.json").read_text())
    digest = hashlib.sha256((sel_dir / "selected.jsonl").read_bytes()).hexdigest()
    assert used["sha256"] == report["output_sha256"] == digest and used["path"] == str(sel_dir / "selected.jsonl")
    ids = {r["id"] for r in rows}
    examples = [json.loads(line) for line in (run / "data" / "examples.train.jsonl").read_text().splitlines()]
    from_selection = [e for e in examples if e["source"] == "selected"]
    assert from_selection and all(e["doc_id"] in ids for e in from_selection)   # each example traces to a row
    assert main(["train", str(proj), "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                 "--set", "model.block_size=64"]) == 0
    card = model_card(load_run(run))
    licences = Counter(r["licence"] for r in rows)
    line = next(x for x in card.splitlines() if x.startswith("| web |"))
    assert line.startswith(f"| web | 100 | {len(rows)} | 100.0% |")
    assert all(f"{lic} ({n})" in line for lic, n in licences.items())
    assert "## Selected generic data" in card and digest in card and "method `clusters`" in card.lower()
    # a selection made again after prepare is not the one trained on: the card says so, and lists no shares
    assert main(["select", str(proj), "--set", "select.documents=21", "--set", "select.method=clusters",
                 "--set", "select.k=3"]) == 0
    card = model_card(load_run(run))
    assert "describes another selection" in card and "| web |" not in card
