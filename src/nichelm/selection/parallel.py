"""`nichelm select --workers N | --executor slurm|ray`: the scoring pass on datatrove tasks.

The parent reads the corpus once for the fit sample and fits (dsir: the weights, core._dsir; clusters:
the TF-IDF + SVD embedding and the k-means centres, core._clusters), then saves what scoring needs
(core.DsirScoring or clusters.ClusterScoring: plain arrays and settings, no pickle) under
RUN/select/.work/: spec.npz and spec.json (`method` picks the class; `key` = sha256 of both). Task I of
T reads its share of the generic sources (below) and scores its documents (dsir: tokenizing and
hashing; clusters: embedding and assigning the nearest centre; both hold the GIL: this is what takes the
cores) into bounded heaps (dsir: one of the selection's budget; clusters: one per cluster of its quota,
plus the generic units per cluster), and writes them as heaps/task-IIIII.npz. The parent merges the
heaps: every key is a hash of (seed, source, id) (plus the document's weight for dsir), and an
embedding depends on its document only, so the merged heaps are those a single process fills, and the
outputs are byte for byte those of `--workers 1` (tests/test_select.py).

The shares are contiguous runs of documents of about equal characters: the parent's pass over the whole
corpus (the fit sample's) notes checkpoints (selection.GenericCorpus: where a record starts, its source,
file, byte offset and line, or parquet row, and its ordinal), and task I reads from its checkpoint only its
documents (a seek into a plain file; a compressed one is decompressed up to it, not parsed), with the
ordinals, ids and keys a whole pass gives them. Resume: datatrove's completion markers (logs/completions) count
only for the spec they were earned on: another spec clears them. Slurm: the tasks are submitted and the
command returns; running it again when they have ended merges their heaps (the fit is recomputed, the
same, so the spec matches). The work folder is removed once the selection is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

import nichelm.data.pipeline  # noqa: F401  (installs the quiet datatrove task loggers in every process)
from nichelm.config import Project
from nichelm.errors import UserError
from nichelm.io import atomic_file, atomic_write_json
from nichelm.selection.clusters import ClusterScoring
from nichelm.selection.core import WORK, DsirScoring, local_scorer

TASK_BYTES = 256 << 20          # slurm/ray without --tasks or --workers: a task per this much generic input
SPECS = {"dsir": DsirScoring, "clusters": ClusterScoring}


class Submitted(Exception):
    """Slurm: the scoring tasks are submitted; the selection is made by running the command again."""


def work_dir(project: Project) -> Path:
    return project.run_path / "select" / WORK


def save_spec(work: Path, spec) -> str:
    """spec.npz + spec.json in work (spec: core.DsirScoring or clusters.ClusterScoring); returns the spec's key."""
    arrays, settings = spec.arrays()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(arrays):
        digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    key = digest.hexdigest()
    with atomic_file(work / "spec.npz") as f:
        np.savez(f, **arrays)
    atomic_write_json(work / "spec.json", {**settings, "key": key})
    return key


