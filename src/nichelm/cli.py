"""Command line: argument parsing only; each subcommand calls one library function.

User errors (UserError) print one line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path

from nichelm.errors import UserError


def _project(args):
    from nichelm.config import load_project
    return load_project(args.project, args.set or [])


def cmd_prepare(args):
    from nichelm.prepare import prepare
    from nichelm.prepare_pipeline import PrepareOptions
    options = _executor_options(args, PrepareOptions)
    options.piece_mb, options.shard_tokens = args.piece_mb, args.shard_tokens
    prepare(_project(args), force=args.force, options=options)


def cmd_train(args):
    from nichelm.train import train
    train(_project(args))


def cmd_select(args):
    from nichelm.selection import print_report, select_project
    print_report(select_project(_project(args), force=args.force, options=_executor_options(args)))


def cmd_perplexity(args):
    from nichelm.evaluate import evaluate_perplexity, print_perplexity
    if args.max_docs < 0:
        raise UserError(f"--max-docs {args.max_docs}: give 0 (all) or more documents")
    project = _project(args) if args.project is not None else None
    report, path = evaluate_perplexity(project, Path(args.data) if args.data else None,
                                       Path(args.model) if args.model else None,
                                       Path(args.out) if args.out else None, device=args.device,
                                       max_docs=args.max_docs)
    print_perplexity(report, path)


def cmd_evaluate(args):
    from nichelm.evaluate import evaluate_external, evaluate_project, print_external_summary, print_summary
    if args.perplexity:
        return cmd_perplexity(args)
    if args.data is None:
        if args.project is None:
            raise UserError("evaluate needs a project file, or --data PATH [--format FMT] [--model RUN]")
        project = _project(args)
        report = evaluate_project(project, device=args.device)
        print_summary(report)
        print(f"\nreport: {project.run_path / 'eval' / 'report.json'}\n        "
              f"{project.run_path / 'eval' / 'report.html'}")
        return
    model = args.model
    if model is None and args.project is not None and not args.no_model:
        model = _project(args).run_path          # the project's own model on outside data
    if args.no_model:
        model = None
    report, out = evaluate_external(Path(args.data), args.format, model=Path(model) if model else None,
                                    gold=Path(args.gold) if args.gold else None,
                                    out=Path(args.out) if args.out else None, max_docs=args.max_docs,
                                    device=args.device, guard_max_change=args.guard,
                                    window_overlap=_overlap(args, model is not None and args.project is not None))
    print_external_summary(report, out)


def cmd_correct(args):
    from nichelm.inference import Corrector
    run = Path(args.run)
    if args.file in (None, "-"):
        text = sys.stdin.read()
    else:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    corrector = Corrector.from_run(run, device=args.device, guard_max_change=args.guard,
                                   window_overlap=_overlap(args))
    sys.stdout.write(corrector.correct([text], guard=corrector.guard_max_change >= 0)[0])
    sys.stdout.flush()


def cmd_export(args):
    from nichelm.export import export
    print(export(args.project, args.format, args.out, args.set or []))


def cmd_specialize(args):
    from nichelm.specialize import pick_expert, specialize
    out = Path(args.out) if args.out else None
    partition = Path(args.partition) if args.partition else None
    if args.pick_expert:
        print(pick_expert(_project(args), Path(args.pick_expert), out=out, partition=partition))
        return
    print(specialize(_project(args), cluster=args.cluster, target=args.target, mixture=args.mixture, out=out,
                     partition=partition))


def _weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give one number per cluster, comma-separated, "
                                         "e.g. 0.5,0,0.5") from None


def _executor_options(args, cls=None):
    from nichelm.prepare_pipeline import ExecutorOptions
    return (cls or ExecutorOptions)(
        executor=args.executor or "local", workers=args.workers, tasks=args.tasks, partition=args.partition,
        time=args.time, cpus_per_task=args.cpus_per_task, mem_per_cpu_gb=args.mem_per_cpu_gb,
        env_command=args.env_command, dry_run=args.dry_run, address=args.address, debug=args.debug)


def cmd_apply(args):
    from nichelm.apply import apply, print_report
    settings = dict(batch_size=args.batch_size, threads=args.threads, text_field=args.text_field,
                    output_field=args.output_field, guard_max_change=args.guard, device=args.device,
                    window_overlap=_overlap(args), backend=args.backend,
                    compile={"on": True, "off": False}.get(args.compile, "auto"), draft_tokens=args.draft_tokens,
                    dtype=args.dtype)
    if args.executor or args.workers or args.tasks:
        if args.shard:
            raise UserError("--shard I/N runs one task by hand; give it without --executor, --workers or --tasks")
        from nichelm.apply_pipeline import apply_with_executor
        report = apply_with_executor(args.model, args.input, args.output, _executor_options(args), **settings)
        if isinstance(report, dict):         # slurm: submitted (or a dry run), nothing corrected here yet
            return
    else:
        report = apply(args.model, args.input, args.output, shard=args.shard, **settings)
    print_report(report)
    if report.failed_count:
        raise SystemExit(1)      # some inputs were skipped; everything else was written


def quickstart_template() -> str:
    from importlib.resources import files
    return files("nichelm").joinpath("examples/quickstart.toml").read_text(encoding="utf-8")


def cmd_quickstart(args):
    from nichelm.config import load_project
    from nichelm.evaluate import evaluate_project, print_summary
    from nichelm.io import atomic_write_text
    from nichelm.prepare import prepare
    from nichelm.train import train
    out = Path(args.out).resolve()
    # The copy lives in the run directory and names it, so later commands can take it as it is.
    text = re.sub(r'(?m)^run_dir\s*=.*$', lambda _: f"run_dir = {json.dumps(str(out))}", quickstart_template())
    atomic_write_text(out / "project.toml", text)
    project = load_project(out / "project.toml", args.set or [])
    print(f"quickstart: project {out / 'project.toml'}", file=sys.stderr)
    prepare(project)
    train(project)
    report = evaluate_project(project)
    print_summary(report)
    print(f"\nreport: {project.run_path / 'eval' / 'report.json'}")


def cmd_plan(args):
    from nichelm.plan import Scenario, format_plan, parse_number, recommend, with_pilot
    if args.pilot and args.project is None:
        raise UserError("plan --pilot: give the project file (PROJECT) whose generic sources and target the pilot "
                        "runs on")
    shape = {}
    if args.project is not None:             # the model family and shape settings of the user's project
        project = _project(args)
        shape = dict(arch=project.model.arch, vocab_size=project.tokenizer.vocab_size,
                     block_size=project.model.block_size)
    plan = recommend(Scenario(
        specialist_tokens=parse_number("specialist-tokens", args.specialist_tokens, integer=True),
        specializations=parse_number("specializations", args.specializations, integer=True),
        pretrain_gpu_hours=parse_number("pretrain-gpu-hours", args.pretrain_gpu_hours),
        specialize_gpu_hours=parse_number("specialize-gpu-hours", args.specialize_gpu_hours),
        inference_tokens_per_s=parse_number("inference-tokens-per-s", args.inference_tokens_per_s),
        hardware=args.hardware, **shape))
    if args.pilot:                           # measured on the project's data, after the budgets are checked
        from nichelm.pilot import PilotSettings, run_pilot
        given = {key: parse_number(f"pilot-{key}", value, integer=True)
                 for key, value in (("tokens", args.pilot_tokens), ("steps", args.pilot_steps)) if value is not None}
        plan = with_pilot(plan, run_pilot(project, PilotSettings(**given), force=args.force))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))


def cmd_bench_train(args):
    from nichelm.bench import bench_train
    print(json.dumps(bench_train(preset=args.preset, arch=args.arch, device=args.device, steps=args.steps,
                                 warmup=args.warmup, batch=args.batch, seq=args.seq, vocab=args.vocab,
                                 threads=args.threads, compile=args.compile, peak_tflops=args.peak_tflops,
                                 precision=args.precision, n_layer=args.n_layer, n_embd=args.n_embd,
                                 n_head=args.n_head)))


def add_executor(p: argparse.ArgumentParser, tasks_help: str, scripts: str, default: str | None = "local") -> None:
    """The datatrove executor options, alike for prepare and apply (prepare_pipeline.make_executor)."""
    p.add_argument("--executor", default=default, choices=["local", "slurm", "ray"],
                   help="where the tasks run: this machine (default), a Slurm cluster, or a Ray cluster")
    p.add_argument("--workers", type=_count, default=0, metavar="N",
                   help="local: tasks run at once (default 0: all cores); slurm/ray: at most N at once (0: no limit)")
    p.add_argument("--tasks", type=_count, default=0, metavar="N", help=tasks_help)
    slurm = p.add_argument_group("slurm (--executor slurm)")
    slurm.add_argument("--partition", default="", help="Slurm partition (required)")
    slurm.add_argument("--time", default="04:00:00", help="time limit of each task (default 04:00:00)")
    slurm.add_argument("--cpus-per-task", type=_count, default=1, help="also for ray (default 1)")
    slurm.add_argument("--mem-per-cpu-gb", type=float, default=2.0, help="also for ray (default 2)")
    slurm.add_argument("--env-command", default="",
                       help="shell line that activates this Python environment in a job (default: source this venv)")
    slurm.add_argument("--dry-run", action="store_true", help=f"write the sbatch scripts under {scripts}, "
                                                             "submit nothing")
    p.add_argument("--address", default="", help="ray: the cluster to join, HEAD:6379 (the address `ray start "
                                                 "--head` prints) or auto (the cluster this machine has joined); "
                                                 "default: that one, else a Ray started for this run")


def add_guard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guard", type=float, default=None,
                   help="keep a window's input when the output differs by more than this share (-1: off; "
                        "default: the share the model's guard margin was chosen with, else 0.15)")
    p.add_argument("--window-overlap", type=int, default=None, metavar="CHARS",
                   help="characters of context each side of a document's windows; only the window's own "
                        "part of the output is kept (default: eval.window_overlap of a given project, else 0)")


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number, 0 or more")
    return int(value)


def _draft_tokens(value: str) -> int:
    if not value.isdigit() or int(value) > 16:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number from 0 to 16")
    return int(value)


def _overlap(args, from_project: bool = False) -> int:
    if args.window_overlap is not None:
        if args.window_overlap < 0:
            raise UserError(f"--window-overlap {args.window_overlap}: give 0 or more characters")
        return args.window_overlap
    return _project(args).eval.window_overlap if from_project else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nichelm", description="Specialized pre-training of small language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_project(p):
        p.add_argument("project", help="project file (TOML)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a project value, e.g. --set train.max_steps=200 (repeatable)")
        return p

    p = with_project(sub.add_parser("prepare", help="read sources, build examples, tokenizer and token shards"))
    p.add_argument("--force", action="store_true", help="rebuild even if the data is already prepared")
    add_executor(p, "tasks of the parallel jobs (default 0: one per piece); the output does not depend on it",
                 "RUN/logs/prepare/slurm")
    p.add_argument("--piece-mb", type=float, default=0, metavar="MB",
                   help="size of a piece of work: files are grouped, big .jsonl/.txt files cut into pieces "
                        "(default 0: the sources' size / 32, from 1 to 64)")
    p.add_argument("--shard-tokens", type=_count, default=100_000_000, metavar="N",
                   help="tokens per shard at most (default 100M); shards are cut between examples")
    p.set_defaults(func=cmd_prepare)
    p = with_project(sub.add_parser("select", help="resample the generic sources to look like the target "
                                                   "(DSIR or clusters) -> RUN/select/selected.jsonl"))
    p.add_argument("--force", action="store_true", help="select again even if the selection is up to date")
    add_executor(p, "tasks that score the generic documents, each every N-th one (default: --workers; local: all "
                    "cores; slurm/ray: one per 256 MB of generic input); the output does not depend on it",
                 "RUN/select/.work/slurm")
    p.set_defaults(func=cmd_select)
    p = with_project(sub.add_parser("train", help="train (or resume training) the model"))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="CER/WER before and after: a project's test split, or any pair set (--data)")
    p.add_argument("project", nargs="?", help="project file (TOML); optional with --data")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a project value, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--data", help="score a pair set instead of the test split: a file or folder")
    p.add_argument("--format", choices=["icdar", "icdar-lines", "bln600", "csv", "jsonl"],
                   help="format of --data (default: guessed: folder=icdar, .csv=bln600, .jsonl=jsonl)")
    p.add_argument("--gold", help="the GS file paired line by line with --data (icdar-lines)")
    p.add_argument("--model", help="run directory (or export directory) to evaluate; default: the project's run, "
                                   "or none (raw OCR)")
    p.add_argument("--no-model", action="store_true", help="score the raw OCR only (after = before)")
    p.add_argument("--out", help="report folder (default RUN/eval/external/NAME, or ./eval-NAME without a model)")
    p.add_argument("--max-docs", type=int, default=0, help="only the first N documents (0: all)")
    p.add_argument("--perplexity", action="store_true",
                   help="token-level perplexity on held-out plain text (--data: .jsonl(.gz) with a text field, .txt, "
                        ".parquet or a folder; default: the target's test split), per domain and macro-averaged, "
                        "into report.json")
    add_guard(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("correct", help="print the corrected text of a file or stdin")
    p.add_argument("file", nargs="?", help="a UTF-8 text file, or - for stdin (default)")
    p.add_argument("--run", required=True, help="a run directory with a trained model")
    p.add_argument("--device", default="cpu")
    add_guard(p)
    p.set_defaults(func=cmd_correct)
    p = with_project(sub.add_parser("export", help="write the model for transformers, llama.cpp or CTranslate2"))
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "ct2"])
    p.add_argument("--out", help="output folder (default RUN/export/FORMAT)")
    p.set_defaults(func=cmd_export)
    p = with_project(sub.add_parser("specialize", help="a projected network's expert (model.projected), or the "
                                                       "target's expert among one model per cluster (--pick-expert), "
                                                       "as a plain run, to fine-tune (train.init_from) or export"))
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cluster", type=_count, metavar="I", help="the expert of cluster I")
    which.add_argument("--target", action="store_true", help="the mixture of experts the target's cluster histogram "
                                                             "gives (RUN/select/selection.json, method clusters)")
    which.add_argument("--mixture", type=_weights, metavar="W0,W1,...", help="one weight per cluster (normalised)")
    which.add_argument("--pick-expert", metavar="EXPERTS",
                       help="SLM-mix: of the runs EXPERTS/cluster-NNNN, each trained on one file of the project's "
                            "partition (select.partition), the one of the target's most frequent cluster")
    p.add_argument("--partition", metavar="FOLDER",
                   help="with --target or --pick-expert: the partition the experts were trained on (another run's "
                        "RUN/select/clusters); the project's target is placed among its clusters with its saved fit")
    p.add_argument("--out", help="the run folder to write (default RUN/specialized/cluster_I, target, mixture or "
                                 "expert_I)")
    p.set_defaults(func=cmd_specialize)
    p = sub.add_parser("apply", help="correct files or folders of .txt/.jsonl/.parquet with a model, resumably")
    p.add_argument("--model", required=True, help="a run directory, a project file or an hf export folder "
                                                  "(or, with --backend ct2, a ct2 export folder)")
    p.add_argument("--input", required=True, nargs="+", help=".txt, .jsonl or .parquet files, or folders of them")
    p.add_argument("--output", required=True, help="output folder; outputs mirror the input names")
    add_executor(p, "tasks the work is planned for (default: --workers; local: all cores; slurm/ray: one per "
                    "64 MB of input); the output does not depend on it", "OUTPUT/.nichelm-apply/slurm", default=None)
    p.add_argument("--shard", help="I/N: run only task I of --tasks N (0-based) in this process, e.g. 0/4 "
                                   "(what each datatrove task runs); the last task to finish joins split files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet: the field (column) holding the text")
    p.add_argument("--output-field", default=None,
                   help="jsonl/parquet: the field added to each output line (the column added to each file); "
                        "default: corrected, or label for a classification model")
    p.add_argument("--backend", default="torch", choices=["torch", "ct2", "vllm"],
                   help="decoding engine: torch (nichelm's own), ct2 (CTranslate2, CPU or cuda) or vllm (GPU)")
    add_guard(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the torch engine (~15 s, then faster); auto: for inputs of 1 MB or more")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="torch engine weights: auto = bf16 on CUDA, fp32 on CPU; bfloat16 on a CPU with bf16 "
                        "arithmetic (AVX512-BF16, AMX) can decode faster compiled; a few outputs may differ from fp32")
    p.add_argument("--draft-tokens", type=_draft_tokens, default=None, metavar="N",
                   help="torch engine: tokens copied from the input and checked per decoding step (same output, "
                        "fewer steps; default 3); 0: one token a step")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("plan", help="which specialized small model to train for given budgets, and why "
                                    "(Plan Early's findings): method, preset, tokens, phases")
    p.add_argument("project", nargs="?", help="project file (TOML): its model arch, vocab_size and block_size "
                                              "(default: nichelm's defaults)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a project value")
    # Numbers are read by nichelm.plan.parse_number (1e6, 1M, 1_000_000), so a bad one is a one-line error.
    p.add_argument("--specialist-tokens", metavar="N", help="tokens of specialist (in-domain) training text")
    p.add_argument("--specializations", metavar="K", default="1", help="specialized models needed (default 1)")
    p.add_argument("--pretrain-gpu-hours", metavar="X", default="0",
                   help="pre-training GPU-hours in all: spent once and shared, or split across the K "
                        "specializations when their data is at hand before pre-training (default 0)")
    p.add_argument("--specialize-gpu-hours", metavar="Y", default="0",
                   help="GPU-hours for each specialization once its data is at hand (default 0)")
    p.add_argument("--inference-tokens-per-s", metavar="Z", help="tokens/s one inference device must generate")
    p.add_argument("--hardware", default="cpu", help="the inference device: cpu (default) or gpu")
    p.add_argument("--pilot", action="store_true",
                   help="also measure on PROJECT's generic sources and target (a few CPU minutes, RUN/plan-pilot/): "
                        "a tiny model pre-trained on a selection vs random generic text, the target's clusters")
    p.add_argument("--pilot-tokens", metavar="N",
                   help="--pilot: the selection's size in words, the random sample's too (default 100k)")
    p.add_argument("--pilot-steps", metavar="N", help="--pilot: training steps of each run (default 60)")
    p.add_argument("--force", action="store_true", help="--pilot: run it again even when RUN/plan-pilot is up to date")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (with --pilot: its figures, \"pilot\")")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("quickstart", help="prepare, train and evaluate the embedded default on CPU")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_quickstart)

    bench = sub.add_parser("bench", help="benchmarks that print JSON").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("train", help="training tokens/s and MFU of one model shape on random tokens")
    p.add_argument("--preset", default="d6")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="as train.precision (auto: bf16 autocast on CUDA, fp32 on a CPU)")
    for dim in ("n-layer", "n-embd", "n-head"):
        p.add_argument(f"--{dim}", type=int, default=0, help=f"override the preset's {dim.replace('-', '_')}")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs)")
    p.set_defaults(func=cmd_bench_train)
    return parser


# Errors of the disk rather than of the program: one line and exit 1, like a user error but not the user's input.
DISK_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
               errno.EFBIG: "the file is larger than this filesystem or `ulimit -f` allows",
               errno.EROFS: "the folder is on a read-only filesystem: choose a writable one",
               errno.EACCES: "make the folder writable", errno.EPERM: "make the folder writable"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"nichelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nichelm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug or e.errno not in DISK_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"nichelm: error: {where}{e.strerror or e}; {DISK_ERRORS[e.errno]}, then re-run the same "
              "command (finished work is kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
