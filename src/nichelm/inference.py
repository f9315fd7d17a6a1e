"""Correct text with a trained model: windowing, batched decoding, do-no-harm guard, stitching back.

load_corrector (`nichelm.load`) builds a Corrector on any model nichelm.artifacts reads (run, project
file, hf or ct2 export), decoding with the engine of nichelm.backends. Used by `nichelm evaluate`,
`nichelm apply`, `nichelm correct` and `nichelm.load(...)`. Windows become documents again in one place:
by_document + stitch.

The guard keeps a window's input unless its correction passes three tests: the model ended it (end
marker within the budget), it changes at most guard_max_change of the window (a hard cap), and the
model itself prefers it to the input copied unchanged by at least guard_margin nats per token. The
last test needs one teacher-forced pass (backend.score) over the prompt followed by each candidate;
the same pass gives the model's surprisal of the input, which apply reports. On text unlike its
training data a small model is as sure of its wrong edits as of its right ones at home, but far
fewer of its changes pass the margin; so a whole document keeps its input when so few of its changed
windows passed that a document like the validation split's would hardly ever show it, or when the
model's tokenizer compresses it worse than nearly every validation document (DocumentTests).
`nichelm evaluate` chooses the margin on the validation split and stores it, with those references, in
RUN/guard.json; every way of loading a model reads it (artifacts.run_task), so all engines apply one rule.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from rapidfuzz.distance import Indel, Levenshtein

from nichelm.artifacts import GUARD_FILE, Source, is_ct2_export, open_model, open_run, run_task  # noqa: F401
from nichelm.backends import BACKENDS, TorchBackend, open_backend
from nichelm.data.tokenizer import encode_text, encode_texts, prompt_ids, prompt_ids_batch, scrub_surrogates
from nichelm.errors import UserError
from nichelm.generate import DRAFT_TOKENS, Generation, compile_for_decoding
from nichelm.metrics import char_distance
from nichelm.model import GPT
from nichelm.tasks import CorrectionTask, get_task
from nichelm.windows import cut_windows  # noqa: F401  (its old home: callers import it from here too)


@dataclass
class GuardStats:
    windows: int = 0
    kept_too_different: int = 0
    kept_hit_limit: int = 0
    kept_low_margin: int = 0       # the model did not prefer its correction to the input by guard_margin
    kept_out_of_domain: int = 0    # corrections undone because their document looked unfamiliar
    documents_out_of_domain: int = 0
    changed: int = 0               # windows the model changed (its output differs from the input)
    corrected: int = 0             # of those, windows whose correction the guard let through
    input_tokens: int = 0          # tokens of the inputs scored as continuations (end markers included)
    input_nats: float = 0.0        # the model's total surprisal of those tokens

    @property
    def input_surprisal(self) -> float | None:
        """Mean surprisal of the input, nats/token (None: nothing scored)."""
        return self.input_nats / self.input_tokens if self.input_tokens else None


# Reasons a window keeps its input whatever the margin: the length cap and an unfinished output.
HARD_LIMITS = ("too_different", "hit_limit")
# A document like the val split's is left whole by chance at most this often. 0.05 (the usual level), not 0.01:
# on design data (a seeded BLN600 train sample disjoint from bench/do_no_harm.py's, ICDAR 2017 English) the
# out-of-domain documents that kept wrong corrections at 0.01 had p = 0.016-0.03.
DOC_ALPHA = 0.05


@dataclass
class Correction:
    text: str              # what we return (after the guard)
    raw: str               # the model's own output
    kept_input: str = ""   # "", "too_different", "hit_limit", "low_margin" or "out_of_domain" (its document)
    source: str = ""       # the window's input
    gain: float | None = None       # mean log-prob/token of the correction minus that of the input copied
                                    # (None: not scored: the model changed nothing, or a hard limit applied)
    surprisal: float | None = None  # the model's mean surprisal of the input copied, nats/token
    tokens: int = 0                 # tokens that surprisal is over

    def text_at(self, margin: float) -> str:
        """The window's guarded text at another margin (the hard limits as they were; the document test
        is DocumentTests.unfamiliar's): evaluate replays the guard with this without decoding again."""
        if self.kept_input in HARD_LIMITS or (self.gain is not None and not self.gain >= margin):
            return self.source
        return self.raw


