"""Issue 14: the partition of the generic corpus by k-means cluster (select.partition) and SLM-mix on it
(one expert per cluster file, `nichelm specialize --pick-expert` takes the target's most frequent cluster's)."""

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nichelm.cli import main
from nichelm.config import load_project
from nichelm.errors import UserError
from nichelm.selection.features import NgramBatch, TokenHashes
from tests.conftest import ROOT
from tests.test_select import BEFORE_PARALLEL, _project

CLUSTERS = 'documents = 30\nfit_chars = 20000\nmethod = "clusters"\nk = 3'     # a BEFORE_PARALLEL setting
PARTITION = ["--set", "select.partition=true"]
EXAMPLE = ROOT / "examples" / "slm_mix"


def _generic(tmp_path: Path) -> dict[str, dict]:
    with gzip.open(tmp_path / "generic.jsonl.gz", "rt") as f:
        return {row["id"]: row for row in map(json.loads, f)}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_partition_puts_every_eligible_document_in_its_cluster_file_once(tmp_path):
    """Every generic document of min_tokens or more is in exactly one cluster file, as selected.jsonl writes it
    but without the weight (the target's); a selected document is in the file of the cluster selected.jsonl gives it;
    selection.json lists each file's documents, tokens and sha256; the saved fit places the target as select did."""
    from nichelm.selection import target_records
    from nichelm.selection.clusters import ClusterFit
    proj = _project(tmp_path, select=CLUSTERS + "\nbuckets = 10000")
    assert main(["select", str(proj), *PARTITION, "--set", "select.min_tokens=150"]) == 0
    out = tmp_path / "run" / "select"
    report = json.loads((out / "selection.json").read_text())
    generic = _generic(tmp_path)
    tokens = dict(zip(generic, NgramBatch([r["text"] for r in generic.values()], TokenHashes()).n_tokens.tolist()))
    eligible = {i for i, n in tokens.items() if n >= 150}
    assert 0 < len(eligible) < len(generic)                          # min_tokens keeps some out

    table = report["partition"]["clusters"]
    assert [r["cluster"] for r in table] == [0, 1, 2] and report["partition"]["documents"] == len(eligible)
    seen, cluster_of = Counter(), {}
    for row in table:
        path = out / "clusters" / row["file"]
        lines = path.read_text().splitlines()
        docs = [json.loads(line) for line in lines]
        assert len(docs) == row["documents"] and row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["tokens"] == sum(tokens[d["id"]] for d in docs)
        for line, d in zip(lines, docs):
            src = generic[d["id"]]
            assert d == {"id": src["id"], "text": src["text"], "source": "web", "licence": src["licence"],
                         "cluster": row["cluster"], "domain": src["domain"]}
            assert line == json.dumps(d, ensure_ascii=False)          # the key order of selected.jsonl's rows
            cluster_of[d["id"]] = row["cluster"]
        seen.update(d["id"] for d in docs)
    assert set(seen) == eligible and set(seen.values()) == {1}
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 30
    assert all(cluster_of[r["id"].split("~")[0]] == r["cluster"] for r in selected)
    # the target (med) lives mostly in one cluster, and that cluster's file is mostly med
    top = max(report["clusters"], key=lambda r: r["target_share"])["cluster"]
    domains = Counter(generic[i]["domain"] for i, c in cluster_of.items() if c == top)
    assert domains.most_common(1)[0][0] == "med"
    # the fit kept beside the files computes select's target histogram again, from the target's text
    target = [r.text for r in target_records(load_project(proj), "train")]
    histogram = ClusterFit.load(out / "clusters").histogram(target)
    assert histogram.tolist() == [r["target_share"] for r in report["clusters"]]
    assert not (out / ".work").exists()


