"""Documents of the sources `select` reads, streamed one at a time (a generic source can be huge).

A Record is one document: its source's name, an id unique within the source, its text, and the
provenance the selection keeps (licence; the record's own domain and origin fields when it has
them, as the shared generic corpus does). Formats of generic and target sources:

- jsonl (.jsonl, .jsonl.gz, .jsonl.zst; a file or a folder of them): one JSON object a line, the
  text in `text_field`, the id in `id_field` (default FILE:LINE); fields "licence"/"license",
  "domain" and "source" are kept when present;
- text (.txt, .txt.gz, .txt.zst; a file or a folder): a file is one document, cut at paragraph
  boundaries into documents of about TEXT_DOC_CHARS when longer; id FILE:FIRST_LINE;
- parquet (a file or a folder of .parquet): the same columns as jsonl's fields (needs pyarrow).

The order of records is fixed (files sorted by path), so every pass over a source sees the same
documents in the same order. A Cursor follows where each record starts (file, byte offset and line;
parquet: row), and a read can start at such a place (iter_records(start=...)): select's tasks read
only their share of the sources. Bad records fail with FILE:LINE, or are counted and skipped with
the source's on_bad_record = "skip".
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nichelm.data.tokenizer import scrub_surrogates
from nichelm.errors import UserError

TEXT_DOC_CHARS = 20_000          # a text file longer than this is cut into documents at blank lines
SELECT_FORMATS = ("jsonl", "text", "parquet")
_EXTENSIONS = {"jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst"), "text": (".txt", ".txt.gz", ".txt.zst"),
               "parquet": (".parquet",)}


@dataclass(slots=True)
class Record:
    source: str          # the project's source name
    id: str              # unique within the source
    text: str
    licence: str
    domain: str = ""     # the record's own "domain" field, if any
    origin: str = ""     # the record's own "source" field (where it came from), if any


def record_row(rec: Record, cluster: int | None, weight: float | None) -> dict:
    """A record as a line of select's outputs (selected.jsonl, the partition's cluster files): id, text,
    source, licence, cluster, weight, and the record's domain and origin when it has them."""
    row = {"id": rec.id, "text": rec.text, "source": rec.source, "licence": rec.licence or "unspecified",
           "cluster": cluster, "weight": weight}
    if rec.domain:
        row["domain"] = rec.domain
    if rec.origin:
        row["origin"] = rec.origin
    return row


def _files(path: Path, fmt: str) -> list[tuple[str, Path]]:
    """(name relative to the source path, file) of a source, sorted; a single file is itself."""
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder; check the source's path")
    found = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                   if p.is_file() and p.name.endswith(_EXTENSIONS[fmt]))
    if not found:
        raise UserError(f"{path}: no {' / '.join(_EXTENSIONS[fmt])} files in this folder; check the path and format")
    return found


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst needs the zstandard package; pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_errors() -> tuple:
    errors = [OSError, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


@dataclass(slots=True)
class Cursor:
    """Where a record starts: its file (index among the source's sorted files), the byte offset of its first
    line in the (decompressed) file and that line's number; parquet: offset 0, `line` = the row (from 1)."""
    file: int = 0
    offset: int = 0
    line: int = 1


def _skip(f, path: Path, offset: int) -> None:
    """Move a file just opened to byte `offset`: a seek for a plain file; compressed ones are read up to it."""
    if not offset:
        return
    if not path.name.endswith((".gz", ".zst")):
        f.seek(offset)
        return
    while offset > 0:
        got = len(f.read(min(offset, 1 << 20)))
        if not got:
            break
        offset -= got


class BadRecord(UserError):
    """A record to skip when the source says on_bad_record = "skip"."""


def _field(obj: dict, key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _json_record(line: bytes, where: str, name: str, licence: str, text_field: str, id_field: str,
                 default_id: str) -> Record | None:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise BadRecord(f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x}); re-save the file as UTF-8") from None
    except (ValueError, RecursionError) as e:
        why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise BadRecord(f"{where}: not valid JSON ({why}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"{where}: not a JSON object (got {type(obj).__name__}); each line must be one JSON object")
    return _obj_record(obj, where, name, licence, text_field, id_field, default_id)


def _obj_record(obj: dict, where: str, name: str, licence: str, text_field: str, id_field: str,
                default_id: str) -> Record | None:
    text = obj.get(text_field)
    if text is None:
        fields = ", ".join(repr(k) for k in obj) or "none"
        raise BadRecord(f"{where}: no field {text_field!r} (fields: {fields}); set text_field in the source")
    if not isinstance(text, str):
        raise BadRecord(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
                        "store text as a string")
    if not text.strip():
        return None
    text = scrub_surrogates(text)       # a JSON "\ud800" escape is no text: U+FFFD, so it can be written out
    doc_id = default_id
    if id_field:
        if obj.get(id_field) is None:
            raise BadRecord(f"{where}: no field {id_field!r}; set id_field in the source "
                            "(or leave it empty: ids FILE:LINE)")
        doc_id = str(obj[id_field])
    return Record(name, doc_id, text, _field(obj, "licence") or _field(obj, "license") or licence,
                  _field(obj, "domain"), _field(obj, "source"))


def _jsonl(rel: str, path: Path, name: str, licence: str, text_field: str, id_field: str, at: Cursor):
    with _open(path) as f:
        _skip(f, path, at.offset)
        offset = at.offset
        for lineno, line in enumerate(f, at.line):
            start, offset = offset, offset + len(line)
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                rec = _json_record(line, f"{path}:{lineno}", name, licence, text_field, id_field, f"{rel}:{lineno}")
            except BadRecord as e:
                yield e
                continue
            if rec is not None:
                at.offset, at.line = start, lineno
                yield rec


def _text(rel: str, path: Path, name: str, licence: str, at: Cursor):
    """A text file as documents: whole, or cut at blank lines once a document passes TEXT_DOC_CHARS
    (at any line once it passes 5 x that: a file without paragraphs). A cut depends only on the lines
    since the document's start, so a read can start at any document's start."""
    with _open(path) as f:
        _skip(f, path, at.offset)
        buf, size, first, first_offset, offset = [], 0, at.line, at.offset, at.offset
        for lineno, raw in enumerate(f, at.line):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                "re-save the file as UTF-8")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if buf and ((not line.strip() and size >= TEXT_DOC_CHARS) or size >= 5 * TEXT_DOC_CHARS):
                text = "".join(buf).replace("\r\n", "\n")
                if text.strip():
                    at.offset, at.line = first_offset, first
                    yield Record(name, f"{rel}:{first}", text, licence)
                buf, size, first, first_offset = [], 0, lineno, start
            buf.append(line)
            size += len(line)
        text = "".join(buf).replace("\r\n", "\n")
        if text.strip():
            at.offset, at.line = first_offset, first
            yield Record(name, f"{rel}:{first}", text, licence)


def _parquet(rel: str, path: Path, name: str, licence: str, text_field: str, id_field: str, at: Cursor):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install 'nichelm[parquet]'") from None
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(sorted(names))}); "
                        "set text_field in the source")
    if id_field and id_field not in names:
        raise UserError(f"{path}: no column {id_field!r}; set id_field in the source (or leave it empty)")
    columns = [c for c in dict.fromkeys([text_field, id_field, "licence", "license", "domain", "source"])
               if c and c in names]
    # from the row group that holds row at.line: the rows before it are counted, not read
    group, row = 0, 0
    while group < pf.num_row_groups and row + pf.metadata.row_group(group).num_rows < at.line:
        row += pf.metadata.row_group(group).num_rows
        group += 1
    for batch in pf.iter_batches(batch_size=1024, columns=columns, row_groups=range(group, pf.num_row_groups)):
        for obj in batch.to_pylist():
            row += 1
            if row < at.line:
                continue
            try:
                rec = _obj_record(obj, f"{path}: row {row}", name, licence, text_field, id_field, f"{rel}:{row}")
            except BadRecord as e:
                yield e
                continue
            if rec is not None:
                at.offset, at.line = 0, row
                yield rec


