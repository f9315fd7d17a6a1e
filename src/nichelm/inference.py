"""Load a trained run and correct text with it: windowing, batched decoding, do-no-harm guard.

Used by `nichelm evaluate`, `nichelm correct` and `nichelm.load(...)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nichelm.checkpoint import latest_checkpoint, load_model_weights
from nichelm.data.tokenizer import load_tokenizer
from nichelm.errors import UserError
from nichelm.generate import beam_search, generate
from nichelm.metrics import char_distance
from nichelm.model import GPT, ModelConfig


@dataclass
class GuardStats:
    windows: int = 0
    kept_too_different: int = 0
    kept_hit_limit: int = 0


@dataclass
class Correction:
    text: str              # what we return (after the guard)
    raw: str               # the model's own output
    kept_input: str = ""   # "", "too_different" or "hit_limit"


def cut_windows(text: str, max_chars: int) -> list[tuple[str, str]]:
    """Cut text into (chunk, following whitespace) pairs, chunks ≤ max_chars, never inside a word.

    Prefers a sentence end near the limit. Joining chunk+sep over all pairs gives the text back.
    """
    pieces = []
    pos, n = 0, len(text)
    while pos < n:
        lead = re.match(r"\s*", text[pos:]).end()
        if lead:                                   # leading whitespace belongs to the previous separator
            if pieces:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + text[pos:pos + lead])
            else:
                pieces.append(("", text[pos:pos + lead]))
            pos += lead
            continue
        end = min(pos + max_chars, n)
        if end < n:
            window = text[pos:end + 1]
            cuts = [m.end() - 1 for m in re.finditer(r"[.!?;:]\s", window)]
            cuts = [c for c in cuts if c >= max_chars // 2]
            spaces = [m.start() for m in re.finditer(r"\s", window)]
            if cuts:
                end = pos + cuts[-1] + 1
            elif spaces and spaces[-1] > 0:
                end = pos + spaces[-1]
            # else: one word longer than the window; cut it hard
        chunk = text[pos:end]
        sep_len = re.match(r"\s*", text[end:]).end()
        pieces.append((chunk, text[end:end + sep_len]))
        pos = end + sep_len
    return pieces


class Corrector:
    def __init__(self, model: GPT, tokenizer, task: dict, device: torch.device | str = "cpu",
                 batch_size: int = 64, guard_max_change: float = 0.15, max_new_tokens_ratio: float = 1.5,
                 beams: int = 1):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt_template = task["prompt_template"]
        self.end_id = tokenizer.token_to_id(task["end_marker"])
        self.window_chars = int(task.get("window_chars", 100))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.guard_max_change = guard_max_change
        self.max_new_tokens_ratio = max_new_tokens_ratio
        self.beams = beams                 # 1: batched greedy; >1: beam search, one window at a time
        self.stats = GuardStats()

    @classmethod
    def from_run(cls, run: Path, device: str = "cpu", **kwargs) -> "Corrector":
        run = Path(run)
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UserError(f"{run}: no complete checkpoint; run `nichelm train` first")
        trainer = json.loads((ckpt / "trainer.json").read_text())
        model = GPT(ModelConfig(**trainer["model_config"]))
        load_model_weights(model, ckpt / "model.safetensors")
        tokenizer = load_tokenizer(run / "tokenizer" / "tokenizer.json")
        task = json.loads((run / "task.json").read_text())
        return cls(model.to(device), tokenizer, task, device=device, **kwargs)

    def _prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(self.prompt_template.format(input=text)).ids

    def correct_windows(self, windows: list[str]) -> list[Correction]:
        """Correct short texts (each fits the model's context) in batches."""
        block = self.model.cfg.block_size
        prompts, budgets, results = [], [], [None] * len(windows)
        todo = []
        for i, w in enumerate(windows):
            if not w.strip():
                results[i] = Correction(w, w)
                continue
            ids = self._prompt_ids(w)
            n_in = len(self.tokenizer.encode(w).ids)
            budget = min(int(n_in * self.max_new_tokens_ratio) + 8, block - len(ids))
            if budget <= 0:              # the window does not fit the context: keep it
                results[i] = Correction(w, w, "hit_limit")
                continue
            todo.append(i)
            prompts.append(ids)
            budgets.append(budget)
        if self.beams > 1:
            gens = [beam_search(self.model, p, b, self.end_id, self.device, beams=self.beams)
                    for p, b in zip(prompts, budgets)]
        else:
            gens = generate(self.model, prompts, budgets, self.end_id, self.device, self.batch_size) if todo else []
        for i, g in zip(todo, gens):
            raw = self.tokenizer.decode(g.tokens).strip()
            results[i] = self._guard(windows[i], raw, g.hit_limit)
        self.stats.windows += len(windows)
        return results

    def _guard(self, source: str, raw: str, hit_limit: bool) -> Correction:
        """Do no harm: keep the input where the output drifted too far or never ended."""
        if hit_limit:
            self.stats.kept_hit_limit += 1
            return Correction(source, raw, "hit_limit")
        if self.guard_max_change >= 0 and char_distance(raw, source) > self.guard_max_change * max(len(source), 1):
            self.stats.kept_too_different += 1
            return Correction(source, raw, "too_different")
        return Correction(raw, raw)

    def correct(self, texts: list[str], guard: bool = True) -> list[str]:
        """Correct texts of any length: cut into windows, correct, stitch back in order."""
        cut = [cut_windows(t, self.window_chars) for t in texts]
        flat = [chunk for pieces in cut for chunk, _ in pieces]
        fixed = self.correct_windows(flat)
        out, k = [], 0
        for pieces in cut:
            parts = []
            for chunk, sep in pieces:
                c = fixed[k]
                parts.append((c.text if guard else c.raw) + sep)
                k += 1
            out.append("".join(parts))
        return out
