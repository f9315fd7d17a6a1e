"""`correction`: noisy text -> corrected text (post-OCR correction, nichelm's flagship job).

The task nichelm has always run, expressed through the Task interface: the same prompt template,
markers, end marker and windows as config.TaskConfig's defaults, free-text decoding up to the end
marker (inference.Corrector, with its do-no-harm guard), and corpus CER/WER (nichelm.metrics).
A task.json without "type" (every run and export made before tasks had types) is this task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nichelm.data.readers import Document
from nichelm.metrics import markdown_score_table, score_pairs
from nichelm.tasks.base import USAGE_INTRO, Task


@dataclasses.dataclass
class CorrectionTask(Task):
    type = "correction"
    decoding = "free"

    name: str = "ocr"
    prompt_template: str = "### Text ###\n{input}\n### Correction ###\n"
    end_marker: str = "<|endoftext|>"
    window_chars: int = 100
    # the do-no-harm guard `nichelm evaluate` calibrated (RUN/guard.json), as exports carry it; None: none
    guard: dict | None = None

    def examples(self, doc: Document) -> list[tuple[str | None, str]]:
        """The document's windows as (input, gold) pairs; input None for clean text (noise comes later)."""
        return [(w.input, w.output) for w in self.windows(doc)]

    def metrics(self, predictions: Sequence[str], references: Sequence[str], inputs: Sequence[str] | None = None,
                **_) -> dict:
        """Corpus (micro) CER and WER of the predictions; with the inputs, the same before correction."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        after = score_pairs(zip(predictions, references))
        out = {"n": after.n, "chars": after.chars, "words": after.words, "cer": after.cer, "wer": after.wer}
        if inputs is not None:
            before = score_pairs(zip(inputs, references))
            out.update(cer_before=before.cer, wer_before=before.wer)
        return out

    def card(self, prompt_code: str) -> list[str]:
        return ["## Prompt format", "",
                "The model reads the prompt below with `{input}` replaced by at most "
                f"~{self.window_chars} characters of text, writes its output, then the end "
                f"marker `{self.end_marker}`. Decode greedily. Longer texts must be cut into windows "
                "(`nichelm apply` does this, and keeps the input where the output drifts too far).", "",
                "```", self.prompt_template.rstrip("\n"), "```", "",
                "`task.json` holds the template and end marker for programs.", "",
                *USAGE_INTRO,
                "```python", "import torch",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "tok = AutoTokenizer.from_pretrained(PATH)",
                "model = AutoModelForCausalLM.from_pretrained(PATH)",
                prompt_code,
                "x = torch.tensor([ids])",
                "out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2 * len(ids),",
                "                     do_sample=False)",
                "print(tok.decode(out[0, len(ids):], skip_special_tokens=True))", "```", "",
                "Or with nichelm: `nichelm apply --model PATH --input texts/ --output corrected/`.", ""]

    def card_metrics(self, report: dict) -> list[str]:
        rows = [("CER (corpus)", "cer_before", "cer_after"), ("WER (corpus)", "wer_before", "wer_after")]
        lines = [f"Held-out test split, {report.get('n_examples', '?')} examples.", "",
                 "| metric | input | model output |", "|---|---|---|"]
        for name, before, after in rows:
            if before in report and after in report:
                lines.append(f"| {name} | {100 * report[before]:.2f}% | {100 * report[after]:.2f}% |")
        if "worse_fraction" in report:
            lines.append(f"| share of examples made worse | | {100 * report['worse_fraction']:.1f}% |")
        margin = report.get("margin_guard") or {}
        val = (margin.get("calibration") or {}).get("val") or {}
        if margin.get("margin") is not None:
            lines += ["", f"Guard margin {margin['margin']:.3f} nats/token, chosen on "
                      f"{val.get('documents', '?')} validation documents ({margin.get('chosen_on', '?')})."]
        caps, rules = report.get("guard") or {}, []
        if caps.get("max_change", -1) >= 0:
            rules.append(f"changes more than {caps['max_change']:g} of its window")
        if caps.get("max_deleted_letters"):
            rules.append(f"deletes {caps['max_deleted_letters']} letters or more in one place")
        if rules:
            lines.append(f"A window keeps its input when the model's output {' or '.join(rules)}.")
        if margin.get("min_chars_per_token") is not None:
            share = margin.get("unfamiliar_share")
            lines.append(f"A document the tokenizer compresses to fewer than {margin['min_chars_per_token']:.2f} "
                         "characters per token" + (f" (all but {100 * share:g}% of the validation documents reach it)"
                                                   if share else "") + " keeps its input whole.")
        for title, per_source in (("Test documents", report.get("per_source")),
                                  ("Validation documents at that margin", val.get("per_source"))):
            if per_source and len(per_source) > 1:
                lines += ["", f"{title}, per source:", "", *markdown_score_table("source", list(per_source.items()))]
        return lines

    def to_json(self) -> dict:
        d = super().to_json()
        if d["guard"] is None:          # task.json as it always was: a "guard" key only once calibrated
            del d["guard"]
        return d