def deleted_letters(source: str, output: str) -> int:
    """The most letters `output` removes from `source` in one place (a deleted run, or a replaced run
    less the letters put in its place), by a Levenshtein alignment."""
    most = 0
    for op in Levenshtein.opcodes(source, output):
        if op.tag in ("delete", "replace"):
            gone = sum(ch.isalpha() for ch in source[op.src_start:op.src_end])
            put = sum(ch.isalpha() for ch in output[op.dest_start:op.dest_end])
            most = max(most, gone - put)
    return most


def chars_per_token(corrections: list[Correction]) -> float | None:
    """Characters per token of a document's input (its windows' copies as scored, less their end markers):
    how well the model's own tokenizer compresses it. None: no window was scored."""
    scored = [c for c in corrections if c.surprisal is not None and c.tokens > 1]
    tokens = sum(c.tokens - 1 for c in scored)
    return sum(len(c.source) for c in scored) / tokens if tokens else None


@dataclass(frozen=True)
class DocumentTests:
    """The two tests that make a whole document keep its input (guard.json's references, from val):
    - min_chars_per_token: its input compresses worse under the model's tokenizer than this (all but a
      small share of the val documents compress better): text in another language or script, where a
      small model is as sure of its wrong edits as at home. On issue 17's model: ICDAR 2019 Dutch
      1.37-1.90 characters/token, the English val documents from 1.71 (median 2.47), threshold 1.92
      (2% of val); the margin and the test below left 3 of 49 Dutch documents worse, this one none;
    - passed_share: of the n windows the model changed, so few passed the guard at the margin that a
      document whose changes pass as often as on the val split (this share) would show as few with
      probability under DOC_ALPHA (binomial test): the pattern where what passes is mostly wrong.
    None for either: no such test."""
    passed_share: float | None = None
    min_chars_per_token: float | None = None

    @classmethod
    def from_guard(cls, guard: dict) -> "DocumentTests":
        return cls(guard.get("passed_share"), guard.get("min_chars_per_token"))

    def unfamiliar(self, corrections: list[Correction], margin: float) -> bool:
        """Should this document keep its input whole? Yes when either test says it is unlike the
        training data."""
        if self.min_chars_per_token is not None:
            cpt = chars_per_token(corrections)
            if cpt is not None and cpt < self.min_chars_per_token:
                return True
        if self.passed_share is None:
            return False
        changed = [c for c in corrections if c.raw != c.source]
        passed = sum(c.text_at(margin) != c.source for c in changed)
        return 0 < passed < len(changed) and binomial_cdf(passed, len(changed), self.passed_share) < DOC_ALPHA


NO_DOCUMENT_TESTS = DocumentTests()


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): exact below 2000 trials, else the normal approximation."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    if n >= 2000:
        sd = math.sqrt(n * p * (1 - p))
        return 0.5 * math.erfc(-(k + 0.5 - n * p) / (sd * math.sqrt(2)))
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                                 + i * log_p + (n - i) * log_q) for i in range(k + 1)))


def context_span(text: str, start: int, end: int, overlap: int) -> tuple[int, int]:
    """(left, right): text[left:right] is text[start:end] with up to `overlap` characters of context each side.

    Context is whole words only (a word the limit would cut is left out), starts and ends on a
    non-space, and never leaves the text.
    """
    left = max(0, start - overlap)
    if 0 < left < start and not text[left - 1].isspace():        # mid-word: skip to the next whitespace
        m = re.compile(r"\s").search(text, left, start)
        left = m.start() if m else start
    while left < start and text[left].isspace():
        left += 1
    right = min(len(text), end + overlap)
    if end < right < len(text) and not text[right].isspace():    # mid-word: back to the last whitespace
        while right > end and not text[right - 1].isspace():
            right -= 1
    while right > end and text[right - 1].isspace():
        right -= 1
    return left, right


def map_offset(opcodes, pos: int, n_src: int, n_out: int, take_inserts: bool = False) -> int:
    """The output offset of the boundary before src[pos], given the opcodes of an alignment of (src, out).

    Inside an equal or replace block the offset moves along (proportionally for a replace of unequal
    length); inside a deleted block it is the point where the deletion was. Text the output inserts
    exactly at pos lies after the offset (right-hand side), or before it with take_inserts. The end
    of src maps to the end of the output.
    """
    if pos >= n_src:
        return n_out
    for tag, i1, i2, j1, j2 in opcodes:
        if i1 == pos and not (take_inserts and tag == "insert"):
            return j1
        if i1 < pos < i2:
            return j1 + round((pos - i1) * (j2 - j1) / (i2 - i1))
    return n_out


