"""`nichelm prepare` as datatrove PipelineSteps: each stage of the data path is one small step.

The orchestration (which steps form which job, the executors, resume, the swap into RUN/data) is
in nichelm/prepare_pipeline.py; this module holds the steps and the pieces of work they share.

Pieces. The sources are cut into *pieces* before anything runs (`plan_pieces`): a group of small
files, one byte range of a big plain .jsonl / .txt file (cut at a line / paragraph boundary), or a
whole source for the formats that need a whole file (csv, icdar, icdar-lines) and for sources with
`max_documents`. A task of a job takes a contiguous block of pieces (`task_pieces`) and every
output is written per piece, so the result depends on the project and the piece size only: not on
the number of tasks, the workers, the executor or interruptions.

Batches travel between steps: a datatrove Document is a batch of one piece (so of one source), so
that the Python work per document or example is the step's own and not the plumbing between steps.
In the examples job a batch first holds source documents (metadata: piece, source, docs = our
readers.Document with aligned segments, up to BATCH_DOCS of them or BATCH_BYTES read; splits from
SplitDocuments); `MakeWindows` turns it into a batch of examples (metadata: piece, source, and lists
doc_ids, ws (window number in its document), splits, inputs, outputs; synthetic from AddNoise). In
the tokens job a batch is up to TOKENIZE_BATCH examples of one piece and split (ReadExampleParts).

Counts go through datatrove's own per-task stats (stat_update: logging_dir/stats/NNNNN.json, keys
"SOURCE::what"); `stage_stats` merges them. Time spent per step is datatrove's time stats
(track_time, once per batch).
"""

from __future__ import annotations

import array
import gzip
import hashlib
import io
import json
import random
import re
import shutil
import zlib
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import islice
from json.encoder import encode_basestring as _quote      # a JSON string, non-ASCII kept (ensure_ascii=False)
from pathlib import Path

import numpy as np
from datatrove.data import Document as DTDocument
from datatrove.pipeline.base import PipelineStep
from rapidfuzz.distance import Levenshtein

from nichelm.config import Project, source_name
from nichelm.data.readers import Document, _line_segments, jsonl_document, read_documents
from nichelm.data.shards import HEADER_INTS, MAGIC_U16, MAGIC_U32, VERSION_U16, VERSION_U32
from nichelm.errors import UserError
from nichelm.io import atomic_file, atomic_write_json
from nichelm.tasks import task_fingerprint

SPLITS = ("train", "val", "test")
DOC_BYTES = 1 << 20          # a text file longer than this is cut into documents at paragraph boundaries
PIECE_BYTES = 64 << 20       # default size of a piece of work (files grouped, big files cut into ranges)
SHUFFLE_EXAMPLES = 50_000    # train examples shuffled together (per piece) before they are written
WRITE_LINES = 4096           # other lines of a piece's parts written in one call (a call per line costs more)
BATCH_DOCS = 1024            # source documents per batch of the examples job ...
BATCH_BYTES = 1 << 20        # ... or fewer, once their bytes read reach this
TOKENIZE_BATCH = 2048        # examples per batch of the tokens job (one encode call each)
COMPRESSED = (".gz", ".zst")
SEP = "::"                   # stats keys: "SOURCE::what"


# ------------------------------------------------------------------ pieces


@dataclass
class Piece:
    index: int                       # position in the global order of the output
    source: int                      # index into project.sources
    files: list[list[str]]           # [[id, path], ...]: id is the file's name in doc ids (as readers.py names it)
    start: int = 0                   # a byte range of files[0] (plain .jsonl / .txt only) ...
    end: int = -1                    # ... -1: to the end
    first_line: int = 1              # line number at `start`
    size: int = 0                    # bytes, for progress and the tokenizer sample rate
    whole: bool = False              # read with readers.read_documents (csv, icdar, icdar-lines)


def drain(data) -> None:
    """Run the steps before this one to the end: a step that works on files, not on the documents
    flowing in, must not start before the steps that write those files have finished."""
    for _ in data or ():
        pass


def task_pieces(rank: int, world_size: int, n_pieces: int) -> range:
    """The contiguous block of pieces task `rank` of `world_size` works on."""
    return range(rank * n_pieces // world_size, (rank + 1) * n_pieces // world_size)


def _text_files(path: Path) -> list[list[str]]:
    if path.is_file():
        return [[path.name, str(path)]]
    found = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(f".txt{c}" for c in ("", *COMPRESSED)))]
    return [[rel, str(p)] for rel, p in sorted((p.relative_to(path).as_posix(), p) for p in found)]


