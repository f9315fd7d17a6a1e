"""Synthetic historical-OCR noise, calibrated to a target corpus CER.

The error model follows the counts in ``shared/data/ocr/README.md`` ("What real
OCR errors look like", ICDAR 2017 aligned data): for English 52% single-char
substitutions, 17% multi-char errors, 12% deletions, 11% insertions, 5.5%
spurious spaces and 2.5% lost spaces, with the frequent confusion pairs listed
there. French and early-modern profiles shift the shares and add their own
confusions (long s, é/e, vv/w, ...).

How it works, per text:

1. Enumerate *sites*: places in the clean text where each error type can
   happen (an ``s`` not at the end of a word for long s, a ``rn`` for rn→m...).
   Each site carries its replacement options and their edit costs.
2. Draw the number of error events from a Poisson distribution whose rate is
   ``target_cer * len(text) / expected_edits_per_event``. The expected edits
   per event are computed from the sites actually present in this text, so a
   type that costs two edits (``construc- tion``) or three (``ffi`` → ``ﬃ``)
   does not push the CER off target. That is the calibration "by
   construction"; no fitting loop is needed.
3. Apply events one by one. An edited character and its neighbours are
   protected from further edits, so edits do not overlap or cancel and the
   measured Levenshtein distance stays close to the sum of event costs. With
   probability ``burstiness`` an event lands near the previous one: real OCR
   damage is bursty (a smudged word gets several errors).

Randomness comes from ``random.Random`` seeded by a stable hash of
``(seed, key)``, so ``corrupt(text, key)`` is reproducible across processes
and does not depend on which texts were corrupted before.

Calibration on real pairs: ``fit_noise(pairs)`` aligns each (OCR, gold) pair
(``Levenshtein.opcodes`` of gold -> OCR), merges consecutive edit operations
into *error spans*, sorts every span into one of ``ERROR_TYPES`` (see
``classify_span``) and returns the corpus CER, the event shares per type and
the most frequent confusions (gold substring -> OCR substring, with counts and
the number of times each gold substring occurs in the gold text).
``OCRNoise.from_fit(fit)`` (or ``OCRNoise(confusions=..., source_counts=...)``)
then draws substitutions, multi-character errors, deletions and inserted
characters from that measured table. A source occurrence is hit at its
measured per-occurrence rate (count / occurrences), so frequent letters are not
over-corrupted; sources the table does not cover keep the built-in
confusions, scaled down to the rarest measured rate so the measured ones lead.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import accumulate, compress, repeat
from operator import add, attrgetter, itemgetter

from rapidfuzz.distance import Levenshtein

ERROR_TYPES = (
    "substitution",
    "multi",
    "deletion",
    "insertion",
    "spurious_space",
    "lost_space",
    "hyphenation",
    "long_s",
    "ligature",
)

# Relative shares of error events (normalised, need not sum to 100). English
# uses the README's ICDAR 2017 counts for the first six types, plus small
# shares for the print-specific phenomena the README also lists.
PROFILE_WEIGHTS: dict[str, dict[str, float]] = {
    "english": {
        "substitution": 52.0,
        "multi": 17.0,
        "deletion": 12.0,
        "insertion": 11.0,
        "spurious_space": 5.5,
        "lost_space": 2.5,
        "hyphenation": 1.5,
        "long_s": 0.3,
        "ligature": 1.0,
    },
    # README: insertions 30% (spurious spaces, hyphens, periods), t→l, l→i,
    # long s→f, é↔e.
    "french": {
        "substitution": 42.0,
        "multi": 10.0,
        "deletion": 10.0,
        "insertion": 18.0,
        "spurious_space": 9.0,
        "lost_space": 2.0,
        "hyphenation": 3.0,
        "long_s": 4.0,
        "ligature": 2.0,
    },
    # README (ICDAR 2019): long s→f, ff→si, h→b, y→p, d→o, w→tb, vv→w.
    "early-modern": {
        "substitution": 36.0,
        "multi": 20.0,
        "deletion": 10.0,
        "insertion": 7.0,
        "spurious_space": 5.0,
        "lost_space": 4.0,
        "hyphenation": 1.0,
        "long_s": 14.0,
        "ligature": 3.0,
    },
}

# Single-character confusions: source -> ((replacement, weight), ...).
# Weight 4 marks the README's frequent confusions; the rest are plausible
# glyph-shape confusions so that most letters can be hit.
_SUBSTITUTIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "c": (("o", 4), ("e", 4)),
    "e": (("o", 4), ("é", 3), ("c", 2)),
    "s": (("a", 4), ("e", 1)),
    "l": (("i", 4), ("1", 2), ("I", 1), ("t", 1)),
    "h": (("b", 4), ("k", 1)),
    "n": (("u", 4), ("a", 1)),
    "I": (("1", 4), ("l", 2)),
    ",": ((".", 4),),
    "E": (("B", 4), ("F", 1)),
    "C": (("O", 4), ("G", 1)),
    "S": (("8", 4), ("5", 1)),
    "a": (("o", 2), ("e", 1), ("s", 1)),
    "b": (("h", 2), ("l", 1)),
    "d": (("a", 1), ("o", 1)),
    "f": (("t", 2), ("l", 1)),
    "g": (("q", 1), ("y", 1)),
    "i": (("l", 2), ("j", 1), ("1", 1)),
    "j": (("i", 1),),
    "k": (("h", 1),),
    "m": (("n", 1),),
    "o": (("c", 2), ("e", 1), ("0", 1)),
    "p": (("o", 1),),
    "q": (("g", 1),),
    "r": (("t", 1), ("n", 1)),
    "t": (("l", 2), ("f", 1), ("i", 1)),
    "u": (("n", 3), ("a", 1)),
    "v": (("y", 1),),
    "w": (("v", 1),),
    "x": (("z", 1),),
    "y": (("v", 1), ("p", 1)),
    "z": (("x", 1),),
    "A": (("4", 1),),
    "B": (("E", 1), ("8", 1)),
    "D": (("O", 1),),
    "G": (("C", 1),),
    "O": (("0", 2), ("Q", 1)),
    "T": (("I", 1),),
    "0": (("o", 1),),
    "1": (("l", 2), ("I", 1)),
    "5": (("S", 1),),
    "8": (("S", 1),),
    ".": ((",", 2),),
    ";": ((":", 2),),
    ":": ((";", 1),),
}

_SUBSTITUTIONS_EXTRA: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {
    "english": {},
    "french": {
        "t": (("l", 4),),
        "l": (("i", 4),),
        "é": (("e", 4),),
        "e": (("é", 4),),
        "è": (("e", 2),),
        "ê": (("e", 1),),
        "à": (("a", 2),),
        "â": (("a", 1),),
        "ç": (("c", 2),),
        "ô": (("o", 1),),
        "î": (("i", 1),),
    },
    "early-modern": {
        "h": (("b", 4),),
        "y": (("p", 4),),
        "d": (("o", 4),),
        "u": (("n", 2),),
        "v": (("u", 1),),
    },
}

# Multi-character confusions: source string -> replacements. Digraph sources
# are rare in text, single-letter ones (h, m, d) common, so the weights favour
# the digraphs to keep h→li from swamping the README's other pairs.
_MULTI: dict[str, tuple[tuple[str, float], ...]] = {
    "ll": (("U", 6),),
    "fi": (("n", 6),),
    "fl": (("n", 6),),
    "il": (("d", 6),),
    "rn": (("m", 6),),
    "cl": (("d", 3),),
    "ri": (("n", 2),),
    "li": (("h", 2),),
    "nn": (("m", 2),),
    "in": (("m", 1),),
    "ni": (("m", 1),),
    "h": (("li", 1),),
    "m": (("rn", 2), ("in", 0.5)),
    "d": (("cl", 1),),
    "w": (("vv", 0.5),),
}

_MULTI_EXTRA: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {
    "english": {},
    "french": {"ui": (("m", 1),), "li": (("h", 2),)},
    "early-modern": {"ff": (("si", 4),), "w": (("tb", 4),), "vv": (("w", 4),)},
}

# Characters OCR inserts out of nothing (specks read as punctuation).
_INSERTED: dict[str, tuple[tuple[str, float], ...]] = {
    "english": (("-", 3), (".", 3), ("'", 2), (",", 2)),
    "french": (("-", 3), (".", 3), ("'", 1), (",", 1)),
    "early-modern": ((".", 2), (",", 2), ("'", 2), ("-", 1)),
}

# Long s: printed ſ kept as ſ, or misread as f (the common OCR outcome).
_LONG_S: dict[str, tuple[tuple[str, float], ...]] = {
    "english": (("ſ", 1), ("f", 1)),
    "french": (("f", 3), ("ſ", 1)),
    "early-modern": (("f", 3), ("ſ", 1)),
}

_LIGATURES: dict[str, tuple[tuple[str, float], ...]] = {
    "ffi": (("\ufb03", 1),),
    "ffl": (("\ufb04", 1),),
    "fi": (("\ufb01", 3),),
    "fl": (("\ufb02", 2),),
    "ff": (("\ufb00", 2),),
}

_BURST_WINDOW = 6  # characters either side of the previous event
_SPACE = ((" ", 1.0),)  # spurious space: inserted after a letter
_HYPHEN = (("- ", 1.0),)  # line-end hyphenation: inserted inside a word
_UNORDERED = frozenset({"multi", "ligature", "deletion"})  # finders that list sites out of text order

# (gold, OCR) pairs that count as the ligature error type.
_LIGATURE_PAIRS = frozenset((src, repl) for src, pairs in _LIGATURES.items() for repl, _ in pairs)
_HYPHEN_BREAK = re.compile(r"-\s+")

# Error types whose replacements a measured confusion table can supply; the
# other types (spaces, hyphenation, long s, ligatures) have fixed forms.
TABLE_TYPES = ("substitution", "multi", "deletion", "insertion")
_ANY_CHAR = "\x00any"  # stand-in source key; never a real gold substring (NUL is dropped by readers)


@dataclass(frozen=True)
class _Options:
    """Replacement choices for one source span, with their mean edit cost."""

    repls: tuple[str, ...]
    weights: tuple[float, ...]
    total: float  # sum of weights; also the site's sampling weight
    cost_sum: float  # sum of weight * Levenshtein(source, replacement)
    cum_weights: tuple[float, ...]  # running sums of weights, for _choose

    @classmethod
    def build(cls, src: str, pairs: tuple[tuple[str, float], ...]) -> _Options:
        pairs = tuple((r, float(w)) for r, w in pairs if r != src and w > 0)
        return cls(
            repls=tuple(r for r, _ in pairs),
            weights=tuple(w for _, w in pairs),
            total=sum(w for _, w in pairs),
            cost_sum=sum(w * Levenshtein.distance(src, r) for r, w in pairs),
            cum_weights=tuple(accumulate(w for _, w in pairs)),
        )


# A site: (start, end, options) — replace text[start:end] by one option.
_Site = tuple[int, int, _Options]


@dataclass
class _TypeSites:
    """All sites of one error type in one text, ready for weighted sampling."""

    sites: list[_Site]
    starts: list[int]
    cum_weights: list[float]

    @classmethod
    def build(cls, sites: list[_Site], ordered: bool = True) -> _TypeSites | None:
        """Sites with a positive weight (the finders drop the others), sorted by span unless
        ``ordered`` says they already are; None if there is none."""
        if not sites:
            return None
        if not ordered:
            sites.sort(key=_SPAN)  # (start, end) never ties within one type
        cum = list(accumulate(map(_TOTAL, map(_OPTS, sites))))  # sequential sums, as choices() expects
        return cls(sites, list(map(_START, sites)), cum)

    def mean_cost(self) -> float:
        return reduce(add, map(_COST, map(_OPTS, self.sites)), 0.0) / self.cum_weights[-1]

    # what _pick_site asks of a type's sites (the lazy kinds below answer the same, the same way)
    def draw(self, rng: random.Random) -> _Site:
        return _choose(rng, self.sites, self.cum_weights)

    def near(self, lo: int, hi: int) -> list[_Site]:
        """The sites that start in [lo, hi], in text order."""
        return self.sites[bisect.bisect_left(self.starts, lo): bisect.bisect_right(self.starts, hi)]

    def every(self) -> list[_Site]:
        return self.sites


class _UniformSites:
    """The sites of a uniform type (OCRNoise._uniform: every site one character, of the same weight
    and cost), kept as their start offsets only; a site's tuple is made when it is drawn.

    The draws are those of _TypeSites: its running sums of weights are k * w exactly (_exact), so
    the weighted choice of _choose is the index floor(x / w), computed exactly below."""

    def __init__(self, starts: list[int], w: float, opts_at):
        self.starts, self.w, self.opts_at = starts, w, opts_at

    def site(self, start: int) -> _Site:
        return (start, start + 1, self.opts_at(start))

    def draw(self, rng: random.Random) -> _Site:
        n, w = len(self.starts), self.w
        x = rng.random() * (n * w + 0.0)
        k = int(x / w)                             # the number of running sums (j + 1) * w <= x ...
        while k > 0 and k * w > x:                 # ... made exact where the division rounded
            k -= 1
        while (k + 1) * w <= x:
            k += 1
        return self.site(self.starts[min(k, n - 1)])   # bisect's hi = n - 1, as in _choose

    def near(self, lo: int, hi: int) -> list[_Site]:
        return [self.site(s) for s in self.starts[bisect.bisect_left(self.starts, lo):
                                                  bisect.bisect_right(self.starts, hi)]]

    def every(self) -> list[_Site]:
        return [self.site(s) for s in self.starts]


class _CharTableSites:
    """The sites of a table keyed by single characters (substitutions), from running sums of the
    weight at every position (0.0 where the character is not in the table), made in C by
    accumulate/map: no Python work per character. They are the sums over sites (adding 0.0 changes
    no float), and the first position whose sum exceeds a draw is the site _choose picks."""

    def __init__(self, text: str, table: dict[str, _Options], weights: dict[str, float]):
        self.text, self.table = text, table
        self.cum = list(accumulate(map(weights.get, text, repeat(0.0, len(text)))))

    def draw(self, rng: random.Random) -> _Site:
        i = bisect.bisect(self.cum, rng.random() * (self.cum[-1] + 0.0))
        if i >= len(self.cum):                     # a draw of the whole total: the last site
            i = next(j for j in range(len(self.text) - 1, -1, -1) if self.text[j] in self.table)
        return (i, i + 1, self.table[self.text[i]])

    def near(self, lo: int, hi: int) -> list[_Site]:
        text, table = self.text, self.table
        return [(i, i + 1, table[text[i]]) for i in range(max(lo, 0), min(hi + 1, len(text))) if text[i] in table]

    def every(self) -> list[_Site]:
        text, table = self.text, self.table
        return [(i, i + 1, table[c]) for i, c in enumerate(text) if c in table]


_SPAN, _START, _OPTS = itemgetter(0, 1), itemgetter(0), itemgetter(2)
_TOTAL, _COST = attrgetter("total"), attrgetter("cost_sum")


def _exact(x: float) -> bool:
    """True when count * x summed over a text is exact in floating point whatever the order
    (a multiple of 1/256 below 256, texts below _COUNTED_CHARS): counting then gives the very
    sums that adding site by site gives."""
    return 0 <= x < 256 and (x * 256).is_integer()


_COUNTED_CHARS = 1 << 24
_COUNTED_TABLE = 1024  # at most this many sources in a counted table


class _CharClasses(dict):
    """``str.translate`` table that reduces text to what the site finders look at: letters -> "a"
    (but "s" and "f" stay: long s needs them), " " stays, other whitespace -> "\t", the rest -> ".".
    Filled on first sight of each character (``str.isalpha``/``isspace`` decide, as in the finders)."""

    def __missing__(self, code: int) -> str:
        c = chr(code)
        cls = c if c in "sf" or c == " " else "a" if c.isalpha() else "\t" if c.isspace() else "."
        self[code] = cls
        return cls


_CLASSES = _CharClasses()
_LETTER_RUN = re.compile("[asf]+")
_LONG_S_SITE = re.compile("s(?=[as])")
_LETTER_PAIR = re.compile("[asf](?=[asf])")
_LOST_SPACE_SITE = re.compile("(?<=[^ \t]) (?=[^ \t])")
_HYPHEN_SITE = re.compile("(?<=[asf]{2})[asf](?=[asf]{3})")  # split after it: 3 letters or more either side
_NON_SPACE = frozenset("asf.")  # the classes of non-space characters
# the one-character sites of the context-dependent uniform types, found in the class mask
_UNIFORM_SITE = {"spurious_space": _LETTER_PAIR, "lost_space": _LOST_SPACE_SITE, "long_s": _LONG_S_SITE,
                 "hyphenation": _HYPHEN_SITE}


def _marked(pattern: re.Pattern, mask: str) -> list[int]:
    """Offsets of pattern's one-character matches in mask, found in C: each match is replaced by a
    mark, and the marks' offsets picked out (no Python object per match)."""
    marked = pattern.sub("\x01", mask)
    return list(compress(range(len(marked)), map("\x01".__eq__, marked)))


