"""Decode-only tokens/s: generate() on pre-tokenized windows, nichelm's engine vs transformers (vs CTranslate2).

    python bench/apply_throughput.py RUN_OR_EXPORT [--threads 2] [--batch-size 32] [--windows 256] [--rounds 5]
                                     [--device cpu|cuda]

What it times is decoding alone ("measures": "decode_only" in its JSON): each engine's generate call on
windows already cut and tokenized, nothing else. No file reading, windowing, guard scoring, stitching,
writing or ledger, and no process start or model load: for `nichelm apply` end to end (files in,
files out, in MB of input text per second) see bench/apply_e2e.py.

Every engine gets the same exported weights, the same prompts (windows of the run's test split,
or of built-in sentences for an export folder without its run) and the same batch size, and
decodes greedily. Tokens counted are those each row needs (up to its end marker or nichelm's
per-row budget); an engine that cannot stop rows early pays for its extra work in time.
`same_as_nichelm` is the share of rows whose tokens equal nichelm's (eager, one token a step).

Engines: nichelm (eager, one token per forward pass), nichelm-compiled (torch.compile; its compile
time is in `warmup_s`, not in the timed passes), nichelm-copy and nichelm-copy-compiled (copy drafts
of --draft-tokens tokens checked per pass, drafted from each window's own tokens, as `apply` does),
transformers, transformers-prompt-lookup (transformers' own copy drafts, prompt_lookup_num_tokens;
batch size 1, the only one it takes), transformers-fp32 (in float32 whatever --dtype says: with
--dtype bfloat16, transformers' faster CPU setting next to nichelm in bf16), ctranslate2.

Every engine first warms up on two batches (where torch.compile compiles); then `--rounds` rounds each
time every engine once over all windows, in turn, so that a machine whose speed drifts (a shared
VM) slows every engine alike. Reported: the median round and the best; every round is listed.
Prints one JSON object; its rates are decode_tokens_per_s and its ratios decode_only_speedup_vs_transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SAMPLE = [
    "Tlie committee met at the town liall on Monday evening to consider the ncw road.",
    "A large nuniber of persons assembled in the market placc before the meeting began.",
    "The prisoner was brouglit up on remand and cliarged with stealing a silver watcb.",
    "It was resolved that the tbanks of the meeting be given to the cbairman.",
]


def windows_for(model_dir: Path, n: int) -> list[str]:
    """Test-split inputs of the run the model came from, else built-in noisy sentences."""
    from nichelm.export import NICHELM_JSON, is_export
    run = Path(json.loads((model_dir / NICHELM_JSON).read_text())["run"]) if is_export(model_dir) else model_dir
    texts = []
    test = run / "data" / "examples.test.jsonl"
    if test.is_file():
        texts = [json.loads(line)["input"] for line in test.read_text().splitlines()[:n]]
    texts = texts or SAMPLE
    return [texts[i % len(texts)] for i in range(n)]


def budgets(corrector, prompts: list[list[int]], texts: list[str]) -> list[int]:
    """nichelm's per-row bound (Corrector.budget): 1.5 x the input tokens + 8, within the context."""
    from nichelm.data.tokenizer import encode_texts
    return [corrector.budget(len(s), len(p)) for p, s in zip(prompts, encode_texts(corrector.tokenizer, texts))]


def useful(tokens: list[int], budget: int, end_id: int) -> list[int]:
    tokens = tokens[:budget]
    return tokens[: tokens.index(end_id)] if end_id in tokens else tokens


def batches(prompts, batch):
    """Length-sorted batches (what transformers and CTranslate2 are given)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def nichelm_engine(corrector, prompts, limits, sources, batch, compile=False, draft_tokens=0):
    """go(subset) -> token lists, with nichelm's engine (continuous batching of `batch` rows)."""
    from nichelm.generate import compile_for_decoding, generate
    step = compile_for_decoding() if compile else None

    def go(idx):
        gens = generate(corrector.model, [prompts[i] for i in idx], [limits[i] for i in idx], corrector.end_id,
                        corrector.device, batch_size=batch, step=step, draft_tokens=draft_tokens,
                        sources=[sources[i] for i in idx], token_chars=corrector.token_chars())
        return [g.tokens for g in gens]
    return go


