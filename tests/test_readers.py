"""Readers: every format from tiny fixtures, error messages, windowing, and real-data figures."""

import csv
import gzip
import json
import random
from pathlib import Path

import pytest
from rapidfuzz.distance import Levenshtein

from nichelm.data.readers import Document, Segment, pair_segments_to_windows, read_documents
from nichelm.errors import UserError

OCR_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ocr"


def joined(doc: Document, side: str = "output") -> str:
    return "".join(getattr(s, side) for s in doc.segments)


# --------------------------------------------------------------------------- text


def test_text_file_segments_at_lines_and_keep_separators(tmp_path):
    text = "First line.\nSecond line.\n\nNew paragraph.\n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    [doc] = read_documents(path, "text")
    assert doc.doc_id == "a.txt"
    assert joined(doc) == text
    assert [s.output for s in doc.segments] == ["First line.\n", "Second line.\n\n", "New paragraph.\n"]
    assert all(s.input is None for s in doc.segments)


def test_text_directory_recursive_sorted_with_gz(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("sea\r\nside".encode()))
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs = read_documents(tmp_path, "text")
    assert [d.doc_id for d in docs] == ["b.txt", "c.txt.gz", "sub/a.txt"]
    assert joined(docs[1]) == "sea\nside"


# --------------------------------------------------------------------------- jsonl


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_paired_clean_and_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"id": "x", "input": "Tbe cat", "output": "The cat"}, {"id": "y", "output": "a\nb"}])
    docs = read_documents(path, "jsonl", id_field="id")
    assert [d.doc_id for d in docs] == ["x", "y"]
    assert docs[0].segments == [Segment("Tbe cat", "The cat")]
    assert docs[1].segments == [Segment(None, "a\n"), Segment(None, "b")]
    assert [d.doc_id for d in read_documents(path, "jsonl")] == ["1", "2"]


def test_jsonl_gz_and_custom_fields(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"ocr": "0ne", "gold": "one"}\n'))
    [doc] = read_documents(path, "jsonl", input_field="ocr", output_field="gold")
    assert doc.segments == [Segment("0ne", "one")]


def test_jsonl_bad_line_names_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"output": "ok"}\n{"output": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON .*each line must be one JSON object"):
        read_documents(path, "jsonl")


def test_jsonl_missing_output_field_names_field_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"output": "ok"}, {"text": "no output"}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: no field 'output'"):
        read_documents(path, "jsonl")


# --------------------------------------------------------------------------- csv

BLN_HEADER = ["Sample ID", "Date", "Publication", "OCR Text", "Ground Truth", "CER"]