def load_spec(work: Path, key: str):
    settings = json.loads((work / "spec.json").read_text(encoding="utf-8"))
    if settings.get("key") != key:
        raise UserError(f"{work / 'spec.json'}: made by another select run than this task's; run `nichelm select` "
                        "again (one run at a time per project)")
    with np.load(work / "spec.npz", allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    return SPECS[settings["method"]].from_arrays(arrays, settings)


def heap_path(work: Path, rank: int) -> Path:
    return work / "heaps" / f"task-{rank:05d}.npz"


class ScoreShare(PipelineStep):
    """One datatrove task: score (dsir) or assign (clusters) share `rank` of the generic corpus, write its heaps."""

    name = "score"
    type = "nichelm"

    def __init__(self, project: Project, work: str, key: str, shares: list[tuple[dict, int]]):
        super().__init__()
        self.project, self.work, self.key, self.shares = project, work, key, shares

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.selection import generic_corpus
        work = Path(self.work)
        spec = load_spec(work, self.key)
        checkpoint, count = self.shares[rank]
        what = "scoring" if spec.method == "dsir" else "embedding and assigning clusters"
        share, stats = spec.score(generic_corpus(self.project).read_from(checkpoint, count),
                                  log=lambda msg: print(f"select: {msg}", file=sys.stderr, flush=True),
                                  into=spec.new_share(f"task-{rank:05d}"),      # its part of a partition
                                  what=f"{what} (share {rank + 1} of {world_size})")
        with atomic_file(heap_path(work, rank)) as f:
            np.savez(f, **spec.share_arrays(share, stats))
        yield from ()


def merge_heap(path: Path, spec, into) -> Counter:
    """Merge a task's saved share into `into`; the task's counts."""
    with np.load(path, allow_pickle=False) as z:
        return spec.merge_share(z, into)


def default_tasks(opts, generic_bytes: int) -> int:
    if opts.tasks or opts.workers:
        return opts.tasks or opts.workers
    if opts.executor == "local":
        return os.cpu_count() or 1
    return max(1, -(-generic_bytes // TASK_BYTES))


class TaskScorer:
    """core.select_corpus's scorer on datatrove tasks (prepare_pipeline.make_executor: local, slurm, ray)."""

    def __init__(self, project: Project, opts, generic_bytes: int):
        if opts.executor not in ("local", "slurm", "ray"):
            raise UserError(f"--executor {opts.executor!r}: use local, slurm or ray")
        if opts.executor == "slurm" and not opts.partition:
            raise UserError("--executor slurm needs --partition NAME (the Slurm partition to submit to)")
        self.project, self.opts = project, opts
        self.tasks = default_tasks(opts, generic_bytes)
        self.work = work_dir(project)

    def __call__(self, corpus, spec, into, log) -> Counter:
        if self.tasks <= 1 and self.opts.executor == "local":
            return local_scorer(corpus, spec, into, log)
        from nichelm.prepare_pipeline import configure_console, make_executor, run_ray, sbatch_scripts, start_ray
        work = self.work
        before = _saved_key(work)
        work.mkdir(parents=True, exist_ok=True)
        key = save_spec(work, spec)
        # contiguous shares of the corpus, each starting at a checkpoint of the parent's whole pass (the fit
        # sample's): a task parses its share only, and its documents keep their ordinals
        shares = [[checkpoint, count] for checkpoint, count in corpus.shares(self.tasks)]
        plan = {"key": key, "tasks": self.tasks, "shares": shares}
        if before != plan:                    # heaps and completion markers of another spec or task count: gone
            shutil.rmtree(work / "logs", ignore_errors=True)
            shutil.rmtree(work / "heaps", ignore_errors=True)
            atomic_write_json(work / "plan.json", plan)
        configure_console(self.opts.debug)
        release_freed_memory()
        ex = make_executor([ScoreShare(self.project, str(work), key, shares)], self.tasks, work / "logs",
                           work / "slurm", "nichelm-select", self.opts)
        what = "scoring" if spec.method == "dsir" else "assigning clusters"
        log(f"{what} in {self.tasks} tasks; executor {self.opts.executor}; logs in {work / 'logs'}")
        done = len(list((work / "logs" / "completions").glob("*")))
        if self.opts.executor == "slurm" and done < self.tasks:
            self._submit(ex, sbatch_scripts, log)
        os.environ["NICHELM_DEBUG"] = "1" if self.opts.debug else "0"
        try:
            if self.opts.executor == "ray":
                start_ray(self.opts)
                run_ray([ex], [("score", None, self.tasks)], work, self.opts.debug)
            elif self.opts.executor == "local":
                ex.run()
        finally:
            os.environ.pop("NICHELM_DEBUG", None)
        stats = Counter()
        for rank in range(self.tasks):          # one task's heap in memory at a time
            path = heap_path(work, rank)
            if not path.is_file():
                raise UserError(f"{path}: scoring task {rank} left no result; see its log in {work / 'logs'} and run "
                                "the same command again")
            stats.update(merge_heap(path, spec, into))
        return stats

    def _submit(self, ex, sbatch_scripts, log):
        if self.opts.dry_run:
            script = sbatch_scripts([ex], [("score", None, self.tasks)])["score"]
            path = self.work / "slurm" / "score.sbatch"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
            raise Submitted(f"dry run: sbatch script in {path}; nothing submitted")
        if not shutil.which("sbatch"):
            raise UserError("--executor slurm: no `sbatch` command here; run select on a Slurm login node")
        ex.run()
        raise Submitted(f"submitted Slurm job {ex.job_id} ({self.tasks} scoring tasks); when it has ended, run the "
                        "same command again to merge them into the selection")


def release_freed_memory() -> None:
    """Hand the memory the fit freed (the sample's texts, TF-IDF matrices: ~150 MB at 0.1 GB) back to the
    system before the tasks start: glibc keeps it otherwise, in this process and in the executor's manager
    process, which is forked from it. Elsewhere than glibc, nothing to do."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _saved_key(work: Path) -> dict | None:
    try:
        return json.loads((work / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
