"""Decoding throughput of a model of a given size (e.g. d12, 124M) on GPU: nichelm's engine vs vLLM.

    python bench/decode_throughput.py RUN_OR_EXPORT --preset d12 [--arch gpt2|llama] [--device cuda]
        [--batch-size 256] [--windows 4096] [--new-tokens 128] [--engines nichelm,nichelm-eager,vllm]

Throughput does not depend on what the weights learned, so the model is the preset's shape with
random weights (seeded) and the given run's tokenizer and prompt format; prompts are the run's
test windows (or built-in noisy sentences). Every row is asked for --new-tokens tokens; a row that
emits the end marker earlier stops there and counts only what it generated. nichelm runs in bf16 on
CUDA (fp32 on CPU), compiled unless the engine is `nichelm-eager`; vLLM (when installed) gets an hf
export of the same weights. Each engine: one warm-up batch, then one timed pass. Prints one JSON object.
On CPU this is a smoke test (`--device cpu --preset nano --windows 64 --new-tokens 16`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_model_export(source: Path, preset: str, arch: str, block_size: int, out: Path):
    """An hf export of a random model of `preset`'s shape with `source`'s tokenizer and task."""
    from nichelm.data.tokenizer import load_tokenizer
    from nichelm.export import NICHELM_JSON, RunModel, export_hf, is_export, load_run, run_dir
    from nichelm.model import GPT, PRESETS, ModelConfig
    if is_export(source):
        meta = json.loads((source / NICHELM_JSON).read_text())
        rm = load_run(Path(meta["run"]))
    else:
        rm = load_run(run_dir(source))
    vocab = load_tokenizer(rm.tokenizer_path).get_vocab_size()
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, block_size=block_size, **PRESETS[preset])
    model = GPT(cfg)
    fake = RunModel(rm.run, rm.checkpoint, cfg, dict(model.state_dict()), rm.task, {"step": 0})
    return export_hf(fake, out), rm


def prompts_for(rm, tokenizer, n: int) -> list[list[int]]:
    test = rm.run / "data" / "examples.test.jsonl"
    texts = [json.loads(line)["input"] for line in test.read_text().splitlines()] if test.is_file() else []
    texts = texts or ["Tlie committee met at the town liall on Monday evening to consider the ncw road."]
    from nichelm.data.tokenizer import prompt_ids_batch
    return prompt_ids_batch(tokenizer, rm.task.prompt_template, [texts[i % len(texts)] for i in range(n)])


def timed(fn, prompts, budgets, batch) -> dict:
    start = time.perf_counter()
    fn(prompts[:batch], budgets[:batch])
    warmup = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    gens = fn(prompts, budgets)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(g.tokens) + (not g.hit_limit) for g in gens)
    return {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "warmup_s": round(warmup, 2), "outputs": [g.tokens for g in gens]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a run, project file or hf export: its tokenizer, prompt format and test windows")
    ap.add_argument("--preset", default="d12")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="nichelm,nichelm-eager,vllm")
    args = ap.parse_args(argv)
    from nichelm.export import load_corrector
    from nichelm.generate import compile_for_decoding, generate
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        hf, rm = random_model_export(Path(args.model), args.preset, args.arch, args.block_size, Path(tmp) / "hf")
        corrector = load_corrector(hf, device=args.device)          # bf16 on CUDA
        model, device = corrector.model, torch.device(args.device)
        prompts = prompts_for(rm, corrector.tokenizer, args.windows)
        budgets = [min(args.new_tokens, args.block_size - len(p)) for p in prompts]
        result = {"preset": args.preset, "arch": args.arch, "params": sum(p.numel() for p in model.parameters()),
                  "dtype": str(next(model.parameters()).dtype), "device": args.device,
                  "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
                  "batch_size": args.batch_size, "windows": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                  "new_tokens": args.new_tokens, "engines": {}}
        runs = {}
        for name, compiled in (("nichelm", True), ("nichelm-eager", False)):
            if name in engines:
                step = compile_for_decoding() if compiled else None
                runs[name] = timed(lambda p, b: generate(model, p, b, corrector.end_id, device, args.batch_size,
                                                         step=step), prompts, budgets, args.batch_size)
        if "vllm" in engines:
            try:
                from nichelm.backends import VLLMBackend
                vllm = VLLMBackend(hf, corrector.end_id, dtype="bfloat16", max_model_len=args.block_size)
                runs["vllm"] = timed(vllm.generate, prompts, budgets, args.batch_size)
            except Exception as e:                      # not installed / no GPU: say so in the JSON
                result["engines"]["vllm"] = {"skipped": str(e).splitlines()[0]}
        reference = next(iter(runs.values()))["outputs"] if runs else []
        for name, r in runs.items():
            outputs = r.pop("outputs")
            r["same_as_first"] = round(sum(a == b for a, b in zip(outputs, reference)) / max(len(outputs), 1), 4)
            result["engines"][name] = r
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
