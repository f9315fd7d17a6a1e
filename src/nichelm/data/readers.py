"""Read OCR post-correction corpora and clean text into Documents of aligned Segments.

Every reader returns the same shape: a Document is a list of small Segments whose
texts, concatenated, give the document back (each segment keeps its trailing
separator whitespace). Paired segments hold the noisy OCR side (`input`) and the
gold side (`output`); clean segments have `input=None` and get synthetic noise
later. Keeping segments small and aligned lets `pair_segments_to_windows` build
training windows of any size without ever cutting inside a word, and keeps
documents whole so train/validation splits can be made by document.

Formats: "text", "jsonl", "csv" (BLN600 layout by default), "icdar" (ICDAR
2017/2019 three-line files) and "icdar-lines" (ICDAR 2017 training Input/GS
line pairs). Bad input raises UserError with one line naming the file and fix.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from pathlib import Path

from rapidfuzz.distance import Hamming, Levenshtein

from nichelm.errors import UserError

FORMATS = ("text", "jsonl", "csv", "icdar", "icdar-lines")

# Gap marker used in alignments we build ourselves; it cannot clash with '@' or
# '#' in real OCR text. NUL characters in the texts themselves are dropped there.
PAD = "\x00"

# Above this many cells (len(a) * len(b)) a direct Levenshtein alignment gets slow
# (it is quadratic: 195k x 195k chars takes ~3 s), so we anchor on unique words first.
_DIRECT_ALIGN_CELLS = 4_000_000

_BLN_ID, _BLN_INPUT, _BLN_OUTPUT = "Sample ID", "OCR Text", "Ground Truth"
_ICDAR_TAGS = ("[OCR_toInput]", "[OCR_aligned]", "[ GS_aligned]")
_WORD = re.compile(r"\S+")
_WS = re.compile(r"\s")
_ONE_OBJECT = "each line must be one JSON object"


@dataclass
class Segment:
    input: str | None  # noisy / OCR side; None for clean text (noise is added later by another module)
    output: str  # gold / clean side


@dataclass
class Document:
    doc_id: str  # unique within its source (file name, "Sample ID", line number...)
    segments: list[Segment]  # in reading order; concatenating them gives the document
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- entry point


def read_documents(
    path: Path,
    fmt: str,
    *,
    input_field: str = "input",
    output_field: str = "output",
    text_field: str = "text",
    id_field: str | None = None,
    gold_path: Path | None = None,
    meta_fields: Sequence[str] = (),
) -> list[Document]:
    """Read one source into Documents; raise UserError on anything the user must fix.

    meta_fields: jsonl fields / csv columns copied into each Document's meta (a csv document: from its
    first row); a record without one simply lacks it.

    Documents whose gold side is empty are dropped (nothing to learn from them);
    a source left with no document at all is an error, since it almost always
    means a wrong path or format.
    """
    if fmt not in FORMATS:
        raise UserError(f"{path}: unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; check the path in the source")
    if fmt == "text":
        docs = _read_text_docs(path)
    elif fmt == "jsonl":
        docs = _read_jsonl(_require_file(path, fmt), input_field, output_field, id_field, meta_fields)
    elif fmt == "csv":
        docs = _read_csv(_require_file(path, fmt), input_field, output_field, text_field, id_field, meta_fields)
    elif fmt == "icdar":
        docs = _read_icdar(path)
    else:
        docs = _read_icdar_lines(_require_file(path, fmt), gold_path)
    docs = [d for d in docs if any(s.output.strip() for s in d.segments)]
    if not docs:
        raise UserError(f"{path}: no documents found; check the path and format")
    return docs


# --------------------------------------------------------------------------- file access


def _require_file(path: Path, fmt: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: is not a file; format {fmt!r} reads one file, give its path")
    return path


def _read_text(path: Path) -> str:
    """Whole file as str (gunzipped if it ends in .gz); UTF-8 errors name the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: not a valid gzip file ({e}); re-compress it or drop the .gz suffix") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    """Split at '\\n' only (str.splitlines would also split at \\x0c, \\u2028... found in OCR)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


# --------------------------------------------------------------------------- clean text


def _line_segments(text: str) -> list[Segment]:
    """Clean segments at line boundaries; blank lines stay attached as trailing whitespace."""
    pieces = re.findall(r"[^\n]*\n|[^\n]+", text)
    return _merge_blank([Segment(None, p) for p in pieces])


