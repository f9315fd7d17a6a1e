"""Fault-injection campaign: SIGKILL `prepare`, `train` and `apply` at seeded random moments, re-run them,
and compare with uninterrupted runs; then disk full, read-only output folders and corrupted files.

    python bench/fault_campaign.py [--kills 100] [--seed 0] [--commands prepare,train,apply]
                                   [--cases all|none|NAME,...] [--modes early,uniform,work,write,end]
                                   [--kills-per-trial 3] [--jobs 1] [--workdir DIR] [--keep] [--out FILE]

Everything runs on a tiny project it writes itself (eager CPU, one thread, 40 training steps with a
checkpoint every 5), as a user runs it: `python -m nichelm ...` in a subprocess.

Kills. For each command: two uninterrupted reference runs (they must agree byte for byte, else no
comparison means anything), timed while the output folder is watched. Then trials: each starts from the
command's starting state (prepare: no run folder; train: a copy of the prepared data; apply: no output
folder), runs the command and SIGKILLs it by a seeded plan, up to --kills-per-trial times, then runs it
to completion and compares every output with the reference, byte for byte (timing fields of json files
left out). A plan is one of
  early    a moment in the start-up, before the reference run changed its output folder
  uniform  a moment in the whole reference duration
  work     a moment in the work: a random delay after this run first changes the output folder, up
           to the reference run's time from its first change to its end
  write    right after the m-th write seen in the output folder (a file appears, grows or is replaced;
           m up to the number the reference run showed): between one write and the next, e.g. after
           data and before the record that counts it
  end      the moment every file of the finished output exists (the last renames, clean-up after them)
A kill "lands" when the process was still running (exit status -9). Counted: kills, re-runs and their
exit codes, mismatches (with the file), crashes (a run that ends on its own with a non-zero exit or a
traceback), leftover files (temporary files or incomplete checkpoints that stay behind: harmless, listed).

Fault cases (--cases). Disk full: a small tmpfs mounted over the output (root; otherwise RLIMIT_FSIZE
with SIGXFSZ ignored, so writes fail with EFBIG). Read-only: the tmpfs remounted read-only (as root,
permissions do not stop writes; not root: chmod). Corrupted files: truncated or bit-flipped checkpoints,
shards, tokenizer, manifest, metrics and apply ledgers, then the command that reads them. A case passes
when the command either ends with exit 1 or 2 and a one-line error (naming the file where one file is at
fault), leaving the earlier outputs as they were, or succeeds with outputs equal to the reference; a
traceback, another exit status, or a success with different outputs (a silent wrong result) fails.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The committee met at the town hall on Monday evening to consider the new road.",
    "A large number of persons assembled in the market place before the meeting began.",
    "The prisoner was brought up on remand and charged with stealing a silver watch.",
    "It was resolved that the thanks of the meeting be given to the chairman.",
    "The weather during the week has been unusually cold for the time of year.",
    "Several gentlemen addressed the assembly in favour of the proposed measure.",
]
MAX_STEPS, CHECKPOINT_EVERY = 40, 5
# json keys that hold timings (elapsed_s, tokens_per_s, data_s_per_step, mfu, time, ...): left out of comparisons
TIMING_KEY = re.compile(r"(^|_)(s|seconds|time|timing|mfu|at|date|created)(_|$)")
MODES = {"early": 0.1, "uniform": 0.2, "work": 0.3, "write": 0.25, "end": 0.15}
COMMANDS = ("prepare", "train", "apply")


# ---------------------------------------------------------------- the tiny project

def noisy(i: int) -> str:
    text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 3))
    return text.replace("e", "c", 1 + i % 2).replace("th", "tb", i % 2)


def make_project(root: Path) -> Path:
    """Sources, the project file and apply's inputs (30 .txt, a .jsonl of 80 long lines, a .parquet of 40 rows)."""
    clean = root / "clean"
    clean.mkdir(parents=True)
    for doc in range(12):
        lines = [SENTENCES[i % len(SENTENCES)].replace("the", ["the", "a", "this"][i % 3], 1) + f" Item {doc}.{i}."
                 for i in range(25)]
        (clean / f"doc{doc:02d}.txt").write_text("\n".join(lines) + "\n")
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(60):
            gold = SENTENCES[i % len(SENTENCES)] + f" No. {i}."
            f.write(json.dumps({"id": f"d{i}", "ocr": gold.replace("e", "c", 1), "gold": gold}) + "\n")
    (root / "project.toml").write_text(f"""
run_dir = "run"        # every command here names its own with --set run_dir=...
seed = 7
[task]
window_chars = 60
[[sources]]
name = "clean"
path = "clean"
format = "text"
role = "clean"
licence = "test text"
[[sources]]
name = "pairs"
path = "pairs.jsonl"
format = "jsonl"
input_field = "ocr"
output_field = "gold"
id_field = "id"
licence = "test pairs"
[noise]
target_cer = 0.05
[split]
val_fraction = 0.1
test_fraction = 0.1
[tokenizer]
vocab_size = 320
[model]
preset = "nano"
n_layer = 2
n_embd = 64
block_size = 96
[train]
max_steps = {MAX_STEPS}
batch_size = 8
eval_every = 10
eval_batches = 2
warmup_steps = 2
threads = 1
compile = false        # compiled CPU training is not bit-reproducible run to run
checkpoint_every = {CHECKPOINT_EVERY}
keep_checkpoints = 2
""")
    inputs = root / "in"
    inputs.mkdir()
    for i in range(30):
        (inputs / f"doc{i:02d}.txt").write_text(noisy(i) + ("\n" if i % 4 else ""))
    # Lines long enough that a group's output outgrows the write buffer: the partial file then holds
    # lines no ledger record counts yet for a while, which a resume must cut off.
    with (inputs / "records.jsonl").open("w") as f:
        for i in range(80):
            f.write(json.dumps({"id": i, "text": noisy(i + 7), "meta": f"é {i} " + "x" * 600}, ensure_ascii=False)
                    + "\n")
    try:
        import pyarrow
        import pyarrow.parquet
        pyarrow.parquet.write_table(pyarrow.table({"id": list(range(40)), "text": [noisy(i + 3) for i in range(40)]}),
                                    inputs / "books.parquet", row_group_size=16)
    except ImportError:
        pass
    return root / "project.toml"


