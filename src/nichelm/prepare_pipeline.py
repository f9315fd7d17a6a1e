"""`nichelm prepare` at corpus scale: the steps of data/pipeline.py as datatrove jobs.

    calibrate  1 task   noise.calibrate_on only: fit the noise on those sources' train pairs
    examples   N tasks  read, split by document, raw OCR score, windows, noise -> per-piece example
                        parts, digests of train texts, tokenizer sample candidates
    tokenizer  1 task   source records (+ sha256), dedupe digest sets, tokenizer trained on the sample
                        (or the one tokenizer.from names, copied)
    tokens     N tasks  dedupe val/test, tokenize (marker-safe) -> per-piece token parts
    finish     1 task   llm.c shards, examples.*.jsonl, manifest.json; swap into RUN/data

Each job `depends` on the one before; datatrove's executors run them: LocalPipelineExecutor on one
machine (`--workers N`, a process per task), SlurmPipelineExecutor (`--executor slurm`: an sbatch
array per job, chained with afterok dependencies; this command returns once they are submitted) or
RayPipelineExecutor (`--executor ray`, joining the cluster at `--address`; run_ray runs the jobs in
order and stops at the first failed task with its error).

Memory is bounded whatever the corpus size: documents stream through the steps, every output is
written per piece as it is made, the tokenizer learns from a bounded seeded sample
(tokenizer.sample_chars), dedupe uses 64-bit digests, shards are written streaming. What grows with
the corpus is the train digest set of the tokenizer job (16 bytes per train example) and disk.

Resume: everything is built under RUN/.prepare/ (plan.json, parts/, staged/), with datatrove's
logging_dir of each job in RUN/logs/prepare/JOB/ (task logs, stats, a completion marker per task).
Re-running the same command skips finished tasks (datatrove's completion markers) and ends with the same bytes, since each output is a function of its
piece. A different plan (project, sources or --piece-mb changed) or --force starts RUN/.prepare over;
the old RUN/data stays in place until the finish job swaps the new one in whole.

The per-task console output of datatrove (loguru) is quiet unless --debug; everything goes to the
task logs under RUN/logs/prepare/JOB/logs/. This process shows one progress line per job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nichelm.config import Project
from nichelm.data import pipeline as pl
from nichelm.errors import UserError
from nichelm.io import atomic_write_json

JOBS = ("calibrate", "examples", "tokenizer", "tokens", "finish")
PLAN_VERSION = 2                 # 2: example parts are .jsonl.zst (were .jsonl.gz): an older build starts over


@dataclass
class ExecutorOptions:
    """Where datatrove tasks run (make_executor); `nichelm apply` takes the same options."""
    executor: str = "local"          # local | slurm | ray
    workers: int = 0                 # local: processes at once (0: all cores); slurm/ray: tasks at once (0: no limit)
    tasks: int = 0                   # tasks of the parallel jobs (prepare: 0 = one per piece)
    partition: str = ""              # slurm
    time: str = "04:00:00"           # slurm: time limit of each task
    cpus_per_task: int = 1           # slurm / ray
    mem_per_cpu_gb: float = 2.0      # slurm / ray
    env_command: str = ""            # slurm: how a job activates this Python environment (default: this venv)
    dry_run: bool = False            # slurm: write and return the sbatch scripts, submit nothing
    address: str = ""                # ray: the cluster to join ("HEAD:6379", "auto"; "": ray.init's default)
    debug: bool = False


@dataclass
class PrepareOptions(ExecutorOptions):
    piece_mb: float = 0              # size of a piece of work (0: the sources' size / 32, from 1 to 64 MiB)
    shard_tokens: int = 100_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_with_pipeline(project: Project, force: bool = False, options: PrepareOptions | None = None) -> dict:
    """Build or resume RUN/data with the datatrove jobs; returns the manifest (for Slurm: what was submitted)."""
    from nichelm.prepare import _clean_leftovers, already_prepared, fingerprint, source_states
    opts = options or PrepareOptions()
    if opts.executor not in ("local", "slurm", "ray"):
        raise UserError(f"--executor {opts.executor!r}: use local, slurm or ray")
    if opts.executor == "slurm" and not opts.partition:
        raise UserError("--executor slurm needs --partition NAME (the Slurm partition to submit to)")
    run = project.run_path
    reused = tokenizer_from(project)
    states = source_states(project)
    fp = fingerprint(project, states)
    if reused:                   # a changed file at the same path is a changed project
        fp = hashlib.sha256(f"{fp}:{reused['sha256']}".encode()).hexdigest()[:16]
    work = run / ".prepare"
    old = already_prepared(project, fp) if not force else None
    if old:
        shutil.rmtree(work, ignore_errors=True)       # a build of something else, or one killed after its swap
        log(f"{run / 'data' / 'manifest.json'}: data already prepared for this project (use --force to rebuild)")
        return old
    _clean_leftovers(run)
    configure_console(opts.debug)
    piece_bytes = max(int(opts.piece_mb * 2**20), 1024) if opts.piece_mb else auto_piece_bytes(project)
    pieces = pl.plan_pieces(project, piece_bytes)
    plan = {"version": PLAN_VERSION, "fingerprint": fp, "piece_bytes": piece_bytes,
            "shard_tokens": opts.shard_tokens, "tokenizer_from": reused, "pieces": pl.pieces_to_json(pieces),
            # each source's sha256 where the fingerprint hashed it (small sources), for the manifest
            "source_sha256": [files[0]["sha256"] for files in states]}
    plan_path = work / "plan.json"
    saved = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() and not force else None
    if saved is None or {k: v for k, v in saved.items() if k != "started"} != plan:
        if work.exists():
            log(f"{work}: starting over ({'--force' if force else 'the project, its sources or the plan changed'})")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pl.job_dir(work, "x").parent, ignore_errors=True)     # the completion markers go too
        (work / "parts").mkdir(parents=True)
        plan["started"] = time.time()
        atomic_write_json(plan_path, plan)
    else:
        plan = saved
    tasks = min(opts.tasks or len(pieces), len(pieces))
    jobs = build_jobs(project, work, pieces, tasks, plan, opts)
    skipped = {name: len(list((pl.job_dir(work, name) / "completions").glob("*"))) for name, _, _ in jobs}
    if any(skipped.values()):
        log("resuming: " + ", ".join(f"{name} {n}/{t} tasks already done (skipped)"
                                      for name, _, t in jobs if (n := skipped[name])))
    log(f"prepare: {len(pieces)} pieces of about {piece_bytes / 2**20:.3g} MB from {len(project.sources)} sources; "
        f"jobs {' -> '.join(f'{n} ({t})' for n, _, t in jobs)}; executor {opts.executor}; work in {work}")
    executors = make_executors(jobs, work, opts)
    if opts.executor == "slurm":
        return submit_slurm(executors, jobs, work, opts)
    os.environ["NICHELM_DEBUG"] = "1" if opts.debug else "0"      # seen by the task processes (quiet_task_logger)
    if opts.executor == "ray":
        start_ray(opts)
    progress = Progress(work, [(name, t) for name, _, t in jobs])
    progress.start()
    try:
        if opts.executor == "ray":
            run_ray(executors, jobs, work, opts.debug)
        else:
            executors[-1].run()        # runs the jobs before it first (depends)
    except Exception as e:
        raise _user_error(e) from None
    finally:
        progress.stop()
    manifest = json.loads((run / "data" / "manifest.json").read_text(encoding="utf-8"))
    print_summary(run, manifest)
    return manifest


def tokenizer_from(project: Project) -> dict | None:
    """tokenizer.from, checked against the task (data.tokenizer.reused_tokenizer): its path, sha256 and size."""
    if not project.tokenizer.from_:
        return None
    from nichelm.data.tokenizer import reused_tokenizer
    from nichelm.prepare import file_sha256
    tok, path = reused_tokenizer(project)
    return {"path": str(path), "sha256": file_sha256(path), "vocab_size": tok.get_vocab_size()}


def _user_error(e: Exception) -> Exception:
    """A UserError raised in a task process arrives as itself (datatrove re-raises it); keep it."""
    return e


def build_jobs(project: Project, work: Path, pieces: list[pl.Piece], tasks: int, plan: dict,
               opts: PrepareOptions) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of each job, in order."""
    n = len(pieces)
    fit_path = work / "noise_fit.json" if project.noise.calibrate_on else None
    jobs = []
    if project.noise.calibrate_on:
        names = {pl.source_name(s, i): i for i, s in enumerate(project.sources)}
        only = [names[name] for name in project.noise.calibrate_on]
        jobs.append(("calibrate", [pl.ReadSources(project, pieces, only_sources=only), pl.SplitDocuments(project),
                                   pl.FitNoise(project, fit_path)], 1))
    reused = plan.get("tokenizer_from")
    rate = 0.0 if reused else sample_rate(project, pieces)      # a reused tokenizer needs no sample
    jobs.append(("examples", [pl.ReadSources(project, pieces), pl.SplitDocuments(project), pl.MeasureRawOCR(project),
                              pl.MakeWindows(project.task), pl.AddNoise(project, fit_path),
                              pl.WriteExampleParts(work, project.seed, n, rate, project.task.text_outputs)], tasks))
    jobs.append(("tokenizer", [pl.MergeSourceStats(project, work, plan.get("source_sha256")),
                               pl.BuildDedupeSets(work, n, project.source_file),
                               pl.ReuseTokenizer(work, reused) if reused else pl.TrainTokenizer(project, work, n)], 1))
    jobs.append(("tokens", [pl.ReadExampleParts(work, n), pl.DedupeEval(work, project.task.text_outputs),
                            pl.Tokenize(project, work / "tokenizer.json"), pl.WriteTokenParts(work, n)], tasks))
    info = {"started": plan["started"], "pieces": n, "tasks": tasks, "executor": opts.executor,
            "shard_tokens": opts.shard_tokens, "tokenizer_from": reused}
    names = [name for name, _, _ in jobs] + ["finish"]
    jobs.append(("finish", [pl.ResetStaging(work), pl.WriteShards(project, work, n, opts.shard_tokens),
                            pl.ConcatExamples(work, n), pl.WriteManifest(project, work, names, plan["fingerprint"], info),
                            pl.SwapIn(project.run_path, work)], 1))
    return jobs


