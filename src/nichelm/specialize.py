"""`nichelm specialize`: a projected network's expert made a plain model, in closed form (SLM-pn), or
the expert model of the target's cluster picked among one small model per cluster (SLM-mix).

PROJECT's run holds a projected network (model.projected: one MLP expert per cluster of the generic
data, attention and embeddings shared). One expert (--cluster I), or the mixture of experts a target's
cluster histogram gives (--target: the target_share column of RUN/select/selection.json; --mixture: any
weights), becomes a plain GPT of the base architecture (model.instantiate) written as a run of its own:

  OUT/checkpoints/step_0000000/   model.safetensors + trainer.json (step 0, no optimizer state), COMPLETE
  OUT/model_config.json           the plain model's config, as train writes it
  OUT/tokenizer/tokenizer.json, OUT/task.json      the project's, unchanged
  OUT/data/manifest.json, OUT/select/selection.json   provenance of the pre-training data (model cards)
  OUT/specialized.json            which run, checkpoint and expert(s) it came from

A fine-tuning project starts from it with train.init_from = OUT; `nichelm export OUT` exports it as it is.
OUT is built in a staging folder and swapped in whole, so a run folder already there is replaced only
once the new one is complete.

SLM-mix (--pick-expert EXPERTS): PROJECT's `nichelm select` wrote a partition (select.partition: one
jsonl per k-means cluster, RUN/select/clusters), and EXPERTS/cluster-NNNN is a plain run trained on cluster
NNNN's file (the experts are trained by `nichelm prepare` + `nichelm train`, one project each:
examples/slm_mix). pick_expert takes the cluster holding the largest share of the target (selection.json's
target_share), checks that its expert's data is that cluster's file (sha256 in its data manifest), and
writes the expert as OUT the same way, with its tokenizer, task and manifest; specialized.json says which
cluster and why.

Another target (--partition FOLDER, with --pick-expert or --target): a partition does not depend on the target
that selected it (its k-means fit is the generic sample's), so one set of experts serves any target. FOLDER is
the partition (RUN/select/clusters of the run that made it); PROJECT's target texts (select's: target_records)
are placed with FOLDER's saved fit (ClusterFit) and their histogram takes the place of selection.json's; an
expert is checked against FOLDER's file itself (sha256). PROJECT needs no selection of its own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text, fsync_tree, replace_dir, staging_dir

SPECIALIZED_JSON = "specialized.json"


def specialize(project: Project, cluster: int | None = None, target: bool = False,
               mixture: list[float] | None = None, out: Path | None = None, partition: Path | None = None) -> Path:
    """Write the plain run of one expert (cluster), of the target's histogram (target: selection.json's, or over
    the partition folder `partition` with its fit) or of `mixture` (one weight per cluster) of PROJECT's
    projected network; returns its folder."""
    from nichelm.artifacts import open_run
    from nichelm.model import instantiate

    if [cluster is not None, bool(target), mixture is not None].count(True) != 1:
        raise UserError("specialize: give one of --cluster I, --target and --mixture W0,W1,...")
    if partition is not None and not target:
        raise UserError("specialize: --partition places the target among a partition's clusters: give it with "
                        "--target or --pick-expert")
    run = project.run_path
    source = open_run(run)                          # the newest complete checkpoint, checked
    projected = source.cfg.projected
    if projected is None:
        raise UserError(f"{source.checkpoint}: the model is plain, not a projected network ([model.projected]); "
                        "fine-tune this run directly with train.init_from")
    k = projected.clusters
    if cluster is not None and not 0 <= cluster < k:
        raise UserError(f"--cluster {cluster}: the projected network of {run} has clusters 0..{k - 1}")
    if target and partition is not None:
        mixture = partition_histogram(project, partition)
        if len(mixture) != k:
            raise UserError(f"--partition {partition}: a partition of {len(mixture)} clusters, but the projected "
                            f"network of {run} has {k} experts: give the partition its experts were trained on")
    elif target:
        mixture = target_histogram(run, k)
    elif mixture is not None:
        _check_mixture(mixture, k, "--mixture")

    plain = instantiate(source.load_model(), cluster=cluster, mixture=mixture)
    histogram = mixture if target else None
    if mixture is not None:
        mixture = [w / sum(mixture) for w in mixture]
    name = f"cluster_{cluster}" if cluster is not None else "target" if target else "mixture"
    out = Path(out) if out else run / "specialized" / name
    provenance = {"from_run": str(run), "checkpoint": source.checkpoint.name, "step": source.trainer.get("step"),
                  "projected": source.cfg.to_dict()["projected"], "cluster": cluster, "mixture": mixture,
                  "mixture_from": (str(partition) if partition is not None else str(run / "select" / "selection.json"))
                  if target else None, "partition": str(partition) if partition is not None else None,
                  "target_histogram": histogram}
    return _write_plain_run(out, plain, provenance, {rel: run / rel for rel in COPIED})


COPIED = ("tokenizer/tokenizer.json", "task.json", "data/manifest.json", "select/selection.json")


def _write_plain_run(out: Path, plain, provenance: dict, files: dict[str, Path]) -> Path:
    """OUT as a run at step 0: the model's weights (no optimizer state), its config, specialized.json, and
    `files` (relative path in OUT -> file, where it exists); staged and swapped in whole."""
    from nichelm.checkpoint import save_checkpoint
    from nichelm.train import Optimizers
    staged = staging_dir(out.parent, f".{out.name}.tmp-")
    try:
        state = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "model_config": plain.cfg.to_dict(),
                 "specialized": provenance}
        save_checkpoint(staged, 0, plain, Optimizers([]), state, keep=0)     # weights only: no optimizer state
        atomic_write_text(staged / "model_config.json", json.dumps(plain.cfg.to_dict(), indent=2) + "\n")
        atomic_write_json(staged / SPECIALIZED_JSON, provenance)
        for rel, path in files.items():
            if path.is_file():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staged / rel)
        fsync_tree(staged)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


EXPERT_DIR = re.compile(r"cluster-(\d{4,})")       # EXPERTS/cluster-NNNN: the partition's file names, less .jsonl


def pick_expert(project: Project, experts: Path, out: Path | None = None, partition: Path | None = None) -> Path:
    """SLM-mix: the expert run of the cluster holding the largest share of PROJECT's target, among EXPERTS/cluster-NNNN
    (one plain run per cluster of PROJECT's partition, or of the partition folder `partition` with PROJECT's
    target placed by its fit), written as a plain run OUT (default RUN/specialized/expert_I); returns OUT."""
    from nichelm.artifacts import open_run
    run = project.run_path
    if partition is None:
        path = run / "select" / "selection.json"
        table, histogram = _partition(path)
        folder, rows, where = Path(table["folder"]), table["clusters"], str(path)
        selection = path
    else:
        folder = Path(partition)
        histogram = partition_histogram(project, folder)
        rows, where = None, str(folder)
        selection = folder.parent / "selection.json"     # the selection that made the partition, where it is
    k = len(histogram)
    experts = Path(experts)
    if not experts.is_dir():
        raise UserError(f"--pick-expert {experts}: no such folder; give the folder of the expert runs "
                        "(EXPERTS/cluster-NNNN, one per cluster: examples/slm_mix)")
    found = {int(m[1]): d for d in experts.iterdir() if d.is_dir() and (m := EXPERT_DIR.fullmatch(d.name))}
    if not found:
        raise UserError(f"--pick-expert {experts}: no expert run in it (folders cluster-0000 ... cluster-{k - 1:04d}, "
                        "one per cluster: examples/slm_mix)")
    beyond = sorted(i for i in found if i >= k)
    if beyond:
        raise UserError(f"{found[beyond[0]]}: an expert of cluster {beyond[0]}, but {where} has k = {k} clusters "
                        f"(0..{k - 1}): these experts come from another partition; train one per cluster of this one "
                        "(examples/slm_mix)")
    cluster = max(range(k), key=lambda c: (histogram[c], -c))        # the most frequent; a tie: the lower cluster
    row = rows[cluster] if rows is not None else _file_row(folder, cluster)
    data = folder / row["file"]
    share = f"cluster {cluster} holds {histogram[cluster]:.1%} of the target, the most of {k} clusters"
    if cluster not in found:
        raise UserError(f"{experts / f'cluster-{cluster:04d}'}: no such expert run; {share}: train its expert on "
                        f"{data} (examples/slm_mix)")
    source = open_run(found[cluster])               # the newest complete checkpoint, checked
    if source.cfg.projected is not None:
        raise UserError(f"{source.checkpoint}: a projected network, not a plain expert; SLM-pn's experts are made "
                        "with `nichelm specialize --cluster I | --target` on that run")
    manifest = _read(source.path / "data" / "manifest.json")
    if row["sha256"] not in {s.get("sha256") for s in (manifest or {}).get("sources", [])}:
        raise UserError(f"{source.path}: its data (data/manifest.json) is not {data} (sha256 {row['sha256'][:12]}...), "
                        f"cluster {cluster} of {where}: prepare and train this expert on that file, or select again "
                        "as its partition was made")
    provenance = {"method": "slm-mix", "from_run": str(source.path), "checkpoint": source.checkpoint.name,
                  "step": source.trainer.get("step"), "experts": str(experts), "cluster": cluster,
                  "why": f"{share} ({'placed with the fit of ' if partition is not None else 'target_share of '}"
                         f"{where})", "partition": str(folder), "target_histogram": histogram,
                  "cluster_data": {"path": str(data), "sha256": row["sha256"], "documents": row["documents"],
                                   "tokens": row.get("tokens")}}
    files = {rel: source.path / rel for rel in COPIED}
    files["select/selection.json"] = selection       # the selection the expert's data came from (the expert has none)
    return _write_plain_run(Path(out) if out else run / "specialized" / f"expert_{cluster}", source.load_model(),
                            provenance, files)


def partition_histogram(project: Project, folder: Path) -> list[float]:
    """PROJECT's target (the train-split texts `nichelm select` matches) placed among the clusters of the partition
    FOLDER (any run's RUN/select/clusters) with its saved k-means fit: each cluster's share, in the fit's unit."""
    from nichelm.selection import target_records
    from nichelm.selection.clusters import ClusterFit
    fit = ClusterFit.load(Path(folder))
    texts = [r.text for r in target_records(project, "train")]
    if not texts:
        raise UserError(f"{project.source_file}: the target has no train-split document (role = \"target\" sources, "
                        "else pairs / clean sources) to place among the partition's clusters; add target text")
    return [float(h) for h in fit.histogram(texts)]


def _file_row(folder: Path, cluster: int) -> dict:
    """A partition file's row as selection.json lists it (file, documents, sha256), from the file as it is now:
    an expert is checked against the bytes it must have been trained on."""
    import hashlib
    from nichelm.selection.clusters import cluster_file
    path = folder / cluster_file(cluster)
    digest, docs = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for line in f:
                digest.update(line)
                docs += 1
    except OSError:
        raise UserError(f"{path}: missing; {folder} is not a whole partition (cluster-NNNN.jsonl beside fit.json): "
                        "give the folder RUN/select/clusters that `nichelm select` wrote with select.partition = "
                        "true") from None
    return {"cluster": cluster, "file": path.name, "documents": docs, "sha256": digest.hexdigest()}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _partition(path: Path) -> tuple[dict, list[float]]:
    """selection.json's partition (select.partition) and the target's histogram over its clusters."""
    report = _read(path)
    if report is None:
        raise UserError(f"{path}: missing or unreadable; --pick-expert needs the partition of `nichelm select` with "
                        "select.method = \"clusters\" and select.partition = true: run it for this project")
    partition = report.get("partition") if isinstance(report, dict) else None
    if not partition:
        raise UserError(f"{path}: no partition; set select.partition = true (select.method = \"clusters\") in "
                        "[select] and run `nichelm select` again")
    return partition, target_histogram(path.parents[1], len(partition["clusters"]))


def target_histogram(run: Path, clusters: int) -> list[float]:
    """The target's share of each k-means cluster, from `nichelm select` with method clusters
    (RUN/select/selection.json, "clusters" rows: cluster, target_share)."""
    path = run / "select" / "selection.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; --target needs the target's cluster histogram: run `nichelm select` "
                        "(select.method = \"clusters\") for this project, or give --mixture") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); run `nichelm select --force` for this project") from None
    rows = report.get("clusters") if isinstance(report, dict) else None
    if not rows:
        method = report.get("method", "?") if isinstance(report, dict) else "?"
        raise UserError(f"{path}: no cluster histogram (a {method} selection); --target needs select.method = "
                        "\"clusters\": select again, or give --mixture")
    try:
        shares = {int(r["cluster"]): float(r["target_share"]) for r in rows}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: a \"clusters\" row lacks cluster or target_share; run `nichelm select "
                        "--force`") from None
    if sorted(shares) != list(range(clusters)):
        raise UserError(f"{path}: a histogram over {len(shares)} clusters, the projected network has {clusters} "
                        f"experts; select with select.k = {clusters}, or set model.projected.clusters = {len(shares)}")
    histogram = [shares[c] for c in range(clusters)]
    _check_mixture(histogram, clusters, str(path))
    return histogram


def _check_mixture(weights: list[float], clusters: int, where: str) -> None:
    import math
    if len(weights) != clusters:
        raise UserError(f"{where}: {len(weights)} weights for {clusters} clusters; give one weight per cluster")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{where}: weights must be finite, 0 or more, and not all 0 (got {weights[:8]})")
