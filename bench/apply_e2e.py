"""End-to-end `nichelm apply` throughput: MB of input text per second, files in -> files out.

    python bench/apply_e2e.py [--model RUN_OR_EXPORT] [--mb 1] [--files 100] [--threads 2] [--batch-size 64]
                              [--rounds 1] [--engines torch,ct2,transformers] [--guard 0.15] [--compile auto]
                              [--work DIR]

Input: --files .txt files holding --mb MB (10^6 bytes) of paragraphs of 1-8 consecutive World English
Bible verses from random places (as bench/prepare_scale.py writes them), each paragraph corrupted with
nichelm's synthetic OCR noise (OCRNoise, --cer, --seed). Model: --model (a run, a project file or an hf
export), else the quickstart project made here as `nichelm quickstart` makes it (prepare, train for
--train-minutes, evaluate, which calibrates the guard's margin; none of it timed). With --work DIR the
run stays in DIR/quickstart: pass --model DIR/quickstart to the next run instead of training again.

Every row is one process, timed by wall clock from its start to its exit (interpreter start, imports
and model load included), with the same --threads (OMP_NUM_THREADS, RAYON_NUM_THREADS, torch threads)
on the same CPUs (pinned to --threads CPUs when this process may use that many):

  torch         `python -m nichelm apply --model HF_EXPORT --input IN --output OUT --threads T
                --batch-size B --guard G --compile C`: reading, windowing, decoding (nichelm's engine),
                guard scoring (one teacher-forced pass per window), stitching, atomic durable writes, ledger.
  ct2           the same command with `--backend ct2 --model CT2_EXPORT` (CTranslate2 decodes and scores).
  transformers  `python bench/apply_e2e.py hf-loop ...`, a plain transformers loop: the hf export loaded
                with AutoModelForCausalLM (fp32); files read, cut with nichelm's cut_windows, grouped
                across files as apply groups them (8 x batch windows); nichelm's prompt ids and per-window
                max new tokens (1.5 x the window's tokens + 8, within the context); greedy generate() per
                length-sorted batch (left-padded, max_new_tokens = the batch's largest budget, rows cut
                to their own budget and end marker); outputs stitched with the input's separators and
                written with the same atomic durable write (nichelm.io.atomic_write_text).
                It EXCLUDES what apply does beyond that: no guard (no scoring pass, no length cap, its
                outputs are the model's raw corrections), no ledger (no resume), no progress output.

startup_s: the same command on a one-paragraph input (interpreter, imports, model load, one window);
mb_per_s_after_startup = MB / (wall_s - startup_s) is the rate once those fixed costs are paid (with
--compile auto, torch.compile's ~15-30 s is not in startup_s: auto compiles for inputs of 1 MB or more).
Rounds: every engine once per round, in turn (a shared machine's speed drifts); median wall reported.
Outputs: each engine's files compared with the transformers loop's and the torch engine's (share of
files byte-identical); with --guard -1 (guard off: raw corrections everywhere) all engines must agree
in fp32, with the guard on they differ where the guard keeps an input. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ENGINES = ("torch", "ct2", "transformers")
MAX_NEW_TOKENS_RATIO = 1.5          # nichelm.inference.Corrector's default: budget = 1.5 x window tokens + 8
NEEDS_CT2 = "ctranslate2 is not installed (pip install ctranslate2)"


# ---------------------------------------------------------------- input

def write_corpus(folder: Path, size: int, files: int, cer: float, seed: int) -> int:
    """`files` .txt files of noisy verse paragraphs (blank lines between), `size` bytes in all; returns the bytes."""
    sys.path.insert(0, str(BENCH))
    try:
        from prepare_scale import verses
    finally:
        sys.path.remove(str(BENCH))
    from nichelm.data.noise import OCRNoise
    vs, rng, noise = verses(), random.Random(seed), OCRNoise(target_cer=cer, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in range(files):
        want, paras, written = size * (f + 1) // files - total, [], 0
        while written < want:
            i = rng.randrange(len(vs))
            para = noise.corrupt(" ".join(vs[i:i + rng.randint(1, 8)]), f"{f}:{len(paras)}") + "\n\n"
            paras.append(para)
            written += len(para.encode())
        (folder / f"doc{f:05d}.txt").write_text("".join(paras), encoding="utf-8")
        total += written
    return total


# ---------------------------------------------------------------- model

def train_quickstart(work: Path, minutes: float, threads: int) -> Path:
    """The quickstart project (Bible verses + synthetic noise) as `nichelm quickstart` runs it, trained for
    `minutes`: prepare, train, evaluate (which calibrates the guard's margin, as users get it); returns its run."""
    from importlib.resources import files

    from nichelm.config import load_project
    from nichelm.evaluate import evaluate_project
    from nichelm.prepare import prepare
    from nichelm.train import train
    run = work / "quickstart"
    text = files("nichelm").joinpath("examples/quickstart.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^run_dir\s*=.*$", lambda _: f"run_dir = {json.dumps(str(run))}", text)
    run.mkdir(parents=True, exist_ok=True)
    (run / "project.toml").write_text(text, encoding="utf-8")
    project = load_project(run / "project.toml", [f"train.max_minutes={minutes}", f"train.threads={threads}"])
    prepare(project)
    train(project)
    evaluate_project(project)
    return project.run_path


def model_folders(model: Path, work: Path, want_ct2: bool) -> tuple[Path, Path | None, str | None]:
    """(hf export, ct2 export or None, why no ct2): the folders the engines load, made here (not timed)."""
    from nichelm.export import export, is_export, run_dir
    hf = model if is_export(model) else export(run_dir(model), "hf", work / "hf")
    if not want_ct2:
        return hf, None, None
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return hf, None, NEEDS_CT2
    from nichelm.export import hf_to_ct2
    shutil.rmtree(work / "ct2", ignore_errors=True)
    return hf, hf_to_ct2(hf, work / "ct2"), None


def model_info(hf: Path) -> dict:
    from safetensors import safe_open
    cfg = json.loads((hf / "nichelm.json").read_text())["model_config"]
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    task = json.loads((hf / "task.json").read_text())
    return {"path": str(hf), "arch": cfg["arch"], "n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"],
            "block_size": cfg["block_size"], "params": params, "window_chars": int(task.get("window_chars", 100)),
            "guard_margin": (task.get("guard") or {}).get("margin")}


