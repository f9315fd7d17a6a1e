"""The task interface: everything that makes one job different from another, in one object.

A task owns
  - its prompt and markers: `prompt_template.format(input=...)`, then the output, then `end_marker`
    (the three markers are special tokens; user text is always encoded marker-safe, through
    nichelm.data.tokenizer, so a quoted marker stays text);
  - how examples are built from a document (`examples`: (input, output) pairs);
  - the loss rule (`loss_mask`: train on the output and the end marker, never on the prompt);
  - its decoding: "free" (text until the end marker) or "labels" (one of a fixed set, scored);
  - post-processing of a decoded output (`postprocess`) and its metrics (`metrics`);
  - its task.json form (`to_json` / `from_json`), which runs and exports carry.

Stages ask the task and never test its type; a new job is a new subclass registered in
nichelm.tasks.TASK_TYPES. This module imports neither torch nor the model, so prepare's processes
can hold a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from nichelm.data import tokenizer as tokmod
from nichelm.data.readers import Document, pair_segments_to_windows
from nichelm.errors import UserError


# The model card's note on encoding user text (every task's prompt is built the same way)
USAGE_INTRO = [
    "## Usage", "",
    "The markers are special tokens, and a tokenizer matches special tokens inside any text it is "
    "given: `tok(template.format(input=text))` turns a marker string quoted in the text into the "
    "marker itself, and the model then reads a different prompt. So build the prompt from the "
    "markers' ids and the text encoded with `split_special_tokens=True` (task.json: "
    "`\"user_text_encoding\": \"split_special_tokens\"`); `text` is one window:", ""]


@dataclasses.dataclass
class Task:
    """Fields every task has; subclasses add their own (dataclass fields) and set `type`/`decoding`."""

    type: ClassVar[str] = ""
    decoding: ClassVar[str] = "free"          # "free": text up to end_marker | "labels": one of a fixed set
    # outputs are text (deduped against train like inputs), not one of a few labels every split shares
    text_outputs: ClassVar[bool] = True
    # examples have an input the model reads: prepare drops one whose input is empty (False: plain text,
    # every input is "", as in the language-model task)
    reads_input: ClassVar[bool] = True
    # set: why nichelm.load gives no runner for this task's models (a one-line UserError); None: it does
    runner_error: ClassVar[str | None] = None

    name: str = "task"
    prompt_template: str = "### Text ###\n{input}\n### Output ###\n"
    end_marker: str = "<|endoftext|>"
    window_chars: int = 100                   # longest example window (characters of the output side)
    # keys of a task.json this version does not know (e.g. an export's "user_text_encoding"): kept, written back
    extra: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------ markers and prompts

    def markers(self) -> tuple[str, str, str]:
        """(input marker, output marker, end marker)."""
        return (*tokmod.template_markers(self.prompt_template), self.end_marker)

    def special_tokens(self) -> list[str]:
        """The tokenizer's special tokens, in the order prepare has always given them."""
        return tokmod.special_tokens(self.prompt_template, self.end_marker)

    def marker_ids(self, tok) -> tuple[int, int, int]:
        """(input id, output id, end id) in `tok`; a marker that is no token is a UserError."""
        ids = tuple(tok.token_to_id(m) for m in self.markers())
        if None in ids:
            missing = [m for m, i in zip(self.markers(), ids) if i is None]
            raise UserError(f"the tokenizer has no token for the task's marker(s) {', '.join(map(repr, missing))}; "
                            "prepare again with this task (`nichelm prepare --force`)")
        return ids

    def prompt(self, tok, text: str) -> list[int]:
        """Ids of the prompt for `text`: markers by id, text marker-safe (data.tokenizer.prompt_ids)."""
        return tokmod.prompt_ids(tok, self.prompt_template, text)

    def prompts(self, tok, texts: Sequence[str]) -> list[list[int]]:
        return tokmod.prompt_ids_batch(tok, self.prompt_template, texts)

    def encode_examples(self, tok, inputs: Sequence[str], outputs: Sequence[str], dtype=np.uint32) -> np.ndarray:
        """prompt + output + end marker of every example, concatenated: a shard's tokens."""
        return tokmod.encode_examples_array(tok, self.prompt_template, self.end_marker, inputs, outputs, dtype)

    # ------------------------------------------------------------ training

    def examples(self, doc: Document) -> list[tuple[str | None, str]]:
        """(input, output) pairs of one document; input None: clean text, noise is made later."""
        raise NotImplementedError

    def valued_examples(self, doc: Document) -> list[tuple[str | None, str, float | None]]:
        """examples() with the number behind each output, where there is one (banded labels: the value the
        label is the band of, which evaluate correlates with); None elsewhere."""
        return [(i, o, None) for i, o in self.examples(doc)]

    def windows(self, doc: Document):
        """The document cut into windows of at most window_chars output characters (readers' rule)."""
        return pair_segments_to_windows(doc, self.window_chars)

    def loss_mask(self, rows: np.ndarray, tok) -> np.ndarray:
        """rows (B, T) of tokens -> True where the next token is trained: inside an output, up to and
        including its end marker (the rule is data.loader.loss_mask, read off the markers)."""
        from nichelm.data.loader import loss_mask      # loader imports torch: only when training
        return loss_mask(rows, *self.marker_ids(tok))

    # ------------------------------------------------------------ decoding and scoring

    def postprocess(self, text: str) -> str:
        """A decoded output as users get it."""
        return text

    def metrics(self, predictions: Sequence[str], references: Sequence[str], **extra) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------ model card (nichelm export)

    def card(self, prompt_code: str) -> list[str]:
        """The model card's "Prompt format" and "Usage" sections (markdown lines). `prompt_code`: Python
        computing the prompt ids `ids` of one window `text` with transformers' tokenizer `tok`."""
        raise NotImplementedError

    def card_metrics(self, report: dict) -> list[str]:
        """The model card's evaluation lines, from RUN/eval/report.json (written by nichelm evaluate)."""
        raise NotImplementedError

    # ------------------------------------------------------------ task.json

    def to_json(self) -> dict:
        d = {"type": self.type}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        return {**self.extra, **d}

    @classmethod
    def from_json(cls, d: dict, where: str = "task", prefix: str = "") -> "Task":
        """The task a task.json (or a project file's [task] table) describes; `where` names it in errors,
        `prefix` goes before the keys they name."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "type"}
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                kwargs[f.name] = _typed(kwargs[f.name], f, where, prefix)
        task = cls(**kwargs, extra=extra)
        task.check(where, prefix)
        return task

    def check(self, where: str = "task", prefix: str = "") -> None:
        """One-line UserError for a template or marker prepare and train could not use. `prefix` goes
        before every key a message names ("task." in a project file: 'task.prompt_template')."""
        template, end = f"'{prefix}prompt_template'", f"'{prefix}end_marker'"
        try:
            self.prompt_template.format(input="")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"{where}: {template} must contain {{input}} and no other {{...}} field "
                            f"(write {{{{ and }}}} for literal braces): {type(e).__name__} {e}") from None
        if self.prompt_template.count("{input}") != 1:
            raise UserError(f"{where}: {template} must contain {{input}} exactly once")
        try:
            markers = tokmod.template_markers(self.prompt_template)
        except ValueError:
            raise UserError(f"{where}: {template} needs a marker before and after {{input}}, e.g. "
                            "\"### Text ###\\n{input}\\n### Output ###\\n\"") from None
        if not self.end_marker.strip():
            raise UserError(f"{where}: {end} is {self.end_marker!r}; give a marker of its own, e.g. \"<|endoftext|>\"")
        if self.end_marker in markers or markers[0] == markers[1]:
            raise UserError(f"{where}: markers {(*markers, self.end_marker)!r} must be distinct; change "
                            f"{template} or {end}")
        for key, marker in ((template, markers[0]), (template, markers[1]), (end, self.end_marker)):
            if len(marker) < 2:       # one character is also a byte of ordinary text: the tokenizer cannot tell them apart
                raise UserError(f"{where}: {key} uses the one-character marker {marker!r}; markers need at least "
                                "two characters, e.g. \"### Text ###\"")
        if isinstance(self.window_chars, int) and self.window_chars < 1:
            raise UserError(f"{where}: '{prefix}window_chars' is {self.window_chars}; it must be at least 1 "
                            "(characters per example window)")


def _typed(value: Any, f: dataclasses.Field, where: str, prefix: str = "") -> Any:
    """A task.json value checked against its field's type (str, int, float, bool, list, dict)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    want = {"str": str, "int": int, "float": (int, float), "bool": bool}.get(kind.split(" ")[0])
    if kind.startswith("list"):
        want = list
    elif kind.startswith("dict"):
        want = dict
    ok = want is None or (isinstance(value, want) and not (want is int and isinstance(value, bool)))
    if value is None and "None" in kind:
        ok = True
    if not ok:
        raise UserError(f"{where}: '{prefix}{f.name}' is {value!r}; give a value of type {kind}")
    return value