def auto_piece_bytes(project: Project) -> int:
    """Pieces small enough to keep every core busy on a mid-sized corpus (about 32 of them), from 1 MiB
    (a text document's grid) to pl.PIECE_BYTES; a function of the sources only, like the output."""
    total = sum(pl._size(project.resolve(s.path)) for s in project.sources)
    return int(min(max(total // 32, 1 << 20), pl.PIECE_BYTES)) >> 20 << 20


def sample_rate(project: Project, pieces: list[pl.Piece]) -> float:
    """Share of train examples drawn as tokenizer-sample candidates: about 1.5x tokenizer.sample_chars in all
    (the tokenizer job keeps the lowest priorities up to the limit). Estimated from the sources' bytes:
    a clean source's examples are twice its text (noisy input + output), compressed files ~4x their size."""
    cfg = project.split
    est = 0.0
    for pc in pieces:
        src = project.sources[pc.source]
        share = (1 - cfg.val_fraction - cfg.test_fraction) if src.split == "auto" else float(src.split == "train")
        packed = any(p.endswith(pl.COMPRESSED) for _, p in pc.files)
        est += pc.size * share * (2 if src.role == "clean" else 1) * (4 if packed else 1)
    return 1.0 if est <= 0 else min(1.0, 1.5 * project.tokenizer.sample_chars / est)


# What every task process needs, imported once by the forkserver that local workers fork from (in
# each worker it would cost 0.5 to 1 s of CPU per process: datatrove pulls in huggingface_hub).
FORKSERVER_PRELOAD = ["nichelm.data.pipeline", "nichelm.prepare", "nichelm.data.tokenizer", "nichelm.data.noise",
                      "nichelm.metrics"]


def make_executors(jobs, work: Path, opts: PrepareOptions) -> list:
    if opts.executor == "local":
        import multiprocess
        multiprocess.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    executors, prev = [], None
    for name, pipeline, tasks in jobs:
        prev = make_executor(pipeline, tasks, pl.job_dir(work, name), pl.job_dir(work, "slurm") / name,
                             f"nichelm-{name}", opts, depends=prev)
        executors.append(prev)
    return executors


def make_executor(pipeline: list, tasks: int, logs: Path, slurm_logs: Path, job_name: str, opts: ExecutorOptions,
                  depends=None):
    """The datatrove executor of one job (prepare's and apply's): local processes, a Slurm array or Ray
    tasks; logs is its logging_dir (task logs, stats, completion markers)."""
    if opts.executor == "local":
        from datatrove.executor import LocalPipelineExecutor
        workers = min(opts.workers or os.cpu_count() or 1, tasks)
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logs), depends=depends)
    if opts.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor
        return SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=opts.time, partition=opts.partition, cpus_per_task=opts.cpus_per_task,
            mem_per_cpu_gb=opts.mem_per_cpu_gb, workers=opts.workers or -1, job_name=job_name,
            qos="", env_command=opts.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}",
            logging_dir=str(logs), slurm_logs_folder=str(slurm_logs), depends=depends)
    # no depends: run_ray runs the jobs in order and stops at a failed one
    return ray_executor(pipeline, tasks=tasks, workers=opts.workers or -1, logging_dir=str(logs),
                        cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb)