class _TableFinder:
    """The sites of a table of sources (OCRNoise._table_sites), in text order. When no source is a
    prefix of another, at most one starts at each offset, and one regex pass (a lookahead, so
    overlapping occurrences count) lists them all: faster than a search per source."""

    def __init__(self, table: dict[str, _Options]):
        self.table = table
        sources = sorted(table, key=len, reverse=True)
        prefix_free = all(sources) and not any(a != b and b.startswith(a) for a in sources for b in sources)
        self.pattern = re.compile("(?=(" + "|".join(map(re.escape, sources)) + "))") \
            if sources and prefix_free else None

    def __call__(self, text: str) -> list[_Site]:
        if self.pattern is None:
            return OCRNoise._table_sites(text, self.table)
        table = self.table
        return [(m.start(), m.end(1), table[m[1]]) for m in self.pattern.finditer(text)]


def _starts(pattern: re.Pattern, text: str) -> list[int]:
    """Where pattern matches text reduced to its character classes (_CharClasses)."""
    return [m.start() for m in pattern.finditer(text.translate(_CLASSES))]


def _choose(rng: random.Random, population: Sequence, cum_weights: Sequence[float]):
    """``rng.choices(population, cum_weights=cum_weights)[0]`` without its per-call set-up: the
    same single draw (``random()`` times the total, then bisect), hence the same result; with
    ``weights=w`` choices draws exactly this with ``cum_weights = accumulate(w)``."""
    return population[bisect.bisect(cum_weights, rng.random() * (cum_weights[-1] + 0.0), 0, len(population) - 1)]