def iter_records(path: Path, fmt: str, *, name: str, licence: str = "", text_field: str = "text",
                 id_field: str = "", on_bad_record: str = "fail", counts: Counter | None = None,
                 cursor: Cursor | None = None, start: Cursor | None = None) -> Iterator[Record]:
    """The documents of one source, streamed in a fixed order; bad records raise (or are counted in
    counts["bad_records"] and skipped with on_bad_record = "skip"). `cursor`, when given, is set to where
    each record starts as it is yielded; `start` (such a place) starts the stream at that record."""
    if fmt not in SELECT_FORMATS:
        raise UserError(f"{path}: format {fmt!r} cannot be read here; use one of {', '.join(SELECT_FORMATS)}")
    path = Path(path)
    cursor = Cursor() if cursor is None else cursor
    files = _files(path, fmt)
    for index in range(start.file if start else 0, len(files)):
        rel, file = files[index]
        cursor.file = index
        cursor.offset, cursor.line = (start.offset, start.line) if start and index == start.file else (0, 1)
        if fmt == "jsonl":
            items = _jsonl(rel, file, name, licence, text_field, id_field, cursor)
        elif fmt == "text":
            items = _text(rel, file, name, licence, cursor)
        else:
            items = _parquet(rel, file, name, licence, text_field, id_field, cursor)
        try:
            for item in items:
                if isinstance(item, BadRecord):
                    if on_bad_record != "skip":
                        raise UserError(str(item))
                    if counts is not None:
                        counts["bad_records"] += 1
                    continue
                yield item
        except _read_errors() as e:
            raise UserError(f"{file}: cannot read ({e}); check the file (re-compress it if it is .gz/.zst)") from None


def guess_format(path: Path) -> str:
    """jsonl, text or parquet from a file's name or a folder's files (for --data)."""
    path = Path(path)
    names = [path.name] if path.is_file() else [p.name for p in path.rglob("*") if p.is_file()]
    for fmt in ("jsonl", "parquet", "text"):
        if any(n.endswith(_EXTENSIONS[fmt]) for n in names):
            return fmt
    raise UserError(f"{path}: no .jsonl(.gz), .txt(.gz) or .parquet file here; give held-out text in one of them")


Corpus = Callable[[], Iterator[Record]]
"""A re-readable corpus: each call starts a new pass over the same records in the same order."""


def list_corpus(records: list[Record]) -> Corpus:
    return lambda: iter(records)
