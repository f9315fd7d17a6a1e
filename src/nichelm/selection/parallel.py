"""`nichelm select --workers N | --executor slurm|ray`: dsir's scoring pass on datatrove tasks.

The parent reads the corpus once for the fit sample and fits the weights (core._dsir), then saves what
scoring needs (core.DsirScoring) under RUN/select/.work/: spec.npz (the per-bucket log ratios, the fit
sample's ordinals) and spec.json (seed, mode, size, ...; `key` = sha256 of both). Task I of T reads the
generic sources, scores the documents whose ordinal is I modulo T (tokenizing and hashing hold the GIL:
this is what takes the cores) into a heap of the selection's budget, and writes it as
heaps/task-IIIII.npz (keys, ordinals, sizes, weights, tokens). The parent merges the heaps: every key is
a hash of (seed, source, id) plus the document's weight, so the merged heap is the one a single
process fills, and the outputs are byte for byte those of `--workers 1` (tests/test_select.py).

Every task reads (parses) the whole corpus and tokenizes its own share only; cutting the sources into
byte ranges would save the parsing too. Resume: datatrove's completion markers (logs/completions) count
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
from nichelm.selection.core import BudgetHeap, DsirScoring, Pick, local_scorer, merge_into, score_share

WORK = ".work"
TASK_BYTES = 256 << 20          # slurm/ray without --tasks or --workers: a task per this much generic input


class Submitted(Exception):
    """Slurm: the scoring tasks are submitted; the selection is made by running the command again."""


def work_dir(project: Project) -> Path:
    return project.run_path / "select" / WORK


def save_spec(work: Path, spec: DsirScoring) -> str:
    """spec.npz + spec.json in work; returns the spec's key."""
    arrays = {"log_diff": spec.log_diff.astype(np.float64), "skip": spec.skip.astype(np.int64)}
    settings = {"seed": spec.seed, "mode": spec.mode, "min_tokens": spec.min_tokens, "size": spec.size,
                "by_tokens": spec.by_tokens}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(arrays):
        digest.update(arrays[name].tobytes())
    key = digest.hexdigest()
    with atomic_file(work / "spec.npz") as f:
        np.savez(f, **arrays)
    atomic_write_json(work / "spec.json", {**settings, "key": key})
    return key


def load_spec(work: Path, key: str) -> DsirScoring:
    settings = json.loads((work / "spec.json").read_text(encoding="utf-8"))
    if settings.get("key") != key:
        raise UserError(f"{work / 'spec.json'}: made by another select run than this task's; run `nichelm select` "
                        "again (one run at a time per project)")
    with np.load(work / "spec.npz", allow_pickle=False) as z:
        log_diff, skip = z["log_diff"], z["skip"]
    return DsirScoring(log_diff, skip, settings["seed"], settings["mode"], settings["min_tokens"],
                       settings["size"], settings["by_tokens"])


def heap_path(work: Path, rank: int) -> Path:
    return work / "heaps" / f"task-{rank:05d}.npz"


class ScoreShare(PipelineStep):
    """One datatrove task: score share `rank` of the generic corpus, write its heap."""

    name = "score"
    type = "nichelm"

    def __init__(self, project: Project, work: str, key: str):
        super().__init__()
        self.project, self.work, self.key = project, work, key

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.selection import generic_corpus
        work = Path(self.work)
        spec = load_spec(work, self.key)
        heap, stats = score_share(generic_corpus(self.project), spec, rank, world_size,
                                  log=lambda msg: print(f"select: {msg}", file=sys.stderr, flush=True))
        items = heap.items()
        with atomic_file(heap_path(work, rank)) as f:
            np.savez(f, keys=np.array([k for k, _, _, _ in items], np.float64),
                     ordinals=np.array([o for _, o, _, _ in items], np.int64),
                     sizes=np.array([s for _, _, s, _ in items], np.float64),
                     weights=np.array([p.weight for _, _, _, p in items], np.float64),
                     tokens=np.array([p.n_tokens for _, _, _, p in items], np.int64),
                     stats=np.array([stats["scored"], stats["too_short"]], np.int64))
        yield from ()


def merge_heap(path: Path, heap: BudgetHeap) -> Counter:
    """Push a task's heap file into `heap`; the task's counts."""
    with np.load(path, allow_pickle=False) as z:
        merge_into(heap, ((float(k), int(o), float(s), Pick(float(w), int(n)))
                          for k, o, s, w, n in zip(z["keys"], z["ordinals"], z["sizes"], z["weights"], z["tokens"])))
        scored, too_short = (int(x) for x in z["stats"])
    return Counter(scored=scored, too_short=too_short)


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

    def __call__(self, corpus, spec: DsirScoring, heap: BudgetHeap, log) -> Counter:
        if self.tasks <= 1 and self.opts.executor == "local":
            return local_scorer(corpus, spec, heap, log)
        from nichelm.prepare_pipeline import configure_console, make_executor, run_ray, sbatch_scripts, start_ray
        work = self.work
        before = _saved_key(work)
        work.mkdir(parents=True, exist_ok=True)
        key = save_spec(work, spec)
        plan = {"key": key, "tasks": self.tasks}
        if before != plan:                    # heaps and completion markers of another spec or task count: gone
            shutil.rmtree(work / "logs", ignore_errors=True)
            shutil.rmtree(work / "heaps", ignore_errors=True)
            atomic_write_json(work / "plan.json", plan)
        configure_console(self.opts.debug)
        ex = make_executor([ScoreShare(self.project, str(work), key)], self.tasks, work / "logs", work / "slurm",
                           "nichelm-select", self.opts)
        log(f"scoring in {self.tasks} tasks; executor {self.opts.executor}; logs in {work / 'logs'}")
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
            stats.update(merge_heap(path, heap))
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


def _saved_key(work: Path) -> dict | None:
    try:
        return json.loads((work / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
