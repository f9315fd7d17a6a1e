"""How many forward passes copy drafts save: decoding steps per draft length (counts, not timings).

    python bench/copy_drafts.py RUN_OR_EXPORT [--split val] [--windows 400] [--batch-size 32] [--drafts 0,2,3,4,8]

Decodes the windows of one split of the run the model came from (validation by default: the
alignment settings in nichelm.generate were chosen there) greedily with nichelm's engine, once
per draft length, with and without re-aligning by token length, and counts decoding steps
(forward passes after the prompts), row-steps (rows decoding in a step), output tokens per
row-step, and tokens the steps processed (steps x batch x (drafts + 1)). Every run's outputs are
checked equal to one-token steps. Counts do not depend on the machine's speed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a run directory or an hf export folder of a run")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--windows", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--drafts", default="0,2,3,4,8", help="draft lengths, comma-separated")
    args = ap.parse_args(argv)
    from nichelm import load
    from nichelm.data.tokenizer import encode_texts, prompt_ids_batch
    from nichelm.export import NICHELM_JSON, is_export
    from nichelm.generate import Steps, decode_step, generate
    model = Path(args.model)
    run = Path(json.loads((model / NICHELM_JSON).read_text())["run"]) if is_export(model) else model
    lines = (run / "data" / f"examples.{args.split}.jsonl").read_text().splitlines()[:args.windows]
    corrector = load(model)
    texts = [json.loads(line)["input"] for line in lines]
    prompts = prompt_ids_batch(corrector.tokenizer, corrector.prompt_template, texts)
    sources = encode_texts(corrector.tokenizer, texts)
    budgets = [corrector.budget(len(s), len(p)) for p, s in zip(prompts, sources)]
    counts = {"steps": 0, "row_steps": 0}

    def counting(model, cache, rows, keys, end_id, draft_len, active=None):
        counts["steps"] += 1
        counts["row_steps"] += int((~rows.done).sum())
        return decode_step(model, cache, rows, keys, end_id, draft_len, active)

    def decode(k, chars):
        counts.update(steps=0, row_steps=0)
        gens = generate(corrector.model, prompts, budgets, corrector.end_id, torch.device("cpu"), args.batch_size,
                        step=Steps(decode=counting), draft_tokens=k, sources=sources, token_chars=chars)
        return [g.tokens for g in gens], dict(counts)

    reference, _ = decode(0, None)
    tokens = sum(len(t) for t in reference)
    result = {"model": str(model), "split": args.split, "windows": len(prompts), "batch_size": args.batch_size,
              "output_tokens": tokens, "runs": []}
    for k in (int(d) for d in args.drafts.split(",")):
        for chars in ([None] if k == 0 else [None, corrector.token_chars()]):
            outputs, c = decode(k, chars)
            # output tokens after each prompt's first (which the prefill gives), end markers included
            emitted = sum(len(o) for o in outputs) + sum(b > len(o) for o, b in zip(outputs, budgets)) - len(outputs)
            result["runs"].append({"draft_tokens": k, "realign_by_length": chars is not None, "steps": c["steps"],
                                   "row_steps": c["row_steps"],
                                   "tokens_per_row_step": round(emitted / max(c["row_steps"], 1), 3),
                                   "tokens_processed": c["steps"] * args.batch_size * (k + 1),
                                   "same_as_one_token_steps": outputs == reference})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    torch.set_num_threads(2)
    main()