# ---------------------------------------------------------------- the rows

def command(engine: str, folders: dict, inp: Path, out: Path, args) -> list[str]:
    common = ["--input", str(inp), "--output", str(out), "--threads", str(args.threads),
              "--batch-size", str(args.batch_size)]
    if engine == "transformers":
        return [sys.executable, str(Path(__file__).resolve()), "hf-loop", "--model", str(folders["hf"]), *common]
    extra = ["--backend", "ct2"] if engine == "ct2" else ["--compile", args.compile]
    return [sys.executable, "-m", "nichelm", "apply", "--model", str(folders[engine]), *common,
            "--guard", str(args.guard), *extra]


def run_process(cmd: list[str], threads: int, cpus: list[int] | None) -> dict:
    """Wall clock, CPU seconds and peak RSS of one process (its own rusage, from wait4)."""
    # every engine gets the OpenMP spin `nichelm apply` sets for itself (apply.short_openmp_spin), so
    # the rows compare engines, not how each one's threads cope with a busy machine
    from nichelm.apply import OPENMP_SPIN_COUNT
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    env.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=pin)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", "replace")[-3000:]
    if proc.returncode:
        raise SystemExit(f"apply_e2e: {shlex.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def warm_up(threads: int, cpus: list[int] | None) -> None:
    """Import every engine's libraries once, untimed, so that no timed row reads them from a cold disk."""
    code = "import torch, transformers, nichelm.apply, nichelm.backends\ntry:\n import ctranslate2\nexcept ImportError:\n pass"
    run_process([sys.executable, "-c", code], threads, cpus)


def digests(out: Path) -> dict[str, str]:
    """Output file (path under OUT, hidden ledger and partial files left out) -> sha256."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def same_share(a: dict[str, str], b: dict[str, str]) -> float:
    return round(sum(a.get(k) == v for k, v in b.items()) / max(len(b), 1), 4)


def pinned_cpus(threads: int) -> list[int] | None:
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:threads] if len(allowed) >= threads else None


# ---------------------------------------------------------------- the transformers loop (hf-loop)

def loop_batches(rows: list[int], prompts, budgets, batch_size: int, block: int) -> list[list[int]]:
    """Length-sorted batches of at most batch_size rows whose longest prompt plus largest budget fits the
    context: generate() runs every row of a batch for the largest budget, and a learned position table
    (GPT-2) has no row past the context."""
    out, cur = [], []
    for i in sorted(rows, key=lambda i: len(prompts[i])):
        if cur and (len(cur) == batch_size or
                    max(len(prompts[j]) for j in cur + [i]) + max(budgets[j] for j in cur + [i]) > block):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def hf_loop(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="apply_e2e.py hf-loop",
                                 description="a plain transformers loop over apply's windows (see the module doc)")
    ap.add_argument("--model", required=True, help="an hf export folder")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from nichelm.data.tokenizer import encode_texts, load_tokenizer, prompt_ids_batch
    from nichelm.inference import cut_windows
    from nichelm.io import atomic_write_text
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    hf, inp, out = Path(args.model), Path(args.input), Path(args.output)
    task = json.loads((hf / "task.json").read_text())
    block = json.loads((hf / "nichelm.json").read_text())["model_config"]["block_size"]
    window_chars = int(task.get("window_chars", 100))
    tok = load_tokenizer(hf / "tokenizer.json")
    end_id = tok.token_to_id(task["end_marker"])
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    def correct(group: list[tuple[Path, list[tuple[str, str]]]]) -> None:
        """Generate every window of the group's files, then stitch and write each file."""
        chunks = [chunk for _, pieces in group for chunk, _ in pieces]
        fixed = list(chunks)                                   # blank or too long for the context: kept
        busy = [i for i, c in enumerate(chunks) if c.strip()]
        texts = [chunks[i] for i in busy]
        prompts, budgets = {}, {}
        for i, p, s in zip(busy, prompt_ids_batch(tok, task["prompt_template"], texts), encode_texts(tok, texts)):
            budget = min(int(len(s) * MAX_NEW_TOKENS_RATIO) + 8, block - len(p))
            if budget > 0:
                prompts[i], budgets[i] = p, budget
        for rows in loop_batches(list(prompts), prompts, budgets, args.batch_size, block):
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), end_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):                       # left padding
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=end_id,
                                     eos_token_id=end_id, max_new_tokens=max(budgets[i] for i in rows))
            for r, i in enumerate(rows):
                new = gen[r, width:].tolist()[:budgets[i]]
                fixed[i] = tok.decode(new[:new.index(end_id)] if end_id in new else new).strip()
        k = 0
        for path, pieces in group:
            text = "".join(fixed[k + n] + sep for n, (_, sep) in enumerate(pieces))
            k += len(pieces)
            atomic_write_text(out / path.relative_to(inp), text)

    group, windows = [], 0
    for path in sorted(inp.rglob("*.txt")):
        pieces = cut_windows(path.read_text(encoding="utf-8"), window_chars)
        group.append((path, pieces))
        windows += len(pieces)
        if windows >= 8 * args.batch_size:                     # as apply groups windows across documents
            correct(group)
            group, windows = [], 0
    if group:
        correct(group)


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a run, project file or hf export (default: the quickstart trained here)")
    ap.add_argument("--train-minutes", type=float, default=7.5,
                    help="without --model: the quickstart's training budget (its own default: 7.5)")
    ap.add_argument("--mb", type=float, default=1.0, help="MB (10^6 bytes) of input text")
    ap.add_argument("--files", type=int, default=100, help="input .txt files the text is spread over")
    ap.add_argument("--cer", type=float, default=0.06, help="synthetic OCR noise of the input")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="apply's --batch-size and the loop's batch")
    ap.add_argument("--guard", type=float, default=0.15, help="apply's --guard (-1: off, raw corrections)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="apply's --compile (torch)")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds, every engine once per round")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--no-startup", dest="startup", action="store_false",
                    help="skip the untimed warm-up and the one-paragraph runs that measure startup_s (a smoke run)")
    ap.add_argument("--work", help="folder for the model, exports, input and outputs (default: a temporary one)")
    args = ap.parse_args(argv)
    wanted = [e for e in args.engines.split(",") if e]
    if unknown := set(wanted) - set(ENGINES):
        ap.error(f"--engines: unknown {', '.join(sorted(unknown))}; use some of {', '.join(ENGINES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="apply_e2e_"))
    work.mkdir(parents=True, exist_ok=True)

    model = Path(args.model) if args.model else train_quickstart(work, args.train_minutes, args.threads)
    hf, ct2, no_ct2 = model_folders(model, work, "ct2" in wanted)
    folders = {"torch": hf, "transformers": hf, "ct2": ct2, "hf": hf}
    skipped = {"ct2": no_ct2} if no_ct2 else {}
    engines = [e for e in wanted if e not in skipped]

    inp, tiny = work / "input", work / "input-startup"
    for folder in (inp, tiny, work / "out"):
        shutil.rmtree(folder, ignore_errors=True)
    size = write_corpus(inp, int(args.mb * 1e6), args.files, args.cer, args.seed)
    write_corpus(tiny, 1, 1, args.cer, args.seed + 1)          # one paragraph
    info = model_info(hf)
    from nichelm.apply import COMPILE_MIN_BYTES
    from nichelm.inference import cut_windows
    n_windows = sum(len(cut_windows(p.read_text(encoding="utf-8"), info["window_chars"])) for p in inp.glob("*.txt"))

    cpus = pinned_cpus(args.threads)
    if args.startup:
        warm_up(args.threads, cpus)
    runs = {e: {"startup": run_process(command(e, folders, tiny, work / "out" / f"{e}-startup", args),
                                       args.threads, cpus) if args.startup else None,
                "rounds": [], "digests": []} for e in engines}
    for r in range(args.rounds):
        for e in engines:
            out = work / "out" / f"{e}-{r}"
            runs[e]["rounds"].append(run_process(command(e, folders, inp, out, args), args.threads, cpus))
            found = digests(out)
            if len(found) != args.files:
                raise SystemExit(f"apply_e2e: {e} wrote {len(found)} files of {args.files} into {out}")
            runs[e]["digests"].append(found)
            shutil.rmtree(out)

    mb = size / 1e6
    result = {"command": shlex.join(["python", "bench/apply_e2e.py", *argv]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "pinned_cpus": cpus, "threads": args.threads, **versions()},
              "model": {**info, "trained_here_minutes": None if args.model else args.train_minutes},
              "input": {"files": args.files, "bytes": size, "mb": round(mb, 6), "windows": n_windows,
                        "cer": args.cer, "seed": args.seed, "text": "World English Bible verse paragraphs, "
                                                                    "synthetic OCR noise"},
              "settings": {"batch_size": args.batch_size, "guard": args.guard, "compile": args.compile,
                           # what apply's --compile auto chose for the torch engine on this input
                           "torch_compiled": args.compile == "on" or (args.compile == "auto"
                                                                      and size >= COMPILE_MIN_BYTES),
                           "rounds": args.rounds},
              "timed": {"torch": "nichelm apply (torch engine): process start to exit, everything apply does",
                        "ct2": "nichelm apply --backend ct2: process start to exit, everything apply does",
                        "transformers": "plain loop, process start to exit: read, cut, generate, stitch, "
                                        "atomic writes; no guard scoring, no length cap, no ledger"},
              "engines": {}}
    reference = {e: runs[e]["digests"][0] for e in ("transformers", "torch") if e in runs}
    for e in engines:
        walls = [x["wall_s"] for x in runs[e]["rounds"]]
        wall, startup = statistics.median(walls), (runs[e]["startup"] or {}).get("wall_s")
        row = {"mb_per_s": sig(mb / wall), "wall_s": round(wall, 3),
               "wall_s_each_round": [round(w, 3) for w in walls],
               "cpu_s": round(statistics.median(x["cpu_s"] for x in runs[e]["rounds"]), 3),
               "peak_rss_mb": round(max(x["peak_rss_mb"] for x in runs[e]["rounds"]), 1),
               "startup_s": None if startup is None else round(startup, 3),
               "mb_per_s_after_startup": sig(mb / (wall - startup)) if startup and wall > startup else None,
               "same_outputs_every_round": all(d == runs[e]["digests"][0] for d in runs[e]["digests"]),
               "command": shlex.join(command(e, folders, inp, work / "out" / f"{e}-ROUND", args))}
        for name, ref in reference.items():
            row[f"same_files_as_{name}"] = same_share(runs[e]["digests"][0], ref)
        result["engines"][e] = row
    result["engines"].update({e: {"skipped": why} for e, why in skipped.items()})
    base = result["engines"].get("transformers", {})
    if "mb_per_s" in base:
        for key in ("mb_per_s", "mb_per_s_after_startup"):
            result[f"ratio_vs_transformers{key[8:]}"] = {
                e: sig(r[key] / base[key]) for e, r in result["engines"].items()
                if r.get(key) and base.get(key)}
        if "torch" in result["engines"]:
            result["acceptance_torch_at_least_3x"] = result["ratio_vs_transformers"]["torch"] >= 3
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (MB/s of a smoke run is 0.0003, of a real one 0.03 or 3)."""
    return float(f"{x:.{digits}g}")


def versions() -> dict:
    import importlib.metadata as md
    found = {}
    for name in ("torch", "transformers", "ctranslate2", "nichelm"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH.parent / "src"))
    if sys.argv[1:2] == ["hf-loop"]:
        hf_loop(sys.argv[2:])
    else:
        main()
