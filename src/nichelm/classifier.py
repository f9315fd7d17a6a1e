"""Classify documents with a trained model: the runner of tasks whose decoding is "labels".

A document of any length is cut into windows as every stage cuts them (nichelm.windows.cut_windows, at the
task's window_chars); each window's prompt is scored against every label of the task's set (the label's
tokens and the end marker, teacher-forced: tasks.constrained.label_scores) and a document's score for a
label is the sum over its windows, so its label is the one the model finds likeliest for the whole text.
The answer is always one of the labels. `nichelm.load` gives a Classifier for a classification run or
export, as it gives a Corrector for a correction one (inference.load_runner).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nichelm.artifacts import Source
from nichelm.data.tokenizer import scrub_surrogates
from nichelm.errors import UserError
from nichelm.model import GPT
from nichelm.tasks import ClassificationTask, get_task
from nichelm.windows import cut_windows


class Classifier:
    def __init__(self, model: GPT, tokenizer, task: ClassificationTask | dict, device: torch.device | str = "cpu",
                 batch_size: int = 64, **_engine_settings):
        # _engine_settings: the Corrector's decoding settings (guard, drafts, compile...), which scoring a
        # label set has no use for; accepted so one call loads either runner
        task = get_task(task)
        if task.decoding != "labels":
            raise UserError(f"a {task.type!r} task writes text, not a label; load it with nichelm.load")
        self.task, self.tokenizer = task, tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.label_ids = task.label_ids(tokenizer)
        self.end_id = task.marker_ids(tokenizer)[2]
        self.window_chars = task.window_chars

    @classmethod
    def from_source(cls, source: Source, device: str = "cpu", backend: str = "torch", **kwargs) -> "Classifier":
        if backend != "torch":
            raise UserError(f"--backend {backend!r}: a classification model scores its labels with nichelm's own "
                            "engine only; use --backend torch")
        return cls(source.load_model(device), source.load_tokenizer(), source.task, device=device, **kwargs)

    def _prompt(self, text: str) -> list[int]:
        """The window's prompt, its text shortened (rarely) until prompt + longest label fit the context."""
        room = self.model.cfg.block_size - max(map(len, self.label_ids)) - 1
        prompt = self.task.prompt(self.tokenizer, text)
        while len(prompt) > room and text:
            text = text[:len(text) * 3 // 4]
            prompt = self.task.prompt(self.tokenizer, text)
        return prompt

    def window_scores(self, windows: Sequence[str]) -> torch.Tensor:
        """(windows, labels) log-probabilities of each label after each window's prompt."""
        from nichelm.tasks.constrained import label_scores
        prompts = [self._prompt(scrub_surrogates(w)) for w in windows]
        if not prompts:
            return torch.zeros(0, len(self.label_ids), dtype=torch.float64)
        return label_scores(self.model, prompts, self.label_ids, self.end_id, self.batch_size)

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """(texts, labels): each text's label scores summed over its windows (a blank text scores 0 for all)."""
        cut = [[w for w, _ in cut_windows(t, self.window_chars) if w.strip()] for t in texts]
        flat = self.window_scores([w for ws in cut for w in ws])
        out = torch.zeros(len(texts), len(self.label_ids), dtype=torch.float64)
        at = 0
        for i, ws in enumerate(cut):
            out[i] = flat[at:at + len(ws)].sum(0)
            at += len(ws)
        return out

    def classify(self, texts: Sequence[str]) -> list[str]:
        """The label of each text (ties, and blank texts: the first label of the set)."""
        if not texts:
            return []
        return [self.task.labels[i] for i in self.scores(texts).argmax(dim=1).tolist()]

    run = classify           # what `nichelm apply` calls on every runner: text in, the task's output out


def load_classifier(path, device: str = "cpu", backend: str = "torch", **kwargs) -> Classifier:
    """A Classifier for a run directory, a project file or an hf export of a label-set task (nichelm.load)."""
    from nichelm.artifacts import open_model
    return Classifier.from_source(open_model(path), device=device, backend=backend, **kwargs)
