"""Task tokenizer: byte-level BPE trained with HF tokenizers on the task's own examples.

Byte-level means every byte is a base symbol, so any text encodes (no unknown
token: the byte fallback). The prompt markers and the end marker are special
tokens, so each costs one position and never merges with text.

Marker safety: HF tokenizers matches special tokens inside any string it encodes,
so user text quoting a marker ("A ### Correction ### B") would become marker ids
and corrupt prompts and loss masks. Every path from text to ids therefore goes
through this module: `encode_text(s)` for text (special tokens stay plain text)
and `prompt_ids(s)` for prompts (the template's markers by id, the text between
them encoded plainly). For text that quotes no marker the ids are exactly
`tok.encode(template.format(input=text)).ids`: HF splits a string at special
tokens and encodes each piece alone, which is what prompt_ids does.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nichelm.errors import UserError
from nichelm.io import atomic_write_text


def template_markers(prompt_template: str) -> tuple[str, str]:
    """'### Text ###\\n{input}\\n### Correction ###\\n' -> ('### Text ###', '### Correction ###')."""
    before, _, after = prompt_template.partition("{input}")
    input_marker, output_marker = before.strip(), after.strip()
    if not input_marker or not output_marker:
        raise ValueError("prompt_template needs a marker before and after {input}, e.g. "
                         "'### Text ###\\n{input}\\n### Correction ###\\n'")
    return input_marker, output_marker


def special_tokens(prompt_template: str, end_marker: str) -> list[str]:
    return [end_marker, *template_markers(prompt_template)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, specials: list[str], min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((scrub_surrogates(t) for t in texts), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    atomic_write_text(path, tok.to_str(pretty=True))


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer at path; a missing, truncated or corrupt file is a one-line UserError."""
    fix = "re-run `nichelm prepare --force` (for an export folder: export it again)"
    if not Path(path).is_file():
        raise UserError(f"{path}: tokenizer file missing; {fix}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:        # tokenizers raises a plain Exception for bad JSON or an unknown layout
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable tokenizer ({why}); {fix}") from None


def reused_tokenizer(project) -> tuple[Tokenizer, Path]:
    """The tokenizer `tokenizer.from` names, checked against the task: it must hold the task's markers
    (task.end_marker and the prompt_template's), and an explicit tokenizer.vocab_size must be its size."""
    from nichelm.config import tokenizer_from_path
    path = tokenizer_from_path(project)
    where = f"{project.source_file}: 'tokenizer.from' = {str(path)!r}"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:        # tokenizers raises a plain Exception for bad JSON or an unknown layout
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}: not a readable tokenizer ({why}); give a tokenizer.json written by "
                        "HF tokenizers (a run's RUN/tokenizer/tokenizer.json)") from None
    task = project.task
    has = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [m for m in special_tokens(task.prompt_template, task.end_marker) if m not in has]
    if missing:
        raise UserError(f"{where}: it has no marker token {', '.join(map(repr, missing))} (its markers: "
                        f"{', '.join(map(repr, sorted(has))) or 'none'}); use this tokenizer's task.end_marker "
                        "and task.prompt_template, or a tokenizer prepared with this task's")
    size = tok.get_vocab_size()
    if project.tokenizer.vocab_size_given and project.tokenizer.vocab_size != size:
        raise UserError(f"{project.source_file}: 'tokenizer.vocab_size' is {project.tokenizer.vocab_size} but the "
                        f"tokenizer of 'tokenizer.from' has {size} tokens; remove vocab_size (it is taken from "
                        "that tokenizer)")
    return tok, path


# ---------------------------------------------------------------- marker-safe encoding