def test_the_partition_is_the_same_bytes_on_one_process_and_on_tasks(tmp_path, monkeypatch, capsys):
    """Each task writes its own part files, the parent joins them: the cluster files, the fit and selected.jsonl are
    byte for byte those of one process. Without a partition the target still takes part in the embedding's fit:
    selected.jsonl is the bytes it always was (with one the fit is the generic sample's alone: on this corpus
    it happens to make the same clusters, hence the same selection)."""
    import nichelm.selection as selection
    import nichelm.selection.clusters as clusters
    monkeypatch.setattr(selection, "CHECKPOINT_CHARS", 5000)       # the corpus is 130 kB: shares of ~25 documents
    monkeypatch.setattr(clusters, "PART_FLUSH_BYTES", 3000)          # many appends per part file
    proj = _project(tmp_path, select=CLUSTERS + "\nbuckets = 10000")
    out = tmp_path / "run" / "select"
    outputs = []
    for flags, tasks in ((["--workers", "1"], 0), (["--workers", "2"], 2), (["--workers", "2", "--tasks", "3"], 3)):
        assert main(["select", str(proj), "--force", *PARTITION, *flags]) == 0
        assert (f" in {tasks} tasks;" in capsys.readouterr().err) == bool(tasks), flags
        report = json.loads((out / "selection.json").read_text())
        outputs.append((_files(out / "clusters"), report["partition"], report["clusters"],
                        hashlib.sha256((out / "selected.jsonl").read_bytes()).hexdigest()))
        assert not (out / ".work").exists()
    assert outputs[0] == outputs[1] == outputs[2]
    files, partition = outputs[0][0], outputs[0][1]
    assert sorted(files) == ["cluster-0000.jsonl", "cluster-0001.jsonl", "cluster-0002.jsonl", "fit.json", "fit.npz"]
    assert partition["documents"] == 100                                # min_tokens = 0: every document
    assert main(["select", str(proj), "--force"]) == 0
    assert hashlib.sha256((out / "selected.jsonl").read_bytes()).hexdigest() == BEFORE_PARALLEL[CLUSTERS][0]


