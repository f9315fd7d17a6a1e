"""`language-model`: plain text, for pre-training (issue 13: a selection used as pre-training text).

Every example is one window of a document's text (clean sources, the gold side of pairs, a
selection) with an empty input: the prompt is only the two markers the loss rule reads
(`<|lm|><|text|>`, then the text, then the end marker), so the loss (data.loader.loss_mask) covers
every token of the text and the end marker, and the markers cost two tokens per window. No noise is
made (the input is "", not None) and an empty input is kept (`reads_input = False`).

The model continues text; it corrects nothing, so there is no runner to load (`runner_error`) and no
decoded metrics: it is scored by perplexity (`nichelm evaluate PROJECT --perplexity`, nichelm.perplexity).
Fine-tune it on a correction or classification task afterwards: train.init_from with tokenizer.from = this
run, which needs the same special tokens, so give this task that task's prompt_template
(examples/pretrain_lm.toml); or as a [[train.phases]] phase of data prepared with that tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nichelm.data.readers import Document
from nichelm.errors import UserError
from nichelm.tasks.base import Task

SCORED_BY = ("a language-model task is a pre-training task, scored by perplexity: run "
             "`nichelm evaluate PROJECT --perplexity`, or fine-tune it on a correction or classification task")


@dataclasses.dataclass
class LanguageModelTask(Task):
    type = "language-model"
    decoding = "free"
    reads_input = False
    runner_error = ("this model was trained on a 'language-model' task (pre-training): it corrects and "
                    "classifies nothing; fine-tune it (train.init_from) or score it with `nichelm evaluate "
                    "--perplexity`")

    name: str = "lm"
    prompt_template: str = "<|lm|>{input}<|text|>"
    end_marker: str = "<|endoftext|>"
    # a row of training starts at an example and holds block_size tokens (data.loader): a window longer than
    # that loses its tail, so the default fits model.block_size's default (256) at >= 2 characters a token
    window_chars: int = 500

    @property
    def guard(self) -> None:
        """No do-no-harm guard: nothing is corrected (inference.Corrector, which nichelm.perplexity loads
        the model through, reads it)."""
        return None

    def examples(self, doc: Document) -> list[tuple[str, str]]:
        """The document's text in windows, each with an empty input: the gold side of pairs, clean text."""
        return [("", w.output) for w in self.windows(doc)]

    def metrics(self, predictions: Sequence[str], references: Sequence[str], **_) -> dict:
        raise UserError(SCORED_BY)

    def card(self, prompt_code: str) -> list[str]:
        return ["## Task", "",
                "Language model (pre-training): trained on windows of at most "
                f"~{self.window_chars} characters of plain text, each after the markers of the prompt below "
                f"(with an empty `{{input}}`) and followed by the end marker `{self.end_marker}`. It continues "
                "text; fine-tune it before using it for a task.", "",
                "```", self.prompt_template.rstrip("\n"), "```", ""]

    def card_metrics(self, report: dict) -> list[str]:
        p = report.get("perplexity") or {}
        if "macro_perplexity" not in p:
            return [f"Not scored yet: {SCORED_BY}."]
        return [f"Held-out text, {p.get('documents', '?')} documents, {p.get('tokens', '?')} tokens.", "",
                "| metric | value |", "|---|---|",
                f"| perplexity (macro over domains) | {p['macro_perplexity']:.2f} |",
                f"| bits per byte | {p['bits_per_byte']:.3f} |"]