def _positive(table: dict[str, _Options]) -> dict[str, _Options]:
    return {src: o for src, o in table.items() if o.total > 0}


def _stable_seed(seed: int, key: int | str) -> int:
    """64-bit seed from (seed, key); stable across processes (no hash())."""
    data = f"{seed}\x1f{type(key).__name__}\x1f{key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _poisson(rng: random.Random, lam: float) -> int:
    """Poisson draw (Knuth), in chunks so large rates do not underflow."""
    k = 0
    while lam > 0:
        step = min(lam, 20.0)
        lam -= step
        threshold = math.exp(-step)
        p = rng.random()
        while p > threshold:
            k += 1
            p *= rng.random()
    return k


def _merge(
    base: dict[str, tuple[tuple[str, float], ...]],
    extra: dict[str, tuple[tuple[str, float], ...]],
) -> dict[str, tuple[tuple[str, float], ...]]:
    """Add a profile's confusions to the base table (weights of equal pairs add)."""
    merged: dict[str, dict[str, float]] = {}
    for table in (base, extra):
        for src, pairs in table.items():
            slot = merged.setdefault(src, {})
            for repl, w in pairs:
                slot[repl] = slot.get(repl, 0.0) + w
    return {src: tuple(pairs.items()) for src, pairs in merged.items()}