def sbatch_scripts(executors, jobs) -> dict[str, str]:
    """The sbatch script each Slurm job would be submitted with (what SlurmPipelineExecutor.launch_job
    writes to LOGS/launch_script.slurm), without submitting anything."""
    scripts = {}
    for ex, (name, _, tasks) in zip(executors, jobs):
        max_array = min(tasks, ex.max_array_size) if ex.max_array_size != -1 else tasks
        run = f"srun -l -n {ex.nodes_per_task} launch_pickled_pipeline {ex.logging_dir.resolve_paths('executor.pik')}"
        scripts[name] = ex.get_launch_file_contents(ex.get_sbatch_args(max_array), run)
    return scripts


def submit_slurm(executors, jobs, work: Path, opts: PrepareOptions) -> dict:
    if opts.dry_run:
        scripts = sbatch_scripts(executors, jobs)
        folder = pl.job_dir(work, "slurm")
        for name, text in scripts.items():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.sbatch").write_text(text)
        log(f"dry run: sbatch scripts in {folder}; nothing submitted")
        return {"submitted": False, "scripts": scripts}
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: no `sbatch` command here; run prepare on a Slurm login node")
    executors[-1].run()                # submits every job, each depending on the one before
    ids = {name: ex.job_id for ex, (name, _, _) in zip(executors, jobs)}
    log("submitted Slurm jobs " + ", ".join(f"{n}={i}" for n, i in ids.items())
        + f"; the data appears in {work.parent / 'data'} when the last one ends; re-run the same command to "
          "resume after a failure")
    return {"submitted": True, "job_ids": ids}