def core_output(src: str, out: str, start: int, end: int, end_takes_inserts: bool = True) -> str:
    """The part of `out` (the model's correction of `src`) that corresponds to src[start:end], stripped.

    Alignment: longest common subsequence (Indel opcodes) of the two texts with every whitespace
    character counted twice, so among alignments that match as many characters, one that keeps the
    separators' whitespace matched wins; plain character alignment may, at equal cost, match a
    letter instead and move a boundary into the neighbouring word ("a rn" -> "an m" matching the
    n's). Boundaries map by map_offset. At the edges a core claims what the output inserts right at
    its start and (end_takes_inserts) right at its end: cores are cut at whitespace, so text inserted
    touching a core belongs to it, and text inserted inside a separator to neither (separators are
    kept from the input). Where a word longer than a window was cut hard, two cores touch: pass
    end_takes_inserts=False, so an insertion at the cut goes to the right-hand window only, never
    to both. Insertions before src[0] or after src[-1] go to the core only where it reaches that end.
    """
    if start <= 0 and end >= len(src):
        return out
    src_at, out_at = _spread_offsets(src), _spread_offsets(out)     # original offset -> spread offset
    ops = [tuple(op) for op in Indel.opcodes(_spread(src), _spread(out))]
    left, right = (map_offset(ops, src_at[p], src_at[-1], out_at[-1], take_inserts=t)
                   for p, t in ((start, False), (end, end_takes_inserts)))
    # back to offsets in out; an offset inside a doubled whitespace character rounds down (stripped anyway)
    return out[bisect.bisect_right(out_at, left) - 1:bisect.bisect_right(out_at, right) - 1].strip()


def _spread(text: str) -> str:
    return "".join(c + c if c.isspace() else c for c in text)


def _spread_offsets(text: str) -> list[int]:
    return list(itertools.accumulate((2 if c.isspace() else 1 for c in text), initial=0))


DTYPES = ("auto", "float32", "bfloat16")
NO_MARGIN = float("-inf")         # an uncalibrated model: the margin test lets every correction through
DEFAULT_MAX_CHANGE = 0.15         # the length cap of a model with no guard.json (RUN/guard.json keeps its own)