def _overlaps(needle: str) -> bool:
    """Whether two occurrences of needle can overlap ("ll" in "lll"): only then does str.count,
    which skips overlaps, count fewer than _find_all finds."""
    return any(needle[:k] == needle[-k:] for k in range(1, len(needle)))


def _find_all(text: str, needle: str) -> list[int]:
    """Start offsets of every (possibly overlapping) occurrence of needle."""
    found, i = [], text.find(needle)
    while i >= 0:
        found.append(i)
        i = text.find(needle, i + 1)
    return found


class OCRNoise:
    """Corrupt clean text the way historical-print OCR does, at a target CER.

    ``weights`` overrides the profile's relative event shares by type (see
    ``ERROR_TYPES``); a weight of 0 switches a type off.

    ``confusions`` is a measured table ``[[gold, ocr, count], ...]`` (as
    returned by ``fit_noise``): rows of the types in ``TABLE_TYPES`` replace the
    built-in confusions for their gold substring (insertion rows, gold ``""``,
    replace the inserted-character table); gold substrings the table does not
    cover keep the built-in confusions, scaled down to the rarest measured
    rate. ``source_counts`` maps each gold substring to its number of
    occurrences in the text the table was measured on, turning counts into
    per-occurrence rates; without it the counts are used as per-occurrence
    weights directly, like the built-in tables.
    """

    def __init__(
        self,
        target_cer: float = 0.05,
        seed: int = 0,
        profile: str = "english",
        weights: dict[str, float] | None = None,
        burstiness: float = 0.25,
        confusions: Sequence[Sequence] | None = None,
        source_counts: dict[str, int] | None = None,
    ) -> None:
        if profile not in PROFILE_WEIGHTS:
            raise ValueError(f"unknown noise profile {profile!r}; choose one of {sorted(PROFILE_WEIGHTS)}")
        if not 0.0 <= target_cer < 1.0:
            raise ValueError(f"target_cer must be in [0, 1), got {target_cer}")
        if not 0.0 <= burstiness <= 1.0:
            raise ValueError(f"burstiness must be in [0, 1], got {burstiness}")
        self.target_cer = target_cer
        self.seed = seed
        self.profile = profile
        self.burstiness = burstiness
        self.weights = self._resolve_weights(profile, weights)
        substitutions = _merge(_SUBSTITUTIONS, _SUBSTITUTIONS_EXTRA[profile])
        multi = _merge(_MULTI, _MULTI_EXTRA[profile])
        self._inserted = _INSERTED[profile]
        self._delete = _Options.build("x", (("", 1.0),))  # any one char -> "": cost 1
        # Measured deletions (None: every non-space char alike, self._delete), and those of
        # longer gold substrings ("e," -> "").
        self._deletions: dict[str, _Options] | None = None
        self._deletions_longer: dict[str, _Options] = {}
        self.confusions = [list(row) for row in confusions] if confusions else []
        if self.confusions:
            measured = _measured_tables(self.confusions, source_counts)
            substitutions = _with_fallback(measured["substitution"], substitutions)
            multi = _with_fallback(measured["multi"], multi)
            if measured["insertion"]:
                self._inserted = tuple((repl, w) for repl, w in measured["insertion"][""].items())
            if measured["deletion"]:
                # The built-in deletion hits any character alike: one stand-in source.
                deletions = _with_fallback(measured["deletion"], {_ANY_CHAR: (("", 1.0),)})
                self._delete = _Options.build("x", deletions.pop(_ANY_CHAR))  # uncovered chars
                self._deletions = self._options_table(deletions)
                self._deletions_longer = {src: o for src, o in self._deletions.items() if len(src) > 1}
        # sources whose options all have weight 0 can never be hit: left out of the site tables
        self._substitutions = _positive(self._options_table(substitutions))
        self._multi = _positive(self._options_table(multi))
        self._ligatures = _positive(self._options_table(_LIGATURES))
        self._long_s = _Options.build("s", _LONG_S[profile])
        self._char_options: dict[tuple[str, str], _Options] = {}
        self._finders = {
            "substitution": self._substitution_sites,
            "multi": _TableFinder(self._multi),
            "deletion": self._deletion_sites,
            "insertion": self._insertion_sites,
            "spurious_space": self._spurious_space_sites,
            "lost_space": self._lost_space_sites,
            "hyphenation": self._hyphenation_sites,
            "long_s": self._long_s_sites,
            "ligature": _TableFinder(self._ligatures),
        }
        # Types whose sites all carry options of the same weight and cost (the character kept by an
        # insertion does not change either): their mean cost needs only the number of sites.
        uniform = {
            "insertion": self._insert_after("x", self._inserted, "ins"),
            "spurious_space": self._insert_after("x", _SPACE, "space"),
            "hyphenation": self._insert_after("x", _HYPHEN, "hyph"),
            "lost_space": self._delete,
            "long_s": self._long_s,
        }
        if self._deletions is None:
            uniform["deletion"] = self._delete
        self._uniform = {name: o for name, o in uniform.items() if _exact(o.total) and _exact(o.cost_sum)}
        self._kept_char = {"insertion": (self._inserted, "ins"), "spurious_space": (_SPACE, "space"),
                           "hyphenation": (_HYPHEN, "hyph")}
        # Types with a table of sources: their sites can be counted per source when the table is exact.
        tables = {"substitution": self._substitutions, "multi": self._multi, "ligature": self._ligatures}
        self._counted_tables = {
            name: [(src, o, _overlaps(src)) for src, o in table.items()] for name, table in tables.items()
            if len(table) <= _COUNTED_TABLE and all(_exact(o.total) and _exact(o.cost_sum) for o in table.values())}
        self._substitution_weights = {src: o.total for src, o in self._substitutions.items()}
        self._substitution_costs = {src: o.cost_sum for src, o in self._substitutions.items()}

    @classmethod
    def from_fit(cls, fit: dict, seed: int = 0, burstiness: float = 0.25, **overrides) -> OCRNoise:
        """Noise calibrated by ``fit_noise``: its CER, type shares and confusion table."""
        kwargs = dict(target_cer=fit["target_cer"], seed=seed, profile=fit.get("profile", "english"),
                      weights=fit["weights"], burstiness=burstiness, confusions=fit.get("confusions"),
                      source_counts=fit.get("source_counts"))
        kwargs.update(overrides)
        return cls(**kwargs)

    @staticmethod
    def _resolve_weights(profile: str, weights: dict[str, float] | None) -> dict[str, float]:
        resolved = dict(PROFILE_WEIGHTS[profile])
        for name, value in (weights or {}).items():
            if name not in resolved:
                raise ValueError(f"unknown noise weight {name!r}; known: {', '.join(ERROR_TYPES)}")
            if value < 0:
                raise ValueError(f"noise weight {name!r} must be >= 0, got {value}")
            resolved[name] = float(value)
        if sum(resolved.values()) <= 0:
            raise ValueError("at least one noise weight must be positive")
        return resolved

    @staticmethod
    def _options_table(table: dict[str, tuple[tuple[str, float], ...]]) -> dict[str, _Options]:
        return {src: _Options.build(src, pairs) for src, pairs in table.items()}

    # -- public API -------------------------------------------------------

    def corrupt(self, text: str, key: int | str) -> str:
        """Return a noisy copy of ``text``; deterministic in (seed, key)."""
        if self.target_cer <= 0 or not text.strip():
            return text
        rng = random.Random(_stable_seed(self.seed, key))
        built: dict[str, _TypeSites] = {}  # sites per type, built when first needed
        costs = self._type_costs(text, built)
        if not costs:
            return text
        shares = {name: self.weights[name] for name in costs}
        per_event = sum(shares[n] * costs[n] for n in shares) / sum(shares.values())
        n_events = _poisson(rng, self.target_cer * len(text) / per_event)
        out = self._apply_events(text, n_events, built, shares, rng)
        # Guard: a short input must never vanish (e.g. "a" with a deletion).
        return out if out.strip() else text

    def measure_cer(self, texts: list[str]) -> float:
        """Corpus CER of ``corrupt(text, i)`` against the clean texts."""
        edits = sum(Levenshtein.distance(self.corrupt(t, i), t) for i, t in enumerate(texts))
        chars = sum(len(t) for t in texts)
        return edits / chars if chars else 0.0

    # -- sites ------------------------------------------------------------

    def _type_costs(self, text: str, built: dict[str, _TypeSites]) -> dict[str, float]:
        """Mean edit cost per event of each error type that has a positive weight and a site in text.

        Speed: most types are never hit in a short text, so building every site list (a Python
        tuple per character and type) is wasted. Types whose options all weigh and cost alike
        (``self._uniform``), and table types whose table is exact (``self._counted_tables``), are
        counted with whole-string operations instead; ``_exact`` makes those counts give the very
        floating-point sums that ``_TypeSites.build`` gives, so the draws do not change (a uniform
        type's mean cost is its options' own, so only whether it has a site matters). Substitutions
        get their running sums over positions now (``_CharTableSites``; drawing uses them). Other
        types build their sites now, into ``built``.
        """
        counted = len(text) < _COUNTED_CHARS
        present = self._sites_present(text) if counted else {}
        costs = {}
        for name in ERROR_TYPES:
            if self.weights[name] <= 0:
                continue
            opts = self._uniform.get(name)
            if counted and opts is not None:
                # n sites: (n * cost_sum) / (n * total), both products exact, is cost_sum / total
                if present[name] and opts.total > 0:
                    costs[name] = opts.cost_sum / opts.total
            elif counted and name == "substitution" and name in self._counted_tables:
                # the running sums that draws use (built now: substitutions are nearly always drawn);
                # their last is the total weight, exact as the counts below
                sites = _CharTableSites(text, self._substitutions, self._substitution_weights)
                if sites.cum and sites.cum[-1] > 0:
                    built[name] = sites
                    costs[name] = sum(map(self._substitution_costs.get, text, repeat(0.0, len(text)))) / sites.cum[-1]
            elif counted and name in self._counted_tables:
                acc = cost = 0.0
                for src, o, overlaps in self._counted_tables[name]:
                    # str.count unless occurrences can overlap, which it would miss
                    n = len(_find_all(text, src)) if overlaps else text.count(src)
                    if n:
                        acc += n * o.total
                        cost += n * o.cost_sum
                if acc > 0:
                    costs[name] = cost / acc
            else:
                typed = self._build_sites(name, text)
                if typed is not None:
                    built[name] = typed
                    costs[name] = typed.mean_cost()
        return costs

    def _build_sites(self, name: str, text: str) -> _TypeSites | None:
        return _TypeSites.build(self._finders[name](text), ordered=name not in _UNORDERED)

    def _drawing_sites(self, name: str, text: str) -> _TypeSites | _UniformSites | _CharTableSites:
        """The sites of a type with a site in text, to draw from: for the uniform types and the
        substitution table, a lazy form that lists no site tuple (building those lists was most of
        the time of corrupt()); the other types build their sites in full."""
        opts = self._uniform.get(name)
        if opts is not None and len(text) < _COUNTED_CHARS:
            mask = text.translate(_CLASSES)
            if name in ("deletion", "insertion"):        # every non-space character
                starts = list(compress(range(len(mask)), map(_NON_SPACE.__contains__, mask)))
            else:
                starts = _marked(_UNIFORM_SITE[name], mask)
            kept = self._kept_char.get(name)              # the types that insert after a kept character
            at = (lambda i: opts) if kept is None else (lambda i: self._insert_after(text[i], *kept))
            return _UniformSites(starts, opts.total, at)
        if name == "substitution":
            return _CharTableSites(text, self._substitutions, self._substitution_weights)
        return self._build_sites(name, text)

    @staticmethod
    def _sites_present(text: str) -> dict[str, bool]:
        """Whether text has a site of each uniform type, as the finders below would list them."""
        mask = text.translate(_CLASSES)
        non_space = len(mask) > mask.count(" ") + mask.count("\t")
        present = {name: pattern.search(mask) is not None for name, pattern in _UNIFORM_SITE.items()}
        return {"deletion": non_space and len(text) >= 2, "insertion": non_space, **present}

    def _insert_after(self, char: str, inserted: tuple[tuple[str, float], ...], tag: str) -> _Options:
        """Options that keep ``char`` and insert something after it (cached)."""
        key = (tag, char)
        opts = self._char_options.get(key)
        if opts is None:
            opts = _Options.build(char, tuple((char + ins, w) for ins, w in inserted))
            self._char_options[key] = opts
        return opts

    def _substitution_sites(self, text: str) -> list[_Site]:
        table = self._substitutions
        return [(i, i + 1, table[c]) for i, c in enumerate(text) if c in table]

    @staticmethod
    def _table_sites(text: str, table: dict[str, _Options]) -> list[_Site]:
        return [(i, i + len(src), opts) for src, opts in table.items() for i in _find_all(text, src)]

    def _deletion_sites(self, text: str) -> list[_Site]:
        if len(text) < 2:
            return []
        if self._deletions is None:
            if self._delete.total <= 0:
                return []
            opts, chars = self._delete, {c for c in set(text) if not c.isspace()}
            return [(i, i + 1, opts) for i, c in enumerate(text) if c in chars]
        table, fallback = self._deletions, self._delete
        sites = [(i, i + 1, table.get(c, fallback)) for i, c in enumerate(text) if not c.isspace()]
        if self._deletions_longer:
            sites += self._table_sites(text, self._deletions_longer)
        return [s for s in sites if s[2].total > 0]

    def _after_each(self, text: str, inserted: tuple[tuple[str, float], ...], tag: str, letters: bool) -> dict:
        """_insert_after options for each distinct letter (letters) or non-space character of text."""
        keep = str.isalpha if letters else (lambda c: not c.isspace())
        return {c: self._insert_after(c, inserted, tag) for c in set(text) if keep(c)}

    def _insertion_sites(self, text: str) -> list[_Site]:
        if self._insert_after("x", self._inserted, "ins").total <= 0:
            return []
        opts = self._after_each(text, self._inserted, "ins", letters=False)
        return [(i, i + 1, opts[c]) for i, c in enumerate(text) if c in opts]

    def _spurious_space_sites(self, text: str) -> list[_Site]:
        """A letter followed by a letter (a space inserted between them)."""
        opts = self._after_each(text, _SPACE, "space", letters=True)
        return [(i, i + 1, opts[text[i]]) for i in _starts(_LETTER_PAIR, text)]

    def _lost_space_sites(self, text: str) -> list[_Site]:
        """A single space between two non-space characters."""
        if self._delete.total <= 0:
            return []
        opts = self._delete
        return [(i, i + 1, opts) for i in _starts(_LOST_SPACE_SITE, text)]

    def _hyphenation_sites(self, text: str) -> list[_Site]:
        """Line-end splits ``construc- tion``: >= 3 letters either side."""
        opts = self._after_each(text, _HYPHEN, "hyph", letters=True)
        sites = []
        for word in _LETTER_RUN.finditer(text.translate(_CLASSES)):
            # split after text[j]
            sites += [(j, j + 1, opts[text[j]]) for j in range(word.start() + 2, word.end() - 3)]
        return sites

    def _long_s_sites(self, text: str) -> list[_Site]:
        """Non-final ``s`` (printers used round s at word end and before f)."""
        if self._long_s.total <= 0:
            return []
        opts = self._long_s
        return [(i, i + 1, opts) for i in _starts(_LONG_S_SITE, text)]

    # -- applying events --------------------------------------------------

    def _apply_events(
        self,
        text: str,
        n_events: int,
        built: dict[str, _TypeSites],
        shares: dict[str, float],
        rng: random.Random,
    ) -> str:
        """Apply up to n_events non-overlapping edits and return the result (the sites of a type
        are built into ``built`` when the type is first drawn)."""
        cells = list(text)
        # damaged[i + 1] marks text[i]; the padding avoids bounds checks.
        damaged = bytearray(len(text) + 2)
        last: int | None = None
        shares = dict(shares)
        names, cum = list(shares), list(accumulate(shares.values()))
        for _ in range(n_events):
            site = None
            while site is None and shares:
                name = _choose(rng, names, cum)
                typed = built.get(name)
                if typed is None:
                    typed = built[name] = self._drawing_sites(name, text)
                site = self._pick_site(typed, damaged, last, rng)
                if site is None:
                    del shares[name]  # every site of this type is used up
                    names, cum = list(shares), list(accumulate(shares.values()))
            if site is None:
                break
            start, end, opts = site
            cells[start] = _choose(rng, opts.repls, opts.cum_weights)
            for i in range(start + 1, end):
                cells[i] = ""
            damaged[start + 1 : end + 1] = b"\x01" * (end - start)
            last = start
        return "".join(cells)

    def _pick_site(
        self,
        typed: _TypeSites | _UniformSites | _CharTableSites,
        damaged: bytearray,
        last: int | None,
        rng: random.Random,
    ) -> _Site | None:
        """Weighted choice of a site whose span and neighbours are untouched."""

        def free(site: _Site) -> bool:
            return damaged.find(1, site[0], site[1] + 2) < 0

        if last is not None and rng.random() < self.burstiness:
            near = [s for s in typed.near(last - _BURST_WINDOW, last + _BURST_WINDOW) if free(s)]
            if near:
                return _choose(rng, near, list(accumulate(map(_TOTAL, map(_OPTS, near)))))
        for _ in range(8):  # rejection sampling: cheap while most text is clean
            site = typed.draw(rng)
            if free(site):
                return site
        remaining = [s for s in typed.every() if free(s)]
        if not remaining:
            return None
        return _choose(rng, remaining, list(accumulate(map(_TOTAL, map(_OPTS, remaining)))))


