"""The BLN600 archive tasks (issue 15) at a CPU budget: prepare, train, evaluate; the model beside the baselines.

    python bench/task_bln600.py [PROJECT ...] [--work DIR] [--minutes 10] [--steps N]

PROJECT: task project files (default: examples/bln600_dating.toml and examples/bln600_quality.toml; they read
../shared/data/ocr/bln600/train.csv beside the project, never copied in: a task whose data is absent is
skipped, with the reason, in its JSON). For each, in DIR/<project name> (DIR: --work, else a new temporary
folder, kept), three processes run one after the other, as a user runs them:

  nichelm prepare PROJECT --set run_dir=RUN
  nichelm train PROJECT --set run_dir=RUN --set train.max_minutes=M --set train.max_steps=S
  nichelm evaluate PROJECT --set run_dir=RUN --device cpu

The training budget is --minutes of wall clock (train.max_minutes: the lr schedule follows elapsed time;
0 = none) and/or --steps (train.max_steps; default: the project's own when --minutes is 0, else no step
limit), whichever ends first. Each stage's wall and CPU seconds (user + system of the process) are recorded;
steps reached and tokens trained come from the last checkpoint (trainer.json).

Prints ONE JSON object per task: the model's accuracy, macro-F1 and Spearman (ordered labels) on the
held-out test windows, and per document where evaluate scores documents (one label per document, e.g. a
date), beside the majority class and TF-IDF + logistic regression from the same report (RUN/eval/report.json),
the model (arch, preset, parameters), the training reached and the commands run. main() returns the list.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROJECTS = [ROOT / "examples" / "bln600_dating.toml", ROOT / "examples" / "bln600_quality.toml"]
NO_STEP_LIMIT = 10_000_000            # with a time budget, the clock ends the run
METRICS = ("accuracy", "macro_f1", "spearman", "n")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="*", type=Path, help="task project files (default: both BLN600 examples)")
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary folder, kept)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per task (0: none)")
    ap.add_argument("--steps", type=int, default=0, help="training step limit (0: the project's when --minutes "
                                                          "is 0, else none)")
    args = ap.parse_args(argv)
    if args.minutes < 0 or args.steps < 0:
        ap.error("--minutes and --steps are 0 or more")
    return args


def _cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run_stage(cmd: list[str]) -> dict:
    """Run one stage as its own process (this one only waits): its wall and CPU seconds, and why it failed."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
           "cpu_s": round(_cpu_seconds() - cpu0, 1)}
    if proc.returncode != 0:
        out["error"] = proc.stdout[-2000:]
    return out


def missing_data(project_file: Path) -> str | None:
    """Why the task cannot run here (a source file absent), or None. Read before load_project, which
    refuses a project whose data is absent."""
    raw = tomllib.loads(project_file.read_text(encoding="utf-8"))
    for source in raw.get("sources", []):
        given = str(source.get("path", ""))
        path = project_file.parent / Path(given).expanduser()        # relative paths: to the project file
        if given and not given.startswith("package:") and not path.exists():
            return (f"{path} is absent: the BLN600 data lives in ../shared beside the project (never copied "
                    "into the repository); this benchmark needs it")
    return None


def last_checkpoint(run: Path) -> dict:
    """trainer.json of the newest complete checkpoint: step, elapsed_s, tokens, model_config."""
    done = sorted(p.parent for p in (run / "checkpoints").glob("step_*/COMPLETE"))
    return json.loads((done[-1] / "trainer.json").read_text()) if done else {}


def scores(part: dict) -> dict:
    """The model and both baselines of one part of evaluate's report (windows, or by_document)."""
    def pick(m):
        return {k: m[k] for k in METRICS if m.get(k) is not None}
    return {"model": pick(part["metrics"]), **{name: pick(m) for name, m in part["baselines"].items()}}


def bench_task(project_file: Path, work: Path, minutes: float, steps: int) -> dict:
    from nichelm.config import load_project
    result = {"task": project_file.stem, "project": str(project_file)}
    why = missing_data(project_file)
    if why:
        return {**result, "skipped": why}
    project = load_project(project_file)
    result["task"] = getattr(project.task, "name", project_file.stem)
    run = (work / project_file.stem).resolve()
    if (run / "checkpoints").exists():
        return {**result, "error": f"{run}/checkpoints exists: training would resume it; give a new --work"}
    max_steps = steps or (NO_STEP_LIMIT if minutes > 0 else project.train.max_steps)
    base = [sys.executable, "-m", "nichelm"]
    where = ["--set", f"run_dir={json.dumps(str(run))}"]
    stages = {
        "prepare": [*base, "prepare", str(project_file), *where],
        "train": [*base, "train", str(project_file), *where, "--set", f"train.max_minutes={minutes}",
                  "--set", f"train.max_steps={max_steps}"],
        "evaluate": [*base, "evaluate", str(project_file), *where, "--device", "cpu"],
    }
    result["commands"] = [shlex.join(c) for c in stages.values()]
    result["stages"] = {}
    for stage, cmd in stages.items():
        done = result["stages"][stage] = run_stage(cmd)
        if done["rc"] != 0:
            return {**result, "error": f"{stage} failed (exit {done['rc']}); see stages.{stage}.error"}

    trained = last_checkpoint(run)
    report = json.loads((run / "eval" / "report.json").read_text())
    m = project.model
    result.update({
        "model": {"arch": m.arch, "preset": m.preset, "block_size": m.block_size,
                  "params": count_params(trained["model_config"])},
        "train": {"budget_minutes": minutes, "max_steps": max_steps, "steps": trained["step"],
                  "tokens": trained["tokens"], "elapsed_s": round(trained["elapsed_s"], 1),
                  "cpu_s": result["stages"]["train"]["cpu_s"], "batch_size": project.train.batch_size,
                  "lr": project.train.lr},
        "labels": report["task"]["labels"],
        "test": {"windows": report["n_examples"], "documents": report["n_documents"], **scores(report)},
    })
    if "by_document" in report:
        result["test_by_document"] = scores(report["by_document"])
    model, tfidf = result["test"]["model"], result["test"]["tfidf_logreg"]
    result["model_beats_tfidf_logreg"] = {k: model[k] > tfidf[k] for k in ("accuracy", "macro_f1", "spearman")
                                          if k in model and k in tfidf}
    return result


def count_params(model_config: dict) -> int:
    from nichelm.model import GPT, ModelConfig
    return sum(p.numel() for p in GPT(ModelConfig(**model_config)).parameters())


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="nichelm-task-bln600-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results = []
    for project_file in args.projects or DEFAULT_PROJECTS:
        result = {**bench_task(project_file.resolve(), work, args.minutes, args.steps), "work": str(work),
                  "machine": machine}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