class Corrector:
    def __init__(self, model: GPT, tokenizer, task: CorrectionTask | dict, device: torch.device | str = "cpu",
                 batch_size: int = 64, guard_max_change: float | None = None, max_new_tokens_ratio: float = 1.5,
                 beams: int = 1, window_overlap: int = 0, compile: bool = False,
                 draft_tokens: int = DRAFT_TOKENS, dtype: str = "auto", guard_margin: float | None = None,
                 guard_max_deleted_letters: int | None = None):
        self.device = torch.device(device)
        # bf16 weights and KV cache (logits come back as fp32): on a GPU by default; on a CPU when asked,
        # which pays on CPUs with bf16 arithmetic (AVX512-BF16, AMX) and may round near-ties differently
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.tokenizer = tokenizer
        task = get_task(task)                  # a task.json dict too (older callers)
        if task.decoding != "free":
            raise UserError(f"a {task.type!r} task's model writes no text to correct; load it with nichelm.load "
                            "(which picks the task's runner)")
        self.task = task
        self.prompt_template = task.prompt_template
        self.end_id = tokenizer.token_to_id(task.end_marker)
        self.window_chars = task.window_chars
        self.batch_size = batch_size
        # keep a correction only when the model prefers it to the input by this many nats per token;
        # None: the margin calibrated for this model (task["guard"], from RUN/guard.json), else no margin
        self.guard = task.guard or {}
        # the length cap; None: the one the margin was chosen with (a margin is only right with its cap)
        if guard_max_change is None:
            guard_max_change = self.guard.get("max_change", DEFAULT_MAX_CHANGE)
        self.guard_max_change = float(guard_max_change)
        # ... and the letters a correction may delete in one place (0: any); None: guard.json's, else 0
        if guard_max_deleted_letters is None:
            guard_max_deleted_letters = self.guard.get("max_deleted_letters", 0)
        self.guard_max_deleted_letters = int(guard_max_deleted_letters)
        if guard_margin is None:
            guard_margin = self.guard.get("margin")          # null in guard.json: "off"
        self.guard_margin = NO_MARGIN if guard_margin is None else float(guard_margin)
        # when a whole document counts as unlike the training data and keeps its input
        self.document_tests = DocumentTests.from_guard(self.guard)
        self._scoring = True               # off while _raw_windows decodes for correct_pieces
        self.max_new_tokens_ratio = max_new_tokens_ratio
        self.beams = beams                 # 1: batched greedy; >1: beam search, one window at a time
        # greedy decoding checks this many tokens copied from the input per forward pass (0: one token
        # a pass); the output is the same, in fewer passes (nichelm.generate)
        self.draft_tokens = max(0, int(draft_tokens))
        self._token_chars: list[int] | None = None        # token_chars(), computed on first use
        # torch.compile for decoding: ~2x faster after ~15 s of compiling (CPU); for corpora, not a few windows
        self.step = compile_for_decoding() if compile else None
        self.window_overlap = max(0, int(window_overlap))   # characters of context each side (correct_pieces)
        self.stats = GuardStats()
        self.backend = TorchBackend(self)   # what decodes (nichelm.backends); load(..., backend=) swaps it

    @classmethod
    def from_run(cls, run: Path, device: str = "cpu", **kwargs) -> "Corrector":
        """A Corrector on a run directory's newest complete checkpoint (nichelm's own engine)."""
        return cls.from_source(open_run(run), device=device, **kwargs)

    @classmethod
    def from_source(cls, source: Source, device: str = "cpu", backend: str = "torch", **kwargs) -> "Corrector":
        """A Corrector on a model read by nichelm.artifacts, decoding with `backend` (nichelm.backends).
        For ct2 and vllm the engine loads its own copy of the weights, and the Corrector's model only
        gives the shape (on the meta device: no weights read)."""
        if backend == "torch":
            model = source.load_model(device)
        else:
            with torch.device("meta"):
                model = GPT(source.cfg)
        corrector = cls(model, source.load_tokenizer(), source.task, device=device, **kwargs)
        if backend != "torch":
            corrector.backend = open_backend(backend, source, corrector, device)
        return corrector

    def token_chars(self) -> list[int]:
        """Characters of each token id (copy drafts re-align by them), computed once."""
        if self._token_chars is None:
            self._token_chars = [len(self.tokenizer.decode([i])) for i in range(self.tokenizer.get_vocab_size())]
        return self._token_chars

    def budget(self, source_tokens: int, prompt_tokens: int) -> int:
        """A window's output bound in tokens: max_new_tokens_ratio x its own tokens + 8, within the context."""
        return min(int(source_tokens * self.max_new_tokens_ratio) + 8, self.model.cfg.block_size - prompt_tokens)

    def _prompt_ids(self, text: str) -> list[int]:
        # marker-safe: a marker string quoted in the text stays text (nichelm.data.tokenizer)
        return prompt_ids(self.tokenizer, self.prompt_template, text)

    def correct_windows(self, windows: list[str]) -> list[Correction]:
        """Correct short texts (each fits the model's context) in batches.

        Lone surrogates (not Unicode text: they cannot be written as UTF-8) become U+FFFD first,
        in the model's input and in any window kept as it was, so every output can be written."""
        windows = [scrub_surrogates(w) for w in windows]
        decoded: list[tuple[str, bool] | None] = [None] * len(windows)     # blank: nothing to do
        busy = [i for i, w in enumerate(windows) if w.strip()]
        texts = [windows[i] for i in busy]
        prompts, budgets, sources, todo = [], [], [], []
        for i, ids, source in zip(busy, prompt_ids_batch(self.tokenizer, self.prompt_template, texts),
                                  encode_texts(self.tokenizer, texts)):
            w = windows[i]
            budget = self.budget(len(source), len(ids))
            if budget <= 0:              # the window does not fit the context: keep it
                decoded[i] = (w, True)
                continue
            todo.append(i)
            prompts.append(ids)
            budgets.append(budget)
            sources.append(source)             # what the output mostly copies: drafts come from it
        gens = self.backend.generate(prompts, budgets, sources, score=self._scoring) if todo else []
        generations: list[Generation | None] = [None] * len(windows)
        for i, g in zip(todo, gens):
            decoded[i] = (self.tokenizer.decode(g.tokens).strip(), g.hit_limit)
            generations[i] = g
        self.stats.windows += len(windows)
        return self._guard_all(windows, decoded, generations)

    def _guard_all(self, windows: list[str], decoded: list[tuple[str, bool] | None],
                   generations: list[Generation | None] | None = None) -> list[Correction]:
        """The guard over many windows: (model output, hit the limit) per window, None for a blank one.
        One scoring pass (backend.score) gives each changed window's gain and every window's surprisal,
        except what the decoding already scored (`generations`, from backend.generate(score=True))."""
        scores = self._scores(windows, decoded, generations) if self._scoring else [(None, None, 0)] * len(windows)
        return [Correction(w, w, source=w) if d is None else self._guard(w, d[0], d[1], *sc)
                for w, d, sc in zip(windows, decoded, scores)]

    def _too_different(self, source: str, raw: str) -> bool:
        """The length cap: the output changes more than guard_max_change of the window, or deletes
        guard_max_deleted_letters letters or more in one place (a small model drops words: on issue 17's
        val split, its passed corrections deleting 3+ letters made 40 windows worse and 16 better)."""
        if self.guard_max_change < 0:
            return False
        if char_distance(raw, source) > self.guard_max_change * max(len(source), 1):
            return True
        return self.guard_max_deleted_letters > 0 and deleted_letters(source, raw) >= self.guard_max_deleted_letters

    def _scores(self, windows: list[str], decoded, generations=None) -> list[tuple[float | None, float | None, int]]:
        """(gain, surprisal, input tokens) per window.

        Each window's prompt is followed once by its input copied unchanged and, where the model changed
        it (and no hard limit already keeps the input), once by its correction; both end with the end
        marker. gain = mean log-prob per token of the correction minus that of the copy; surprisal =
        minus the copy's. Where the decoding scored them (generations: the copy in the prompt's own
        forward, the correction as it was decoded, when its text encodes back to the same tokens),
        those figures are used; the rest come from one teacher-forced pass (backend.score). A sequence
        longer than the context cannot be scored: a correction then gets gain -inf (kept only with no
        margin at all), an input no surprisal."""
        out: list[tuple[float | None, float | None, int]] = [(None, None, 0)] * len(windows)
        if not hasattr(self.backend, "score"):
            return out
        # a score is a float when the decoding gave it, else an int: its row in the teacher-forced pass
        rows, todo = [], []                  # todo: (window, copy score, correction score or None, copy tokens)
        block = self.model.cfg.block_size

        def scored(known: float | None, tokens: int, prompt: list[int], continuation: list[int]) -> float | int:
            if known is not None:
                return known / tokens
            rows.append((prompt, continuation))
            return len(rows) - 1

        busy = [i for i, d in enumerate(decoded) if d is not None]
        texts = [windows[i] for i in busy]
        for i, prompt, copy in zip(busy, prompt_ids_batch(self.tokenizer, self.prompt_template, texts),
                                   encode_texts(self.tokenizer, texts)):
            raw, hit_limit = decoded[i]
            g = generations[i] if generations is not None else None
            copy = copy + [self.end_id]
            c = None
            if len(prompt) + len(copy) <= block:
                c = scored(g.source_logprob if g is not None else None, len(copy), prompt, copy)
            f = None
            if raw != windows[i] and not hit_limit and not self._too_different(windows[i], raw):
                fix = encode_text(self.tokenizer, raw) + [self.end_id]
                f = float("-inf")
                if c is not None and len(prompt) + len(fix) <= block:
                    as_decoded = g is not None and g.logprob is not None and fix == g.tokens + [self.end_id]
                    f = scored(g.logprob if as_decoded else None, len(fix), prompt, fix)
            todo.append((i, c, f, len(copy)))
        logp = self.backend.score([p for p, _ in rows], [x for _, x in rows]) if rows else []
        for i, c, f, n in todo:
            copy_lp = logp[c] if isinstance(c, int) else c
            fix_lp = logp[f] if isinstance(f, int) else f
            gain = None if f is None else (float("-inf") if fix_lp == float("-inf") else fix_lp - copy_lp)
            out[i] = (gain, None if copy_lp is None else -copy_lp, n if copy_lp is not None else 0)
        return out

    def _guard(self, source: str, raw: str, hit_limit: bool, gain: float | None = None,
               surprisal: float | None = None, tokens: int = 0) -> Correction:
        """Do no harm: keep the input where the output never ended, changed too much of it, or the model
        did not prefer it to the input by guard_margin (Correction.text_at: the one rule)."""
        reason = "hit_limit" if hit_limit else "too_different" if self._too_different(source, raw) else ""
        c = Correction(source, raw, reason, source, gain, surprisal, tokens)
        c.text = c.text_at(self.guard_margin)
        if not reason and c.text != raw:
            c.kept_input = "low_margin"
        st = self.stats
        st.kept_hit_limit += reason == "hit_limit"
        st.kept_too_different += reason == "too_different"
        st.kept_low_margin += c.kept_input == "low_margin"
        st.changed += raw != source
        st.corrected += c.text != source
        if surprisal is not None:
            st.input_tokens += tokens
            st.input_nats += surprisal * tokens
        return c

    def correct_pieces(self, cut: list[list[tuple[str, str]]]) -> list[Correction]:
        """One Correction per chunk of cut_windows' pieces (all documents, in order).

        window_overlap 0: correct_windows on the chunks as they are. k > 0: each chunk's core (the
        chunk less any edge whitespace, which is kept from the input) goes to the model with up to
        k characters of whole-word context each side (less where the prompt and its output budget
        would not fit the model's context); only the output aligned to the core is kept
        (core_output), and the guard compares that with the core, as it would without context.
        Then a document that looks unfamiliar (DocumentTests) keeps its input whole.
        """
        results = self._correct_pieces(cut)
        k = 0
        for pieces in cut:
            doc = results[k:k + len(pieces)]
            if self.document_tests.unfamiliar(doc, self.guard_margin):
                self.stats.documents_out_of_domain += 1
                for i, c in enumerate(doc, k):
                    if c.text != c.source:
                        results[i] = Correction(c.source, c.raw, "out_of_domain", c.source, c.gain, c.surprisal,
                                                c.tokens)
                        self.stats.corrected -= 1
                        self.stats.kept_out_of_domain += 1
            k += len(pieces)
        return results

    def _correct_pieces(self, cut: list[list[tuple[str, str]]]) -> list[Correction]:
        if self.window_overlap <= 0:
            return self.correct_windows([chunk for pieces in cut for chunk, _ in pieces])
        jobs, inputs, results = [], [], []
        for pieces in cut:
            pieces = [(scrub_surrogates(chunk), sep) for chunk, sep in pieces]     # as correct_windows does
            text, pos = "".join(chunk + sep for chunk, sep in pieces), 0
            for n, (chunk, sep) in enumerate(pieces):
                core = chunk.strip()
                lead, trail = chunk[:len(chunk) - len(chunk.lstrip())], chunk[len(chunk.rstrip()):]
                start = pos + len(lead)
                pos += len(chunk) + len(sep)
                if not core:                           # blank: nothing to correct
                    results.append(Correction(chunk, chunk, source=chunk))
                    continue
                src, a, b = self._with_context(text, start, start + len(core))
                touches_next = not (trail or sep) and n + 1 < len(pieces)      # a word cut hard
                jobs.append((len(results), lead, core, trail, a, b, src, not touches_next))
                inputs.append(src)
                results.append(None)
        cores, decoded = [], []
        for job, (raw, hit_limit) in zip(jobs, self._raw_windows(inputs)):
            _, lead, core, trail, a, b, src, end_inserts = job
            cores.append(core)
            decoded.append((core_output(src, raw, a, b, end_inserts), hit_limit))
        for job, c in zip(jobs, self._guard_all(cores, decoded)):      # the guard sees the core alone
            i, lead, _, trail = job[:4]
            results[i] = Correction(lead + c.text + trail, lead + c.raw + trail, c.kept_input,
                                    lead + c.source + trail, c.gain, c.surprisal, c.tokens)
        self.stats.windows += len(results)
        return results

    def _with_context(self, text: str, start: int, end: int) -> tuple[str, int, int]:
        """(model input, core start, core end in it): the widest context up to window_overlap that fits."""
        k = self.window_overlap
        while k > 0:
            left, right = context_span(text, start, end, k)
            src = text[left:right]
            n_in = len(encode_text(self.tokenizer, src))
            if len(self._prompt_ids(src)) + int(n_in * self.max_new_tokens_ratio) + 8 <= self.model.cfg.block_size:
                return src, start - left, end - left
            k //= 2
        return text[start:end], 0, end - start

    def _raw_windows(self, windows: list[str]) -> list[tuple[str, bool]]:
        """(model output, hit the limit) per window, from correct_windows with its guard, scoring and
        counts off (correct_pieces guards and scores the cores afterwards)."""
        saved = self.guard_max_change, self.guard_margin, vars(self.stats).copy()
        self.guard_max_change, self.guard_margin, self._scoring = -1, NO_MARGIN, False
        try:
            fixed = self.correct_windows(windows) if windows else []
        finally:
            self.guard_max_change, self.guard_margin, self._scoring = saved[0], saved[1], True
            vars(self.stats).update(saved[2])
        return [(c.raw, c.kept_input == "hit_limit") for c in fixed]

    def correct(self, texts: list[str], guard: bool = True) -> list[str]:
        """Correct texts of any length: cut into windows, correct, stitch back in order."""
        cut = [cut_windows(t, self.window_chars) for t in texts]
        margin = self.guard_margin if guard else None
        return [stitch(pieces, margin, self.document_tests)
                for pieces in by_document(cut, self.correct_pieces(cut))]

    def run(self, texts: list[str]) -> list[str]:
        """What every task's runner offers (`nichelm apply`, nichelm.load): text in, the task's output out."""
        return self.correct(texts)