# ---------------------------------------------------------------- calibration


def error_spans(gold: str, ocr: str) -> list[tuple[str, str]]:
    """(gold, ocr) substrings for each run of consecutive non-equal edit operations."""
    spans: list[tuple[str, str]] = []
    cur: tuple[str, str] | None = None
    for op in Levenshtein.opcodes(gold, ocr):
        if op.tag == "equal":
            if cur:
                spans.append(cur)
            cur = None
            continue
        old, new = gold[op.src_start : op.src_end], ocr[op.dest_start : op.dest_end]
        cur = (cur[0] + old, cur[1] + new) if cur else (old, new)
    if cur:
        spans.append(cur)
    return spans


def classify_span(gold: str, ocr: str) -> str:
    """The error type (one of ``ERROR_TYPES``) of one error span, gold -> OCR.

    Whitespace-only insertions and deletions are spurious and lost spaces; an
    inserted ``-`` plus whitespace is a line-end hyphenation (``construc- tion``);
    ``s`` read as ``f`` or ``ſ`` is long s; ``fi`` -> ``ﬁ`` and the like are
    ligatures; other insertions and deletions (any length) keep those names; one
    character for one is a substitution and everything else is multi.
    """
    if not gold:
        if ocr.isspace():
            return "spurious_space"
        return "hyphenation" if _HYPHEN_BREAK.fullmatch(ocr) else "insertion"
    if not ocr:
        return "lost_space" if gold.isspace() else "deletion"
    if gold == "s" and ocr in ("f", "\u017f"):
        return "long_s"
    if (gold, ocr) in _LIGATURE_PAIRS:
        return "ligature"
    if len(gold) == 1 and len(ocr) == 1:
        return "substitution"
    return "multi"