# ---------------------------------------------------------------- running a command

def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false")
    e.pop("PYTHONSTARTUP", None)
    return e


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file under root (none when it does not exist)."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            found[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return found


class Run:
    """One subprocess, optionally killed by a plan; watches the output folder while it runs."""

    def __init__(self, argv: list[str], watch: Path, stderr_path: Path, limit_fsize: int | None = None):
        self.argv, self.watch, self.stderr_path, self.limit_fsize = argv, watch, stderr_path, limit_fsize

    def command(self) -> list[str]:
        if self.limit_fsize is None:
            return self.argv
        # "Disk full" without a mount: writes past the limit fail with EFBIG (SIGXFSZ ignored). A shell
        # sets the limit (a preexec_fn is unsafe with threads); ulimit -f counts 1024-byte blocks.
        return ["bash", "-c", f'trap "" XFSZ; ulimit -f {self.limit_fsize // 1024}; exec "$@"', "bash", *self.argv]

    def go(self, plan: dict | None = None, final: set[str] = frozenset(), timeout: float = 600.0,
           record: bool = False) -> dict:
        """Run to the end, or until the plan says kill. record: note when the folder first changes and
        count the writes seen in it (the reference runs)."""
        before = prev = snapshot(self.watch)
        writes, first_change = 0, None
        watched = ("write", "end", "work")          # the plans that need the folder watched
        poll = record or (plan is not None and plan["mode"] in watched)
        with open(self.stderr_path, "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err, env=env(),
                                    start_new_session=True)
            killed_at = None
            while proc.poll() is None:
                now = time.monotonic() - start
                if now > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return {"rc": "timeout", "seconds": round(now, 3), "landed": False, "stderr": self.stderr()}
                kill = False
                if poll:
                    snap = snapshot(self.watch)
                    if first_change is None and snap != before:
                        first_change = now
                    writes += sum(1 for k, v in snap.items() if prev.get(k) != v)
                    prev = snap
                    if plan and plan["mode"] == "write":
                        kill = writes >= plan["m"]
                    elif plan and plan["mode"] == "end":
                        kill = final <= set(snap) and snap != before
                    elif plan and plan["mode"] == "work":
                        kill = first_change is not None and now >= first_change + plan["after_first_change"]
                if plan and plan["mode"] not in watched:
                    kill = now >= plan["at"]
                if kill:
                    killed_at = now
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                    break
                time.sleep(0.002 if poll else min(0.01, max(0.0005, plan["at"] - now) if plan else 0.01))
            seconds = time.monotonic() - start
        out = {"rc": proc.returncode, "seconds": round(seconds, 3), "landed": proc.returncode == -signal.SIGKILL}
        if killed_at is not None:
            out["killed_at"] = round(killed_at, 3)
        if record:
            out.update(first_change=first_change, writes=writes)
        if not out["landed"]:
            out["stderr"] = self.stderr()
        return out

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def crashed(r: dict) -> bool:
    return r["rc"] != 0 or "Traceback" in r.get("stderr", "")


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------- outputs and their comparison

def _normalise_json(obj):
    if isinstance(obj, dict):
        return {k: _normalise_json(v) for k, v in obj.items() if not TIMING_KEY.search(k)}
    if isinstance(obj, list):
        return [_normalise_json(v) for v in obj]
    return obj


