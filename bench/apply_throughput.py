"""Corrected tokens/s on CPU: nichelm's engine vs transformers `generate()` (vs CTranslate2 if installed).

    python bench/apply_throughput.py RUN_OR_EXPORT [--threads 2] [--batch-size 32] [--windows 256] [--repeats 3]

Every engine gets the same exported weights, the same prompts (windows of the run's test split,
or of built-in sentences for an export folder without its run) and the same batch size, and
decodes greedily. Tokens counted are those each row needs (up to its end marker or nichelm's
per-row budget); an engine that cannot stop rows early pays for its extra work in time.
`same_as_nichelm` is the share of rows whose tokens equal nichelm's (eager). Engines: nichelm (eager),
nichelm-compiled (torch.compile; its compile time is in `warmup_s`, not in the timed passes),
transformers, ctranslate2. Each engine: one warm-up batch, then `--repeats` timed passes, median
reported. Prints one JSON object.
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
    """nichelm's per-row bound (Corrector.correct_windows): 1.5 x the input tokens + 8, within the context."""
    block = corrector.model.cfg.block_size
    return [min(int(len(corrector.tokenizer.encode(t).ids) * corrector.max_new_tokens_ratio) + 8, block - len(p))
            for p, t in zip(prompts, texts)]


def useful(tokens: list[int], budget: int, end_id: int) -> list[int]:
    tokens = tokens[:budget]
    return tokens[: tokens.index(end_id)] if end_id in tokens else tokens


def timed(fn, repeats: int) -> dict:
    """Warm up on one batch (this is where torch.compile compiles), then time `repeats` full passes."""
    start = time.perf_counter()
    fn(warmup=True)
    warmup = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(warmup=False)
        seconds.append(time.perf_counter() - start)
    return {"warmup_s": warmup, "seconds": seconds, "out": out}


def run_nichelm(corrector, prompts, limits, batch, repeats, compile=False):
    from nichelm.generate import compile_for_decoding, generate
    step = compile_for_decoding() if compile else None

    def go(warmup):
        p, b = (prompts[:batch], limits[:batch]) if warmup else (prompts, limits)
        gens = generate(corrector.model, p, b, corrector.end_id, torch.device("cpu"), batch_size=batch,
                        step=step)
        return [g.tokens for g in gens]
    return timed(go, repeats)


def batches(prompts, batch):
    """Length-sorted batches, as nichelm's generate() makes them."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def run_transformers(export_dir, prompts, limits, batch, end_id, repeats):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()

    def go(warmup):
        out = [None] * len(prompts)
        for idx in batches(prompts, batch)[:1] if warmup else batches(prompts, batch):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), end_id)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):                      # left padding, like nichelm
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=end_id,
                                     eos_token_id=end_id, max_new_tokens=max(limits[i] for i in idx))
            for row, i in enumerate(idx):
                out[i] = useful(gen[row, width:].tolist(), limits[i], end_id)
        return out
    return timed(go, repeats)


def run_ctranslate2(ct2_dir, corrector, prompts, limits, batch, threads, repeats):
    import ctranslate2
    generator = ctranslate2.Generator(str(ct2_dir), device="cpu", intra_threads=threads)
    tok = corrector.tokenizer
    end = tok.id_to_token(corrector.end_id)

    def go(warmup):
        out = [None] * len(prompts)
        for idx in batches(prompts, batch)[:1] if warmup else batches(prompts, batch):
            res = generator.generate_batch([[tok.id_to_token(t) for t in prompts[i]] for i in idx],
                                           max_length=max(limits[i] for i in idx), sampling_topk=1,
                                           end_token=end, include_prompt_in_result=False, max_batch_size=batch)
            for r, i in zip(res, idx):
                out[i] = useful(r.sequences_ids[0], limits[i], corrector.end_id)
        return out
    return timed(go, repeats)


def summary(run: dict, reference, limits) -> dict:
    """Median of the timed passes (this machine's timings vary from run to run); all passes listed."""
    outputs = run["out"]
    # Each row costs its tokens plus the end marker when it stopped before its budget.
    tokens = sum(len(o) + (len(o) < b) for o, b in zip(outputs, limits))
    seconds = statistics.median(run["seconds"])
    same = sum(o == r for o, r in zip(outputs, reference)) / len(outputs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_each_pass": [round(tokens / s, 1) for s in run["seconds"]],
            "warmup_s": round(run["warmup_s"], 2), "windows_per_s": round(len(outputs) / seconds, 2),
            "same_as_nichelm": round(same, 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a run directory, project file or hf export folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--windows", type=int, default=256, help="how many windows to correct")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per engine (the median is reported)")
    ap.add_argument("--engines", default="nichelm,nichelm-compiled,transformers,ctranslate2")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nichelm.export import export, is_export, run_dir
    model = Path(args.model)
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = model if is_export(model) else export(run_dir(model), "hf", Path(tmp) / "hf")
        from nichelm import load
        corrector = load(export_dir)
        texts = windows_for(export_dir if is_export(model) else run_dir(model), args.windows)
        prompts = [corrector.tokenizer.encode(corrector.prompt_template.format(input=t)).ids for t in texts]
        limits = budgets(corrector, prompts, texts)
        eager = run_nichelm(corrector, prompts, limits, args.batch_size, args.repeats)
        reference = eager["out"]
        result = {"model": str(model), "arch": corrector.model.cfg.arch, "params": sum(
                      p.numel() for p in corrector.model.parameters()),
                  "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                  "torch": torch.__version__, "batch_size": args.batch_size, "windows": len(prompts),
                  "prompt_tokens": sum(map(len, prompts)), "engines": {}}
        result["engines"]["nichelm"] = summary(eager, reference, limits)
        if "nichelm-compiled" in engines:
            run = run_nichelm(corrector, prompts, limits, args.batch_size, args.repeats, compile=True)
            result["engines"]["nichelm-compiled"] = summary(run, reference, limits)
        if "transformers" in engines:
            import transformers
            run = run_transformers(export_dir, prompts, limits, args.batch_size, corrector.end_id, args.repeats)
            result["engines"]["transformers"] = dict(summary(run, reference, limits),
                                                     version=transformers.__version__)
        if "ctranslate2" in engines:
            result["engines"]["ctranslate2"] = ct2_result(export_dir, tmp, corrector, prompts, limits, reference, args)
        base = result["engines"].get("transformers", {}).get("tokens_per_s")
        if base:
            result["speedup_vs_transformers"] = {name: round(e["tokens_per_s"] / base, 2)
                                                 for name, e in result["engines"].items() if "tokens_per_s" in e}
    print(json.dumps(result, indent=2))
    return result


def ct2_result(export_dir, tmp, corrector, prompts, limits, reference, args) -> dict:
    try:
        import ctranslate2
    except ImportError:
        return {"skipped": "ctranslate2 is not installed (pip install ctranslate2)"}
    from nichelm.export import hf_to_ct2
    ct2_dir = hf_to_ct2(export_dir, Path(tmp) / "ct2")
    run = run_ctranslate2(ct2_dir, corrector, prompts, limits, args.batch_size, args.threads, args.repeats)
    return dict(summary(run, reference, limits), version=ctranslate2.__version__)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
