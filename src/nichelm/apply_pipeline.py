"""`nichelm apply --workers N | --executor slurm|ray`: apply's tasks on datatrove's executors, as prepare's.

The work is planned once (apply.plan_tasks): whole files, and byte ranges of big .txt files cut at the
pieces one process would correct, each given to one of T tasks. Task I is exactly `nichelm apply --shard
I/T`: it loads the model once, corrects its units with its own ledger (OUT/.nichelm-ledger.shard-I-of-T.jsonl:
a killed task resumes mid-file), writes a range's output as a part file, and joins the parts of a split
file once all are done (apply.join_parts). So the outputs are byte for byte those of one process,
whatever the executor, the workers or the interruptions.

datatrove's files are kept in OUT/.nichelm-apply/: plan.json (the inputs' sizes and times, the task
count), logs/ (task logs, a completion marker per task: a re-run skips finished tasks), reports/ (each
task's figures, summed into the command's report). A changed plan (an input changed, added or removed,
another --tasks) clears the completion markers: every task runs again, and its ledger skips what is done.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

import nichelm.data.pipeline  # noqa: F401  (installs the quiet datatrove task loggers in every process)
from nichelm import apply as ap
from nichelm.errors import UserError
from nichelm.io import atomic_write_json
from nichelm.prepare_pipeline import (ExecutorOptions, configure_console, make_executor, run_ray, sbatch_scripts,
                                      start_ray)

WORK_DIR = ".nichelm-apply"
TASK_BYTES = 64 << 20               # slurm/ray without --tasks or --workers: a task per this much input


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CorrectTask(PipelineStep):
    """One task of the plan: apply.run_task for rank `rank`; its report goes to reports/."""

    name = "correct"
    type = "nichelm"

    def __init__(self, model: str, out: str, plan: ap.Plan, settings: dict, chunk_bytes: int):
        super().__init__()
        self.model, self.out, self.plan, self.settings = model, out, plan, settings
        self.chunk_bytes = chunk_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # the plan's ranges were cut at the pieces of this size: the task must cut alike
        ap.TEXT_CHUNK_BYTES = self.chunk_bytes
        report = ap.run_task(self.model, self.out, self.plan, rank, **self.settings)
        atomic_write_json(Path(self.out) / WORK_DIR / "reports" / f"task-{rank:05d}.json",
                          {**report.to_dict(), "finished": time.time()})
        yield from ()


def default_tasks(opts: ExecutorOptions, total_bytes: int) -> int:
    if opts.tasks or opts.workers:
        return opts.tasks or opts.workers
    if opts.executor == "local":
        return os.cpu_count() or 1
    return max(1, -(-total_bytes // TASK_BYTES))


def apply_with_executor(model: str | Path, inputs: list[str | Path], output: str | Path, opts: ExecutorOptions,
                        **settings) -> ap.ApplyReport | dict:
    """Run apply's tasks on opts.executor; the merged report (Slurm: what was submitted)."""
    if opts.executor not in ("local", "slurm", "ray"):
        raise UserError(f"--executor {opts.executor!r}: use local, slurm or ray")
    if opts.executor == "slurm" and not opts.partition:
        raise UserError("--executor slurm needs --partition NAME (the Slurm partition to submit to)")
    out = Path(output).resolve()
    ap.refuse_overlap(inputs, out)
    units = ap.discover(inputs)
    tasks = default_tasks(opts, sum(ap.input_stamps(units).get(u.rel, (0, 0))[0] for u in units))
    plan = ap.plan_tasks(inputs, tasks)
    if opts.executor == "local" and not settings.get("threads"):
        # the cores shared out between the processes that run at once
        settings["threads"] = max(1, (os.cpu_count() or 1) // min(opts.workers or os.cpu_count() or 1, tasks))
    elif opts.executor != "local" and not settings.get("threads"):
        settings["threads"] = opts.cpus_per_task
    work = out / WORK_DIR
    remember_plan(work, plan)
    configure_console(opts.debug)
    step = CorrectTask(str(Path(model).resolve()), str(out), plan, settings, ap.TEXT_CHUNK_BYTES)
    ex = make_executor([step], tasks, work / "logs", work / "slurm", "nichelm-apply", opts)
    split = sum(1 for units in plan.tasks for u in units if u.name)
    ranges = f" and {split} ranges of {len(plan.stamps)} big .txt files" if split else ""
    log(f"apply: {sum(len(u) for u in plan.tasks) - split} files{ranges} in {tasks} tasks; executor {opts.executor}; "
        f"logs in {work / 'logs'}")
    if opts.executor == "slurm":
        return submit(ex, tasks, work, opts)
    os.environ["NICHELM_DEBUG"] = "1" if opts.debug else "0"
    started = time.time()
    try:
        if opts.executor == "ray":
            start_ray(opts)
            run_ray([ex], [("correct", None, tasks)], work, opts.debug)
        else:
            ex.run()
    finally:
        os.environ.pop("NICHELM_DEBUG", None)
    return merged_report(work, tasks, len(units), started)


def remember_plan(work: Path, plan: ap.Plan) -> None:
    """plan.json: what the completion markers were earned on. Another plan (an input changed, added or
    removed, another task count) clears them, so every task runs again (its ledger skips finished work)."""
    now = {"tasks": [[[str(u.path), u.rel, u.start, u.end] for u in units] for units in plan.tasks],
           "stamps": {rel: list(st) for rel, st in ap.input_stamps([u for t in plan.tasks for u in t]).items()}}
    path = work / "plan.json"
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    if before != now:
        shutil.rmtree(work / "logs" / "completions", ignore_errors=True)
        atomic_write_json(path, now)


def merged_report(work: Path, tasks: int, files: int, started: float) -> ap.ApplyReport:
    """The tasks' reports as one; a task skipped as finished counts nothing "this run"."""
    reports = []
    for rank in range(tasks):
        try:
            r = json.loads((work / "reports" / f"task-{rank:05d}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if r.pop("finished") < started:
            r["documents_this_run"] = r["tokens_this_run"] = 0
        reports.append(r)
    report = ap.merge_reports(reports, files)
    report.seconds = time.time() - started
    return report


def submit(ex, tasks: int, work: Path, opts: ExecutorOptions) -> dict:
    script = sbatch_scripts([ex], [("correct", None, tasks)])["correct"]
    if opts.dry_run:
        path = work / "slurm" / "correct.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        log(f"dry run: sbatch script in {path}; nothing submitted")
        return {"submitted": False, "script": script}
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: no `sbatch` command here; run apply on a Slurm login node")
    ex.run()
    log(f"submitted Slurm job {ex.job_id} ({tasks} tasks); outputs appear in {work.parent} as tasks end; "
           "re-run the same command to resume after a failure")
    return {"submitted": True, "job_id": ex.job_id}