def write_csv(path, header, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_bln600_layout_groups_rows_by_sample_id(tmp_path):
    path = tmp_path / "bln.csv"
    write_csv(path, BLN_HEADER, [
        ["7", "1880", "P", "Tbe cat.", "The cat.", "0.1"],
        ["3", "1880", "P", "0ne.", "One.", "0.2"],
        ["7", "1880", "P", "It sat,\non a mat.", "It sat,\non a mat.", "0"],
    ])
    docs = read_documents(path, "csv")
    assert [d.doc_id for d in docs] == ["7", "3"]
    assert docs[0].segments == [Segment("Tbe cat. ", "The cat. "), Segment("It sat,\non a mat.", "It sat,\non a mat.")]
    assert docs[1].segments == [Segment("0ne.", "One.")]


def test_csv_missing_column_is_a_user_error(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(path, ["id", "text"], [["1", "hello"]])
    with pytest.raises(UserError, match=r"x\.csv: no column 'OCR Text' \(columns: 'id', 'text'\); set input_field"):
        read_documents(path, "csv")


def test_csv_clean_text_by_index_with_repeated_header(tmp_path):
    path = tmp_path / "c.csv.gz"
    path.write_bytes(gzip.compress(b'field,field,field\na,"first doc",x\nb,second doc,y\n'))
    docs = read_documents(path, "csv", input_field="", text_field="1")
    assert [d.doc_id for d in docs] == ["1", "2"]
    assert [joined(d) for d in docs] == ["first doc", "second doc"]
    assert all(s.input is None for d in docs for s in d.segments)


def test_csv_clean_text_groups_by_id_column(tmp_path):
    path = tmp_path / "c.csv"
    write_csv(path, BLN_HEADER, [["1", "", "", "x", "A.", ""], ["1", "", "", "y", "B.", ""]])
    [doc] = read_documents(path, "csv", input_field="", text_field="Ground Truth")
    assert doc.doc_id == "1" and joined(doc) == "A. B."


# --------------------------------------------------------------------------- icdar


def write_icdar(path, ocr_al, gold_al, raw=None):
    raw = ocr_al.replace("@", "") if raw is None else raw
    path.write_text(f"[OCR_toInput] {raw}\n[OCR_aligned] {ocr_al}\n[ GS_aligned] {gold_al}\n", encoding="utf-8")


def test_icdar_rule_drops_hash_columns_then_at(tmp_path):
    path = tmp_path / "0.txt"
    write_icdar(path, "Tlie qu@ck bxown f@x.", "The@ quick ##own fox.")
    [doc] = read_documents(path, "icdar")
    assert joined(doc, "input") == "Tlie quck own fx."
    assert joined(doc) == "The quick own fox."
    assert [s.output for s in doc.segments] == ["The ", "quick ", "own ", "fox."]
    assert [s.input for s in doc.segments] == ["Tlie ", "quck ", "own ", "fx."]


def test_icdar_directory_meta_folder_and_length_check(tmp_path):
    (tmp_path / "NL1").mkdir()
    write_icdar(tmp_path / "NL1" / "1.txt", "een twee", "een twee")
    write_icdar(tmp_path / "NL1" / "0.txt", "drie", "drie")
    docs = read_documents(tmp_path, "icdar")
    assert [(d.doc_id, d.meta["folder"]) for d in docs] == [("NL1/0.txt", "NL1"), ("NL1/1.txt", "NL1")]
    write_icdar(tmp_path / "NL1" / "2.txt", "vier", "vijf!")
    with pytest.raises(UserError, match=r"2\.txt: \[OCR_aligned\] has 4 characters but \[ GS_aligned\] has 5"):
        read_documents(tmp_path, "icdar")


def test_icdar_lines_column_aligned_pair(tmp_path):
    inp, gs = tmp_path / "EngMonoInput.txt", tmp_path / "EngMonoGS.txt"
    inp.write_text("Tbe qu@ck fox\nab#c d\n", encoding="utf-8")
    gs.write_text("The quick f@x\nab#c d\n", encoding="utf-8")
    docs = read_documents(inp, "icdar-lines", gold_path=gs)
    assert [d.doc_id for d in docs] == ["EngMonoInput.txt:1", "EngMonoInput.txt:2"]
    assert docs[0].meta["column_aligned"]
    assert (joined(docs[0], "input"), joined(docs[0])) == ("Tbe quck fox", "The quick fx")
    assert (joined(docs[1], "input"), joined(docs[1])) == ("abc d", "abc d")


def test_icdar_lines_raw_ocr_against_aligned_gold(tmp_path):
    inp, gs = tmp_path / "France_Input.txt", tmp_path / "FranceGS.txt"
    inp.write_text("Tbe qnick brown fox jumped\r\nThe quick brown fox\r\n", encoding="utf-8")
    gs.write_text("The quick@ brown fox jumps.\nThe quick #### fox\n", encoding="utf-8")
    first, second = read_documents(inp, "icdar-lines", gold_path=gs)
    assert not first.meta["column_aligned"]
    assert joined(first, "input") == "Tbe qnick brown fox jumped"
    assert joined(first) == "The quick brown fox jumps."
    assert [s.output for s in first.segments] == ["The ", "quick ", "brown ", "fox ", "jumps."]
    # '#' (no gold) is dropped together with the OCR characters aligned to it.
    assert (joined(second, "input"), joined(second)) == ("The quick  fox", "The quick  fox")


def test_icdar_lines_equal_length_but_shifted_is_not_column_aligned(tmp_path):
    text = "the quick brown fox jumps over the lazy dog " * 3
    inp, gs = tmp_path / "in.txt", tmp_path / "gs.txt"
    inp.write_text(text + "\n", encoding="utf-8")
    gs.write_text("@@" + text[1:-1] + "\n", encoding="utf-8")
    [doc] = read_documents(inp, "icdar-lines", gold_path=gs)
    assert not doc.meta["column_aligned"]
    assert joined(doc, "input") == text and joined(doc) == text[1:-1]


def test_icdar_lines_errors(tmp_path):
    inp, gs = tmp_path / "in.txt", tmp_path / "gs.txt"
    inp.write_text("a\nb\n", encoding="utf-8")
    gs.write_text("a\n", encoding="utf-8")
    with pytest.raises(UserError, match="needs gold_path"):
        read_documents(inp, "icdar-lines")
    with pytest.raises(UserError, match=r"2 lines but .*gs\.txt has 1"):
        read_documents(inp, "icdar-lines", gold_path=gs)


# --------------------------------------------------------------------------- general errors


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "icdar"])
def test_empty_file_is_a_user_error(tmp_path, fmt):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="no documents found; check the path and format"):
        read_documents(path, fmt)