def normalised(path: Path) -> bytes:
    """A file's bytes; json and jsonl without timing fields (which differ run to run by design)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".json") and path.name != "tokenizer.json":
            return json.dumps(_normalise_json(json.loads(data)), sort_keys=True).encode()
        if path.name == "metrics.jsonl":
            return b"".join(json.dumps(_normalise_json(json.loads(line)), sort_keys=True).encode() + b"\n"
                            for line in data.splitlines() if line.strip())
        if path.name == "COMPLETE":       # "step N" + the files' sha256; trainer.json's holds its timings
            head, _, sums = data.decode().partition("\n")
            sums = json.loads(sums) if sums.strip() else {}
            sums.get("sha256", {}).pop("trainer.json", None)
            return (head + "\n" + json.dumps(sums, sort_keys=True)).encode()
    except ValueError:
        return b"unreadable json: " + data
    return data


def is_leftover(rel: str) -> bool:
    """Temporary files, hidden files and folders (partial outputs, staging), incomplete checkpoints."""
    parts = rel.split("/")
    return any(p.startswith(".") or p.endswith((".tmp", ".partial")) or "staging" in p for p in parts)


class Outputs:
    """What a finished command leaves that must equal the reference, per command."""

    # Not outputs: prepare's per-task logs (timings); train's inputs (copied in from the reference).
    SKIP = {"prepare": {"logs"}, "train": {"data", "tokenizer", "task.json"}, "apply": set()}
    # Caches keyed by another file's size and mtime (a stale one is rebuilt), so never equal run to run.
    CACHES = (".starts.npy",)

    @staticmethod
    def collect(command: str, target: Path) -> dict[str, bytes]:
        files = {}
        for rel in sorted(snapshot(target)):
            rel_posix = Path(rel).as_posix()
            top = rel_posix.split("/")[0]
            if (top in Outputs.SKIP[command] or rel_posix.endswith(Outputs.CACHES)
                    or (command == "apply" and Path(rel).name.startswith(".nichelm-ledger"))):
                continue
            if command == "train" and top == "checkpoints":
                ckpt = target / Path(rel_posix).parent
                if not (ckpt / "COMPLETE").is_file():
                    files[rel_posix] = None       # an incomplete checkpoint: never loaded, a leftover
                    continue
            files[rel_posix] = None if is_leftover(rel_posix) else normalised(target / rel)
        return files

    @staticmethod
    def compare(ref: dict, got: dict) -> tuple[list[str], list[str]]:
        """(mismatches: 'FILE: why', leftovers: files that stayed behind)."""
        mismatches, leftovers = [], []
        for rel in sorted(set(ref) | set(got)):
            if rel not in got:
                if ref[rel] is not None:
                    mismatches.append(f"{rel}: missing")
            elif got[rel] is None:
                leftovers.append(rel)
            elif rel not in ref:
                mismatches.append(f"{rel}: not in the uninterrupted run's output")
            elif ref[rel] != got[rel]:
                mismatches.append(f"{rel}: differs")
        return mismatches, leftovers


def digest(root: Path, rels=None) -> dict[str, str]:
    """sha256 of files under root (all, or the given relative paths: missing ones map to 'missing')."""
    rels = sorted(snapshot(root)) if rels is None else rels
    out = {}
    for rel in rels:
        p = root / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return out


# ---------------------------------------------------------------- small filesystems

class Mounts:
    """tmpfs mounts for disk-full and read-only cases, or the fallbacks where mount is not allowed."""

    def __init__(self, work: Path, allow_mount: bool = True):
        self.mounted: list[Path] = []
        probe = work / ".mount-probe"
        probe.mkdir(parents=True, exist_ok=True)
        self.method = "tmpfs" if allow_mount and self._mount(probe, "size=1m") else "rlimit"
        if self.method == "tmpfs":
            self.umount(probe)
        self.readonly = "tmpfs" if self.method == "tmpfs" else ("chmod" if os.geteuid() != 0 else None)

    def _mount(self, path: Path, opts: str) -> bool:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if r.returncode == 0:
            self.mounted.append(path)
        return r.returncode == 0

    def tmpfs(self, path: Path, size: str = "64m") -> None:
        path.mkdir(parents=True, exist_ok=True)
        if not self._mount(path, f"size={size}"):
            raise RuntimeError(f"mount tmpfs on {path} failed")

    @staticmethod
    def remount(path: Path, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True)

    @staticmethod
    def used(path: Path) -> int:
        st = os.statvfs(path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self, path: Path) -> None:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        if path in self.mounted:
            self.mounted.remove(path)

    def close(self) -> None:
        for path in list(reversed(self.mounted)):
            self.umount(path)


# ---------------------------------------------------------------- the campaign

class Campaign:
    def __init__(self, work: Path, seed: int, kills_per_trial: int, jobs: int, allow_mount: bool = True,
                 modes: dict[str, float] = MODES):
        self.work, self.seed, self.kpt, self.jobs, self.modes = work, seed, kills_per_trial, jobs, modes
        self.project = make_project(work / "project")
        self.inputs = work / "project" / "in"
        self.mounts = Mounts(work, allow_mount)
        self.refs: dict[str, dict] = {}
        self.setup_lock = threading.Lock()       # states several cases copy are built once

    def path(self, name: str) -> Path:
        base = self.work / f"case-{name}"
        base.mkdir(parents=True)
        return base

    # -------- one command, from its starting state

    def argv(self, command: str, target: Path, *extra: str) -> list[str]:
        py = [sys.executable, "-m", "nichelm"]
        if command == "apply":
            return [*py, "apply", "--model", str(self.work / "ref-train" / "run"), "--input", str(self.inputs),
                    "--output", str(target), "--batch-size", "8", "--threads", "1",
                    "--guard", "-1", *extra]             # guard off: the outputs are the model's own
        return [*py, command, str(self.project), "--set", f"run_dir={target}", *extra]

    def start_state(self, command: str, target: Path) -> None:
        """prepare: no run folder; train: the reference's prepared data; apply: no output folder."""
        if command == "train":
            src = self.work / "ref-prepare" / "run"
            target.mkdir(parents=True)
            for name in ("data", "tokenizer"):
                shutil.copytree(src / name, target / name)
            shutil.copy2(src / "task.json", target / "task.json")

    def reference(self, command: str) -> dict:
        """Two uninterrupted runs, timed and watched; they must agree."""
        runs = []
        for k in range(2):
            base = self.work / (f"ref-{command}" if k == 0 else f"ref2-{command}")
            target = base / ("out" if command == "apply" else "run")
            base.mkdir(parents=True)
            self.start_state(command, target)
            runs.append((target, Run(self.argv(command, target), target, base / "stderr.txt").go(record=True)))
        (target0, r0), (target1, r1) = runs
        if crashed(r0) or crashed(r1):
            raise RuntimeError(f"reference {command} failed: {last_line(r0.get('stderr', ''))} "
                               f"{last_line(r1.get('stderr', ''))}")
        files = Outputs.collect(command, target0)
        differ, _ = Outputs.compare(files, Outputs.collect(command, target1))
        final = set(snapshot(target0))
        ref = {"target": target0, "files": files, "final": final, "seconds": r0["seconds"],
               "first_change": r0["first_change"] or 0.0,
               "writes": max(1, r0["writes"]),
               "repeatable": not differ, "repeat_differs": differ[:5]}
        self.refs[command] = ref
        return ref

    def plan(self, rng: random.Random, ref: dict) -> dict:
        mode = rng.choices(list(self.modes), weights=list(self.modes.values()))[0]
        total, t0 = ref["seconds"], min(ref["first_change"], ref["seconds"])
        if mode == "early":
            return {"mode": mode, "at": rng.uniform(0, max(t0, 0.05))}
        if mode == "uniform":
            return {"mode": mode, "at": rng.uniform(0, total * 1.02)}
        if mode == "work":
            return {"mode": mode, "after_first_change": rng.uniform(0, (total - t0) * 1.02)}
        if mode == "write":
            return {"mode": mode, "m": rng.randint(1, ref["writes"])}
        return {"mode": mode}

    def trial(self, command: str, index: int) -> dict:
        ref = self.refs[command]
        rng = random.Random(f"{self.seed}-{command}-{index}")
        base = self.work / f"trial-{command}-{index:04d}"
        target = base / ("out" if command == "apply" else "run")
        base.mkdir(parents=True)
        self.start_state(command, target)
        argv = self.argv(command, target)
        timeout = max(120.0, 20 * ref["seconds"])
        runs = []
        for k in range(self.kpt + 1):
            plan = self.plan(rng, ref) if k < self.kpt else None
            r = Run(argv, target, base / f"stderr-{k}.txt").go(plan, final=ref["final"], timeout=timeout)
            r["plan"] = plan
            runs.append(r)
            if not r["landed"]:
                break                              # it ran to its end (or crashed): that is the final run
        final = runs[-1]
        result = {"trial": index, "runs": [{k: v for k, v in r.items() if k != "stderr"} for r in runs],
                  "kills_landed": sum(r["landed"] for r in runs),
                  "crashes": [{"run": i, "rc": r["rc"], "resume": i > 0, "stderr": last_line(r.get("stderr", "")),
                               "traceback": "Traceback" in r.get("stderr", "")}
                              for i, r in enumerate(runs) if not r["landed"] and crashed(r)]}
        if not crashed(final):
            result["mismatches"], result["leftovers"] = Outputs.compare(ref["files"], Outputs.collect(command, target))
        else:
            result["mismatches"], result["leftovers"] = [], []
        if not (result["mismatches"] or result["crashes"]):
            shutil.rmtree(base, ignore_errors=True)
        return result

    def kill_campaign(self, command: str, kills: int) -> dict:
        ref = self.refs[command]
        results, index = [], 0
        with futures.ThreadPoolExecutor(self.jobs) as pool:
            while sum(r["kills_landed"] for r in results) < kills and index < 3 * kills + 3:
                missing = kills - sum(r["kills_landed"] for r in results)
                batch = range(index, index + max(1, -(-missing // self.kpt)))
                index += len(batch)
                results += list(pool.map(lambda i: self.trial(command, i), batch))
        runs = [r for t in results for r in t["runs"]]
        modes = {}
        for r in runs:
            if r["plan"]:
                m = modes.setdefault(r["plan"]["mode"], {"planned": 0, "landed": 0})
                m["planned"] += 1
                m["landed"] += r["landed"]
        exit_codes = {}
        for t in results:
            for i, r in enumerate(t["runs"]):
                if i > 0 and not r["landed"]:
                    exit_codes[str(r["rc"])] = exit_codes.get(str(r["rc"]), 0) + 1
        mism = [t for t in results if t["mismatches"]]
        crashes = [dict(c, trial=t["trial"]) for t in results for c in t["crashes"]]
        leftovers = sorted({f for t in results for f in t["leftovers"]})
        return {"reference_s": ref["seconds"], "reference_first_change_s": ref["first_change"],
                "reference_repeatable": ref["repeatable"], "reference_repeat_differs": ref["repeat_differs"],
                "trials": len(results), "kills_planned": sum(1 for r in runs if r["plan"]),
                "kills": sum(t["kills_landed"] for t in results), "kill_modes": modes,
                "final_runs_exit_codes": exit_codes, "mismatches": len(mism),
                "mismatch_examples": [{"trial": t["trial"], "files": t["mismatches"][:5],
                                       "plans": [r["plan"] for r in t["runs"]]} for t in mism[:10]],
                "resume_crashes": sum(c["resume"] for c in crashes), "crashes": len(crashes),
                "crash_examples": crashes[:10],
                "trials_with_leftovers": sum(1 for t in results if t["leftovers"]), "leftover_examples": leftovers[:10]}

    # -------- states the fault cases start from

    def all_checkpoints(self) -> Path:
        """A train run that keeps every checkpoint (keep_checkpoints does not change the training)."""
        with self.setup_lock:
            return self._all_checkpoints()

    def _all_checkpoints(self) -> Path:
        run = self.work / "ckpt-all" / "run"
        if not run.exists():
            self.start_state("train", run)
            r = Run(self.argv("train", run, "--set", "train.keep_checkpoints=0"), run,
                    self.work / "ckpt-all" / "stderr.txt").go()
            if crashed(r):
                raise RuntimeError(f"keep-all train failed: {last_line(r.get('stderr', ''))}")
        return run

    def train_state(self, target: Path, steps: list[int], metrics_upto: int | None = None) -> None:
        """A run folder as a kill after step max(steps) leaves it: data, those checkpoints, metrics."""
        src = self.all_checkpoints()
        self.start_state("train", target)
        shutil.copy2(src / "model_config.json", target / "model_config.json")
        for s in steps:
            shutil.copytree(src / "checkpoints" / f"step_{s:07d}", target / "checkpoints" / f"step_{s:07d}")
        upto = max(steps) if metrics_upto is None else metrics_upto
        lines = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= upto]
        (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))

    def killed_apply(self) -> Path:
        """An apply output folder killed once the jsonl input has a progress record (parquet and txt done)."""
        with self.setup_lock:
            return self._killed_apply()

    def _killed_apply(self) -> Path:
        out = self.work / "apply-killed" / "out"
        if out.exists():
            return out
        (out.parent).mkdir(parents=True)
        proc = subprocess.Popen(self.argv("apply", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env(), start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            ledger = next(out.glob(".nichelm-ledger*"), None) if out.exists() else None
            if ledger and b'"progress", "file": "records.jsonl"' in ledger.read_bytes():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"apply finished before the kill (exit {proc.returncode}); cannot build the case")
        return out

    # -------- the cases

    def judge(self, name: str, command: str, r: dict, intact: bool, equal: bool | None, names: list[str],
              recovered: bool | None = None, **extra) -> dict:
        err = r.get("stderr", "")
        line = last_line(err)
        rc = r["rc"]
        res = {"command": command, "exit_code": rc, "stderr_line": line[:300], "traceback": "Traceback" in err,
               "outputs_intact": intact, **extra}
        if equal is not None:
            res["output_equals_reference"] = equal
        if recovered is not None:
            res["recovered_after_fix"] = recovered
        if rc == 0:
            ok, why = bool(equal) and intact and "Traceback" not in err, (
                "succeeded with the reference's output" if equal else "SILENT WRONG RESULT: succeeded, output differs")
        elif rc in (1, 2):
            named = not names or any(n in line for n in names)
            ok = "Traceback" not in err and line.startswith("nichelm") and named and intact
            why = ("one-line error" if ok else "traceback" if "Traceback" in err else
                   f"error does not name {names}" if not named else "earlier outputs changed" if not intact else
                   "no nichelm error line")
        else:
            ok, why = False, f"exit status {rc}"
        if ok and recovered is False:
            ok, why = False, "the re-run after the fault was removed did not give the reference output"
        res["verdict"] = "pass" if ok else "fail"
        res["why"] = why
        return res

    def run_case(self, name: str) -> dict:
        try:
            return CASES[name](self, name)
        except Exception as e:              # a broken case is reported, the campaign goes on
            return {"verdict": "error", "why": f"{type(e).__name__}: {e}"}


def _equal(c: Campaign, command: str, target: Path) -> bool:
    mism, _ = Outputs.compare(c.refs[command]["files"], Outputs.collect(command, target))
    return not mism


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _flip_weight(path: Path) -> None:
    """One bit of a safetensors file's tensor data: the top exponent bit of a float32 in the middle, so the
    value changes by far more than rounding (a flip in a low mantissa bit can leave every output as it was)."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")          # 8-byte header length, json header, then data
    _flip(path, start + 4 * ((len(data) - start) // 8) + 3, 6)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _go(c: Campaign, command: str, target: Path, base: Path, *extra, limit_fsize=None) -> dict:
    argv = c.argv(command, target, *extra)
    return Run(argv, target, base / f"stderr-{time.monotonic_ns()}.txt", limit_fsize).go(timeout=600)


# Disk full and read-only: each puts the output on a small filesystem that already holds earlier outputs.

def _earlier_outputs(c: Campaign, command: str, target: Path, base: Path) -> list[str]:
    """What the folder holds before the faulty run: prepare: data prepared with another seed; train: a run
    stopped at step 10; apply: the outputs of the .txt inputs alone. Returns the files that must survive
    (prepare: the prepared data; train: the checkpoint and the data, not the metrics a resumed run appends
    to; apply: the outputs, not the ledger)."""
    if command == "prepare":
        r = _go(c, "prepare", target, base, "--set", "seed=8")
    elif command == "train":
        c.train_state(target, [10])
    else:
        txt = sorted(str(p) for p in c.inputs.glob("*.txt"))
        argv = c.argv("apply", target)
        argv[argv.index("--input") + 1: argv.index("--output")] = txt
        r = Run(argv, target, base / "stderr-earlier.txt").go()
    if command != "train" and crashed(r):
        raise RuntimeError(f"the earlier {command} failed: {last_line(r.get('stderr', ''))}")
    files = sorted(snapshot(target))
    if command == "train":
        return [f for f in files if f.startswith(("checkpoints/", "data/", "tokenizer/"))]
    if command == "prepare":                  # not its work folder (.prepare) or logs: the prepared data
        return [f for f in files if f.startswith(("data/", "tokenizer/", "task.json"))]
    return [f for f in files if not f.startswith(".")]


def case_disk_full(c: Campaign, name: str) -> dict:
    command = name.split("_")[-1]
    base = c.path(name)
    target = base / "fs" / ("out" if command == "apply" else "run")
    limit = None
    if c.mounts.method == "tmpfs":
        c.mounts.tmpfs(base / "fs")
    keep = _earlier_outputs(c, command, target, base)
    before = digest(target, keep)
    if c.mounts.method == "tmpfs":            # room for a few small files, not for the new outputs
        c.mounts.remount(base / "fs", f"size={Mounts.used(base / 'fs') + 16 * 1024}")
    else:
        limit = 4096 if command == "apply" else 32 * 1024
    r = _go(c, command, target, base, limit_fsize=limit)
    intact = digest(target, keep) == before
    if c.mounts.method == "tmpfs":
        c.mounts.remount(base / "fs", "size=256m")
    again = _go(c, command, target, base)
    recovered = not crashed(again) and _equal(c, command, target)
    return c.judge(name, command, r, intact, _equal(c, command, target) if r["rc"] == 0 else None, [],
                   recovered, filesystem=c.mounts.method, recovery_stderr=last_line(again.get("stderr", ""))[:200])


def case_readonly(c: Campaign, name: str) -> dict:
    command = name.split("_")[-1]
    if c.mounts.readonly is None:
        return {"verdict": "skipped", "why": "root without mount: permissions cannot make a folder read-only"}
    base = c.path(name)
    target = base / "fs" / ("out" if command == "apply" else "run")
    if c.mounts.readonly == "tmpfs":
        c.mounts.tmpfs(base / "fs")
    keep = _earlier_outputs(c, command, target, base)
    before = digest(target, keep)
    if c.mounts.readonly == "tmpfs":
        c.mounts.remount(base / "fs", "ro")
    else:
        for p in [target, *target.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
    r = _go(c, command, target, base)
    intact = digest(target, keep) == before
    if c.mounts.readonly == "tmpfs":
        c.mounts.remount(base / "fs", "rw")
    else:
        for p in [target, *target.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    again = _go(c, command, target, base)
    recovered = not crashed(again) and _equal(c, command, target)
    return c.judge(name, command, r, intact, _equal(c, command, target) if r["rc"] == 0 else None, [],
                   recovered, filesystem=c.mounts.readonly)


# Corrupted files read by train: a run stopped at step 15 (checkpoints 10 and 15), one file damaged.

def _train_corrupt(file: str, how):
    def case(c: Campaign, name: str) -> dict:
        base = c.path(name)
        target = base / "run"
        c.train_state(target, [10, 15])
        how(target / file)
        keep = [k for k in snapshot(target) if k.startswith(("checkpoints/step_0000010", "data/"))]
        before = digest(target, keep)
        r = _go(c, "train", target, base)
        intact = r["rc"] == 0 or digest(target, keep) == before
        return c.judge(name, "train", r, intact, _equal(c, "train", target) if r["rc"] == 0 else None,
                       [Path(file).name], corrupted=file)
    return case


def _metrics_torn(c: Campaign, name: str) -> dict:
    """Killed while appending the metrics line of step 17 (checkpoint 15): the last line is cut."""
    base = c.path(name)
    target = base / "run"
    c.train_state(target, [10, 15], metrics_upto=17)
    data = (target / "metrics.jsonl").read_bytes()
    (target / "metrics.jsonl").write_bytes(data[: len(data) - 40])
    r = _go(c, "train", target, base)
    return c.judge(name, "train", r, True, _equal(c, "train", target) if r["rc"] == 0 else None, ["metrics.jsonl"],
                   corrupted="metrics.jsonl (torn last line)")


def _prepared_corrupt(file: str, how):
    """A finished prepare with one file damaged, then prepare again."""
    def case(c: Campaign, name: str) -> dict:
        base = c.path(name)
        target = base / "run"
        shutil.copytree(c.work / "ref-prepare" / "run", target)
        how(target / file)
        r = _go(c, "prepare", target, base)
        return c.judge(name, "prepare", r, True, _equal(c, "prepare", target) if r["rc"] == 0 else None,
                       [Path(file).name], corrupted=file)
    return case


def _apply_model_corrupt(file: str, how):
    """apply with a model (run folder) one of whose files is damaged: an error, never other outputs."""
    def case(c: Campaign, name: str) -> dict:
        base = c.path(name)
        model = base / "model"
        shutil.copytree(c.work / "ref-train" / "run", model)
        if "{latest}" in file:
            latest = sorted((model / "checkpoints").glob("step_*"))[-1].name
            path = model / file.format(latest=latest)
        else:
            path = model / file
        how(path)
        out = base / "out"
        argv = c.argv("apply", out)
        argv[argv.index("--model") + 1] = str(model)
        r = Run(argv, out, base / "stderr.txt").go()
        return c.judge(name, "apply", r, True, _equal(c, "apply", out) if r["rc"] == 0 else None, [path.name],
                       corrupted=str(path.relative_to(model)))
    return case


# The apply ledger and partial outputs: a run killed in the middle of its jsonl input, then damaged.

def _ledger(out: Path) -> Path:
    return next(out.glob(".nichelm-ledger*"))


def _ledger_case(how, names=(".nichelm-ledger",)):
    def case(c: Campaign, name: str) -> dict:
        base = c.path(name)
        out = base / "out"
        shutil.copytree(c.killed_apply(), out)
        what = how(out)
        keep = sorted(k for k in snapshot(out) if not k.startswith("."))
        before = digest(out, keep)
        r = Run(c.argv("apply", out), out, base / "stderr.txt").go()
        intact = r["rc"] == 0 or digest(out, keep) == before
        return c.judge(name, "apply", r, intact, _equal(c, "apply", out) if r["rc"] == 0 else None, list(names),
                       corrupted=what)
    return case


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _torn_last(out: Path) -> str:
    p = _ledger(out)
    lines = _lines(p)
    p.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    return "ledger: last line cut in half (an interrupted append)"


def _garbage_last(out: Path) -> str:
    p = _ledger(out)
    lines = _lines(p)
    p.write_bytes(b"".join(lines[:-1]) + b"\x00\x00garbage\x00\n")
    return "ledger: last line replaced by garbage ending in a newline"


def _garbage_middle(out: Path) -> str:
    p = _ledger(out)
    lines = _lines(p)
    mid = len(lines) // 2
    p.write_bytes(b"".join(lines[:mid]) + b"garbage line\n" + b"".join(lines[mid:]))
    return f"ledger: a garbage line inserted as line {mid + 1}"


def _lower_digit(line: bytes, key: bytes) -> bytes:
    """One bit flipped in the value of `key` so the number gets smaller (the rightmost non-zero digit)."""
    at = line.index(key) + len(key)
    end = at
    while line[end:end + 1].isdigit():
        end += 1
    for i in range(end - 1, at - 1, -1):
        d = line[i] - 0x30
        if d:
            return line[:i] + bytes([0x30 + (d & (d - 1))]) + line[i + 1:]
    raise ValueError(f"no non-zero digit after {key!r}")


def _flipped_middle(out: Path) -> str:
    """The newest progress record of the jsonl output counts fewer bytes than were written (one bit), and a
    later line follows it (the start record a resumed run appends)."""
    p = _ledger(out)
    lines = _lines(p)
    i = max(k for k, line in enumerate(lines) if b'"file": "records.jsonl"' in line)
    lines[i] = _lower_digit(lines[i], b'"bytes": ')
    p.write_bytes(b"".join(lines) + lines[0])
    return f"ledger: one bit of line {i + 1} ('bytes' of records.jsonl) flipped, then a start line"


def _partial_truncated(out: Path) -> str:
    p = out / ".records.jsonl.partial"
    _truncate(p, 0.5)
    return ".records.jsonl.partial cut to half its size"


def _shard_header(path: Path) -> None:
    _flip(path, 8, 3)                 # the token count in the header


CASES = {
    "disk_full_prepare": case_disk_full,
    "disk_full_train": case_disk_full,
    "disk_full_apply": case_disk_full,
    "readonly_prepare": case_readonly,
    "readonly_train": case_readonly,
    "readonly_apply": case_readonly,
    "ckpt_model_truncated": _train_corrupt("checkpoints/step_0000015/model.safetensors", _truncate),
    "ckpt_model_header_flipped": _train_corrupt("checkpoints/step_0000015/model.safetensors",
                                                lambda p: _flip(p, 20, 1)),
    "ckpt_model_data_flipped": _train_corrupt("checkpoints/step_0000015/model.safetensors", _flip_weight),
    "ckpt_optimizer_truncated": _train_corrupt("checkpoints/step_0000015/optimizer.safetensors", _truncate),
    "ckpt_optimizer_data_flipped": _train_corrupt("checkpoints/step_0000015/optimizer.safetensors", _flip_weight),
    "ckpt_trainer_json_truncated": _train_corrupt("checkpoints/step_0000015/trainer.json", _truncate),
    "ckpt_rng_truncated": _train_corrupt("checkpoints/step_0000015/rng.safetensors", _truncate),
    "metrics_torn_last_line": _metrics_torn,
    "shard_truncated": _train_corrupt("data/shards/train_000000.bin", _truncate),
    "shard_header_flipped": _train_corrupt("data/shards/train_000000.bin", _shard_header),
    "shard_data_flipped": _train_corrupt("data/shards/train_000000.bin", lambda p: _flip(p, 4000, 0)),
    "tokenizer_truncated": _train_corrupt("tokenizer/tokenizer.json", _truncate),
    "tokenizer_flipped": _train_corrupt("tokenizer/tokenizer.json", lambda p: _flip(p, p.stat().st_size // 2, 0)),
    "manifest_truncated": _prepared_corrupt("data/manifest.json", _truncate),
    "manifest_flipped": _prepared_corrupt("data/manifest.json", lambda p: _flip(p, 20, 0)),
    "apply_model_truncated": _apply_model_corrupt("checkpoints/{latest}/model.safetensors", _truncate),
    "apply_model_data_flipped": _apply_model_corrupt("checkpoints/{latest}/model.safetensors", _flip_weight),
    "apply_tokenizer_truncated": _apply_model_corrupt("tokenizer/tokenizer.json", _truncate),
    "ledger_torn_last_line": _ledger_case(_torn_last),
    "ledger_garbage_last_line": _ledger_case(_garbage_last),
    "ledger_garbage_middle_line": _ledger_case(_garbage_middle),
    "ledger_flipped_middle_record": _ledger_case(_flipped_middle),
    "apply_partial_truncated": _ledger_case(_partial_truncated),
}


# ---------------------------------------------------------------- main

def _code_version() -> str:
    """The commit the tested code is at, '+changes' when its tree differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100, help="kills that land, per command (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default="prepare,train,apply", help="comma-separated; '' for none")
    ap.add_argument("--cases", default="all", help="'all', 'none' or comma-separated names: " + ", ".join(CASES))
    ap.add_argument("--modes", default=",".join(MODES), help="kill plans to draw from (see above)")
    ap.add_argument("--kills-per-trial", type=int, default=3, help="kills before the run that goes to the end")
    ap.add_argument("--jobs", type=int, default=1, help="trials and cases run at once")
    ap.add_argument("--workdir", help="where to work (default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--no-mount", action="store_true",
                    help="use the fallbacks (RLIMIT_FSIZE; chmod when not root) even where mount works")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    commands = [c for c in args.commands.split(",") if c]
    unknown = [c for c in commands if c not in COMMANDS]
    cases = list(CASES) if args.cases == "all" else [] if args.cases == "none" else args.cases.split(",")
    unknown += [c for c in cases if c not in CASES]
    modes = {m: MODES.get(m, 0) for m in args.modes.split(",")}
    unknown += [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="nichelm-faults-"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"--workdir {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    c = Campaign(work, args.seed, max(1, args.kills_per_trial), max(1, args.jobs), allow_mount=not args.no_mount,
                 modes=modes)
    result = {"config": {"code": _code_version(), "kills_per_command": args.kills, "seed": args.seed,
                         "commands": commands, "modes": modes, "kills_per_trial": c.kpt, "jobs": c.jobs,
                         "disk_full_by": c.mounts.method, "readonly_by": c.mounts.readonly, "workdir": str(work), "python": sys.version.split()[0],
                         "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                         "parquet_input": (c.inputs / "books.parquet").exists()},
              "commands": {}, "cases": {}}
    try:
        # Each command's reference needs the one before (train: prepared data; apply: a model); cases need all.
        last = max([COMMANDS.index(x) for x in commands] + [len(COMMANDS) - 1 if cases else 0])
        for command in COMMANDS[: last + 1]:
            c.reference(command)
        for command in commands:
            result["commands"][command] = c.kill_campaign(command, args.kills)
        with futures.ThreadPoolExecutor(c.jobs) as pool:
            for name, res in zip(cases, pool.map(lambda n: c.run_case(n), cases)):
                result["cases"][name] = res
    finally:
        c.mounts.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    per = result["commands"].values()
    result["summary"] = {
        "kills": {k: v["kills"] for k, v in result["commands"].items()},
        "mismatches": sum(v["mismatches"] for v in per),
        "resume_crashes": sum(v["resume_crashes"] for v in per),
        "crashes": sum(v["crashes"] for v in per),
        "references_repeatable": all(v["reference_repeatable"] for v in per),
        "cases_passed": sum(v["verdict"] == "pass" for v in result["cases"].values()),
        "cases_failed": [k for k, v in result["cases"].items() if v["verdict"] not in ("pass", "skipped")],
        "cases_skipped": [k for k, v in result["cases"].items() if v["verdict"] == "skipped"],
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
