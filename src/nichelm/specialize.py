"""`nichelm specialize`: a projected network's expert made a plain model, in closed form (SLM-pn).

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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text, fsync_tree, replace_dir, staging_dir

SPECIALIZED_JSON = "specialized.json"


def specialize(project: Project, cluster: int | None = None, target: bool = False,
               mixture: list[float] | None = None, out: Path | None = None) -> Path:
    """Write the plain run of one expert (cluster), of the target's histogram (target) or of `mixture`
    (one weight per cluster) of PROJECT's projected network; returns its folder."""
    from nichelm.artifacts import open_run
    from nichelm.checkpoint import save_checkpoint
    from nichelm.model import instantiate
    from nichelm.train import Optimizers

    if [cluster is not None, bool(target), mixture is not None].count(True) != 1:
        raise UserError("specialize: give one of --cluster I, --target and --mixture W0,W1,...")
    run = project.run_path
    source = open_run(run)                          # the newest complete checkpoint, checked
    projected = source.cfg.projected
    if projected is None:
        raise UserError(f"{source.checkpoint}: the model is plain, not a projected network ([model.projected]); "
                        "fine-tune this run directly with train.init_from")
    k = projected.clusters
    if cluster is not None and not 0 <= cluster < k:
        raise UserError(f"--cluster {cluster}: the projected network of {run} has clusters 0..{k - 1}")
    if target:
        mixture = target_histogram(run, k)
    elif mixture is not None:
        _check_mixture(mixture, k, "--mixture")

    plain = instantiate(source.load_model(), cluster=cluster, mixture=mixture)
    if mixture is not None:
        mixture = [w / sum(mixture) for w in mixture]
    name = f"cluster_{cluster}" if cluster is not None else "target" if target else "mixture"
    out = Path(out) if out else run / "specialized" / name
    provenance = {"from_run": str(run), "checkpoint": source.checkpoint.name, "step": source.trainer.get("step"),
                  "projected": source.cfg.to_dict()["projected"], "cluster": cluster, "mixture": mixture,
                  "mixture_from": str(run / "select" / "selection.json") if target else None}
    staged = staging_dir(out.parent, f".{out.name}.tmp-")
    try:
        state = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "model_config": plain.cfg.to_dict(),
                 "specialized": provenance}
        save_checkpoint(staged, 0, plain, Optimizers([]), state, keep=0)     # weights only: no optimizer state
        atomic_write_text(staged / "model_config.json", json.dumps(plain.cfg.to_dict(), indent=2) + "\n")
        atomic_write_json(staged / SPECIALIZED_JSON, provenance)
        for rel in ("tokenizer/tokenizer.json", "task.json", "data/manifest.json", "select/selection.json"):
            if (run / rel).is_file():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / rel, staged / rel)
        fsync_tree(staged)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


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