def _other_target(folder: Path, select: str = CLUSTERS) -> Path:
    """_project's project in `folder` (the same generic sources) with another target: mostly law, some code (so its
    histogram is not all in one cluster)."""
    from tests.test_select import make_doc
    folder.mkdir(parents=True, exist_ok=True)
    proj = _project(folder, select=select)
    rng = random.Random(7)
    docs = [make_doc("law" if i % 3 else "code", rng) for i in range(40)]
    (folder / "target.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return proj


def test_the_partition_is_the_same_bytes_for_two_targets(tmp_path):
    """Issue 14: the partition depends on the generic sources, the settings and the seed, not on the target: two
    projects over the same generic corpus with targets of two domains write the same cluster files and fit (and the
    same partition table), while their histograms and selections differ."""
    (tmp_path / "a").mkdir()
    a, b = _project(tmp_path / "a", select=CLUSTERS), _other_target(tmp_path / "b")
    outputs = []
    for proj in (a, b):
        assert main(["select", str(proj), *PARTITION]) == 0
        out = proj.parent / "run" / "select"
        report = json.loads((out / "selection.json").read_text())
        outputs.append((_files(out / "clusters"), report["partition"]["clusters"], report["partition"]["documents"],
                        [r["target_share"] for r in report["clusters"]], (out / "selected.jsonl").read_bytes()))
    (files_a, table_a, docs_a, hist_a, sel_a), (files_b, table_b, docs_b, hist_b, sel_b) = outputs
    assert files_a == files_b and table_a == table_b and docs_a == docs_b == 100
    assert hist_a != hist_b and sel_a != sel_b
    assert max(range(3), key=hist_a.__getitem__) != max(range(3), key=hist_b.__getitem__)


def test_partition_settings_are_checked_in_one_line(tmp_path, capsys):
    proj = _project(tmp_path)                                           # method dsir
    assert main(["select", str(proj), *PARTITION]) == 2
    err = capsys.readouterr().err.strip()
    assert "select.partition = true needs select.method = \"clusters\"" in err and "\n" not in err
    assert err.startswith(f"nichelm: error: {proj}")


# ---------------------------------------------------------------- SLM-mix: pick the target's expert

TINY = ["tokenizer.vocab_size=320", "model.n_layer=2", "model.n_embd=64", "model.block_size=96", "train.max_steps=2",
        "train.batch_size=4", "train.eval_every=0", "train.warmup_steps=0", "train.threads=1", "split.val_fraction=0.2",
        "split.test_fraction=0.1"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A partition of 3 clusters; the example's expert projects (write_experts.py); the target's expert prepared
    and trained (2 steps of a tiny model); the two others its copies with other weights, each with its own cluster
    file in its manifest (as prepare would write it)."""
    from nichelm.checkpoint import save_checkpoint
    from nichelm.model import GPT, ModelConfig
    from nichelm.prepare import prepare
    from nichelm.train import Optimizers, train
    folder = tmp_path_factory.mktemp("mix")
    proj = _project(folder, select=CLUSTERS + "\npartition = true")
    assert main(["select", str(proj)]) == 0
    report = json.loads((folder / "run" / "select" / "selection.json").read_text())
    top = max(report["clusters"], key=lambda r: r["target_share"])["cluster"]
    made = subprocess.run([sys.executable, EXAMPLE / "write_experts.py", proj, folder / "experts"], capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stderr
    projects = [Path(p) for p in made.stdout.split()]
    assert [p.name for p in projects] == ["cluster-0000.toml", "cluster-0001.toml", "cluster-0002.toml"]
    torch.set_num_threads(1)
    chosen = load_project(projects[top], TINY)
    prepare(chosen)
    train(chosen)
    runs = {}
    for row in report["partition"]["clusters"]:
        c, run = row["cluster"], folder / "experts" / f"cluster-{row['cluster']:04d}"
        runs[c] = run
        if c == top:
            continue
        shutil.copytree(chosen.run_path, run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
        manifest = json.loads((run / "data" / "manifest.json").read_text())
        data = folder / "run" / "select" / "clusters" / row["file"]
        manifest["sources"][0].update(path=str(data), sha256=row["sha256"])
        (run / "data" / "manifest.json").write_text(json.dumps(manifest))
        cfg = json.loads((chosen.run_path / "model_config.json").read_text())
        torch.manual_seed(10 + c)
        model = GPT(ModelConfig(**cfg))
        save_checkpoint(run, 2, model, Optimizers([]), {"step": 2, "elapsed_s": 1.0, "tokens": 10,
                                                        "model_config": cfg}, keep=0)
    return {"project": proj, "folder": folder, "report": report, "top": top, "runs": runs, "chosen": projects[top]}


def _weights(run: Path) -> dict:
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    return load_file(str(ckpts[-1] / "model.safetensors"))


def test_pick_expert_writes_the_target_clusters_expert_as_a_plain_run_to_fine_tune(experts, tmp_path):
    """--pick-expert: the cluster with the largest target_share; OUT holds that expert's weights (not another's), its
    tokenizer and task, and says which cluster and why; a fine-tuning project starts from it (init_from)."""
    from nichelm.artifacts import open_run
    from nichelm.train import train
    shares = [r["target_share"] for r in experts["report"]["clusters"]]
    top = experts["top"]
    assert shares[top] == max(shares) > 0.5
    r_ = main(["specialize", str(experts["project"]), "--pick-expert", str(experts["folder"] / "experts"),
               "--out", str(tmp_path / "picked")])
    assert r_ == 0
    out = tmp_path / "picked"
    info = json.loads((out / "specialized.json").read_text())
    assert info["cluster"] == top and info["method"] == "slm-mix" and info["target_histogram"] == shares
    assert f"cluster {top} holds" in info["why"] and info["from_run"] == str(experts["runs"][top])
    assert info["cluster_data"]["sha256"] == experts["report"]["partition"]["clusters"][top]["sha256"]
    got = load_file(str(out / "checkpoints" / "step_0000000" / "model.safetensors"))
    want = _weights(experts["runs"][top])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    other = _weights(experts["runs"][(top + 1) % 3])
    assert not all(torch.equal(got[k], other[k]) for k in got)
    source = open_run(out)
    assert source.cfg.projected is None and source.trainer["step"] == 0
    for rel in ("tokenizer/tokenizer.json", "task.json", "data/manifest.json"):
        assert (out / rel).read_bytes() == (experts["runs"][top] / rel).read_bytes(), rel

    torch.set_num_threads(1)                       # fine-tune: the chosen expert's project, init_from = OUT
    tune = load_project(experts["chosen"], [*TINY, f"run_dir={tmp_path / 'tune'}", f"train.init_from={out}",
                                            f"tokenizer.from={out}", "train.max_steps=1", "train.lr=1e-30"])
    shutil.copytree(experts["runs"][top], tune.run_path, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    train(tune)
    tuned = load_file(str(tune.run_path / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert all(torch.equal(tuned[k], got[k]) for k in got)


def test_pick_expert_refuses_bad_input_in_one_line(experts, tmp_path):
    from nichelm.specialize import pick_expert
    project = load_project(experts["project"])
    top, root = experts["top"], tmp_path / "experts"

    def refused(folder, match, proj=project):
        with pytest.raises(UserError, match=match) as e:
            pick_expert(proj, folder, out=tmp_path / "out")
        assert "\n" not in str(e.value)

    refused(tmp_path / "none", r"--pick-expert .*none: no such folder")
    root.mkdir()
    refused(root, r"no expert run in it \(folders cluster-0000 ... cluster-0002")
    for c, run in experts["runs"].items():                    # every expert but the target's
        if c != top:
            shutil.copytree(run, root / run.name)
    refused(root, rf"cluster-{top:04d}: no such expert run; cluster {top} holds .* train its expert on .*"
                  rf"cluster-{top:04d}.jsonl")
    shutil.copytree(experts["runs"][(top + 1) % 3], root / f"cluster-{top:04d}")   # trained on another cluster
    refused(root, rf"cluster-{top:04d}: its data \(data/manifest.json\) is not .*cluster-{top:04d}.jsonl")
    shutil.rmtree(root / f"cluster-{top:04d}")
    shutil.copytree(experts["runs"][top], root / f"cluster-{top:04d}")
    (root / "cluster-0003").mkdir()                          # k = 4 experts for a partition of 3 clusters
    refused(root, r"cluster-0003: an expert of cluster 3, but .*selection.json has k = 3 clusters")
    (root / "cluster-0003").rmdir()
    assert pick_expert(project, root, out=tmp_path / "out").is_dir()       # now it is right
    shutil.rmtree(root / f"cluster-{top:04d}" / "checkpoints")
    refused(root, r"no complete checkpoint")

    plain = experts["folder"] / "plain"                     # a selection without a partition
    shutil.copytree(experts["folder"] / "run" / "select", plain / "select")
    report = json.loads((plain / "select" / "selection.json").read_text())
    del report["partition"]
    (plain / "select" / "selection.json").write_text(json.dumps(report))
    refused(experts["folder"] / "experts", r"selection.json: no partition; set select.partition = true",
            load_project(experts["project"], [f"run_dir={plain}"]))
    refused(experts["folder"] / "experts", r"selection.json: missing or unreadable",
            load_project(experts["project"], [f"run_dir={tmp_path / 'nothing'}"]))
    code = main(["specialize", str(experts["project"]), "--pick-expert", str(tmp_path / "none")])
    assert code == 2


def test_one_partitions_experts_serve_a_new_target(experts, tmp_path):
    """--pick-expert --partition FOLDER: a project that made no selection (another target: law, where the partition's
    own target is med) is placed among FOLDER's clusters with its saved fit; the histogram is ClusterFit's of the
    project's target texts, the expert is that of its argmax (another than the med target's), checked against
    FOLDER's file. The partition's own project gets, through --partition, what it gets without it."""
    from nichelm.selection import target_records
    from nichelm.selection.clusters import ClusterFit
    folder = experts["folder"] / "run" / "select" / "clusters"
    law = _other_target(tmp_path / "law")
    texts = [r.text for r in target_records(load_project(law), "train")]
    want = ClusterFit.load(folder).histogram(texts).tolist()
    cluster = max(range(3), key=lambda c: (want[c], -c))
    assert cluster != experts["top"] and sorted(want)[-2] > 0          # not all in one cluster
    assert main(["specialize", str(law), "--pick-expert", str(experts["folder"] / "experts"), "--partition",
                 str(folder), "--out", str(tmp_path / "picked")]) == 0
    info = json.loads((tmp_path / "picked" / "specialized.json").read_text())
    assert info["target_histogram"] == want and info["cluster"] == cluster and info["partition"] == str(folder)
    row = experts["report"]["partition"]["clusters"][cluster]
    assert info["cluster_data"]["sha256"] == row["sha256"] and info["cluster_data"]["documents"] == row["documents"]
    got = _weights(tmp_path / "picked")
    want_w = _weights(experts["runs"][cluster])
    assert all(torch.equal(got[k], want_w[k]) for k in want_w)
    assert (tmp_path / "picked" / "select" / "selection.json").read_bytes() == \
        (folder.parent / "selection.json").read_bytes()
    # the partition's own target, through --partition: the same expert and histogram as from its selection.json
    from nichelm.specialize import pick_expert
    own = json.loads((pick_expert(load_project(experts["project"]), experts["folder"] / "experts", tmp_path / "own",
                                  partition=folder) / "specialized.json").read_text())
    assert own["cluster"] == experts["top"]
    assert own["target_histogram"] == [r["target_share"] for r in experts["report"]["clusters"]]


def _projected_run(experts, tmp_path: Path, clusters: int) -> Path:
    """A run of a projected network of `clusters` experts of the chosen expert's shape (a checkpoint written directly)."""
    from nichelm.checkpoint import save_checkpoint
    from nichelm.model import GPT, ModelConfig
    from nichelm.train import Optimizers
    run = tmp_path / f"pn{clusters}"
    shutil.copytree(experts["runs"][experts["top"]], run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    cfg = {**json.loads((run / "model_config.json").read_text()), "projected": {"clusters": clusters, "m": 4, "h": 5}}
    torch.manual_seed(4)
    model = GPT(ModelConfig(**cfg))
    save_checkpoint(run, 3, model, Optimizers([]), {"step": 3, "elapsed_s": 1.0, "tokens": 10,
                                                    "model_config": model.cfg.to_dict()}, keep=0)
    return run


def test_specialize_target_with_a_partition_mixes_by_the_new_targets_histogram(experts, tmp_path):
    """--target --partition FOLDER (SLM-pn): the mixture is the new target's histogram over FOLDER's clusters."""
    from nichelm.model import instantiate
    from nichelm.selection import target_records
    from nichelm.selection.clusters import ClusterFit
    from nichelm.specialize import specialize
    folder = experts["folder"] / "run" / "select" / "clusters"
    law = _other_target(tmp_path / "law")
    run = _projected_run(experts, tmp_path, 3)
    project = load_project(law, [f"run_dir={run}"])
    hist = ClusterFit.load(folder).histogram([r.text for r in target_records(project, "train")]).tolist()
    out = specialize(project, target=True, partition=folder, out=tmp_path / "target")
    info = json.loads((out / "specialized.json").read_text())
    assert info["partition"] == str(folder) and info["target_histogram"] == hist
    assert info["mixture"] == pytest.approx([h / sum(hist) for h in hist])
    from nichelm.artifacts import open_run
    want = instantiate(open_run(run).load_model(), mixture=hist).state_dict()
    got = _weights(out)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_partition_bad_input_is_refused_in_one_line(experts, tmp_path):
    """--partition: a folder that is not there, one without the fit, one without its cluster files, a partition of
    another k than the experts' or the projected network's, and --partition without --target / --pick-expert."""
    from nichelm.specialize import pick_expert, specialize
    folder = experts["folder"] / "run" / "select" / "clusters"
    law = load_project(_other_target(tmp_path / "law"))
    root = experts["folder"] / "experts"

    def refused(match, call):
        with pytest.raises(UserError, match=match) as e:
            call()
        assert "\n" not in str(e.value)

    refused(r"none: no such folder; give a partition folder", lambda: pick_expert(law, root, partition=tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    refused(r"empty: no readable k-means fit \(fit.json, fit.npz: .*run `nichelm select` with select.partition",
            lambda: pick_expert(law, root, partition=tmp_path / "empty"))
    (tmp_path / "fit_only").mkdir()
    for name in ("fit.json", "fit.npz"):
        shutil.copyfile(folder / name, tmp_path / "fit_only" / name)
    refused(r"cluster-\d{4}.jsonl: missing; .*fit_only is not a whole partition",
            lambda: pick_expert(law, root, partition=tmp_path / "fit_only"))
    fewer = tmp_path / "experts2"                              # experts of a partition of 4 clusters
    shutil.copytree(root, fewer)
    (fewer / "cluster-0003").mkdir()
    refused(r"cluster-0003: an expert of cluster 3, but .*clusters has k = 3 clusters",
            lambda: pick_expert(law, fewer, partition=folder))
    pn2 = load_project(law.source_file, [f"run_dir={_projected_run(experts, tmp_path, 2)}"])
    refused(r"--partition .*: a partition of 3 clusters, but the projected network of .* has 2 experts",
            lambda: specialize(pn2, target=True, partition=folder))
    refused(r"--partition places the target .* with --target or --pick-expert",
            lambda: specialize(pn2, cluster=0, partition=folder))
    assert main(["specialize", str(law.source_file), "--pick-expert", str(root), "--partition",
                 str(tmp_path / "empty")]) == 2


def test_the_partitions_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """The part files are written as the documents come (a buffer of PART_FLUSH_BYTES) and joined line by line."""
    import tracemalloc

    import nichelm.selection.clusters as clusters
    import nichelm.selection.core as core
    from nichelm.config import SelectConfig
    from nichelm.selection import select_corpus
    from tests.test_select import _lazy_corpus, make_doc
    monkeypatch.setattr(core, "BATCH_CHARS", 20_000)          # batches (1 MB in real runs) far smaller than the corpus
    monkeypatch.setattr(clusters, "PART_FLUSH_BYTES", 50_000)
    target = [make_doc("med", random.Random(i)) for i in range(10)]
    cfg = SelectConfig(method="clusters", documents=20, min_tokens=0, fit_chars=60_000, k=2)

    def peak(n: int) -> int:
        tracemalloc.start()
        sel = select_corpus(_lazy_corpus(n), target, cfg, seed=0, log=lambda m: None, partition=tmp_path / f"p{n}")
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sel.partition["documents"] == n
        return top
    peak(300)                                                  # imports (scikit-learn...) outside the measures
    small, big = peak(1000), peak(4000)
    assert big < 1.3 * small, (small, big)