def load_corrector(path: str | Path, device: str = "cpu", backend: str = "torch", **kwargs) -> Corrector:
    """A Corrector for a run directory, a project file, or an export folder (nichelm.load).

    backend (nichelm.backends): "torch" decodes with nichelm's own engine; "ct2" and "vllm" run the
    same weights in CTranslate2 or vLLM. "ct2" also takes a folder made by `nichelm export --format ct2`."""
    path = Path(path)
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if is_ct2_export(path) and backend != "ct2":
        raise UserError(f"{path}: a CTranslate2 export runs only with --backend ct2; give the run or its hf "
                        f"export for --backend {backend}")
    return Corrector.from_source(open_model(path), device=device, backend=backend, **kwargs)


def load_runner(path: str | Path, device: str = "cpu", backend: str = "torch", **kwargs):
    """The runner of a model's task (nichelm.load): a Corrector for free-text decoding, a
    classifier.Classifier for a label set; the task's `decoding` picks it."""
    from nichelm.classifier import load_classifier
    runners = {"free": load_corrector, "labels": load_classifier}
    task = open_model(path).task
    if task.runner_error:                  # a task whose models decode nothing for users (pre-training)
        raise UserError(f"{path}: {task.runner_error}")
    return runners[task.decoding](path, device=device, backend=backend, **kwargs)


# ---------------------------------------------------------------- stitching windows back

def by_document(cut: list[list[tuple[str, str]]], fixed: list[Correction]) -> list[list[tuple[Correction, str]]]:
    """correct_pieces' corrections (all documents, in order) regrouped per document: (Correction, the
    separator cut_windows kept after that window) for each window."""
    it = iter(fixed)
    return [[(next(it), sep) for _, sep in pieces] for pieces in cut]


def stitch(pieces: list[tuple[Correction, str]], margin: float | None,
           tests: DocumentTests = NO_DOCUMENT_TESTS) -> str:
    """A document's text from its windows: each window's output at the guard of `margin` (Correction.text_at)
    and the document `tests`, each followed by its separator from the input. margin None: the model's raw
    outputs. The one way windows become a document again: with the Corrector's own margin and tests this
    is the text correct_pieces decided; evaluate replays the same rule at other margins without decoding
    again."""
    if margin is None:
        return "".join(c.raw + sep for c, sep in pieces)
    if tests.unfamiliar([c for c, _ in pieces], margin):
        return "".join(c.source + sep for c, sep in pieces)
    return "".join(c.text_at(margin) + sep for c, sep in pieces)
