"""Exact small examples for corpus scoring and diff display."""

import pytest

from nichelm.metrics import (
    CorpusScore,
    char_distance,
    mark_changes,
    mark_changes_html,
    score_pairs,
    word_distance,
)


def test_identical_strings_have_no_errors():
    assert char_distance("the cat", "the cat") == 0
    assert word_distance("the cat", "the cat") == 0
    score = score_pairs([("the cat", "the cat")])
    assert score.cer == 0.0 and score.wer == 0.0


def test_known_distances():
    assert char_distance("kitten", "sitting") == 3
    assert char_distance("", "abc") == 3
    assert word_distance("the cat sat", "the bat sat") == 1
    assert word_distance("the cat", "the cat sat down") == 2
    # Whitespace runs do not count as words.
    assert word_distance("the  cat\n", "the cat") == 0
    # Unit costs, no transposition operation: a swap is 2 edits.
    assert char_distance("ab", "ba") == 2 and char_distance("flaw", "lawn") == 2
    assert char_distance("ſ", "s") == 1 and char_distance("été", "ete") == 2    # one edit per character
    assert word_distance("a b c", "c b a") == 2


def test_empty_score_is_zero():
    score = CorpusScore()
    assert score.cer == 0.0 and score.wer == 0.0 and score.n == 0
    score.add("", "")
    assert score.cer == 0.0 and score.wer == 0.0 and score.n == 1


def test_corpus_score_accumulates():
    score = score_pairs([("tbe cat", "the cat"), ("a dog", "a dog ran")])
    assert score.char_errors == 1 + 4
    assert score.chars == 7 + 9
    assert score.word_errors == 1 + 1
    assert score.words == 2 + 3
    assert score.n == 2
    assert score.cer == pytest.approx(5 / 16)
    assert score.wer == pytest.approx(2 / 5)


def test_micro_average_differs_from_macro():
    """One wrong short line and one clean long line: the corpus CER is 1 edit over 100 reference
    characters (1%), not the mean of the lines' rates ((100% + 0%) / 2 = 50%)."""
    long_ref = "x" * 99
    score = score_pairs([("b", "a"), (long_ref, long_ref)])
    assert (score.char_errors, score.chars, score.n) == (1, 100, 2)
    assert score.cer == pytest.approx(0.01)
    assert (score.word_errors, score.words) == (1, 2) and score.wer == pytest.approx(0.5)


def test_mark_changes_substitution():
    assert mark_changes("the cat", "the eat") == "the [-c-]{+e+}at"


def test_mark_changes_groups_adjacent_operations():
    # h -> li is one change (substitution + insertion), shown as one group.
    assert mark_changes("the hat", "the liat") == "the [-h-]{+li+}at"
    assert mark_changes("modern", "rnodern") == "[-m-]{+rn+}odern"


def test_mark_changes_insertions_deletions_and_identity():
    assert mark_changes("cat", "cat") == "cat"
    assert mark_changes("construction", "construc- tion") == "construc{+- +}tion"
    assert mark_changes("the cat", "thecat") == "the[- -]cat"
    assert "\n" not in mark_changes("a\nb", "a\nc")


def test_mark_changes_html_escapes():
    out = mark_changes_html("a<b & c", "a<b & o")
    assert out == "a&lt;b &amp; <del>c</del><ins>o</ins>"
    assert mark_changes_html("x", "x<") == "x<ins>&lt;</ins>"