def test_missing_path_unknown_format_and_bad_utf8(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        read_documents(tmp_path / "nope.txt", "text")
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="unknown format 'xml'; use one of: text, jsonl, csv, icdar, icdar-lines"):
        read_documents(tmp_path / "a.txt", "xml")
    (tmp_path / "b.jsonl").write_bytes(b'{"output": "ok"}\n{"output": "\xff"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl:2: not valid UTF-8"):
        read_documents(tmp_path / "b.jsonl", "jsonl")


# --------------------------------------------------------------------------- windows

WORDS = ("the of and a to in is was that for on with as by at from his her it an be this which were "
         "parliament correspondence extraordinary committee Wednesday yesterday inquest").split()


def random_text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        parts.append(rng.choice(WORDS) + rng.choice([" "] * 8 + [". ", ", ", "\n", "! "]))
    return "".join(parts)


def ocr_noise(rng: random.Random, text: str) -> str:
    """Substitutions, lost and spurious spaces, deletions: the shapes real OCR errors take."""
    out = []
    for ch in text:
        r = rng.random()
        if r < 0.04:
            out.append(rng.choice("1lI0oce."))
        elif r < 0.06 and ch == " ":
            continue
        elif r < 0.08:
            out.append(ch + " ")
        elif r < 0.09:
            continue
        else:
            out.append(ch)
    return "".join(out)


def check_windows(doc: Document, max_chars: int) -> list[Segment]:
    windows = pair_segments_to_windows(doc, max_chars)
    assert windows and all(0 < len(w.output) <= max_chars for w in windows)
    assert all(w.output == w.output.strip() for w in windows)
    # No word is cut: re-joining the windows with spaces gives the same words.
    assert " ".join(w.output for w in windows).split() == joined(doc).split()
    if doc.segments[0].input is not None:
        assert " ".join(w.input for w in windows).split() == joined(doc, "input").split()
    return windows


@pytest.mark.parametrize("max_chars", [24, 60, 200])
def test_windows_clean_respect_limit_and_words(max_chars):
    rng = random.Random(max_chars)
    text = random_text(rng, 400)
    pieces = [p + "\n" for p in text.split("\n")]
    check_windows(Document("d", [Segment(None, p) for p in pieces]), max_chars)
    check_windows(Document("one", [Segment(None, text)]), max_chars)  # a single long segment


@pytest.mark.parametrize("max_chars", [24, 60, 200])
def test_windows_paired_respect_limit_and_words(max_chars):
    rng = random.Random(max_chars)
    sentences = [random_text(rng, rng.randint(3, 40)) for _ in range(30)]
    # Segments end at whitespace on both sides, as every reader makes them.
    doc = Document("d", [Segment(ocr_noise(rng, s[:-1]) + s[-1], s) for s in sentences])
    windows = check_windows(doc, max_chars)
    assert all(len(w.input) <= 1.5 * max_chars + 10 for w in windows)


def test_windows_prefer_sentence_ends_and_group_small_segments():
    doc = Document("d", [Segment(None, w) for w in "One two three. Four five six seven eight nine.".split(" ")])
    doc.segments = [Segment(None, s.output + " ") for s in doc.segments]
    assert [w.output for w in pair_segments_to_windows(doc, 30)] == [
        "One two three.", "Four five six seven eight", "nine."
    ]
    paired = Document("p", [Segment("Tbe cat sat. 0n tbe mat", "The cat sat. On the mat")])
    assert pair_segments_to_windows(paired, 16) == [Segment("Tbe cat sat.", "The cat sat."), Segment("0n tbe mat", "On the mat")]


def test_windows_do_not_cut_words_when_ocr_lost_spaces():
    gold = "the quick brown fox jumps over the lazy dog and runs away"
    doc = Document("d", [Segment(gold.replace(" ", ""), gold)])
    for w in pair_segments_to_windows(doc, 20):
        assert len(w.output) <= 20
    assert "".join(w.input for w in pair_segments_to_windows(doc, 20)) == gold.replace(" ", "")


# --------------------------------------------------------------------------- real data (../shared)


@pytest.fixture(scope="module")
def ocr_dir() -> Path:
    if not OCR_DATA.is_dir():
        pytest.skip("../shared/data/ocr not present (fresh clone): real-data reader checks need it")
    return OCR_DATA


def corpus_cer(pairs) -> tuple[float, int]:
    dist = chars = 0
    for ocr, gold in pairs:
        dist += Levenshtein.distance(ocr, gold)
        chars += len(gold)
    return 100 * dist / chars, chars


@pytest.mark.shared
def test_bln600_documents_and_cer(ocr_dir):
    docs = read_documents(ocr_dir / "bln600" / "train.csv", "csv")
    assert len(docs) == 480
    assert sum(len(d.segments) for d in docs) == 10_400
    # Over the rows themselves (segments without the separator space we add).
    cer, chars = corpus_cer((s.input.strip(), s.output.strip()) for d in docs for s in d.segments)
    assert cer == pytest.approx(6.22, abs=0.05)
    assert chars == pytest.approx(1_333_380, rel=0.001)
    windows = [w for d in docs for w in pair_segments_to_windows(d, 256)]
    assert max(len(w.output) for w in windows) <= 256


@pytest.mark.shared
def test_icdar2019_nl1_rule_and_cer(ocr_dir):
    docs = read_documents(ocr_dir / "icdar2019-nl" / "NL1", "icdar")
    assert len(docs) == 49
    cer, chars = corpus_cer((joined(d, "input"), joined(d)) for d in docs)
    assert cer == pytest.approx(32.0, abs=0.1)
    assert chars == pytest.approx(208_748, rel=0.005)
    for doc in docs[:10]:
        check_windows(Document(doc.doc_id, [s for s in doc.segments if s.output.strip()]), 300)


@pytest.mark.shared
@pytest.mark.parametrize("inp, gs, n_docs, cer", [
    ("EngMonoInput.txt", "EngMonoGS.txt", 666, 1.9),
    ("EngPerioInput.txt", "EngPerioGS.txt", 58, 13.9),
    ("France_Input.txt", "FranceGS.txt", 977, 2.0),
])
def test_icdar2017_training_pairs(ocr_dir, inp, gs, n_docs, cer):
    folder = ocr_dir / "icdar2017-train"
    docs = read_documents(folder / inp, "icdar-lines", gold_path=folder / gs)
    assert len(docs) == n_docs
    # Summed over word segments (fast; a little above whole-document Levenshtein).
    measured, _ = corpus_cer((s.input, s.output) for d in docs for s in d.segments)
    assert measured == pytest.approx(cer, abs=0.3)


def test_one_segment_document_is_one_stripped_window():
    """The shortcut for one-segment documents (a jsonl/csv row) gives what the general loop gives."""
    row = Segment("  Tbe cat sat. \n", "\tThe cat sat.\n\n")
    assert pair_segments_to_windows(Document("d", [row]), 20) == [Segment("Tbe cat sat.", "The cat sat.")]
    assert pair_segments_to_windows(Document("d", [Segment(None, " Clean text. ")]), 20) == [Segment(None, "Clean text.")]
    assert pair_segments_to_windows(Document("d", [Segment("ocr only", "  \n")]), 20) == []     # no gold: dropped
    # too long on either side: cut at word boundaries as before, not one window
    long_gold = Document("d", [Segment("one two three four five six", "one two three four five six")])
    assert [w.output for w in pair_segments_to_windows(long_gold, 14)] == ["one two three", "four five six"]
    long_ocr = Document("d", [Segment("x" * 8 + " " + "y" * 8 + " " + "z" * 8, "short gold text")])
    assert len(pair_segments_to_windows(long_ocr, 15)) > 1