def transformers_engine(export_dir, prompts, limits, batch, end_id, lookup=0, device="cpu", dtype=torch.float32):
    """transformers' generate(), greedy, left-padded length-sorted batches; lookup > 0: its
    prompt-lookup drafts of that many tokens."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}

    def go(idx):
        out = {}
        sub = [prompts[i] for i in idx]
        for part in batches(sub, batch):
            rows = [idx[p] for p in part]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), end_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):                      # left padding
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     pad_token_id=end_id,
                                     eos_token_id=end_id, max_new_tokens=max(limits[i] for i in rows), **extra)
            for row, i in enumerate(rows):
                out[i] = useful(gen[row, width:].tolist(), limits[i], end_id)
        return [out[i] for i in idx]
    return go


def ctranslate2_engine(ct2_dir, corrector, prompts, limits, batch, threads):
    import ctranslate2
    compute = "bfloat16" if next(corrector.model.parameters()).dtype == torch.bfloat16 else "float32"
    generator = ctranslate2.Generator(str(ct2_dir), device=corrector.device.type, intra_threads=threads,
                                      compute_type=compute)
    tok = corrector.tokenizer
    end = tok.id_to_token(corrector.end_id)

    def go(idx):
        out = {}
        sub = [prompts[i] for i in idx]
        for part in batches(sub, batch):
            rows = [idx[p] for p in part]
            res = generator.generate_batch([[tok.id_to_token(t) for t in prompts[i]] for i in rows],
                                           max_length=max(limits[i] for i in rows), sampling_topk=1,
                                           end_token=end, include_prompt_in_result=False, max_batch_size=batch)
            for r, i in zip(res, rows):
                out[i] = useful(r.sequences_ids[0], limits[i], corrector.end_id)
        return [out[i] for i in idx]
    return go


def measure(engines: dict, n: int, batch: int, rounds: int) -> dict:
    """Warm every engine up on two batches' worth of rows (so that rows are refilled: every graph
    torch.compile makes is made here), then `rounds` rounds of every engine in turn over all n rows."""
    runs = {}
    for name, go in engines.items():
        start = time.perf_counter()
        go(list(range(min(2 * batch + 1, n))))
        runs[name] = {"warmup_s": time.perf_counter() - start, "seconds": []}
    everything = list(range(n))
    for _ in range(rounds):
        for name, go in engines.items():
            start = time.perf_counter()
            runs[name]["out"] = go(everything)
            runs[name]["seconds"].append(time.perf_counter() - start)
    return runs


def summary(run: dict, reference, limits) -> dict:
    """Median and best round (this machine's timings vary from run to run); every round listed."""
    outputs = run["out"]
    # Each row costs its tokens plus the end marker when it stopped before its budget.
    tokens = sum(len(o) + (len(o) < b) for o, b in zip(outputs, limits))
    seconds = statistics.median(run["seconds"])
    same = sum(o == r for o, r in zip(outputs, reference)) / len(outputs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "decode_tokens_per_s": round(tokens / seconds, 1),
            "decode_tokens_per_s_best": round(tokens / min(run["seconds"]), 1),
            "decode_tokens_per_s_each_round": [round(tokens / s, 1) for s in run["seconds"]],
            "warmup_s": round(run["warmup_s"], 2), "windows_per_s": round(len(outputs) / seconds, 2),
            "same_as_nichelm": round(same, 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a run directory, project file or hf export folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="every engine's weights and arithmetic (auto: nichelm's choice, bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--windows", type=int, default=256, help="how many windows to correct")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each engine once per round)")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="copy-draft length of the nichelm-copy engines (default: nichelm's DRAFT_TOKENS)")
    ap.add_argument("--engines", default="nichelm,nichelm-compiled,nichelm-copy,nichelm-copy-compiled,"
                                         "transformers,transformers-prompt-lookup,ctranslate2")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nichelm.data.tokenizer import encode_texts, prompt_ids_batch
    from nichelm.export import export, is_export, run_dir
    from nichelm.generate import DRAFT_TOKENS
    model = Path(args.model)
    wanted = args.engines.split(",")
    draft = DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = model if is_export(model) else export(run_dir(model), "hf", Path(tmp) / "hf")
        from nichelm import load
        corrector = load(export_dir, device=args.device)
        if args.dtype != "auto":
            corrector.model = corrector.model.to(getattr(torch, args.dtype))
        dtype = next(corrector.model.parameters()).dtype
        texts = windows_for(export_dir if is_export(model) else run_dir(model), args.windows)
        prompts = prompt_ids_batch(corrector.tokenizer, corrector.prompt_template, texts)
        sources = encode_texts(corrector.tokenizer, texts)
        limits = budgets(corrector, prompts, texts)
        engines, versions, skipped = {}, {}, {}
        for name, compile, k in (("nichelm", False, 0), ("nichelm-compiled", True, 0),
                                 ("nichelm-copy", False, draft), ("nichelm-copy-compiled", True, draft)):
            if name == "nichelm" or name in wanted:
                engines[name] = nichelm_engine(corrector, prompts, limits, sources, args.batch_size, compile, k)
        if any(name.startswith("transformers") for name in wanted):
            import transformers
            for name in ("transformers", "transformers-prompt-lookup", "transformers-fp32"):
                versions[name] = transformers.__version__
        if "transformers" in wanted:
            engines["transformers"] = transformers_engine(export_dir, prompts, limits, args.batch_size,
                                                          corrector.end_id, device=args.device, dtype=dtype)
        if "transformers-fp32" in wanted:
            engines["transformers-fp32"] = transformers_engine(export_dir, prompts, limits, args.batch_size,
                                                               corrector.end_id, device=args.device)
        if "transformers-prompt-lookup" in wanted:
            engines["transformers-prompt-lookup"] = transformers_engine(export_dir, prompts, limits, 1,
                                                                        corrector.end_id, lookup=draft,
                                                                        device=args.device, dtype=dtype)
        if "ctranslate2" in wanted:
            try:
                import ctranslate2
                from nichelm.export import hf_to_ct2
                ct2_dir = hf_to_ct2(export_dir, Path(tmp) / "ct2")
                engines["ctranslate2"] = ctranslate2_engine(ct2_dir, corrector, prompts, limits, args.batch_size,
                                                            args.threads)
                versions["ctranslate2"] = ctranslate2.__version__
            except ImportError:
                skipped["ctranslate2"] = "ctranslate2 is not installed (pip install ctranslate2)"
            except ValueError as e:                    # e.g. no bf16 compute on this CPU
                skipped["ctranslate2"] = str(e).splitlines()[0]
        runs = measure(engines, len(prompts), args.batch_size, args.rounds)
        reference = runs["nichelm"]["out"]
        result = {"measures": "decode_only", "model": str(model), "arch": corrector.model.cfg.arch, "params": sum(
                      p.numel() for p in corrector.model.parameters()),
                  "device": args.device, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                  "gpu": torch.cuda.get_device_name() if corrector.device.type == "cuda" else None,
                  "dtype": str(dtype),
                  "torch": torch.__version__, "batch_size": args.batch_size, "windows": len(prompts),
                  "prompt_tokens": sum(map(len, prompts)), "draft_tokens": draft, "rounds": args.rounds,
                  "engines": {}}
        for name, run in runs.items():
            result["engines"][name] = summary(run, reference, limits)
            if name in versions:
                result["engines"][name]["version"] = versions[name]
        if "transformers-prompt-lookup" in result["engines"]:
            result["engines"]["transformers-prompt-lookup"]["batch_size"] = 1
        result["engines"].update({name: {"skipped": why} for name, why in skipped.items()})
        base = result["engines"].get("transformers", {})
        if "decode_tokens_per_s" in base:
            result["decode_only_speedup_vs_transformers"] = {
                name: round(e["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
                for name, e in result["engines"].items() if "decode_tokens_per_s" in e}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