def start_ray(opts: ExecutorOptions) -> None:
    """Join the Ray cluster at --address ("auto": the one started on this machine by `ray start`), or start
    a Ray for this run when there is none. Its workers import nichelm: every node needs this environment."""
    # Ray >= 2.52 turns token auth on for a cluster started where a token exists (~/.ray/auth_token), but a
    # driver joining it sends the token only under RAY_AUTH_MODE=token; set that as `ray start` does (a
    # cluster without auth accepts a driver that sends one). Read when Ray is imported: before it.
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if "RAY_AUTH_MODE" not in os.environ and (token or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'nichelm[ray]'") from None
    if ray.is_initialized():
        return
    import logging
    try:
        ray.init(address=opts.address or None, log_to_driver=opts.debug,
                 logging_level=logging.INFO if opts.debug else logging.WARNING,
                 runtime_env={"env_vars": {"NICHELM_DEBUG": "1" if opts.debug else "0"}})
    except ConnectionError as e:
        raise UserError(f"--address {opts.address or 'auto'}: could not join a Ray cluster ({str(e).splitlines()[0]}); "
                        "is one running there (`ray start --head` prints its address) and, if it asks for a token, "
                        "is the token in ~/.ray/auth_token or RAY_AUTH_TOKEN?") from None
    # A task no node can hold would wait for its resources forever: say so now
    need = {"CPU": opts.cpus_per_task, "memory": opts.mem_per_cpu_gb * opts.cpus_per_task * 2**30}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        most = max(nodes, key=lambda r: r.get("memory", 0), default={})
        raise UserError(f"--executor ray: each task asks for {opts.cpus_per_task} CPU(s) and "
                        f"{need['memory'] / 2**30:.3g} GB, more than any node of the cluster has (at most "
                        f"{most.get('CPU', 0):g} CPUs, {most.get('memory', 0) / 2**30:.3g} GB); lower "
                        "--cpus-per-task or --mem-per-cpu-gb")


def ray_executor(pipeline, **kwargs):
    """A RayPipelineExecutor whose failed tasks leave their error in LOGS/errors/RANK.json, so that
    run_ray can report it: datatrove's own Ray executor only logs a task's exception."""
    from datatrove.executor.ray import RayPipelineExecutor

    class RayExecutor(RayPipelineExecutor):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            try:
                return super()._run_for_rank(rank, local_rank, node_rank)
            except Exception as e:
                with self.logging_dir.open(f"errors/{rank:05d}.json", "w") as f:
                    json.dump({"user_error": isinstance(e, UserError), "message": str(e),
                               "type": type(e).__name__}, f)
                raise

    with quiet_ray_executor(False):            # its warning that a local logging_dir must be shared (README says so)
        return RayExecutor(pipeline, **kwargs)


@contextmanager
def quiet_ray_executor(debug: bool):
    """datatrove's Ray executor driver messages off (unless --debug): run_ray reports failures itself."""
    from datatrove.utils.logging import logger
    if debug:
        yield
        return
    logger.disable("datatrove.executor.ray")
    try:
        yield
    finally:
        logger.enable("datatrove.executor.ray")


def run_ray(executors, jobs, work: Path, debug: bool = False) -> None:
    """Run the jobs in order on the Ray cluster; stop at the first with an unfinished task. (datatrove's
    `depends` would wait forever for a failed dependency, in 2-minute sleeps.)"""
    for ex, (name, _, _) in zip(executors, jobs):
        logs = Path(ex.logging_dir.path)               # the job's logging_dir (pl.job_dir for prepare's jobs)
        for rank in ex.get_incomplete_ranks():
            (logs / "errors" / f"{rank:05d}.json").unlink(missing_ok=True)
        with quiet_ray_executor(debug):
            ex.run()
        failed = ex.get_incomplete_ranks()
        if not failed:
            continue
        rank = failed[0]
        try:
            info = json.loads((logs / "errors" / f"{rank:05d}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None                # none written: the worker died (out of memory, node lost, ...)
        if info and info["user_error"]:
            raise UserError(info["message"])
        cause = f"{info['type']}: {info['message']}" if info else "its worker died"
        raise UserError(f"ray: {len(failed)} {name} task(s) failed, first task {rank} ({cause}); its log: "
                        f"{logs / 'logs' / f'task_{rank:05d}.log'}; re-run the same command "
                        "to resume")


# ------------------------------------------------------------------ console


def configure_console(debug: bool) -> None:
    """This process's loguru output (datatrove's driver messages): warnings only unless --debug."""
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level="INFO" if debug else "WARNING",
               filter=None if debug else (lambda r: r["exception"] is None))


class Progress:
    """One line per job: a tqdm bar on a terminal, else a plain line when a job moves on (at most
    every 30 s) and when it ends. Counted from datatrove's completion markers."""

    def __init__(self, work: Path, jobs: list[tuple[str, int]]):
        self.work, self.jobs = work, jobs
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _done(self, name: str) -> int:
        return len(list((pl.job_dir(self.work, name) / "completions").glob("*")))

    def _loop(self) -> None:
        bars, last, said, t0 = {}, {}, {}, time.time()
        while True:
            stopping = self._stop.wait(0.5)
            for i, (name, total) in enumerate(self.jobs):
                done = self._done(name)
                if self.tty:
                    if name not in bars and (done or any(self._done(n) for n, _ in self.jobs[i + 1:]) or
                                             (i == 0 or self._done(self.jobs[i - 1][0]) >= self.jobs[i - 1][1])):
                        from tqdm import tqdm
                        bars[name] = tqdm(total=total, desc=f"{name:>9}", unit="task", leave=True, position=i,
                                          file=sys.stderr)
                    if name in bars and bars[name].n != done:
                        bars[name].update(done - bars[name].n)
                elif done != last.get(name, 0) and (done == total or time.time() - said.get(name, 0) > 30):
                    log(f"  {name}: {done}/{total} tasks done ({time.time() - t0:.0f} s)")
                    said[name] = time.time()
                    last[name] = done
            if stopping:
                for bar in bars.values():
                    bar.close()
                return


def print_summary(run: Path, manifest: dict) -> None:
    for s in manifest["sources"]:
        line = f"  {s['name']}: {s['documents']} documents"
        if "raw_ocr" in s:
            r = s["raw_ocr"]
            line += (f", raw OCR corpus CER {100 * r['cer']:.2f}% WER {100 * r['wer']:.2f}% over "
                     f"{r['gold_chars']:,} gold characters")
        else:
            line += f" (clean; synthetic noise at target CER {100 * manifest['noise']['target_cer']:.2f}%)"
        if s.get("skip", {}).get("bad_records"):
            line += f"; {s['skip']['bad_records']} bad records skipped"
        log(line)
    t = manifest["timing"]
    log(f"prepared {run}: examples train/val/test = {manifest['examples']['train']}/{manifest['examples']['val']}/"
        f"{manifest['examples']['test']}, {manifest['tokens']['train']:,} train tokens, vocabulary "
        f"{manifest['tokenizer']['vocab_size']}")
    log(f"  {t['elapsed_s']:.1f} s: {t['documents_per_s']:,.0f} documents/s, {t['mb_per_s']:.2f} MB/s, "
        f"{t['tokens_per_s']:,.0f} tokens/s; task time " + ", ".join(f"{k} {v:.1f} s" for k, v in t["task_s"].items()))