def fit_noise(
    pairs: Iterable[tuple[str, str]],
    profile: str = "english",
    top: int = 60,
    max_span: int = 4,
) -> dict:
    """Measure real OCR noise on (ocr, gold) pairs; the result drives ``OCRNoise.from_fit``.

    Returns a JSON-able dict:

    - ``target_cer``: corpus CER of the pairs (total edits / total gold characters);
    - ``weights``: the share (percent) of error events per type of ``ERROR_TYPES``;
    - ``confusions``: the ``top`` most frequent ``[gold, ocr, count]`` spans of the
      types in ``TABLE_TYPES`` with at most ``max_span`` characters a side (longer
      spans, e.g. garbled lines, still count in the CER and the weights);
    - ``source_counts``: occurrences of each confusion's gold substring in the gold
      text (overlapping; ``""`` counts gold characters), for per-occurrence rates;
    - ``profile``, ``pairs``, ``gold_chars``, ``error_events`` for the record.

    Pairs should be sentence- or window-sized: the alignment is quadratic in length.
    """
    if profile not in PROFILE_WEIGHTS:
        raise ValueError(f"unknown noise profile {profile!r}; choose one of {sorted(PROFILE_WEIGHTS)}")
    types: Counter[str] = Counter()
    confusions: Counter[tuple[str, str]] = Counter()
    golds: list[str] = []
    edits = chars = n_pairs = 0
    for ocr, gold in pairs:
        n_pairs += 1
        golds.append(gold)
        chars += len(gold)
        edits += Levenshtein.distance(ocr, gold)
        for old, new in error_spans(gold, ocr):
            kind = classify_span(old, new)
            types[kind] += 1
            if kind in TABLE_TYPES and len(old) <= max_span and len(new) <= max_span:
                confusions[(old, new)] += 1
    if not chars:
        raise ValueError("fit_noise needs at least one pair with a non-empty gold side")
    events = sum(types.values())
    if events:
        weights = {name: round(100.0 * types[name] / events, 3) for name in ERROR_TYPES}
    else:  # perfect OCR: nothing to measure, keep the profile's shape (at CER 0 it is unused)
        weights = dict(PROFILE_WEIGHTS[profile])
    table = sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    joined = "\x00".join(golds)  # NUL never matches inside a gold substring
    sources = {old for (old, _), _ in table}
    source_counts = {old: (chars if not old else len(_find_all(joined, old))) for old in sorted(sources)}
    return {
        "profile": profile,
        "target_cer": round(edits / chars, 6),
        "weights": weights,
        "confusions": [[old, new, n] for (old, new), n in table],
        "source_counts": source_counts,
        "pairs": n_pairs,
        "gold_chars": chars,
        "error_events": events,
    }