def _merge_blank(segments: list[Segment]) -> list[Segment]:
    """Fold whitespace-only segments into their neighbour so no segment is empty of words."""
    merged: list[Segment] = []
    carry_in, carry_out = "", ""  # whitespace before the first real segment
    for seg in segments:
        blank = not seg.output.strip() and not (seg.input or "").strip()
        if blank and merged:
            last = merged[-1]
            last.output += seg.output
            if last.input is not None:
                last.input += seg.input or ""
        elif blank:
            carry_in += seg.input or ""
            carry_out += seg.output
        else:
            if carry_out or carry_in:
                seg.output = carry_out + seg.output
                if seg.input is not None:
                    seg.input = carry_in + seg.input
                carry_in, carry_out = "", ""
            merged.append(seg)
    if not merged and (carry_out or carry_in):
        merged.append(Segment(carry_in if segments[0].input is not None else None, carry_out))
    return merged


def _read_text_docs(path: Path) -> list[Document]:
    """One clean Document per .txt / .txt.gz file; directories are read recursively."""
    if path.is_file():
        files = [(path.name, path)]
    else:
        found = [p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz"))]
        files = sorted((p.relative_to(path).as_posix(), p) for p in found)
    docs = []
    for rel, file in files:
        text = _read_text(file).replace("\r\n", "\n")
        docs.append(Document(rel, _line_segments(text)))
    return docs


# --------------------------------------------------------------------------- jsonl


def _read_jsonl(path: Path, input_field: str, output_field: str, id_field: str | None,
                meta_fields: Sequence[str] = ()) -> list[Document]:
    """One Document per JSON line; a line without `input_field` is clean text."""
    docs, seen = [], set()
    for lineno, line in enumerate(_lines(_read_text(path)), 1):
        doc = jsonl_document(line, lineno, path, input_field, output_field, id_field, seen, meta_fields)
        if doc is not None:
            docs.append(doc)
    return docs


def jsonl_document(line: str, lineno: int, path, input_field: str, output_field: str, id_field: str | None,
                   seen: set, meta_fields: Sequence[str] = ()) -> Document | None:
    """One jsonl line (without its line end) as a Document, or None for a blank line; a bad line is a
    UserError naming path:lineno. `seen` holds the ids met so far (id_field). The one parser of a
    jsonl line: readers read whole files with it, prepare's pipeline reads pieces of big files."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); {_ONE_OBJECT}") from None
    except RecursionError:
        raise UserError(f"{path}:{lineno}: JSON nested too deeply to read; {_ONE_OBJECT} of text fields") from None
    except ValueError:  # Python refuses to convert integers of over 4300 digits
        raise UserError(f"{path}:{lineno}: JSON number too long to read; store long numbers as strings") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{lineno}: not a JSON object (got {type(obj).__name__}); {_ONE_OBJECT}")
    output = _json_str(obj, output_field, path, lineno, required=True)
    inp = _json_str(obj, input_field, path, lineno, required=False) if input_field else None
    doc_id = str(lineno)
    if id_field:
        if id_field not in obj:
            raise UserError(f"{path}:{lineno}: no field {id_field!r} (fields: {_field_names(obj)}); "
                            "set id_field in the source")
        doc_id = _text_or_error(str(obj[id_field]), id_field, path, lineno)
        if doc_id in seen:
            raise UserError(f"{path}:{lineno}: duplicate id {doc_id!r} in field {id_field!r}; ids must be unique")
        seen.add(doc_id)
    segments = _line_segments(output) if inp is None else [Segment(inp, output)]
    return Document(doc_id, segments, {"line": lineno, **{k: obj[k] for k in meta_fields if k in obj}})


def _json_str(obj: dict, key: str, path: Path, lineno: int, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise UserError(f"{path}:{lineno}: no field {key!r} (fields: {_field_names(obj)}); "
                            "set output_field in the source")
        return None
    if not isinstance(value, str):
        kind = type(value).__name__
        raise UserError(f"{path}:{lineno}: field {key!r} is a {kind}, not a string; store text as a JSON string")
    return _text_or_error(value, key, path, lineno)


def _field_names(obj: dict) -> str:
    # repr: a key may hold a newline or any other character that would break the one-line message
    return ", ".join(repr(k) for k in obj) or "none"


def _text_or_error(value: str, key: str, path: Path, lineno: int) -> str:
    """The value, unless it holds a lone surrogate (JSON's "\\ud800" escape): that is no text and
    cannot be written as UTF-8 by any later stage, so we stop here, naming the line."""
    if value.isascii():          # no surrogate possible: skip the copy encode() makes (prepare's hot path)
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{path}:{lineno}: field {key!r} holds a lone surrogate (an unpaired {value[e.start]!r} escape) "
            f"at character {e.start}; fix that escape or drop it"
        ) from None
    return value


# --------------------------------------------------------------------------- csv


def _read_csv(
    path: Path, input_field: str, output_field: str, text_field: str, id_field: str | None,
    meta_fields: Sequence[str] = (),
) -> list[Document]:
    """Rows grouped into Documents by id column (BLN600: one row per sentence).

    Paired mode (default) reads the BLN600 columns unless other names are given.
    Clean mode (`input_field=""`) reads `text_field`. Rows sharing an id form one
    Document in both modes, so a document's sentences are never split between
    train and validation; without an id column each row is its own Document.
    """
    csv.field_size_limit(2**31 - 1)  # whole documents can exceed the 128 KiB default
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: no documents found; check the path and format") from None
    except csv.Error as e:
        raise UserError(f"{path}:1: bad CSV ({e}); check quoting") from None
    clean = input_field == ""
    if clean:
        in_col = None
        out_col = _column(header, text_field, "text_field", path)
    else:
        in_col = _column(header, _csv_default(input_field, "input", _BLN_INPUT, header), "input_field", path)
        out_col = _column(header, _csv_default(output_field, "output", _BLN_OUTPUT, header), "output_field", path)
    if id_field:
        id_col = _column(header, id_field, "id_field", path)
    else:
        id_col = header.index(_BLN_ID) if _BLN_ID in header else None
    meta_cols = {name: _column(header, name, "meta_fields", path) for name in meta_fields}
    need = max(c for c in (in_col, out_col, id_col, *meta_cols.values()) if c is not None)
    meta: dict[str, dict] = {}

    groups: dict[str, list[tuple[str | None, str]]] = {}
    first_row: dict[str, int] = {}
    rowno = 0
    try:
        for row in reader:
            if not row:
                continue
            rowno += 1
            if len(row) <= need:
                raise UserError(
                    f"{path}:{reader.line_num}: row has {len(row)} fields but column {need} is needed; "
                    "check quoting and the column settings"
                )
            doc_id = row[id_col] if id_col is not None else str(rowno)
            groups.setdefault(doc_id, []).append((None if clean else row[in_col], row[out_col]))
            if doc_id not in first_row:
                meta[doc_id] = {name: row[c] for name, c in meta_cols.items()}
            first_row.setdefault(doc_id, rowno)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({e}); check quoting") from None
    return [
        Document(doc_id, _rows_to_segments(rows), {"row": first_row[doc_id], **meta[doc_id]})
        for doc_id, rows in groups.items()
    ]


def _csv_default(value: str, default: str, bln_name: str, header: list[str]) -> str:
    """A field left at its generic default means the BLN600 column (or a literal 'input' column)."""
    if value != default:
        return value
    if bln_name not in header and default in header:
        return default
    return bln_name


def _column(header: list[str], spec: str, setting: str, path: Path) -> int:
    """Column index from a name, or from a 0-based integer (needed when header names repeat)."""
    if spec in header:
        return header.index(spec)
    if spec.isascii() and spec.isdigit() and int(spec) < len(header):  # not '²', which isdigit() too
        return int(spec)
    cols = ", ".join(repr(h) for h in header)
    raise UserError(f"{path}: no column {spec!r} (columns: {cols}); set {setting} in the source")


def _rows_to_segments(rows: list[tuple[str | None, str]]) -> list[Segment]:
    """One segment per row (clean rows split at lines); rows are separated by one space."""
    segments: list[Segment] = []
    for k, (inp, out) in enumerate(rows):
        last = k == len(rows) - 1
        if inp is None:
            row_segs = _line_segments(out) or [Segment(None, out)]
        else:
            row_segs = [Segment(inp, out)]
        if not last:
            tail = row_segs[-1]
            tail.output = _with_space(tail.output)
            if tail.input is not None:
                tail.input = _with_space(tail.input)
        segments.extend(row_segs)
    return segments


def _with_space(text: str) -> str:
    return text if text[-1:].isspace() else text + " "


# --------------------------------------------------------------------------- alignment core


def _drop_gold_gaps(ocr_al: str, gold_al: str, pattern: str) -> tuple[str, str]:
    """Remove the columns matched by `pattern` in the aligned gold from both sides."""
    if "#" not in gold_al:
        return ocr_al, gold_al
    keep_o, keep_g, pos = [], [], 0
    for m in re.finditer(pattern, gold_al):
        keep_o.append(ocr_al[pos : m.start()])
        keep_g.append(gold_al[pos : m.start()])
        pos = m.end()
    keep_o.append(ocr_al[pos:])
    keep_g.append(gold_al[pos:])
    return "".join(keep_o), "".join(keep_g)


def _segments_from_columns(ocr_al: str, gold_al: str, pad: str) -> list[Segment]:
    """Cut two equal-length aligned strings after runs of columns that are whitespace on both sides.

    Each segment keeps its trailing whitespace and has `pad` removed, so joining
    the segments gives exactly the de-padded aligned strings.
    """
    both = {m.start() for m in _WS.finditer(gold_al) if ocr_al[m.start()].isspace()}
    cuts = sorted(i + 1 for i in both if i + 1 not in both and i + 1 < len(gold_al))
    bounds = zip([0, *cuts], [*cuts, len(gold_al)])
    pieces = [Segment(ocr_al[s:e].replace(pad, ""), gold_al[s:e].replace(pad, "")) for s, e in bounds]
    return _merge_blank(pieces)


def _align(ocr: str, gold: str) -> tuple[str, str]:
    """Character alignment of two strings as equal-length strings padded with PAD."""
    ocr, gold = ocr.replace(PAD, ""), gold.replace(PAD, "")
    if len(ocr) * len(gold) <= _DIRECT_ALIGN_CELLS:
        return _align_direct(ocr, gold)
    anchors = _word_anchors(ocr, gold)
    if not anchors:
        return _align_direct(ocr, gold)
    parts_o, parts_g, pa, pb = [], [], 0, 0
    for a, b, n in anchors:
        o, g = _align(ocr[pa:a], gold[pb:b])
        parts_o += [o, ocr[a : a + n]]
        parts_g += [g, gold[b : b + n]]
        pa, pb = a + n, b + n
    o, g = _align(ocr[pa:], gold[pb:])
    return "".join(parts_o) + o, "".join(parts_g) + g


def _align_direct(ocr: str, gold: str) -> tuple[str, str]:
    """Exact Levenshtein alignment (rapidfuzz opcodes; 'replace' blocks are 1:1)."""
    parts_o, parts_g = [], []
    for op in Levenshtein.opcodes(ocr, gold):
        o, g = ocr[op.src_start : op.src_end], gold[op.dest_start : op.dest_end]
        if op.tag == "delete":
            g = PAD * len(o)
        elif op.tag == "insert":
            o = PAD * len(g)
        parts_o.append(o)
        parts_g.append(g)
    return "".join(parts_o), "".join(parts_g)


def _word_anchors(a: str, b: str) -> list[tuple[int, int, int]]:
    """Words occurring exactly once in each string, kept in a common order (patience diff).

    Returns (start in a, start in b, length) triples, increasing in both strings;
    aligning only the gaps between them keeps long documents near-linear.
    """
    def unique_words(text: str) -> dict[str, int]:
        pos: dict[str, int] = {}
        dup: set[str] = set()
        for m in _WORD.finditer(text):
            w = m.group()
            if w in pos:
                dup.add(w)
            pos[w] = m.start()
        return {w: p for w, p in pos.items() if w not in dup}

    ua, ub = unique_words(a), unique_words(b)
    pairs = sorted((pb, ua[w], len(w)) for w, pb in ub.items() if w in ua)
    # Longest increasing subsequence of positions in `a` (pairs are sorted by position in `b`).
    tails: list[int] = []  # a-position ending the best chain of each length
    tail_idx: list[int] = []
    prev = [-1] * len(pairs)
    for k, (_, pa, _) in enumerate(pairs):
        j = bisect.bisect_left(tails, pa)
        if j == len(tails):
            tails.append(pa)
            tail_idx.append(k)
        else:
            tails[j], tail_idx[j] = pa, k
        prev[k] = tail_idx[j - 1] if j else -1
    chain, k = [], tail_idx[-1] if tail_idx else -1
    while k >= 0:
        pb, pa, n = pairs[k]
        chain.append((pa, pb, n))
        k = prev[k]
    return chain[::-1]


# --------------------------------------------------------------------------- icdar


def _read_icdar(path: Path) -> list[Document]:
    """ICDAR 2017/2019 three-line files; a directory is read recursively (hidden files skipped)."""
    if path.is_file():
        files = [(path.name, path)]
    else:
        found = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        files = sorted((p.relative_to(path).as_posix(), p) for p in found)
    docs = []
    for rel, file in files:
        text = _read_text(file)
        if not text.strip():
            continue  # an empty file holds no document; a source of only these is reported as empty
        ocr_al, gold_al = _icdar_aligned(file, text)
        if len(ocr_al) != len(gold_al):
            raise UserError(
                f"{file}: [OCR_aligned] has {len(ocr_al)} characters but [ GS_aligned] has {len(gold_al)}; "
                "the aligned lines must have equal length"
            )
        # The ICDAR scoring rule: drop '#' columns (no gold) from both sides, then remove '@' padding.
        ocr_al, gold_al = _drop_gold_gaps(ocr_al, gold_al, "#+")
        folder = Path(rel).parent.as_posix()
        docs.append(Document(rel, _segments_from_columns(ocr_al, gold_al, "@"), {"folder": folder}))
    return docs


def _icdar_aligned(file: Path, text: str) -> tuple[str, str]:
    """The [OCR_aligned] and [ GS_aligned] contents (one separating space removed)."""
    found: dict[str, str] = {}
    for line in _lines(text):
        for tag in _ICDAR_TAGS:
            if line.startswith(tag) and tag not in found:
                value = line[len(tag) :]
                found[tag] = value[1:] if value.startswith(" ") else value
    for tag in _ICDAR_TAGS[1:]:
        if tag not in found:
            raise UserError(
                f"{file}: no '{tag}' line; fmt 'icdar' needs [OCR_toInput] / [OCR_aligned] / [ GS_aligned] lines"
            )
    return found[_ICDAR_TAGS[1]], found[_ICDAR_TAGS[2]]


def _read_icdar_lines(path: Path, gold_path: Path | None) -> list[Document]:
    """ICDAR 2017 training pairs: line N of the Input file with line N of the GS file.

    Two layouts exist. (a) Both lines have equal length and are column-aligned
    with '@' (EngMono): apply the ICDAR rule per column, as for "icdar" files.
    (b) The Input line is raw OCR and only the gold is '@'-aligned (EngPerio,
    France): remove '@' from gold, align the raw OCR to it with Levenshtein
    opcodes, drop gold '#' characters with the OCR characters aligned to them
    (including OCR-only characters inside or next to a '#' run), and cut where
    both sides are whitespace. Equal length alone does not prove (a): some
    France pairs have equal length by chance, so we also require the column
    mismatches to be close to the edit distance (see _looks_column_aligned).
    """
    if gold_path is None:
        raise UserError(f"{path}: fmt 'icdar-lines' needs gold_path (the GS file paired with this Input file)")
    gold_path = Path(gold_path)
    if not gold_path.is_file():
        raise UserError(f"{gold_path}: no such file; check gold_path in the source")
    ocr_lines, gold_lines = _lines(_read_text(path)), _lines(_read_text(gold_path))
    if len(ocr_lines) != len(gold_lines):
        raise UserError(
            f"{path}: {len(ocr_lines)} lines but {gold_path} has {len(gold_lines)}; "
            "line N of the Input file must pair with line N of the GS file"
        )
    docs = []
    for n, (ocr, gold) in enumerate(zip(ocr_lines, gold_lines), 1):
        aligned = _looks_column_aligned(ocr, gold)
        if aligned:
            ocr_al, gold_al = _drop_gold_gaps(ocr, gold, "#+")
            segments = _segments_from_columns(ocr_al, gold_al, "@")
        else:
            ocr_al, gold_al = _align(ocr, gold.replace("@", ""))
            ocr_al, gold_al = _drop_gold_gaps(ocr_al, gold_al, f"[#{PAD}]*#[#{PAD}]*")
            segments = _segments_from_columns(ocr_al, gold_al, PAD)
        docs.append(Document(f"{path.name}:{n}", segments, {"line": n, "column_aligned": aligned}))
    return docs


def _looks_column_aligned(ocr: str, gold: str) -> bool:
    """Equal-length lines whose column mismatches are about the edit distance.

    Columns of a true alignment form an edit script, so the Levenshtein distance
    of the de-padded strings is at most the mismatch count and close to it; a
    raw line that merely has the same length drifts out of step and mismatches
    far more columns than its edit distance.
    """
    if len(ocr) != len(gold):
        return False
    mismatches = Hamming.distance(ocr, gold)
    if mismatches == 0:
        return True
    lev = Levenshtein.distance(ocr.replace("@", ""), gold.replace("@", ""), score_cutoff=mismatches)
    return mismatches <= 2 * lev + 10


# --------------------------------------------------------------------------- windows


def pair_segments_to_windows(doc: Document, max_chars: int) -> list[Segment]:
    """Group consecutive segments into windows of at most `max_chars` output characters.

    Windows are cut only between segments (input is held to about 1.5 x max_chars);
    when a window overflows we go back to the last sentence end if that keeps it at
    least half full. A segment too long on its own is first cut at word boundaries
    (on both sides for paired ones, see _cut_points). Clean and paired segments
    never share a window. Windows are stripped; empty ones are dropped (OCR-only
    stretches with no gold teach nothing).
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    max_in = int(max_chars * 1.5)
    if len(doc.segments) == 1:   # one segment that fits (a jsonl/csv row): the loop below would give just this
        seg = doc.segments[0]
        output = seg.output.strip()
        if len(output) <= max_chars and (seg.input is None or len(seg.input.strip()) <= max_in):
            return [Segment(None if seg.input is None else seg.input.strip(), output)] if output else []
    windows: list[Segment] = []
    cur: list[Segment] = []
    out_len = in_len = 0  # raw lengths of `cur`
    brk = brk_len = 0  # segments in `cur` up to the last sentence end, and their output length

    for piece in (p for seg in doc.segments for p in _fit_segment(seg, max_chars, max_in)):
        clean = piece.input is None
        while cur and not (
            (cur[0].input is None) == clean
            and out_len + len(piece.output.rstrip()) <= max_chars
            and (clean or in_len + len(piece.input.rstrip()) <= max_in)
        ):
            same_kind = (cur[0].input is None) == clean
            k = brk if same_kind and 0 < brk < len(cur) and brk_len >= max_chars // 2 else len(cur)
            windows.append(_join(cur[:k]))
            cur = cur[k:]
            out_len = sum(len(s.output) for s in cur)
            in_len = sum(len(s.input or "") for s in cur)
            brk = brk_len = 0
        cur.append(piece)
        out_len += len(piece.output)
        in_len += len(piece.input or "")
        if _ends_sentence(piece.output):
            brk, brk_len = len(cur), out_len
    if cur:
        windows.append(_join(cur))
    return [w for w in windows if w.output]


def _join(segments: list[Segment]) -> Segment:
    output = "".join(s.output for s in segments).strip()
    if segments[0].input is None:
        return Segment(None, output)
    return Segment("".join(s.input for s in segments).strip(), output)


def _ends_sentence(text: str) -> bool:
    body = text.rstrip()
    return bool(body) and (body[-1] in ".!?" or "\n" in text[len(body) :])


def _fit_segment(seg: Segment, max_out: int, max_in: int) -> list[Segment]:
    """The segment itself if it fits, else pieces cut at word boundaries on both sides."""
    if len(seg.output.strip()) <= max_out and (seg.input is None or len(seg.input.strip()) <= max_in):
        return [seg]
    if seg.input is None:
        ocr_al, gold_al = PAD * len(seg.output), seg.output
    else:
        ocr_al, gold_al = _align(seg.input, seg.output)
    ocr, gold = ocr_al.replace(PAD, ""), gold_al.replace(PAD, "")
    bounds = [(0, 0), *_cut_points(ocr_al, gold_al, max_out, max_in), (len(gold), len(ocr))]
    return [
        Segment(None if seg.input is None else ocr[i0:i1], gold[g0:g1])
        for (g0, i0), (g1, i1) in zip(bounds, bounds[1:])
    ]


def _cut_points(ocr_al: str, gold_al: str, max_out: int, max_in: int) -> list[tuple[int, int]]:
    """Cut points (gold offset, OCR offset) giving pieces of at most max_out gold characters.

    Gold is cut only right after whitespace. The OCR offset comes from the
    alignment; when it falls inside an OCR word (lost spaces, garbage, a gold
    passage the OCR missed) we prefer another cut, and failing that move the OCR
    cut to the nearest OCR word boundary, so neither side is ever cut inside a
    word. We take the furthest cut that fits, or the furthest sentence end
    ('. ', '! ', '? ', newline) that fills at least half the limit. The OCR limit
    max_in is soft; only a gold word longer than max_out is cut inside.
    Trailing whitespace does not count toward the limits (windows are stripped).
    """
    gold, out_pre, out_ws = _padded_coords(gold_al)
    ocr, in_pre, in_ws = _padded_coords(ocr_al)

    def boundary(ip: int) -> bool:
        return ip in (0, len(ocr)) or ocr[ip - 1].isspace() or ocr[ip].isspace()

    by_gold: dict[int, int] = {}  # gold offset after whitespace -> OCR offset (a boundary one if any)
    for c in range(1, len(gold_al)):
        gp = out_pre[c]
        if 0 < gp < len(gold) and out_ws[gp] and not gold[gp].isspace():
            if gp not in by_gold or (not boundary(by_gold[gp]) and boundary(in_pre[c])):
                by_gold[gp] = in_pre[c]
    cands = sorted(by_gold.items())

    def out_len(g0: int, g1: int) -> int:
        return g1 - g0 - out_ws[g1]

    def in_len(i0: int, i1: int) -> int:
        return i1 - i0 - in_ws[i1]

    points, gs, is_, j = [], 0, 0, 0
    while out_len(gs, len(gold)) > max_out or in_len(is_, len(ocr)) > max_in:
        while j < len(cands) and cands[j][0] <= gs:
            j += 1
        fitting = []  # (gold, ocr, OCR at a word boundary?) for cuts within the gold limit
        for gp, ip in islice(cands, j, None):
            if out_len(gs, gp) > max_out:
                break
            ip = max(ip, is_)
            fitting.append((gp, ip, boundary(ip)))
        exact = [(gp, ip) for gp, ip, ok in fitting if ok]
        both = [(gp, ip) for gp, ip in exact if in_len(is_, ip) <= max_in]
        half_full = [(gp, ip) for gp, ip in both if out_len(gs, gp) >= max_out // 2]
        sentences = [(gp, ip) for gp, ip in half_full if _sentence_end(gold, gp, out_ws)]
        if sentences or both:
            gp, ip = (sentences or both)[-1]
        elif exact:
            gp, ip = exact[0]  # the OCR runs long here; keep its piece as short as the gold allows
        elif fitting:
            gp, ip = fitting[-1][0], _snap(ocr, fitting[-1][1], is_)
        elif out_len(gs, len(gold)) <= max_out:
            break  # only the OCR is too long and it has no word boundary to cut at
        else:  # a gold word longer than the limit: hard cut at the limit
            gp = gs + max_out
            ip = max(in_pre[bisect.bisect_left(out_pre, gp)], is_)
        points.append((gp, ip))
        gs, is_ = gp, ip
    return points


def _sentence_end(gold: str, gp: int, out_ws: list[int]) -> bool:
    body = gp - out_ws[gp]
    return (body > 0 and gold[body - 1] in ".!?") or "\n" in gold[body:gp]


def _snap(ocr: str, ip: int, floor: int) -> int:
    """Move an OCR offset inside a word to the nearer end of that word (not before `floor`)."""
    left, right = ip, ip
    while left > floor and not ocr[left - 1].isspace():
        left -= 1
    while right < len(ocr) and not ocr[right].isspace():
        right += 1
    return left if ip - left < right - ip else right


def _padded_coords(aligned: str) -> tuple[str, list[int], list[int]]:
    """(text without PAD, real characters before each column, whitespace run ending before each text offset)."""
    text = aligned.replace(PAD, "")
    pre = list(accumulate((c != PAD for c in aligned), initial=0))
    ws = [0] * (len(text) + 1)
    for i, ch in enumerate(text):
        ws[i + 1] = ws[i] + 1 if ch.isspace() else 0
    return text, pre, ws