def plan_pieces(project: Project, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Cut every source into pieces (see the module docstring). Reads only a few bytes around each cut,
    plus a count of lines before each cut of a big file (for FILE:LINE messages)."""
    from nichelm.prepare import FILTERS
    pieces: list[Piece] = []

    def add(**kw):
        pieces.append(Piece(index=len(pieces), **kw))

    for i, src in enumerate(project.sources):
        path = project.resolve(src.path)
        where = f"{project.source_file}: sources[{i}]"
        for name in src.filters:
            if name not in FILTERS:
                raise UserError(f"{where}: unknown filter {name!r}; known filters: {', '.join(FILTERS)}")
        if src.format in ("csv", "icdar", "icdar-lines"):
            add(source=i, files=[[path.name, str(path)]], whole=True, size=_size(path))
            continue
        if src.format == "jsonl":
            if not path.is_file():
                raise UserError(f"{path}: is not a file; format 'jsonl' reads one file, give its path")
            files = [[path.name, str(path)]]
        else:
            files = _text_files(path)
        if src.max_documents:            # the first N documents: one piece reads the source in order
            add(source=i, files=files, size=sum(_size(Path(p)) for _, p in files))
            continue
        group, group_size = [], 0
        for rel, p in files:
            size = _size(Path(p))
            ranges = _ranges(Path(p), size, piece_bytes, src.format) \
                if size > piece_bytes and not p.endswith(COMPRESSED) else []
            if len(ranges) > 1:             # a big plain file: one piece per range
                if group:
                    add(source=i, files=group, size=group_size)
                    group, group_size = [], 0
                for start, end, line in ranges:
                    add(source=i, files=[[rel, p]], start=start, end=end, first_line=line, size=end - start)
                continue
            group.append([rel, p])
            group_size += size
            if group_size >= piece_bytes:
                add(source=i, files=group, size=group_size)
                group, group_size = [], 0
        if group or not any(pc.source == i for pc in pieces):
            add(source=i, files=group, size=group_size)
    return pieces


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


_BLANK = re.compile(rb"\n\r?\n")


def paragraph_cut(buf: bytes, base: int, g: int, cell: int) -> int | None:
    """Where a document may start in the cell [g, g + cell) of a text file: right after the first
    blank line in it, else right after its first newline, else nowhere (None).

    `buf` holds the file's bytes from offset `base` (base <= g - 2 where possible) to at least the
    end of the cell. The same rule cuts big files into pieces and pieces into documents, so pieces
    always start at document starts and the documents do not depend on the piece size.
    """
    lo, hi = max(g - 2 - base, 0), g + cell - base
    m = _BLANK.search(buf, lo, hi + 1)
    while m is not None and base + m.end() < g:               # a blank line ending before the cell
        m = _BLANK.search(buf, m.start() + 1, hi + 1)
    if m is not None and base + m.end() < g + cell:
        return base + m.end()
    nl = buf.find(b"\n", max(g - 1 - base, 0), hi - 1)
    return base + nl + 1 if nl >= 0 else None


def _line_cut(buf: bytes, base: int, g: int, cell: int) -> int | None:
    """jsonl: right after the first newline at or after g (within the cell)."""
    nl = buf.find(b"\n", max(g - 1 - base, 0), g + cell - base - 1)
    return base + nl + 1 if nl >= 0 else None


def _ranges(path: Path, size: int, piece_bytes: int, fmt: str) -> list[tuple[int, int, int]]:
    """(start, end, first line) of the byte ranges of one big plain file."""
    if fmt == "text":                 # text pieces start at document starts: a whole number of DOC_BYTES cells
        piece_bytes = max(DOC_BYTES, piece_bytes // DOC_BYTES * DOC_BYTES)
        cell, cut = DOC_BYTES, paragraph_cut
    else:
        cell, cut = piece_bytes, _line_cut
    starts = [0]
    with open(path, "rb") as f:
        for g in range(piece_bytes, size, piece_bytes):
            f.seek(max(g - 2, 0))
            base = f.tell()
            buf = f.read(g + cell - base + 1)
            q = cut(buf, base, g, cell)
            if q is not None and starts[-1] < q < size:
                starts.append(q)
        lines, line, pos = [], 1, 0
        f.seek(0)
        for s in starts:              # count newlines up to each start
            while pos < s:
                chunk = f.read(min(1 << 24, s - pos))
                line += chunk.count(b"\n")
                pos += len(chunk)
            lines.append(line)
    ends = starts[1:] + [size]
    return list(zip(starts, ends, lines))


# ------------------------------------------------------------------ reading


def open_binary(path: str):
    """A file's bytes, decompressed when it ends in .gz or .zst."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_errors():
    errors = [OSError, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _decode(data: bytes, path: str, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data[: e.start].count(b"\n")
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8") \
            from None


def read_text_docs(stream, rel: str, start: int = 0, end: int = -1, first_line: int = 1,
                   doc_bytes: int | None = None):
    """(doc_id, first line, bytes) of each document of a text file (end = -1), or of its byte range
    [start, end) when it is one piece of a big file.

    A whole file of at most doc_bytes is one document named `rel` (as readers.py reads it); a longer
    one is cut at paragraph boundaries (paragraph_cut, on a grid of doc_bytes) into documents named
    `rel@OFFSET`. `stream` is positioned at `start`; a UTF-8 byte-order mark at offset 0 is dropped."""
    doc_bytes = doc_bytes or DOC_BYTES
    pre = b""
    if start > 0:                     # the bytes just before the range: a blank line may end right at a cut
        stream.seek(start - min(start, 2))
        pre = stream.read(min(start, 2))
    base, buf = start - len(pre), bytearray(pre)
    doc_start, line, whole = start, first_line, start == 0 and end < 0
    g = (start // doc_bytes + 1) * doc_bytes
    eof = False

    def fill(upto: int) -> None:
        nonlocal eof
        while base + len(buf) < upto and not eof:
            want = upto - base - len(buf)
            if end >= 0:
                want = min(want, end - base - len(buf))
            chunk = stream.read(max(want, 1 << 16)) if want > 0 else b""
            if end >= 0:
                chunk = chunk[: max(end - base - len(buf), 0)]
            if not chunk:
                eof = True
            buf.extend(chunk)

    def emit(stop: int | None):
        data = bytes(buf[doc_start - base: None if stop is None else stop - base])
        return (data.removeprefix(b"\xef\xbb\xbf") if doc_start == 0 else data), data.count(b"\n")

    while True:
        fill(g + doc_bytes + 1)
        data_end = base + len(buf)
        if g >= data_end:
            break
        q = paragraph_cut(buf, base, g, doc_bytes)
        if q is not None and q < data_end:
            whole = False
            data, newlines = emit(q)
            yield f"{rel}@{doc_start}", line, data
            line += newlines
            del buf[: q - 2 - base]
            base, doc_start = q - 2, q
        g += doc_bytes
    data, _ = emit(None)
    if data or whole:
        yield (rel if whole else f"{rel}@{doc_start}"), line, data


class ReadSources(PipelineStep):
    """Read this task's pieces into batches of Documents, streaming (see Piece and the module docstring);
    the source's filters are applied, clean sources lose their input side. Bad records fail with
    FILE:LINE or, with on_bad_record = "skip", are counted ("SOURCE::bad_records") and logged in the
    task's log."""

    name = "read sources"
    type = "nichelm"

    def __init__(self, project: Project, pieces: list[Piece], only_sources: list[int] | None = None):
        super().__init__()
        self.project, self.pieces, self.only = project, pieces, only_sources

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.prepare import FILTERS
        counts = Counter()
        todo = range(len(self.pieces)) if self.only is not None else task_pieces(rank, world_size, len(self.pieces))
        for k in todo:
            piece = self.pieces[k]
            if self.only is not None and piece.source not in self.only:
                continue
            src = self.project.sources[piece.source]
            name = source_name(src, piece.source)
            filters, clean = [FILTERS[f] for f in src.filters], src.role == "clean"
            kept = paired = 0
            docs = self._documents(piece, src, name, counts)
            more = True
            while more:
                batch, size, more = [], 0, False
                with self.track_time():        # reading and decoding count here, not in later steps
                    for doc, nbytes in docs:
                        if not any(s.output.strip() for s in doc.segments):
                            continue    # nothing to learn from an empty gold side (as readers.py)
                        if filters or clean:
                            for seg in doc.segments:
                                for fn in filters:
                                    seg.output = fn(seg.output)
                                    if seg.input is not None:
                                        seg.input = fn(seg.input)
                                if clean:
                                    seg.input = None
                        if not clean and any(s.input is not None for s in doc.segments):
                            paired += 1
                        batch.append(doc)
                        size += nbytes
                        if src.max_documents and kept + len(batch) >= src.max_documents:
                            break
                        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
                            more = True
                            break
                if batch:
                    kept += len(batch)
                    yield DTDocument(text="", id=f"{k}/{batch[0].doc_id}",
                                     metadata={"piece": k, "source": name, "docs": batch})
            if kept:
                counts[f"{name}{SEP}documents"] += kept
            if paired:
                counts[f"{name}{SEP}paired_documents"] += paired
            counts[f"{name}{SEP}bytes"] += piece.size
        for key, value in sorted(counts.items()):
            self.stat_update(key, value=value)

    def _documents(self, piece: Piece, src, name: str, counts: Counter):
        """(Document, bytes read for it) of one piece, in order."""
        if piece.whole:
            path = Path(piece.files[0][1])
            for doc in read_documents(
                    path, src.format, input_field="" if src.role == "clean" and src.format == "csv" else src.input_field,
                    output_field=src.output_field, text_field=src.text_field, id_field=src.id_field or None,
                    gold_path=self.project.resolve(src.gold_path) if src.gold_path else None,
                    meta_fields=src.meta_fields):
                yield doc, sum(len(s.output) for s in doc.segments)
            return
        for rel, path in piece.files:
            try:
                with open_binary(path) as f:
                    items = self._jsonl(f, path, piece, src) if src.format == "jsonl" else self._text(f, rel, path, piece)
                    for item in items:
                        if isinstance(item, UserError):       # a bad record: fail, or skip and count it
                            if src.on_bad_record != "skip":
                                raise item
                            counts[f"{name}{SEP}bad_records"] += 1
                            if counts[f"{name}{SEP}bad_records"] <= 20:
                                from datatrove.utils.logging import logger
                                logger.warning(f"skipped: {item}")
                            continue
                        yield item
            except _read_errors() as e:
                raise UserError(f"{path}: cannot read ({e}); check the file (re-compress it if it is .gz/.zst)") \
                    from None

    @staticmethod
    def _text(f, rel: str, path: str, piece: Piece):
        for doc_id, line, data in read_text_docs(f, rel, piece.start, piece.end, piece.first_line):
            try:
                text = _decode(data, path, line)
            except UserError as e:
                yield e
                continue
            yield Document(doc_id, _line_segments(text.replace("\r\n", "\n"))), len(data)

    @staticmethod
    def _jsonl(f, path: str, piece: Piece, src):
        """(Document, bytes) of each line of a jsonl file or range (readers.jsonl_document); a bad line
        comes as its UserError."""
        if piece.start:
            f.seek(piece.start)
        pos, lineno = piece.start, piece.first_line - 1
        seen = set()        # ids met in this piece: ids across pieces of a big file are not compared
        for raw in f:
            if piece.end >= 0 and pos >= piece.end:
                return
            lineno += 1
            pos += len(raw)
            try:
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                text = _decode(raw, path, lineno).removesuffix("\n").removesuffix("\r")
                doc = jsonl_document(text, lineno, path, src.input_field, src.output_field, src.id_field, seen,
                                     src.meta_fields)
            except UserError as e:
                yield e
                continue
            if doc is not None:
                yield doc, len(raw)


class SplitDocuments(PipelineStep):
    """Each document's split (metadata["splits"]) from a seeded hash of (seed, source, doc id):
    prepare.split_of, as before."""

    name = "split by document"
    type = "nichelm"

    def __init__(self, project: Project):
        super().__init__()
        self.project = project

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.prepare import split_of
        cfg, seed, counts = self.project.split, self.project.seed, Counter()
        fixed = {source_name(s, i): s.split for i, s in enumerate(self.project.sources)}
        for d in data:
            with self.track_time():
                m = d.metadata
                name = m["source"]
                if fixed[name] != "auto":
                    splits = [fixed[name]] * len(m["docs"])
                else:
                    splits = [split_of(seed, name, doc.doc_id, cfg.val_fraction, cfg.test_fraction)
                              for doc in m["docs"]]
                m["splits"] = splits
                for split, n in Counter(splits).items():
                    counts[name, split] += n
            yield d
        for key, value in sorted((f"{name}{SEP}documents_{split}", v) for (name, split), v in counts.items()):
            self.stat_update(key, value=value)


class MeasureRawOCR(PipelineStep):
    """Raw OCR CER/WER of paired documents (prepare.scoring_units): the 'before' of the manifest."""

    name = "raw OCR score"
    type = "nichelm"

    def __init__(self, project: Project):
        super().__init__()
        self.formats = {source_name(s, i): s.format for i, s in enumerate(project.sources)}

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.metrics import char_distance, word_distance
        from nichelm.prepare import scoring_units
        # metrics.CorpusScore's sums, kept in a list per source: its add() costs more than the distances here
        totals: dict[str, list[int]] = {}      # source -> [char_errors, chars, word_errors, words]
        for d in data:
            with self.track_time():
                name = d.metadata["source"]
                fmt = self.formats[name]
                for doc in d.metadata["docs"]:
                    for ocr, gold in scoring_units(doc, fmt):
                        t = totals.get(name) or totals.setdefault(name, [0, 0, 0, 0])
                        t[0] += char_distance(ocr, gold)
                        t[1] += len(gold)
                        t[2] += word_distance(ocr, gold)
                        t[3] += len(gold.split())
            yield d
        for name, t in sorted(totals.items()):
            for what, value in zip(("char_errors", "chars", "word_errors", "words"), t):
                self.stat_update(f"{name}{SEP}raw_{what}", value=value)


EXAMPLE_LISTS = ("doc_ids", "ws", "splits", "inputs", "outputs")     # a batch of examples (MakeWindows on)


class MakeWindows(PipelineStep):
    """Each batch of documents -> the batch of their examples (the task's: Task.valued_examples; for
    correction readers.pair_segments_to_windows), in order: the lists EXAMPLE_LISTS of metadata (an
    input is None where noise is to make it)."""

    name = "windows"
    type = "nichelm"

    def __init__(self, task):
        super().__init__()
        self.task = task

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for d in data:
            with self.track_time():
                m = d.metadata
                doc_ids, ws, splits, inputs, outputs = lists = [], [], [], [], []
                values = []           # the number behind each banded label (None elsewhere)
                for doc, split in zip(m["docs"], m["splits"]):
                    for w, (inp, out, value) in enumerate(self.task.valued_examples(doc)):
                        doc_ids.append(doc.doc_id)
                        ws.append(w)
                        splits.append(split)
                        inputs.append(inp)
                        outputs.append(out)
                        values.append(value)
            if doc_ids:
                yield DTDocument(text="", id=d.id, metadata={"piece": m["piece"], "source": m["source"],
                                                             **dict(zip(EXAMPLE_LISTS, lists)), "values": values})


class AddNoise(PipelineStep):
    """Clean windows get a synthetic OCR input, seeded per example exactly as before
    (key "SOURCE\\0DOC_ID\\0W"; metadata["synthetic"] says which); examples with an empty side are
    dropped (counted), except the empty input of a task that reads none (Task.reads_input)."""

    name = "synthetic noise"
    type = "nichelm"

    def __init__(self, project: Project, fit_path: Path | None = None):
        super().__init__()
        self.project, self.fit_path = project, fit_path

    def make_noise(self):
        from nichelm.data.noise import OCRNoise
        cfg = self.project.noise
        if cfg.calibrate_on:
            fit = json.loads(Path(self.fit_path).read_text(encoding="utf-8"))
            return OCRNoise.from_fit(fit, seed=self.project.seed)
        return OCRNoise(target_cer=cfg.target_cer, seed=self.project.seed, profile=cfg.profile)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        noise, counts = None, Counter()
        for d in data:
            with self.track_time():
                m = d.metadata
                name, inputs, outputs = m["source"], m["inputs"], m["outputs"]
                synthetic = m["synthetic"] = [i is None for i in inputs]
                if any(synthetic):
                    noise = noise or self.make_noise()
                    for j in (j for j, syn in enumerate(synthetic) if syn):
                        inputs[j] = noise.corrupt(outputs[j], f"{name}\x00{m['doc_ids'][j]}\x00{m['ws'][j]}")
                # plain text (Task.reads_input False) has no input: only an empty output is dropped
                keep = [bool((i.strip() or not self.project.task.reads_input) and o.strip())
                        for i, o in zip(inputs, outputs)]
                if not all(keep):
                    counts[name, "windows_empty_dropped"] += keep.count(False)
                    for key in (*EXAMPLE_LISTS, "synthetic", "values"):
                        if key in m:          # values: MakeWindows' (a batch made elsewhere may have none)
                            m[key] = [x for x, kept in zip(m[key], keep) if kept]
                for split, n in Counter(m["splits"]).items():
                    counts[name, f"examples_{split}"] += n
                for inp, out, syn, split in zip(m["inputs"], m["outputs"], m["synthetic"], m["splits"]):
                    if syn and split == "train":
                        counts["", "noise_edits"] += Levenshtein.distance(inp, out)
                        counts["", "noise_chars"] += len(out)
            if m["inputs"]:
                yield d
        for key, value in sorted((f"{name}{SEP}{what}", v) for (name, what), v in counts.items()):
            self.stat_update(key, value=value)


# ------------------------------------------------------------------ stage 1 outputs


def digest_bytes(text: str) -> bytes:
    """64-bit digest of a text, for the val/test dedupe against train: 8 bytes, a little-endian uint64."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def digest(text: str) -> int:
    return int.from_bytes(digest_bytes(text), "little")


def sample_priority(seed: int, name: str, doc_id: str, w: int) -> float:
    """A train example's place in the tokenizer sample: the lowest priorities are kept."""
    h = hashlib.blake2b(f"{seed}\x00{name}\x00{doc_id}\x00{w}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


_JSON = json.JSONEncoder(ensure_ascii=False)      # json.dumps(row, ensure_ascii=False) builds one per call


def json_line(row) -> bytes:
    try:
        return (_JSON.encode(row) + "\n").encode("utf-8")
    except UnicodeEncodeError:        # a lone surrogate from a JSON escape: keep it escaped, the file stays UTF-8
        return (json.dumps(row) + "\n").encode("ascii")


def example_line(inp: str, out: str, source: str, doc_id: str, synthetic: bool, value: float | None = None) -> bytes:
    """json_line of an example's row (the line examples.*.jsonl holds), built without the dict and
    json's general encoder: half the cost, the same bytes. `value` (a banded label's number) only
    when there is one."""
    if value is not None:
        return json_line({"input": inp, "output": out, "source": source, "doc_id": doc_id,
                          "synthetic_input": synthetic, "value": value})
    try:
        return ('{"input": ' + _quote(inp) + ', "output": ' + _quote(out) + ', "source": ' + _quote(source)
                + ', "doc_id": ' + _quote(doc_id)
                + (', "synthetic_input": true}\n' if synthetic else ', "synthetic_input": false}\n')).encode("utf-8")
    except UnicodeEncodeError:
        return json_line({"input": inp, "output": out, "source": source, "doc_id": doc_id,
                          "synthetic_input": synthetic})


def part(work: Path, kind: str, split: str, piece: int, ext: str) -> Path:
    return Path(work) / "parts" / f"{kind}-{split}-{piece:06d}.{ext}"


class WriteExampleParts(PipelineStep):
    """Per piece: the examples of each split (jsonl compressed with zstd level 1: a third of gzip's
    CPU; train shuffled in buffers of SHUFFLE_EXAMPLES, seeded per piece), 64-bit digests of train
    texts and of val examples, and the train examples drawn into the tokenizer sample (priority
    below `sample_rate`)."""

    name = "write examples"
    type = "nichelm"

    def __init__(self, work: Path, seed: int, n_pieces: int, sample_rate: float, text_outputs: bool = True):
        super().__init__()
        self.work, self.seed, self.n_pieces, self.sample_rate = Path(work), seed, n_pieces, sample_rate
        self.text_outputs = text_outputs          # Task.text_outputs: outputs are deduped like inputs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        mine = task_pieces(rank, world_size, self.n_pieces)
        done, out = set(), None
        for d in data or ():
            with self.track_time():
                k = d.metadata["piece"]
                if out is None or out.piece != k:
                    if out is not None:
                        out.close()
                        done.add(out.piece)
                    out = _PieceWriter(self.work, k, self.seed, self.sample_rate, self.text_outputs)
                out.add(d.metadata)
        with self.track_time():
            if out is not None:
                out.close()
                done.add(out.piece)
            for k in mine:                      # pieces without any example still get (empty) parts
                if k not in done:
                    _PieceWriter(self.work, k, self.seed, self.sample_rate, self.text_outputs).close()
        yield from ()


class _PieceWriter:
    def __init__(self, work: Path, piece: int, seed: int, sample_rate: float, text_outputs: bool = True):
        self.piece, self.work, self.seed, self.rate = piece, work, seed, sample_rate
        self.text_outputs = text_outputs
        self.stack = ExitStack()
        self.files = {s: self._zst(part(work, "ex", s, piece, "jsonl.zst")) for s in SPLITS}
        self.files["sample"] = self._zst(part(work, "sample", "train", piece, "jsonl.zst"))
        self.rng = random.Random(f"{seed}/{piece}")
        self.buffer: list[bytes] = []
        self.lines: dict[str, list[bytes]] = {"val": [], "test": [], "sample": []}     # up to WRITE_LINES
        self.train_digests = bytearray()          # digest_bytes, one after another
        self.val_digests = bytearray()

    def _zst(self, path: Path):
        import zstandard
        raw = self.stack.enter_context(atomic_file(path))
        return self.stack.enter_context(zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False))

    def add(self, batch: dict) -> None:
        """A batch of examples (MakeWindows, AddNoise) of this piece."""
        source = batch["source"]
        values = batch.get("values") or [None] * len(batch["doc_ids"])
        for doc_id, w, split, inp, out, synthetic, value in zip(*(batch[k] for k in EXAMPLE_LISTS), batch["synthetic"],
                                                                values):
            line = example_line(inp, out, source, doc_id, synthetic, value)
            # a label is shared by every split: only text is deduped (the input stands in for a label output)
            seen_out = out if self.text_outputs else inp
            seen_in = inp or seen_out              # an empty input (plain text: Task.reads_input) matches nothing
            if split == "train":
                self.train_digests += digest_bytes(seen_in)
                self.train_digests += digest_bytes(seen_out)
                if self.rate > 0:                  # 0: no tokenizer to train (tokenizer.from)
                    u = sample_priority(self.seed, source, doc_id, w)
                    if u < self.rate:
                        self.lines["sample"].append(json_line([u, inp, out]))
                        if len(self.lines["sample"]) >= WRITE_LINES:
                            self._write("sample")
                self.buffer.append(line)
                if len(self.buffer) >= SHUFFLE_EXAMPLES:
                    self._flush()
            else:
                if split == "val":
                    self.val_digests += digest_bytes(seen_in)
                    self.val_digests += digest_bytes(seen_out)
                lines = self.lines[split]
                lines.append(line)
                if len(lines) >= WRITE_LINES:
                    self._write(split)

    def _write(self, kind: str) -> None:
        self.files[kind].write(b"".join(self.lines[kind]))
        self.lines[kind] = []

    def _flush(self) -> None:
        self.rng.shuffle(self.buffer)
        self.files["train"].write(b"".join(self.buffer))
        self.buffer = []

    def close(self) -> None:
        self._flush()
        for kind in self.lines:
            self._write(kind)
        with atomic_file(part(self.work, "dig", "train", self.piece, "npy")) as f:
            np.save(f, np.frombuffer(self.train_digests, dtype="<u8").astype(np.uint64), allow_pickle=False)
        with atomic_file(part(self.work, "dig", "val", self.piece, "npy")) as f:
            np.save(f, np.frombuffer(self.val_digests, dtype="<u8").astype(np.uint64).reshape(-1, 2),
                    allow_pickle=False)
        self.stack.close()


# ------------------------------------------------------------------ stage 0: noise calibration


class FitNoise(PipelineStep):
    """noise.calibrate_on: fit the noise on those sources' train-split pairs (prepare.calibration_pairs,
    noise.fit_noise) and write the fit; a one-task job before the examples are made."""

    name = "fit noise"
    type = "nichelm"

    def __init__(self, project: Project, out: Path):
        super().__init__()
        self.project, self.out = project, Path(out)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from nichelm.data.noise import fit_noise
        from nichelm.prepare import NOISE_TABLE_ROWS, calibration_pairs
        cfg, formats = self.project.noise, {source_name(s, i): s.format for i, s in enumerate(self.project.sources)}
        pairs = []
        for d in data:
            fmt = formats[d.metadata["source"]]
            for doc, split in zip(d.metadata["docs"], d.metadata["splits"]):
                if split == "train":       # never val/test: they measure the model
                    pairs += calibration_pairs(doc, fmt, self.project.task.window_chars)
        if not any(gold.strip() for _, gold in pairs):
            raise UserError(f"{self.project.source_file}: 'noise.calibrate_on' = {cfg.calibrate_on}: these sources "
                            "have no train-split pairs to fit the noise on; check their split setting")
        with self.track_time():
            fit = fit_noise(pairs, profile=cfg.profile, top=NOISE_TABLE_ROWS)
        if fit["target_cer"] >= 1:
            raise UserError(f"{self.project.source_file}: 'noise.calibrate_on' = {cfg.calibrate_on}: the OCR of "
                            f"these pairs has a corpus CER of {fit['target_cer']:.0%}; check input_field/output_field")
        atomic_write_json(self.out, fit)
        yield from ()


# ------------------------------------------------------------------ stage 2: merge, digests, tokenizer


def stage_stats(logs: Path) -> tuple[Counter, dict[str, float]]:
    """Every task's datatrove stats of one job, merged: (counts by key, seconds by step name)."""
    counts, seconds = Counter(), Counter()
    for f in sorted((Path(logs) / "stats").glob("*.json")):
        for step in json.loads(f.read_text(encoding="utf-8")):
            timing = step["time_stats"]          # a bare 0 when the step never timed anything
            seconds[step["name"].removeprefix("nichelm: ")] += timing.get("total", 0.0) if isinstance(timing, dict) else 0.0
            for key, metric in step["stats"].items():
                if SEP in key:
                    counts[key] += metric["total"] if isinstance(metric, dict) else metric
    return counts, dict(seconds)


class BuildDedupeSets(PipelineStep):
    """The sorted digest sets the val/test dedupe searches: train texts (for val), and train plus the
    val examples that survive (for test), as prepare did with sets of strings."""

    name = "dedupe sets"
    type = "nichelm"

    def __init__(self, work: Path, n_pieces: int, source_file: Path | None = None):
        super().__init__()
        self.work, self.n, self.source_file = Path(work), n_pieces, source_file

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        with self.track_time():
            train = np.unique(np.concatenate(
                [np.load(part(self.work, "dig", "train", k, "npy")) for k in range(self.n)] + [np.zeros(0, np.uint64)]))
            val = np.concatenate([np.load(part(self.work, "dig", "val", k, "npy")) for k in range(self.n)]
                                 + [np.zeros((0, 2), np.uint64)])
            kept = val[~(_member(val[:, 0], train) | _member(val[:, 1], train))]
            if not len(kept):                # train measures its validation loss on them
                raise UserError(f"{self.source_file}: no validation examples (no document went to the val split, or "
                                "all repeat train text); raise split.val_fraction, add documents, or give a source "
                                "split = \"val\"")
            test = np.union1d(train, kept.ravel())
            for name, arr in (("train", train), ("test", test)):
                with atomic_file(self.work / f"dedupe-{name}.npy") as f:
                    np.save(f, arr.astype(np.uint64), allow_pickle=False)
        yield from ()


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[i] == values


class TrainTokenizer(PipelineStep):
    """Train the tokenizer on the seeded sample of train examples: the candidates written by every
    piece (priority below the sample rate), of which the lowest priorities up to
    tokenizer.sample_chars characters are kept, fed in piece order."""

    name = "train tokenizer"
    type = "nichelm"

    def __init__(self, project: Project, work: Path, n_pieces: int):
        super().__init__()
        self.project, self.work, self.n = project, Path(work), n_pieces

    def _rows(self):
        for k in range(self.n):
            with io.TextIOWrapper(open_binary(str(part(self.work, "sample", "train", k, "jsonl.zst"))),
                                  encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        from nichelm.data.tokenizer import save_tokenizer, special_tokens, train_tokenizer
        cfg, task = self.project.tokenizer, self.project.task
        with self.track_time():
            prio, size = array.array("d"), array.array("q")
            for u, inp, out in self._rows():
                prio.append(u)
                size.append(len(inp) + len(out))
            prio, size = np.frombuffer(prio, dtype=np.float64), np.frombuffer(size, dtype=np.int64)
            threshold = 2.0
            if size.sum() > cfg.sample_chars:       # keep the lowest priorities up to the budget
                order = np.argsort(prio, kind="stable")
                n = int(np.searchsorted(np.cumsum(size[order]), cfg.sample_chars, side="right"))
                threshold = float(prio[order[n]]) if n < len(order) else 2.0
            kept = int(size[prio < threshold].sum())
            texts = (t for u, inp, out in self._rows() if u < threshold for t in (inp, out))
            specials = special_tokens(task.prompt_template, task.end_marker)
            tok = train_tokenizer(texts, cfg.vocab_size, specials, cfg.min_frequency)
            save_tokenizer(tok, self.work / "tokenizer.json")
            atomic_write_json(self.work / "tokenizer_sample.json", {"chars": kept, "candidates": int(len(prio))})
        yield from ()


class ReuseTokenizer(PipelineStep):
    """tokenizer.from: the checked tokenizer (prepare_pipeline.tokenizer_from) copied in, instead of
    training one; the same file as when prepare started, else an error."""

    name = "reuse tokenizer"
    type = "nichelm"

    def __init__(self, work: Path, reused: dict):
        super().__init__()
        self.work, self.reused = Path(work), reused

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        with self.track_time():
            raw = Path(self.reused["path"]).read_bytes()
            if hashlib.sha256(raw).hexdigest() != self.reused["sha256"]:
                raise UserError(f"{self.reused['path']}: the tokenizer of 'tokenizer.from' changed while prepare ran; "
                                "run the same command again")
            with atomic_file(self.work / "tokenizer.json") as f:
                f.write(raw)
            atomic_write_json(self.work / "tokenizer_sample.json", {"chars": 0, "candidates": 0})
        yield from ()


# ------------------------------------------------------------------ stage 3: dedupe, tokenize


class ReadExampleParts(PipelineStep):
    """This task's pieces' examples, split by split (train, val, test), in batches: from here on a
    datatrove Document is a batch of up to TOKENIZE_BATCH examples of one piece and split (metadata:
    piece, split, lines: the jsonl lines as written, inputs, outputs), so that the steps after this
    one work per batch and not per example."""

    name = "read examples"
    type = "nichelm"

    def __init__(self, work: Path, n_pieces: int):
        super().__init__()
        self.work, self.n = Path(work), n_pieces

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for k in task_pieces(rank, world_size, self.n):
            for split in SPLITS:
                with open_binary(str(part(self.work, "ex", split, k, "jsonl.zst"))) as f:
                    while True:
                        with self.track_time():
                            lines = list(islice(f, TOKENIZE_BATCH))
                            if not lines:
                                break
                            rows = json.loads(b"[" + b",".join(lines) + b"]")     # one parse per batch
                        yield DTDocument(text="", id=f"{k}/{split}", metadata={
                            "piece": k, "split": split, "lines": lines,
                            "inputs": [r["input"] for r in rows], "outputs": [r["output"] for r in rows]})


class DedupeEval(PipelineStep):
    """Drop val/test examples whose input or output text also occurs in train (test: or in the kept val)."""

    name = "dedupe val/test"
    type = "nichelm"

    def __init__(self, work: Path, text_outputs: bool = True):
        super().__init__()
        self.work, self.text_outputs = Path(work), text_outputs     # Task.text_outputs (see _PieceWriter)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        sets, counts = {}, Counter()
        for d in data:
            m = d.metadata
            if m["split"] != "train":
                with self.track_time():
                    key = "train" if m["split"] == "val" else "test"
                    if key not in sets:
                        sets[key] = np.load(self.work / f"dedupe-{key}.npy", mmap_mode="r")
                    outs = m["outputs"] if self.text_outputs else m["inputs"]
                    digests = np.array([(digest(i), digest(o)) for i, o in zip(m["inputs"], outs)],
                                       dtype=np.uint64).reshape(-1, 2)
                    seen = _member(digests.ravel(), sets[key]).reshape(-1, 2).any(axis=1)
                    if seen.any():
                        counts[f"{SEP}dedupe_dropped_{m['split']}"] += int(seen.sum())
                        for name in ("lines", "inputs", "outputs"):
                            m[name] = [x for x, drop in zip(m[name], seen) if not drop]
            yield d
        for key, value in sorted(counts.items()):
            self.stat_update(key, value=value)


class Tokenize(PipelineStep):
    """Each train/val batch's tokens (metadata["tokens"]): prompt + output + end marker per example,
    marker-safe (tokenizer.load_examples_encoder: encode_examples_array's ids, the tokenizer loaded
    once). Test examples pass through untokenized (they only go to examples.test.jsonl)."""

    name = "tokenize"
    type = "nichelm"

    def __init__(self, project: Project, tokenizer_path: Path):
        super().__init__()
        self.task, self.path = project.task, Path(tokenizer_path)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import os
        os.environ["TOKENIZERS_PARALLELISM"] = "false"     # one core per task: the tasks are the parallelism
        from nichelm.data.tokenizer import load_examples_encoder
        vocab, encode = load_examples_encoder(self.path)
        dtype = token_dtype(vocab)
        for d in data:
            m = d.metadata
            if m["split"] != "test":
                with self.track_time():
                    m["tokens"] = encode(self.task.prompt_template, self.task.end_marker, m["inputs"], m["outputs"],
                                         dtype)
            yield d


class WriteTokenParts(PipelineStep):
    """Per piece and split: the kept examples' jsonl lines and (train, val) their tokens, raw."""

    name = "write tokens"
    type = "nichelm"

    def __init__(self, work: Path, n_pieces: int):
        super().__init__()
        self.work, self.n = Path(work), n_pieces

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        counts, stack, files, current = Counter(), ExitStack(), {}, None
        written = set()
        with stack:
            for d in data:
                m = d.metadata
                key = (m["piece"], m["split"])
                if key != current:
                    stack.close()
                    files = self._open(stack, *key)
                    written.add(key)
                    current = key
                with self.track_time():
                    files["jsonl"].write(b"".join(m["lines"]))
                    counts[f"{SEP}examples_{key[1]}"] += len(m["lines"])
                    if "tokens" in m:
                        files["tokens"].write(m["tokens"].tobytes())
                        counts[f"{SEP}tokens_{key[1]}"] += len(m["tokens"])
            stack.close()
            for k in task_pieces(rank, world_size, self.n):     # empty parts for what had no example
                for split in SPLITS:
                    if (k, split) not in written:
                        with ExitStack() as empty:
                            self._open(empty, k, split)
        for key, value in sorted(counts.items()):
            self.stat_update(key, value=value)
        yield from ()

    def _open(self, stack: ExitStack, piece: int, split: str) -> dict:
        files = {"jsonl": stack.enter_context(atomic_file(part(self.work, "out", split, piece, "jsonl")))}
        if split != "test":
            files["tokens"] = stack.enter_context(atomic_file(part(self.work, "tok", split, piece, "bin")))
        return files


def token_dtype(vocab_size: int):
    return np.dtype("<u4") if vocab_size > 65535 else np.dtype("<u2")


# ------------------------------------------------------------------ stage 4: shards, examples, manifest


class ShardWriter:
    """Stream tokens into llm.c shards (shards.py's layout) of at most `shard_tokens`, cut only
    after an end marker (so a shard ends where an example ends), never holding a shard in memory."""

    def __init__(self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int, end_id: int):
        self.dir, self.split, self.limit, self.end_id = Path(out_dir), split, shard_tokens, end_id
        self.dtype = token_dtype(vocab_size)
        self.magic = (MAGIC_U32, VERSION_U32) if self.dtype.itemsize == 4 else (MAGIC_U16, VERSION_U16)
        self.paths: list[Path] = []
        self.carry = np.zeros(0, self.dtype)      # tokens of an example not yet complete
        self._cm = self._f = None
        self.n = 0

    def _open(self) -> None:
        self.paths.append(self.dir / f"{self.split}_{len(self.paths):06d}.bin")
        self._cm = atomic_file(self.paths[-1])
        self._f = self._cm.__enter__()
        self._f.write(bytes(HEADER_INTS * 4))
        self.n = 0

    def _close(self) -> None:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[0], header[1], header[2] = *self.magic, self.n
        self._f.seek(0)
        self._f.write(header.tobytes())
        self._cm.__exit__(None, None, None)
        self._cm = self._f = None

    def write(self, tokens: np.ndarray) -> None:
        data = np.concatenate([self.carry, tokens.astype(self.dtype)])
        ends = np.flatnonzero(data == self.end_id)
        cut = int(ends[-1]) + 1 if len(ends) else 0
        self.carry, data = data[cut:], data[:cut]
        while len(data):
            if self._f is None:
                self._open()
            room = self.limit - self.n
            if len(data) <= room:
                take = len(data)
            else:
                fits = np.flatnonzero(data[:room] == self.end_id)
                if len(fits):
                    take = int(fits[-1]) + 1
                elif self.n:                      # the next example does not fit: a new shard
                    self._close()
                    continue
                else:                             # one example longer than a shard has to be cut
                    take = room
            self._f.write(data[:take].tobytes())
            self.n += take
            data = data[take:]
            if self.n >= self.limit:
                self._close()

    def close(self) -> list[Path]:
        if len(self.carry):               # tokens after the last end marker (not from encode_examples): kept
            if self._f is None:
                self._open()
            self._f.write(self.carry.tobytes())
            self.n += len(self.carry)
            self.carry = np.zeros(0, self.dtype)
        if self._f is None and not self.paths:   # an empty split still has one (empty) shard
            self._open()
        if self._f is not None:
            self._close()
        return self.paths


class WriteShards(PipelineStep):
    """The train and val token parts, in piece order, into llm.c shards of at most shard_tokens."""

    name = "write shards"
    type = "nichelm"

    def __init__(self, project: Project, work: Path, n_pieces: int, shard_tokens: int):
        super().__init__()
        self.task, self.work, self.n, self.shard_tokens = project.task, Path(work), n_pieces, shard_tokens

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        from nichelm.data.tokenizer import load_tokenizer, template_markers
        tok = load_tokenizer(self.work / "tokenizer.json")
        vocab, end_id = tok.get_vocab_size(), tok.token_to_id(self.task.end_marker)
        dtype = token_dtype(vocab)
        out = self.work / "staged" / "shards"
        out.mkdir(parents=True, exist_ok=True)
        with self.track_time():
            for split in ("train", "val"):
                writer = ShardWriter(out, split, vocab, self.shard_tokens, end_id)
                for k in range(self.n):
                    with open(part(self.work, "tok", split, k, "bin"), "rb") as f:
                        while chunk := f.read(1 << 24):
                            writer.write(np.frombuffer(chunk, dtype=dtype))
                paths = writer.close()
                try:              # the index of example starts the training loader keeps beside each shard
                    from nichelm.data.shards import example_starts
                    marker = tok.token_to_id(template_markers(self.task.prompt_template)[0])
                    for p in paths:
                        example_starts(p, marker)
                except ImportError:
                    pass
        yield from ()


class ConcatExamples(PipelineStep):
    """examples.{train,val,test}.jsonl: the kept examples' lines, parts in piece order, streamed."""

    name = "write examples.jsonl"
    type = "nichelm"

    def __init__(self, work: Path, n_pieces: int):
        super().__init__()
        self.work, self.n = Path(work), n_pieces

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        with self.track_time():
            for split in SPLITS:
                with atomic_file(self.work / "staged" / f"examples.{split}.jsonl") as out:
                    for k in range(self.n):
                        with open(part(self.work, "out", split, k, "jsonl"), "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 22)
        yield from ()


@dataclass
class StageInfo:
    """What the manifest step needs to know of the jobs (for counts, timing and the swap)."""
    logs: dict[str, str] = field(default_factory=dict)      # job name -> its datatrove logging_dir
    started: float = 0.0


def pieces_to_json(pieces: list[Piece]) -> list[dict]:
    return [asdict(p) for p in pieces]


def pieces_from_json(rows: list[dict]) -> list[Piece]:
    return [Piece(**r) for r in rows]


# ------------------------------------------------------------------ merge: sources, manifest, swap


def job_dir(work: Path, job: str) -> Path:
    """A job's datatrove logging_dir, RUN/logs/prepare/JOB (work is RUN/.prepare): logs/, stats/,
    completions/ (the resume markers). Outside the work folder, so the logs stay after a build."""
    return Path(work).parent / "logs" / "prepare" / job


class MergeSourceStats(PipelineStep):
    """The manifest's record of each source, from the examples job's per-task stats; sources that gave
    no document, or 'pairs' sources without any OCR side, are errors as before. Also the sha256: as
    given (sha256s: one per source, None where not known), else read now."""

    name = "source records"
    type = "nichelm"

    def __init__(self, project: Project, work: Path, sha256s: list[str | None] | None = None):
        super().__init__()
        self.project, self.work = project, Path(work)
        self.sha256s = sha256s or [None] * len(project.sources)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        from nichelm.prepare import file_sha256
        counts, _ = stage_stats(job_dir(self.work, "examples"))
        records = []
        with self.track_time():
            for i, src in enumerate(self.project.sources):
                name, path = source_name(src, i), self.project.resolve(src.path)
                mine = {k.split(SEP, 1)[1]: int(v) for k, v in counts.items() if k.split(SEP, 1)[0] == name}
                where = f"{self.project.source_file}: sources[{i}]"
                if not mine.get("documents"):
                    raise UserError(f"{path}: no documents found; check the path and format")
                if src.role == "pairs" and not mine.get("paired_documents"):
                    raise UserError(f"{where}: role = 'pairs' but {path} has no input (OCR) side; "
                                    "set role = 'clean' to generate noisy inputs")
                rec = {"name": name, "path": str(path), "format": src.format, "role": src.role,
                       "licence": src.licence or "unspecified", "sha256": self.sha256s[i] or file_sha256(path),
                       "filters": src.filters, "documents": mine["documents"]}
                rec.update(sorted((k, v) for k, v in mine.items()
                                  if k.startswith(("documents_", "examples_", "windows_")) and v))
                if src.on_bad_record == "skip":
                    rec["skip"] = {"bad_records": mine.get("bad_records", 0)}
                if src.role == "pairs":
                    chars, words = mine.get("raw_chars", 0), mine.get("raw_words", 0)
                    rec["raw_ocr"] = {"cer": mine.get("raw_char_errors", 0) / chars if chars else 0.0,
                                      "wer": mine.get("raw_word_errors", 0) / words if words else 0.0,
                                      "gold_chars": chars, "gold_words": words}
                records.append(rec)
            if not sum(r.get("examples_train", 0) for r in records):
                raise UserError(f"{self.project.source_file}: no training examples; check the sources and split "
                                "fractions")
            atomic_write_json(self.work / "sources.json", {
                "sources": records, "bytes": sum(int(v) for k, v in counts.items() if k.endswith(SEP + "bytes")),
                "noise_edits": int(counts.get(SEP + "noise_edits", 0)),
                "noise_chars": int(counts.get(SEP + "noise_chars", 0))})
        yield from ()


# Where time went: datatrove's per-step time, summed over tasks, by kind of work.
TIME_KINDS = {"read": ("read sources", "split by document", "raw OCR score", "windows", "read examples",
                       "dedupe val/test", "source records", "dedupe sets"),
              "noise": ("synthetic noise", "fit noise"),
              "tokenize": ("tokenize", "train tokenizer", "reuse tokenizer"),
              "write": ("write examples", "write tokens", "write shards", "write examples.jsonl")}


def job_walls(work: Path, jobs: list[str], started: float, now: float) -> dict[str, float]:
    """Wall seconds per job, from its tasks' completion markers (a job starts when the one before ends)."""
    walls, t = {}, started
    for job in jobs:
        marks = list((job_dir(work, job) / "completions").glob("*"))
        end = max((m.stat().st_mtime for m in marks), default=now) if job != jobs[-1] else now
        walls[job], t = round(max(end - t, 0.0), 3), max(end, t)
    return walls


class WriteManifest(PipelineStep):
    """manifest.json: the source records, counts after dedupe, tokens, tokenizer, noise, timing."""

    name = "manifest"
    type = "nichelm"

    def __init__(self, project: Project, work: Path, jobs: list[str], fingerprint: str, info: dict):
        super().__init__()
        self.project, self.work, self.jobs, self.fp, self.info = project, Path(work), jobs, fingerprint, info

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        import time

        from nichelm.data.tokenizer import load_tokenizer, special_tokens
        from nichelm.prepare import SPLITS as _S, Example, _all_pairs_score, _chars_per_token, file_sha256, fit_summary
        assert _S == SPLITS
        p, staged = self.project, self.work / "staged"
        merged = json.loads((self.work / "sources.json").read_text(encoding="utf-8"))
        kept, _ = stage_stats(job_dir(self.work, "tokens"))
        tok = load_tokenizer(self.work / "tokenizer.json")
        shutil.copyfile(self.work / "tokenizer.json", staged / "tokenizer.json")
        atomic_write_json(staged / "task.json", task_fingerprint(p.task))
        fit = None
        if p.noise.calibrate_on:
            fit = json.loads((self.work / "noise_fit.json").read_text(encoding="utf-8"))
            shutil.copyfile(self.work / "noise_fit.json", staged / "noise_fit.json")
        first = []
        with open(staged / "examples.train.jsonl", encoding="utf-8") as f:
            for line, _ in zip(f, range(2000)):
                row = json.loads(line)
                first.append(Example(row["input"], row["output"], "", "", False))
        sample = json.loads((self.work / "tokenizer_sample.json").read_text(encoding="utf-8"))
        records = merged["sources"]
        tokens = {s: int(kept.get(f"{SEP}tokens_{s}", 0)) for s in ("train", "val")}
        docs = sum(r["documents"] for r in records)
        now = time.time()
        seconds = {}
        for job in self.jobs:
            seconds.update(stage_stats(job_dir(self.work, job))[1])
        elapsed = max(now - self.info["started"], 1e-9)
        manifest = {
            "fingerprint": self.fp,
            "tokenizer_sha256": file_sha256(staged / "tokenizer.json"),
            "task_sha256": file_sha256(staged / "task.json"),
            # train checks these before reading a token: a shard changed on disk is an error, not data
            "shard_sha256": {f.name: file_sha256(f) for f in sorted((staged / "shards").glob("*.bin"))},
            "sources": records,
            "examples": {s: int(kept.get(f"{SEP}examples_{s}", 0)) for s in SPLITS},
            "tokens": tokens,
            "chars_per_token": _chars_per_token(tok, first),
            "tokenizer": {"vocab_size": tok.get_vocab_size(), "type": "byte-level BPE (HF tokenizers)",
                          "special_tokens": special_tokens(p.task.prompt_template, p.task.end_marker),
                          "sample_chars": sample["chars"], "sample_chars_limit": p.tokenizer.sample_chars,
                          # reused (tokenizer.from) rather than trained on this project's sample
                          **({"from": self.info["tokenizer_from"]["path"],
                              "from_sha256": self.info["tokenizer_from"]["sha256"]}
                             if self.info.get("tokenizer_from") else {})},
            "noise": {"target_cer": fit["target_cer"] if fit else p.noise.target_cer, "profile": p.noise.profile,
                      "measured_cer_train": merged["noise_edits"] / merged["noise_chars"]
                      if merged["noise_chars"] else None,
                      **({"calibrated_on": p.noise.calibrate_on, "fit": fit_summary(fit)} if fit else {})},
            "filters": {"dedupe_dropped": {s: int(kept.get(f"{SEP}dedupe_dropped_{s}", 0)) for s in ("val", "test")},
                        "split": "by document (seeded hash)", "window_chars": p.task.window_chars},
            "raw_ocr_all_pairs": _all_pairs_score(records),
            "prepare": {"pieces": self.info["pieces"], "tasks": self.info["tasks"],
                        "executor": self.info["executor"], "shard_tokens": self.info["shard_tokens"]},
            "timing": {
                "elapsed_s": round(elapsed, 3),
                "documents_per_s": round(docs / elapsed, 2),
                "mb_per_s": round(merged["bytes"] / 1e6 / elapsed, 3),
                "tokens_per_s": round((tokens["train"] + tokens["val"]) / elapsed, 1),
                "wall_s": job_walls(self.work, self.jobs, self.info["started"], now),
                "task_s": {kind: round(sum(seconds.get(n, 0.0) for n in names), 3)
                           for kind, names in TIME_KINDS.items()},
                "step_s": {n: round(v, 3) for n, v in sorted(seconds.items())},
            },
        }
        atomic_write_json(staged / "manifest.json", manifest)
        yield from ()


class SwapIn(PipelineStep):
    """Put the finished build in place (prepare._swap_in: tokenizer and task.json, then the data folder
    whole), then drop the work folder (RUN/.prepare). The last step of the last job."""

    name = "swap in"
    type = "nichelm"

    def __init__(self, run: Path, work: Path):
        super().__init__()
        self.run_dir, self.work = Path(run), Path(work)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        from nichelm.prepare import _swap_in
        _swap_in(self.work / "staged", self.run_dir)
        shutil.rmtree(self.work, ignore_errors=True)      # parts, digests, plan: the build is done
        yield from ()


def finish_started(work: Path) -> None:
    """A finish job starting over: its staging folder is rebuilt from the parts."""
    staged = Path(work) / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)


class ResetStaging(PipelineStep):
    name = "reset staging"
    type = "nichelm"

    def __init__(self, work: Path):
        super().__init__()
        self.work = Path(work)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        drain(data)
        finish_started(self.work)
        yield from ()


# ------------------------------------------------------------------ quiet task consoles

_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


def _console(level: str | None = None) -> None:
    import os
    import sys

    from loguru import logger
    debug = os.environ.get("NICHELM_DEBUG") == "1"
    logger.add(sys.stderr, level=level or ("INFO" if debug else "WARNING"), format=_LOG_FORMAT,
               filter=None if debug else (lambda r: r["exception"] is None))


def quiet_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's add_task_logger with a quiet console: warnings only, and no traceback (the command
    prints the error once), unless NICHELM_DEBUG=1 (--debug). The task's log file gets everything."""
    from loguru import logger
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    _console(None if local_rank == 0 else "ERROR")
    # catch=False: a log write that fails (disk full) raises in the task and reaches the command's one-line
    # error, instead of loguru printing its own traceback to stderr and going on
    logger.add(logfile, level="DEBUG", format=_LOG_FORMAT, catch=False)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _quiet_default_logger():
    from loguru import logger
    logger.remove()
    _console()


def _quiet_datatrove() -> None:
    """Every process that runs our steps imports this module first (to unpickle them): install the
    quiet loggers there, in the places datatrove's executors look them up."""
    import datatrove.executor.base as base
    import datatrove.executor.ray as ray_executor
    import datatrove.utils.logging as logging
    base.add_task_logger = ray_executor.add_task_logger = quiet_task_logger
    logging.setup_default_logger = _quiet_default_logger
    _cache_loguru_lib_dirs()


def _cache_loguru_lib_dirs() -> None:
    """loguru builds an exception formatter for every handler added, which asks sysconfig for the
    library folders: ~3 ms each time (sysconfig recomputes them on every call), and each task adds
    three handlers (quiet_task_logger, then the default one back). They do not change while a process
    runs: ask once. Skipped if loguru has no such method any more."""
    import functools
    try:
        from loguru._better_exceptions import ExceptionFormatter
    except ImportError:
        return
    lib_dirs = ExceptionFormatter.__dict__.get("_get_lib_dirs")
    if isinstance(lib_dirs, staticmethod) and not hasattr(lib_dirs.__func__, "cache_info"):
        ExceptionFormatter._get_lib_dirs = staticmethod(functools.cache(lib_dirs.__func__))


_quiet_datatrove()