_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(text: str) -> str:
    """Lone surrogates (e.g. from a JSON "\\ud800" escape) are not Unicode text and cannot be UTF-8
    encoded: each becomes U+FFFD, one character for one, so lengths and offsets stay the same."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


class _Plain:
    """What marker-safe encoding needs for one tokenizer, built once: a copy that encodes special
    tokens as plain text, the added-token ids, and the per-template prompt plans."""

    def __init__(self, tok: Tokenizer, own: bool = False):
        # a copy, so that the caller's tokenizer still matches special tokens; own: tok is ours alone
        self.tok = tok if own else Tokenizer.from_str(tok.to_str())
        self.tok.encode_special_tokens = True
        added = tok.get_added_tokens_decoder()
        self.markers = {t.content: i for i, t in added.items()}
        self.added = set(added)
        self.added_ids = np.array(sorted(added), dtype=np.int64)
        # BPE may merge a marker's characters back into the marker's own string, hence its id
        # ("@@@" as one word): such an id from text is spelled out character by character instead
        self.spelled = {}
        for content, i in self.markers.items():
            spelled = [j for ch in content for j in self.tok.encode(ch).ids]
            if self.added & set(spelled):
                raise UserError(f"marker {content!r} is a single character, which the tokenizer cannot tell "
                                "from text; use a longer task.end_marker / markers in task.prompt_template")
            self.spelled[i] = spelled
        # leftmost-longest, as HF tokenizers splits a string at its added tokens
        self.split = re.compile("(" + "|".join(re.escape(m) for m in sorted(self.markers, key=len, reverse=True))
                                + ")") if self.markers else None
        self.plans: dict[str, list] = {}

    def raw(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, special tokens as plain text; a marker's id may still come out of BPE
        (see `spelled`): encode() spells those out."""
        try:
            encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        except TypeError:             # a lone surrogate: not encodable as given
            encs = self.tok.encode_batch_fast([scrub_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encs]

    def spell_out(self, ids: list[int]) -> list[int]:
        if self.added.isdisjoint(ids):
            return ids
        return [j for i in ids for j in (self.spelled[i] if i in self.added else (i,))]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.spell_out(ids) for ids in self.raw(texts)]

    def plan(self, template: str) -> list[tuple]:
        """The template as parts, in order: ("marker", [id], content), ("fixed", ids, text) for text
        between markers, or ("input", (l0, l1, ..., ln)) for the text run l0 + input + l1 + ... + ln
        that holds the input (encoded as one piece, as HF would)."""
        if template not in self.plans:
            sentinel = "\x00"
            while sentinel in template:
                sentinel += "\x00"
            rendered = template.format(input=sentinel)
            pieces = self.split.split(rendered) if self.split else [rendered]
            parts: list[tuple] = []
            for n, piece in enumerate(pieces):
                if n % 2:                             # re.split puts the matched markers at odd indices
                    parts.append(("marker", [self.markers[piece]], piece))
                elif sentinel in piece:
                    parts.append(("input", tuple(piece.split(sentinel))))
                elif piece:
                    parts.append(("fixed", self.tok.encode(piece).ids, piece))
            self.plans[template] = parts
        return self.plans[template]

    def examples(self, template: str, end_id: int, inputs: Sequence[str], outputs: Sequence[str],
                 dtype) -> np.ndarray:
        """prompt + output + end marker of every example, as one array: the ids of prompts() and
        encode(), with the Python work per example kept to a few list appends (prepare's hot loop)."""
        plan = self.plan(template)
        k = next(i for i, (kind, *_) in enumerate(plan) if kind == "input")
        before = [j for _, ids, *_ in plan[:k] for j in ids]          # markers and fixed text around the input
        after = [j for _, ids, *_ in plan[k + 1:] for j in ids]
        lits = plan[k][1]
        runs = self.raw([lits[0] + "".join(t + lit for lit in lits[1:]) for t in inputs])
        outs = self.raw(outputs)

        def flat(runs, outs) -> np.ndarray:
            ids: list[int] = []
            for run, out in zip(runs, outs):
                ids += before
                ids += run
                ids += after
                ids += out
                ids.append(end_id)
            return np.array(ids, dtype=dtype)

        arr = flat(runs, outs)
        # the template's own marker ids are expected; any more came from text: spell those out (rare)
        expected = sum(i in self.added for i in (*before, *after, end_id)) * len(runs)
        if np.count_nonzero(np.isin(arr, self.added_ids)) != expected:
            arr = flat([self.spell_out(r) for r in runs], [self.spell_out(o) for o in outs])
        return arr

    def prompts(self, template: str, texts: Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in texts]
        for kind, *rest in self.plan(template):
            if kind == "input":
                lits = rest[0]
                runs = self.encode([lits[0] + "".join(t + lit for lit in lits[1:]) for t in texts])
            else:
                runs = [rest[0]] * len(texts)
            for ids, run in zip(out, runs):
                ids.extend(run)
        return out


_PLAIN: "weakref.WeakKeyDictionary[Tokenizer, _Plain]" = weakref.WeakKeyDictionary()


def _plain(tok: Tokenizer) -> _Plain:
    p = _PLAIN.get(tok)
    if p is None:
        p = _PLAIN[tok] = _Plain(tok)
    return p


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Ids of user text: marker strings in it stay plain text, never marker ids."""
    return _plain(tok).encode([text])[0]


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """encode_text for many texts in one batch call."""
    return _plain(tok).encode(texts) if texts else []


def encode_examples_array(tok: Tokenizer, template: str, end_marker: str, inputs: Sequence[str],
                          outputs: Sequence[str], dtype=np.uint32) -> np.ndarray:
    """prompt + output + end marker per example, concatenated: the tokens of a shard (marker-safe).
    The same ids as prepare.encode_examples, faster."""
    return _plain(tok).examples(template, tok.token_to_id(end_marker), inputs, outputs, dtype)


def load_examples_encoder(path: Path):
    """(vocabulary size, encode) of the tokenizer file at path, loaded once (encode_examples_array on a
    loaded tokenizer makes a second, marker-safe copy of it): encode(template, end_marker, inputs, outputs,
    dtype) gives encode_examples_array's ids. For prepare's tokens tasks, which load it once each."""
    plain = _Plain(load_tokenizer(path), own=True)

    def encode(template: str, end_marker: str, inputs: Sequence[str], outputs: Sequence[str], dtype) -> np.ndarray:
        return plain.examples(template, plain.tok.token_to_id(end_marker), inputs, outputs, dtype)

    return plain.tok.get_vocab_size(), encode


def prompt_ids(tok: Tokenizer, template: str, text: str) -> list[int]:
    """Ids of template.format(input=text): the template's markers by id, text between them plainly."""
    return _plain(tok).prompts(template, [text])[0]


def prompt_ids_batch(tok: Tokenizer, template: str, texts: Sequence[str]) -> list[list[int]]:
    """prompt_ids for many texts in one batch call per text run of the template."""
    return _plain(tok).prompts(template, texts) if texts else []


def transformers_prompt_code(tok: Tokenizer, template: str) -> str:
    """Python code (for a model card) computing prompt_ids(tok, template, text) with transformers'
    tokenizer `tok` of an hf export: the markers by id, user text with split_special_tokens=True."""
    terms = []
    for kind, *rest in _plain(tok).plan(template):
        if kind == "marker":
            terms.append(f"tok.convert_tokens_to_ids([{rest[1]!r}])")
        elif kind == "fixed":
            terms.append(f"tok({rest[1]!r}).input_ids")
        else:
            run = " + text + ".join(repr(lit) for lit in rest[0])
            terms.append(f"tok({run}, split_special_tokens=True).input_ids")
    return "ids = (" + "\n       + ".join(terms) + ")"