def _measured_tables(
    confusions: Sequence[Sequence], source_counts: dict[str, int] | None
) -> dict[str, dict[str, dict[str, float]]]:
    """Per table type: gold -> {ocr: per-occurrence rate} from ``[gold, ocr, count]`` rows."""
    tables: dict[str, dict[str, dict[str, float]]] = {name: {} for name in TABLE_TYPES}
    for row in confusions:
        if (len(row) != 3 or not isinstance(row[0], str) or not isinstance(row[1], str)
                or isinstance(row[2], bool) or not isinstance(row[2], (int, float))):
            raise ValueError(f"confusion rows must be [gold, ocr, count], got {row!r}")
        old, new, count = row
        if count < 0:
            raise ValueError(f"confusion count must be >= 0, got {row!r}")
        kind = classify_span(old, new) if old != new else None
        if kind not in TABLE_TYPES or count == 0:
            continue  # identical strings, or a type with a fixed form (spaces, hyphenation, ...)
        rate = float(count)
        if source_counts is not None and kind != "insertion":
            occurrences = source_counts.get(old)
            if occurrences is None:
                raise ValueError(f"source_counts has no entry for the confusion source {old!r}")
            if occurrences <= 0:
                continue
            rate /= occurrences
        slot = tables[kind].setdefault(old, {})
        slot[new] = slot.get(new, 0.0) + rate
    return tables


def _with_fallback(
    measured: dict[str, dict[str, float]],
    builtin: dict[str, tuple[tuple[str, float], ...]],
) -> dict[str, tuple[tuple[str, float], ...]]:
    """Measured sources with their rates; other built-in sources scaled to the rarest measured rate.

    The scale maps built-in weights to rates on the sources both tables know,
    taking the smallest ratio: a source outside the measured top list was rarer
    than every source in it, so its built-in confusions must not outweigh them.
    """
    if not measured:
        return dict(builtin)
    totals = {src: sum(reps.values()) for src, reps in measured.items()}
    builtin_totals = {src: sum(w for _, w in pairs) for src, pairs in builtin.items()}
    ratios = [totals[s] / builtin_totals[s] for s in totals if builtin_totals.get(s, 0) > 0]
    scale = min(ratios) if ratios else min(totals.values()) / max(max(builtin_totals.values(), default=1.0), 1e-12)
    table = {src: tuple((repl, w * scale) for repl, w in pairs)
             for src, pairs in builtin.items() if src not in measured}
    table.update({src: tuple(reps.items()) for src, reps in measured.items()})
    return table
