"""`nichelm apply`: correct a whole corpus with a trained model or an export, resumably, in shards.

Inputs are .txt files (one document each), .jsonl files (one document per line, the text in
``text_field``), .parquet files (one document per row, the text in column ``text_field``; needs
pyarrow) or folders of them (recursive). Outputs mirror the inputs under OUT: a folder input's
files keep their path inside the folder, a file input keeps its name. OUT may not overlap an input.

A .txt file is read in pieces of at most TEXT_CHUNK_BYTES, cut at a paragraph break (a blank line),
else at a line end, else at a space, else at a character boundary (text_chunks); each piece is
corrected as a document of its own, so memory stays bounded whatever the file's size. The cuts depend
only on the file's bytes, so a run killed mid-file and resumed writes exactly what an uninterrupted
run writes. A small file is one piece: the whole file is the document. Work for several tasks
(plan_tasks: --shard I/N here, or datatrove's executors in nichelm.apply_pipeline) is whole files and
ranges of whole pieces of big .txt files; a range's output is a part file, and the parts are joined in
order (join_parts), so any task count writes the bytes of one process.

Documents from many files are corrected together (windows of all of them share batches),
then written in input order. Crash safety without a database:

- a text or jsonl output grows in OUT/.NAME.partial; after each group of documents the partial file
  is fsync'd, then a ledger line (OUT/.nichelm-ledger.shard-I-of-N.jsonl, fsync'd) records how far
  the input was read (text: bytes, jsonl: lines) and how many output bytes count. On resume the
  partial file is cut back to the recorded size and reading restarts at the recorded point ("resuming
  FILE at byte N" on stderr), so a kill at any moment loses only unrecorded work and duplicates
  nothing; when the input ends the partial file is renamed onto the final name.
- a parquet output's new column grows as part files in the folder OUT/.NAME.partial/, each
  written atomically, then counted in a ledger line (input rows consumed, parts). A part is written
  once it holds PART_BYTES of text or PART_SECONDS after the previous one (the work a kill can lose).
  On resume, parts the ledger does not count are deleted and reading restarts at the recorded row.
  When the input ends, its columns plus the new one are written row group by row group to a
  temporary file renamed onto OUT/NAME (row order and every other column kept), then the parts are
  removed.
- every ledger record names the input's size and modification time: an input changed since is
  corrected again from its start (said on stderr).
- every ledger line carries a CRC32 of its record. A last line cut short or unreadable (a kill or a full
  disk mid-append) is dropped and its work redone; any other bad line stops the run with a one-line
  error naming it, since resuming past it could skip or repeat work. A full disk or a read-only OUT is
  a one-line error too; the same command resumes once it can write.

Unreadable inputs (binary, bad UTF-8, corrupt parquet) are reported by name and skipped. A jsonl line
that is blank or bad (not UTF-8, not a JSON object, no string in ``text_field``) and a parquet row
without a string text keep their place with a null output; bad ones are reported by line. The run
carries on and ``ApplyReport.failed`` lists them (exit code 1).
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nichelm.errors import UserError
from nichelm.io import atomic_file, atomic_write_bytes, fsync_dir

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
COMPILE_MIN_BYTES = 1_000_000        # compile='auto': ~10k windows; below that compiling costs more than it saves
MAX_LISTED_FAILURES = 100           # per jsonl/parquet file in the ledger; the count is always exact
TEXT_CHUNK_BYTES = 1 << 16          # a .txt file's pieces: ~650 windows of 100 characters, about one group
PART_BYTES = 16 << 20               # a parquet output's part file holds about this much corrected text,
PART_SECONDS = 60.0                 # or what was corrected in this long (so a kill loses at most that)
# How long torch's OpenMP threads (libgomp) spin at a wait before they sleep: libgomp's own count for a machine
# with more threads than free cores, instead of its default 300,000 (see short_openmp_spin)
OPENMP_SPIN_COUNT = "1000"


# ---------------------------------------------------------------- inputs and shards

@dataclass(frozen=True)
class Unit:
    """One input file, or a byte range of a big .txt file split across tasks (plan_tasks), and where its
    output goes under OUT."""
    path: Path
    rel: str                        # posix path relative to OUT that this unit writes (a range: its part file)
    kind: str                       # "text" | "jsonl" | "parquet"
    start: int = 0                  # a range: input bytes [start, end), both piece boundaries (text_chunks)
    end: int = -1                   # -1: to the end of the file
    name: str = ""                  # a range: the output file its part is joined into ("": rel)

    @property
    def output(self) -> str:
        return self.name or self.rel


def _kind(path: Path) -> str:
    if path.name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if path.name.endswith(JSONL_SUFFIXES) else "text"


def discover(inputs: list[str | Path]) -> list[Unit]:
    """Every input file, sorted by output name; two inputs that map to one output name are an error."""
    units: dict[str, Unit] = {}
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = [Unit(p, p.relative_to(path).as_posix(), _kind(p)) for p in sorted(path.rglob("*"))
                     if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
                     and not p.name.startswith(".")]
        elif path.is_file():
            found = [Unit(path, path.name, _kind(path))]
        else:
            raise UserError(f"--input {raw}: no such file or folder")
        for u in found:
            other = units.get(u.rel)
            if other is not None and other.path.resolve() != u.path.resolve():
                raise UserError(f"--input: {other.path} and {u.path} would both be written to {u.rel}; "
                                "apply them in separate runs with separate --output folders")
            units[u.rel] = u
    return [units[k] for k in sorted(units)]


def refuse_overlap(inputs: list[str | Path], output: str | Path) -> None:
    """OUT inside an input folder would have its outputs read as inputs by the next run; an input
    inside OUT could be overwritten by its own output. Either is a one-line error."""
    out = Path(output).resolve()
    for raw in inputs:
        path = Path(raw).resolve()
        if out == path or path in out.parents or out in path.parents:
            where = "inside" if path in out.parents else "the same as" if out == path else "holds"
            raise UserError(f"--output {output} is {where} --input {raw}; choose an --output folder outside "
                            "every input (and no input inside it)")


def input_stamps(units: list[Unit]) -> dict[str, tuple[int, int]]:
    """rel -> (size, modification time in ns) of each input, taken before it is read."""
    stamps = {}
    for u in units:
        try:
            st = u.path.stat()
        except OSError:
            continue                               # reading it will report why
        stamps[u.rel] = (st.st_size, st.st_mtime_ns)
    return stamps


def parse_shard(text: str | None) -> tuple[int, int]:
    """'1/4' -> (1, 4): this process runs task 1 of 4 (0-based) of plan_tasks(inputs, 4)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= I < N, e.g. --shard 0/4 ... 3/4")
    return i, n


def shard_of(rel: str, n: int) -> int:
    """A stable hash of the output name: the same file lands in the same task on every machine,
    whatever else each machine's input list holds."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % n


# ---------------------------------------------------------------- the plan: which task does what

RANGE_MAX_BYTES = 16 << 20          # a big .txt file is split for several tasks into ranges of at most this


@dataclass
class Plan:
    """The work of `tasks` tasks (datatrove's ranks, or --shard I/N run by hand), a function of the inputs
    and the task count only, so every process that makes it agrees. A whole file goes to task
    shard_of(name); a .txt file bigger than range_bytes is cut into ranges of whole pieces (the 64 KiB
    pieces one process corrects, text_chunks), range j going to task shard_of(name) + j: each range's
    output is a part file, and the parts are joined in order into the output (join_parts), so the bytes
    are those of one process."""
    tasks: list[list[Unit]]
    total_bytes: int                                # of all inputs (compile='auto' decides on it, alike in every task)
    stamps: dict[str, tuple[int, int]]              # split file's output name -> (size, mtime_ns) its ranges were cut at

    def parts(self, name: str) -> list[Unit]:
        return sorted((u for units in self.tasks for u in units if u.name == name), key=lambda u: u.start)


def range_bytes(total: int, tasks: int) -> int:
    """About four ranges per task over the whole input, so shard_of's uneven draws even out."""
    return max(TEXT_CHUNK_BYTES, min(RANGE_MAX_BYTES, total // (4 * tasks)))


def plan_tasks(inputs: list[str | Path], tasks: int) -> Plan:
    units = discover(inputs)
    stamps = input_stamps(units)
    total = sum(size for size, _ in stamps.values())
    plan, limit = Plan([[] for _ in range(tasks)], total, {}), range_bytes(total, tasks)
    for u in units:
        first = shard_of(u.rel, tasks)
        ranges = text_ranges(u.path, limit) if tasks > 1 and u.kind == "text" and u.rel in stamps \
            and stamps[u.rel][0] > limit else []
        if len(ranges) < 2:
            plan.tasks[first].append(u)
            continue
        size, mtime = plan.stamps[u.rel] = stamps[u.rel]
        for j, (start, end) in enumerate(ranges):
            rel = f"{PARTS_DIR}/{u.rel}/{size}-{mtime}/{start:012d}-{end:012d}.txt"
            plan.tasks[(first + j) % tasks].append(Unit(u.path, rel, "text", start, end, u.rel))
    return plan


def text_ranges(path: Path, limit: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about `limit` bytes made of whole pieces of a .txt file (one pass over
    the file to find the piece ends); [] for a file that is not clean UTF-8 text: one task takes it whole
    and reports it as one process would."""
    if check_text_file(path):
        return []
    ranges, start = [], 0
    try:
        for end, _ in text_chunks(path, 0):
            if end - start >= limit:
                ranges.append((start, end))
                start = end
    except OSError:
        return []
    size = path.stat().st_size
    if start < size:
        ranges.append((start, size))
    return ranges


PARTS_DIR = ".nichelm-parts"        # OUT/.nichelm-parts/NAME/SIZE-MTIME/START-END.txt: the parts of a split file


def join_parts(out: Path, plan: Plan, names: set[str]) -> None:
    """Join the parts of each split file in `names` into its output, once every part is finished (each
    task tries after its own work; under a lock, so the last one to finish does it). The output is
    written atomically, then the parts folder renamed away and deleted: a kill at any point leaves either
    the parts or the joined file whole. A part folder of another version of the input (or of another
    task count) is removed with it."""
    if not names:
        return
    lock_path = out / PARTS_DIR / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in sorted(names):
            parts = [out / u.rel for u in plan.parts(name)]
            if not all(p.is_file() for p in parts):
                continue                           # another task's part is not done yet (or was joined)
            with atomic_file(out / name) as fh:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
            folder = out / PARTS_DIR / name
            gone = folder.with_name(f".{folder.name}.joined")
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(folder, gone)
            shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------- the ledger

@dataclass
class FileState:
    """What the ledger says about one input file (records are cumulative per file)."""
    done: bool = False
    lines: int = 0                  # jsonl: input lines consumed; parquet: input rows consumed
    offset: int = 0                 # text: input bytes consumed
    bytes: int = 0                  # text, jsonl: output bytes written to the partial file
    parts: int = 0                  # parquet: part files in the partial folder
    size: int = -1                  # the input's size and modification time when it was read
    mtime_ns: int = -1              # (-1: a record written before they were kept)
    docs: int = 0
    windows: int = 0
    kept_too_different: int = 0
    kept_hit_limit: int = 0
    tokens: int = 0
    kept_low_margin: int = 0        # the guard's view of the file (GuardFigures): windows kept for a low margin,
    docs_out_of_domain: int = 0     # documents left whole as unfamiliar,
    changed: int = 0                # windows the model changed, of them those whose correction was kept,
    corrected: int = 0
    input_tokens: int = 0           # and the model's surprisal of the input: tokens scored, millinats in all
    input_mnats: int = 0
    failed_count: int = 0
    failed: list = field(default_factory=list)   # ["file:line: why", ...], at most MAX_LISTED_FAILURES

    def record(self, rel: str, event: str) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "done"}
        return {"event": event, "file": rel, **d}


LEDGER_EVENTS = ("start", "progress", "done")
STATE_TYPES = {name: (list if name == "failed" else int) for name in FileState.__dataclass_fields__ if name != "done"}
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def record_crc(rec: dict) -> int:
    """Checksum of a ledger record (without its own "crc"), over a canonical form of its values, so a bit
    flipped by a disk shows up instead of silently changing how much of an output counts as done."""
    body = {k: v for k, v in rec.items() if k != "crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=True).encode("ascii"))


def parse_record(line: bytes) -> tuple[dict | None, str]:
    """(record, "") for a sound ledger line, else (None, what is wrong). Lines written before records
    had a "crc" are taken without one."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(rec, dict) or rec.get("event") not in LEDGER_EVENTS:
        return None, "not a ledger record"
    if "crc" in rec and rec["crc"] != record_crc(rec):
        return None, "checksum mismatch (the line was changed after it was written)"
    if rec["event"] == "start":
        return (rec, "") if isinstance(rec.get("settings"), dict) else (None, "a start record without settings")
    fields = {k: v for k, v in rec.items() if k not in ("event", "file", "crc")}
    if not isinstance(rec.get("file"), str) or any(
            k not in STATE_TYPES or type(v) is not STATE_TYPES[k] for k, v in fields.items()):
        return None, "a file record with missing or mistyped fields"
    return rec, ""


def write_error(e: OSError, out: Path) -> Exception:
    """A full disk or a read-only --output as one line (exit 2), not a traceback: nothing written is lost
    and the same command resumes once it can write. Other OSErrors are returned as they are."""
    if e.errno not in WRITE_ERRNOS:
        return e
    return UserError(f"{e.filename or out}: cannot write ({e.strerror}); make room (or use a writable --output) "
                     "and re-run the same command: it resumes where it stopped")


class Ledger:
    """Append-only jsonl, one per shard, fsync'd after every record; locked against a second writer.

    Records are cumulative per file (the newest one of a file says all there is), and every record is
    written after the data it counts. So losing the newest line only redoes work, and that is what
    happens to a last line a kill or a full disk cut short (or left unreadable). Any other bad line is
    an error: no resume guesses past it."""

    def __init__(self, out: Path, shard: tuple[int, int]):
        self.path = out / f".nichelm-ledger.shard-{shard[0]}-of-{shard[1]}.jsonl"
        self.files: dict[str, FileState] = {}
        self.settings: dict | None = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            # Unbuffered: an append a full disk refuses leaves no bytes behind to be flushed later
            # (by close, after a newer record), only a cut last line, which the next run drops.
            self._fh = open(self.path, "a+b", buffering=0)
        except OSError as e:
            raise write_error(e, out) from None
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise UserError(f"{self.path}: another `nichelm apply` is writing this shard of {out}; "
                            "wait for it or use another --output") from None
        try:
            self._load()
        except BaseException:
            self._fh.close()
            raise

    def _load(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        lines = data.split(b"\n")                  # the last item is b"" when the file ends with a newline
        starts = [0]
        for line in lines[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(numbered):
            rec, why = parse_record(line)
            if rec is not None and n < len(lines):   # a line without its newline was cut short
                records.append(rec)
                continue
            if i == len(numbered) - 1:             # the newest line, cut or garbled: drop it, redo its work
                self._fh.truncate(starts[n - 1])
                print(f"nichelm apply: {self.path}:{n}: dropped an incomplete last record (an interrupted "
                      "run); its work is done again", file=sys.stderr, flush=True)
                break
            raise UserError(f"{self.path}:{n}: {why or 'cut short'}; the ledger is damaged: delete that line "
                            f"and every line after it (their work is redone), or delete {self.path.parent} "
                            "to start over")
        for rec in records:
            if rec["event"] == "start":
                self.settings = self.settings or rec["settings"]
            else:
                fields = {k: v for k, v in rec.items() if k not in ("event", "file", "crc")}
                self.files[rec["file"]] = FileState(done=rec["event"] == "done", **fields)

    def check_settings(self, settings: dict) -> None:
        """Resuming with another model or other settings would mix two runs' outputs."""
        if self.settings is not None:
            for key in sorted(set(settings) | set(self.settings)):
                if settings.get(key) != self.settings.get(key):
                    raise UserError(f"{self.path}: this output folder was written with {key} = "
                                    f"{self.settings.get(key)!r}, now {settings.get(key)!r}; use a new --output "
                                    "folder (or delete it to start over)")
        self.append({"event": "start", "settings": settings, "time": time.time()})
        self.settings = self.settings or settings

    def append(self, rec: dict) -> None:
        rec = {**rec, "crc": record_crc(rec)}
        data = memoryview((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        while data:                                # a raw write may take only part of it
            data = data[self._fh.write(data):]
        os.fsync(self._fh.fileno())

    def put(self, rel: str, state: FileState, done: bool) -> None:
        state.done = done
        self.files[rel] = state
        self.append(state.record(rel, "done" if done else "progress"))

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------- reading documents

@dataclass
class Doc:
    unit: Unit
    line: int                       # jsonl: 1-based input line; parquet: 1-based row; text: 0
    text: str
    record: dict | None = None      # jsonl: the input object
    end: int = 0                    # text: the input byte just after this piece


@dataclass
class Failure:
    unit: Unit
    line: int                       # 0: the whole file is skipped; else the jsonl line or parquet row, output null
    why: str
    record: dict | None = None      # jsonl: the input object, when the line is one (its output keeps it)

    def __str__(self):
        return f"{self.unit.path}{f':{self.line}' if self.line else ''}: {self.why}"


@dataclass
class Blank:
    """A blank jsonl line: it keeps its place with a null output, and is no failure."""
    unit: Unit
    line: int


@dataclass
class UnitEnd:
    unit: Unit


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def check_text_file(path: Path, start: int = 0, end: int = -1) -> str:
    """"" for a readable UTF-8 text file, else why it is skipped. One pass in blocks (memory stays bounded),
    before anything of the file is corrected, so a bad byte late in a big file writes nothing. A range
    [start, end) of the file (cut at piece boundaries, so never inside a character) is checked alone."""
    decoder, pos, held = codecs.getincrementaldecoder("utf-8")(), start, 0
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            while block := fh.read(1 << 20 if end < 0 else min(1 << 20, end - pos)):
                if b"\x00" in block:
                    return "binary file (NUL bytes), not text; skipped"
                held = len(decoder.getstate()[0])      # bytes of a character the last block cut
                decoder.decode(block)
                pos += len(block)
            held = len(decoder.getstate()[0])
            decoder.decode(b"", final=True)
    except OSError as e:
        return f"cannot read ({e.strerror}); skipped"
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte {pos - held + e.start}); convert it to UTF-8; skipped"
    return ""


def piece_end(block: bytes) -> int:
    """Where a piece of a .txt file ends, given the TEXT_CHUNK_BYTES + 1 bytes from its start (the last one
    only looks ahead): after the last paragraph break (blank line) that fits, else the last line end, else
    the last space or tab, else at TEXT_CHUNK_BYTES backed off to a character boundary (a file without
    whitespace). It depends on these bytes alone: a resumed run cuts exactly where an uninterrupted one did."""
    n = len(block) - 1
    last = None
    for last in _BLANK_LINE.finditer(block, 0, n):
        pass
    if last is not None:
        return last.end()
    cut = block.rfind(b"\n", 0, n)
    if cut < 0:
        cut = max(block.rfind(b" ", 0, n), block.rfind(b"\t", 0, n))
    if cut >= 0:
        return cut + 1
    while block[n] & 0xC0 == 0x80:                 # the next piece may not start inside a UTF-8 character
        n -= 1
    return n


def text_chunks(path: Path, start: int, end: int = -1):
    """(end offset, bytes) of each piece of a .txt file from byte `start` (a piece boundary: 0 or an end
    this function gave) up to byte `end` (another such end; -1: the end of the file), read TEXT_CHUNK_BYTES
    at a time. Every cut depends only on the bytes after the one before, so the pieces of a range are
    exactly the whole file's pieces there. An empty file is one empty piece."""
    limit = max(TEXT_CHUNK_BYTES, 4)               # room for any UTF-8 character
    with open(path, "rb") as fh:
        fh.seek(start)
        pos, buf = start, b""
        while end < 0 or pos < end:
            buf += fh.read(limit + 1 - len(buf))
            if len(buf) <= limit:                  # the rest of the file is the last piece
                if buf or pos == 0:
                    yield pos + len(buf), buf
                return
            cut = piece_end(buf)
            yield pos + cut, buf[:cut]
            pos, buf = pos + cut, buf[cut:]


def read_text_unit(unit: Unit, start: int):
    """The pieces of a .txt file from byte `start` on, as documents; a bad file is one Failure."""
    why = check_text_file(unit.path, start, unit.end)
    if why:
        yield Failure(unit, 0, why)
        return
    try:
        for end, data in text_chunks(unit.path, start, unit.end):
            yield Doc(unit, 0, data.decode("utf-8"), end=end)
    except OSError as e:
        yield Failure(unit, 0, f"cannot read ({e.strerror}); skipped")
        return
    except UnicodeDecodeError:                     # checked above: the file changed while it was read
        yield Failure(unit, 0, "changed while it was read (no longer UTF-8); skipped")
        return
    yield UnitEnd(unit)


def read_jsonl_unit(unit: Unit, text_field: str, start_line: int):
    """Documents from line start_line+1 on; bad lines become Failures, blank ones Blanks (both keep
    their place in the output with a null output)."""
    try:
        fh = open(unit.path, "rb")
    except OSError as e:
        yield Failure(unit, 0, f"cannot read ({e.strerror}); skipped")
        return
    with fh:
        for n, raw in enumerate(fh, 1):
            if n <= start_line:
                continue
            yield _jsonl_line(unit, n, raw, text_field)
    yield UnitEnd(unit)


def _jsonl_line(unit: Unit, n: int, raw: bytes, text_field: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Failure(unit, n, f"not UTF-8 (byte {e.start} of the line); output null")
    if not line.strip():
        return Blank(unit, n)
    try:
        rec = json.loads(line)
    except ValueError as e:
        return Failure(unit, n, f"not JSON ({e.msg}); output null")
    if not isinstance(rec, dict):
        return Failure(unit, n, "not a JSON object; output null")
    if text_field not in rec:
        return Failure(unit, n, f"no field {text_field!r} (set --text-field); output null", rec)
    if not isinstance(rec[text_field], str):
        return Failure(unit, n, f"field {text_field!r} is not a string; output null", rec)
    return Doc(unit, n, rec[text_field], rec)


def pyarrow_for(path: Path):
    """(pyarrow, pyarrow.parquet), imported only when a parquet input needs them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install 'nichelm[parquet]'") from None
    return pyarrow, pyarrow.parquet


def read_parquet_unit(unit: Unit, text_field: str, start_row: int):
    """Documents from row start_row+1 on (rows count from 1, like jsonl lines); a row without a string
    in column text_field is a Failure (the row stays, its output is null); a file pyarrow cannot read
    is one Failure for the whole file."""
    pa, pq = pyarrow_for(unit.path)
    try:
        pf = pq.ParquetFile(unit.path)
        names = pf.schema_arrow.names
        if text_field not in names:
            has = ", ".join(map(repr, names[:8])) + (", ..." if len(names) > 8 else "")
            why = f"no column {text_field!r} (it has {has}; set --text-field); output null"
            for n in range(start_row + 1, pf.metadata.num_rows + 1):
                yield Failure(unit, n, why)
        else:
            groups, n = [], 0                       # skip whole row groups that are done
            for g in range(pf.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if groups or n + rows > start_row:
                    groups.append(g)
                else:
                    n += rows
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field], row_groups=groups) if groups else ():
                for value in batch.column(0).to_pylist():
                    n += 1
                    if n <= start_row:
                        continue
                    if isinstance(value, str):
                        yield Doc(unit, n, value)
                    else:
                        what = "null" if value is None else f"a {type(value).__name__}"
                        yield Failure(unit, n, f"column {text_field!r} is {what}, not a string; output null")
    except (OSError, pa.ArrowException) as e:
        yield Failure(unit, 0, f"not a readable parquet file ({_first_line(e)}); skipped")
        return
    yield UnitEnd(unit)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def events(units: list[Unit], ledger: Ledger, text_field: str, resume_at):
    """Docs, Blanks, Failures and UnitEnds of every unfinished unit, in order.

    resume_at(unit) gives the text byte, jsonl line or parquet row to go on from, after checking the
    partial output really holds what the ledger says (Writer.resume_at)."""
    for unit in units:
        state = ledger.files.get(unit.rel)
        if state is not None and state.done:
            continue
        if unit.kind == "text":
            yield from read_text_unit(unit, resume_at(unit))
        elif unit.kind == "parquet":
            yield from read_parquet_unit(unit, text_field, resume_at(unit))
        else:
            yield from read_jsonl_unit(unit, text_field, resume_at(unit))


# ---------------------------------------------------------------- correcting

@dataclass
class DocResult:
    text: str
    windows: int = 0
    kept_too_different: int = 0
    kept_hit_limit: int = 0
    tokens: int = 0                 # tokens the model wrote (its raw output, before the guard)
    kept_low_margin: int = 0
    docs_out_of_domain: int = 0
    changed: int = 0
    corrected: int = 0
    input_tokens: int = 0
    input_mnats: int = 0


def correct_documents(corrector, texts: list[str], guard: bool = True) -> list[DocResult]:
    """Corrector.correct, plus per-document guard counts: windows of all texts share batches."""
    from nichelm.data.tokenizer import encode_texts
    from nichelm.inference import by_document, cut_windows, stitch
    cut = [cut_windows(t, corrector.window_chars) for t in texts]
    fixed = corrector.correct_pieces(cut)
    tokens = [len(ids) for ids in encode_texts(corrector.tokenizer, [c.raw for c in fixed])]
    margin = corrector.guard_margin if guard else None
    results, k = [], 0
    for pieces in by_document(cut, fixed):
        r = DocResult(stitch(pieces, margin, corrector.document_tests))
        for c, _ in pieces:
            r.windows += 1
            r.kept_too_different += c.kept_input == "too_different"
            r.kept_hit_limit += c.kept_input == "hit_limit"
            r.tokens += tokens[k]
            r.kept_low_margin += c.kept_input == "low_margin"
            r.docs_out_of_domain = int(r.docs_out_of_domain or c.kept_input == "out_of_domain")
            r.changed += c.raw != c.source
            r.corrected += (c.text if guard else c.raw) != c.source
            if c.surprisal is not None:
                r.input_tokens += c.tokens
                r.input_mnats += round(1000 * c.surprisal * c.tokens)
            k += 1
        results.append(r)
    return results


def label_documents(classifier, texts: list[str], guard: bool = True) -> list[DocResult]:
    """Classifier.classify: each document's label (the best sum of its windows' label scores)."""
    from nichelm.windows import cut_windows
    labels = classifier.classify(texts)
    return [DocResult(label, windows=sum(1 for w, _ in cut_windows(t, classifier.window_chars) if w.strip()))
            for t, label in zip(texts, labels)]


# What a document becomes, by the task's decoding (Task.decoding), and the field it is written to by default
RESULTS = {"free": correct_documents, "labels": label_documents}
OUTPUT_FIELDS = {"free": "corrected", "labels": "label"}
# a .txt input's output is its text corrected; a label needs a record (jsonl line, parquet row) to go into
TXT_INPUTS = {"free": True, "labels": False}


# ---------------------------------------------------------------- writing

@dataclass
class PendingPart:
    """A parquet output's rows not yet in a part file (None: a row without a text)."""
    state: FileState
    values: list = field(default_factory=list)
    chars: int = 0
    since: float = field(default_factory=time.monotonic)


class Writer:
    """Turns corrected documents into files and ledger records, in input order."""

    def __init__(self, out: Path, ledger: Ledger, output_field: str, stamps: dict[str, tuple[int, int]]):
        self.out, self.ledger, self.output_field = out, ledger, output_field
        self.stamps = stamps                      # rel -> the input's (size, mtime_ns) before it was read
        self.open: dict[str, tuple] = {}          # rel -> (file handle, FileState) for text and jsonl outputs
        self.tables: dict[str, PendingPart] = {}  # rel -> pending rows of a parquet output
        self.file_failures: list[str] = []        # whole files skipped by this run (jsonl lines, parquet rows: ledger)

    def partial_path(self, rel: str) -> Path:
        final = self.out / rel
        return final.with_name(f".{final.name}.partial")

    def put(self, rel: str, state: FileState, done: bool) -> None:
        """A ledger record of `rel`, stamped with its input's size and modification time."""
        state.size, state.mtime_ns = self.stamps.get(rel, (-1, -1))
        self.ledger.put(rel, state, done)

    def _partial(self, unit: Unit):
        """The open partial output of a text or jsonl unit, cut back to what the ledger recorded."""
        if unit.rel in self.open:
            return self.open[unit.rel]
        state = self.ledger.files.get(unit.rel) or FileState()
        part, final = self.partial_path(unit.rel), self.out / unit.rel
        part.parent.mkdir(parents=True, exist_ok=True)
        if not part.exists() and final.exists() and state.bytes and final.stat().st_size == state.bytes:
            final.rename(part)                     # killed after the final rename, before the ledger line
        if (not part.exists() or part.stat().st_size < state.bytes
                or (unit.kind == "jsonl" and not _ends_a_line(part, state.bytes))):
            state = FileState()                    # the partial output is gone or short: start this file over
        fh = open(part, "r+b" if part.exists() else "w+b")
        fh.truncate(state.bytes)
        fh.seek(state.bytes)
        self.open[unit.rel] = (fh, state)
        return fh, state

    def _parquet(self, unit: Unit) -> PendingPart:
        """The rows of a parquet unit not yet in a part file, and its state, the part files checked
        against the ledger."""
        if unit.rel in self.tables:
            return self.tables[unit.rel]
        state = self.ledger.files.get(unit.rel) or FileState()
        folder = self.partial_path(unit.rel)
        if not parts_hold(folder, state.parts, state.lines):
            state = FileState()                    # the part files are gone or short: start this file over
        keep_parts(folder, state.parts)
        self.tables[unit.rel] = PendingPart(state)
        return self.tables[unit.rel]

    def resume_at(self, unit: Unit) -> int:
        """Where reading `unit` goes on (text: byte offset; jsonl: lines done; parquet: rows done), said on
        stderr when it is not the start: the finished part is not read, decoded or written again."""
        if unit.kind == "parquet":
            at, what = self._parquet(unit).state.lines, "after row"
        else:
            state = self._partial(unit)[1]
            at, what = (max(state.offset, unit.start), "at byte") if unit.kind == "text" else (state.lines, "after line")
        if at > unit.start:
            print(f"nichelm apply: resuming {unit.path} {what} {at}", file=sys.stderr, flush=True)
        return at

    def doc(self, doc: Doc, res: DocResult) -> None:
        if doc.unit.kind == "parquet":
            pending = self._parquet(doc.unit)
            pending.values.append(res.text)
            pending.chars += len(res.text)
            pending.state.lines = doc.line
            _add(pending.state, res)
            return
        fh, state = self._partial(doc.unit)
        if doc.unit.kind == "text":
            fh.write(res.text.encode("utf-8"))
            state.offset = doc.end
        else:
            self._write_line(fh, {**doc.record, self.output_field: res.text})
            state.lines = doc.line
        _add(state, res)

    @staticmethod
    def _write_line(fh, row: dict) -> None:
        try:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:     # a lone surrogate the input held as an escape ("\ud800"): escape it back
            line = (json.dumps(row) + "\n").encode("utf-8")
        fh.write(line)

    def null(self, unit: Unit, line: int, record: dict | None) -> FileState:
        """A jsonl line or parquet row that keeps its place with a null output (a blank or bad one)."""
        if unit.kind == "parquet":
            pending = self._parquet(unit)
            pending.values.append(None)
            state = pending.state
        else:
            fh, state = self._partial(unit)
            self._write_line(fh, {**(record or {}), self.output_field: None})
        state.lines = line
        return state

    def failure(self, f: Failure) -> None:
        print(f"nichelm apply: {f}", file=sys.stderr, flush=True)
        if not f.line:
            self.file_failures.append(str(f))
            self.tables.pop(f.unit.rel, None)      # a file that broke mid-way: drop its unrecorded output
            if f.unit.rel in self.open:
                self.open.pop(f.unit.rel)[0].close()
                if f.unit.rel not in self.ledger.files:      # nothing of it recorded: leave no partial file
                    self.partial_path(f.unit.rel).unlink(missing_ok=True)
            return
        state = self.null(f.unit, f.line, f.record)
        state.failed_count += 1
        if len(state.failed) < MAX_LISTED_FAILURES:
            state.failed.append(str(f))

    def sync(self) -> None:
        """Make every output's progress durable: data first, then the ledger line that counts it. A parquet
        output's pending rows become a part file once they are big or old enough (PendingPart)."""
        for rel, (fh, state) in self.open.items():
            fh.flush()
            os.fsync(fh.fileno())
            state.bytes = fh.tell()
            self.put(rel, state, done=False)
        for rel, pending in self.tables.items():
            if pending.chars >= PART_BYTES or time.monotonic() - pending.since >= PART_SECONDS:
                self._flush_part(rel)

    def _flush_part(self, rel: str) -> None:
        """A parquet output's pending rows become the next part file; then the ledger counts it."""
        pending = self.tables[rel]
        if pending.values:
            write_part(self.partial_path(rel), pending.state.parts, pending.values)
            pending.state.parts += 1
            pending.values, pending.chars, pending.since = [], 0, time.monotonic()
        self.put(rel, pending.state, done=False)

    def end(self, unit: Unit) -> None:
        if unit.kind == "parquet":
            self._parquet(unit)                    # opens the outputs of files with no rows
            self._flush_part(unit.rel)
            state = self.tables.pop(unit.rel).state
            folder = self.partial_path(unit.rel)
            combine_parts(unit.path, folder, state.parts, self.out / unit.rel, self.output_field)
            self.put(unit.rel, state, done=True)
            shutil.rmtree(folder, ignore_errors=True)
            return
        fh, state = self._partial(unit)            # opens (empty) outputs of files with no documents
        fh.flush()
        os.fsync(fh.fileno())
        state.bytes = fh.tell()
        fh.close()
        del self.open[unit.rel]
        self.put(unit.rel, state, done=False)
        os.replace(self.partial_path(unit.rel), self.out / unit.rel)
        fsync_dir((self.out / unit.rel).parent)      # the rename is durable before the record says done
        self.put(unit.rel, state, done=True)

    def close(self) -> None:
        for fh, _ in self.open.values():
            fh.close()


_TEMP_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")     # nichelm.io.atomic_file's temporary file for NAME


def remove_stale_temp_files(out: Path, units: list[Unit]) -> None:
    """Delete the temporary files (.NAME.XXXXXXXX.tmp beside NAME) that kills left mid-way through atomic
    writes of this shard's outputs: once, when a run resumes. Other shards' are left to their own process."""
    mine = {out / u.rel for u in units} | {out / u.name for u in units if u.name}     # + joined outputs
    for folder, _, names in os.walk(out):
        for name in names:
            m = _TEMP_NAME.fullmatch(name)
            if m and Path(folder) / m.group(1) in mine:
                (Path(folder) / name).unlink(missing_ok=True)


def _ends_a_line(path: Path, size: int) -> bool:
    """Do the first `size` bytes of a jsonl output end with a whole line? (Not if the ledger and the
    file disagree: then the file is started over rather than cut mid-line.)"""
    if size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"


def part_path(folder: Path, i: int) -> Path:
    return folder / f"part-{i:06d}.parquet"


def parts_hold(folder: Path, n: int, rows: int) -> bool:
    """Do the first n part files of a parquet output exist and hold `rows` rows in all?"""
    pa, pq = pyarrow_for(folder)
    try:
        return sum(pq.read_metadata(part_path(folder, i)).num_rows for i in range(n)) == rows
    except (OSError, pa.ArrowException):
        return False


def keep_parts(folder: Path, n: int) -> None:
    """Delete what the partial folder holds besides its first n parts (parts the ledger does not
    count yet, temporary files of a killed write)."""
    keep = {part_path(folder, i).name for i in range(n)}
    for p in (folder.iterdir() if folder.is_dir() else ()):
        if p.name not in keep:
            p.unlink()


def write_part(folder: Path, i: int, values: list) -> None:
    """Part i of a parquet output: one string column (null for failed rows), written atomically."""
    pa, pq = pyarrow_for(folder)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"output": pa.array(values, pa.string())}), sink)
    atomic_write_bytes(part_path(folder, i), sink.getvalue().to_pybytes())


def combine_parts(source: Path, folder: Path, n: int, final: Path, output_field: str) -> None:
    """FINAL: the input's columns, rows and row groups as they are, plus output_field (replaced in place
    when the input has that column) from the n parts; written atomically, with one input row group and
    one part in memory at a time."""
    pa, pq = pyarrow_for(source)
    pf = pq.ParquetFile(source)
    held = sum(pq.read_metadata(part_path(folder, i)).num_rows for i in range(n))
    if held != pf.metadata.num_rows:
        raise UserError(f"{source}: has {pf.metadata.num_rows} rows but {folder} holds {held} outputs; "
                        "was the input changed during the run? delete that folder and re-run")
    schema, field = pf.schema_arrow, pa.field(output_field, pa.string())
    at = schema.get_field_index(output_field)
    schema = schema.set(at, field) if at >= 0 else schema.append(field)
    parts = (pq.read_table(part_path(folder, i)).column(0).combine_chunks() for i in range(n))
    part, used = pa.array([], pa.string()), 0      # the part being read, and how many of its rows are placed
    with atomic_file(final) as fh, pq.ParquetWriter(fh, schema) as writer:
        for g in range(pf.num_row_groups):
            group = pf.read_row_group(g)
            pieces, need = [], group.num_rows
            while need:
                if used == len(part):
                    part, used = next(parts), 0
                take = min(need, len(part) - used)
                pieces.append(part.slice(used, take))
                used, need = used + take, need - take
            piece = pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())
            group = group.set_column(at, field, piece) if at >= 0 else group.append_column(field, piece)
            writer.write_table(group, row_group_size=max(1, group.num_rows))


def _add(state: FileState, r: DocResult) -> FileState:
    state.docs += 1
    state.windows += r.windows
    state.kept_too_different += r.kept_too_different
    state.kept_hit_limit += r.kept_hit_limit
    state.tokens += r.tokens
    for name in GUARD_FIELDS:
        setattr(state, name, getattr(state, name) + getattr(r, name))
    return state


# ---------------------------------------------------------------- the guard's view of a corpus

GUARD_FIELDS = ("kept_low_margin", "docs_out_of_domain", "changed", "corrected", "input_tokens", "input_mnats")
DOMAIN_MIN_WINDOWS = 200            # windows seen before the out-of-domain check speaks
DOMAIN_SURPRISAL_RATIO = 1.5        # out of domain: input surprisal above this x the val split's, or
DOMAIN_KEPT_RATIO = 0.5             # a share of the model's changes kept below this x the val split's
                                    # (inference.DocumentTests judges one document)


@dataclass
class GuardFigures:
    """Windows, windows changed by the model and corrections the guard kept, and the model's surprisal
    of the input, summed over documents, files or a whole run."""
    windows: int = 0
    changed: int = 0
    corrected: int = 0
    input_tokens: int = 0
    input_mnats: int = 0

    def add(self, r) -> None:
        for name in ("windows", "changed", "corrected", "input_tokens", "input_mnats"):
            setattr(self, name, getattr(self, name) + getattr(r, name))

    @property
    def kept_share(self) -> float | None:
        return self.corrected / self.changed if self.changed else None

    @property
    def input_surprisal(self) -> float | None:
        """Mean nats per input token (end markers included)."""
        return self.input_mnats / 1000 / self.input_tokens if self.input_tokens else None

    def to_dict(self) -> dict:
        return {"windows": self.windows, "changed": self.changed, "corrected": self.corrected,
                "kept_share": self.kept_share, "input_surprisal": self.input_surprisal,
                "input_tokens": self.input_tokens, "input_mnats": self.input_mnats}     # (the raw sums: mergeable)

    @classmethod
    def from_dict(cls, d: dict) -> "GuardFigures":
        return cls(**{k: d[k] for k in ("windows", "changed", "corrected", "input_tokens", "input_mnats")})

    def domain_warning(self, reference: dict) -> str | None:
        """One line when these inputs look unlike the data the guard was calibrated on (its val split:
        `reference`), else None: the model finds them much more surprising, or the guard keeps far fewer
        of its changes. Nothing is said before DOMAIN_MIN_WINDOWS windows or without a calibration."""
        if self.windows < DOMAIN_MIN_WINDOWS or not reference:
            return None
        why = []
        ref_s, ref_k = reference.get("input_surprisal"), reference.get("kept_share")
        if ref_s and self.input_surprisal is not None and self.input_surprisal > DOMAIN_SURPRISAL_RATIO * ref_s:
            why.append(f"input surprisal {self.input_surprisal:.2f} nats/token vs {ref_s:.2f} on its validation data")
        if ref_k and self.kept_share is not None and self.changed >= 20 and self.kept_share < DOMAIN_KEPT_RATIO * ref_k:
            why.append(f"guard kept {100 * self.kept_share:.0f}% of the model's changes vs {100 * ref_k:.0f}%")
        if not why:
            return None
        return ("nichelm apply: warning: this corpus looks unlike the model's training data (" + "; ".join(why) +
                "): the guard leaves most of it as it was; a model trained on text like it would do more")


# ---------------------------------------------------------------- progress

class Progress:
    """tqdm on a terminal, a plain line every few seconds otherwise (logs of batch jobs)."""

    def __init__(self, total_files: int, every_s: float = 10.0):
        self.start = self.last = time.time()
        self.docs = self.tokens = self.files = 0
        self.total, self.every_s = total_files, every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_files, unit="file", file=sys.stderr)

    def rates(self) -> tuple[float, float]:
        dt = max(time.time() - self.start, 1e-9)
        return self.docs / dt, self.tokens / dt

    def update(self, files: int, docs: int, tokens: int) -> None:
        self.files, self.docs, self.tokens = self.files + files, self.docs + docs, self.tokens + tokens
        docs_s, tok_s = self.rates()
        if self.bar is not None:
            self.bar.update(files)
            self.bar.set_postfix_str(f"{docs_s:.1f} docs/s, {tok_s:.0f} tok/s")
        elif time.time() - self.last >= self.every_s:
            self.last = time.time()
            print(f"nichelm apply: {self.files}/{self.total} files, {self.docs} documents, "
                  f"{docs_s:.1f} docs/s, {tok_s:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the command

@dataclass
class ApplyReport:
    files: int                      # input files in this shard
    documents: int                  # corrected documents in OUT (this and earlier runs; a .txt piece is one)
    windows: int
    kept_too_different: int
    kept_hit_limit: int
    tokens: int
    seconds: float                  # this run
    documents_this_run: int
    tokens_this_run: int
    failed: list[str]               # skipped files and jsonl lines (at most 100 listed per jsonl file)
    failed_count: int               # all of them
    kept_low_margin: int = 0        # windows the margin test kept as they were
    documents_out_of_domain: int = 0            # documents left whole as unlike the training data
    guard_margin: float | None = None           # nats/token (None: no margin test, the length cap alone)
    guard: dict = field(default_factory=dict)   # GuardFigures of all files: kept_share, input_surprisal, ...
    per_file: dict = field(default_factory=dict)    # output name -> its GuardFigures
    domain_warning: str | None = None           # GuardFigures.domain_warning of all files
    guard_reference: dict | None = None         # the model's own figures on its val split (the warning's yardstick)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_identity(model: Path) -> str:
    """Names the weights, so a resume with another model or a newer checkpoint is refused."""
    from nichelm.artifacts import model_identity
    return model_identity(model)


def apply(model: str | Path, inputs: list[str | Path], output: str | Path, shard: str | None = None,
          **settings) -> ApplyReport:
    """Correct every input into OUTPUT in this process; re-running resumes where the last run stopped.
    shard "I/N": only task I of N of the plan (plan_tasks), as one datatrove task of `nichelm apply
    --tasks N` would (nichelm.apply_pipeline runs all of them on an executor). Settings: run_task's."""
    shard_i, shard_n = parse_shard(shard)
    refuse_overlap(inputs, output)
    return run_task(model, output, plan_tasks(inputs, shard_n), shard_i, **settings)


_LOADED: dict = {}                  # the corrector this process loaded: a worker running several tasks loads once


def cached_corrector(model: Path, **kwargs):
    """The runner of the model's task (inference.load_runner: a Corrector, or a Classifier for a label set)."""
    from nichelm.inference import load_runner
    key = (str(model), json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_runner(model, **kwargs)
    return _LOADED[key]


def run_task(model: str | Path, output: str | Path, plan: Plan, rank: int,
             batch_size: int = 64, threads: int = 0, text_field: str = "text", output_field: str | None = None,
             guard_max_change: float | None = None, device: str = "cpu", group_windows: int = 0,
             window_overlap: int = 0, backend: str = "torch", compile: str | bool = "auto",
             draft_tokens: int | None = None, dtype: str = "auto", guard_margin: float | None = None) -> ApplyReport:
    """Correct task `rank`'s units of the plan into OUTPUT (its own ledger), then join the split files whose
    parts are all done; re-running resumes where the last run stopped.

    backend: the decoding engine, "torch" (nichelm's own), "ct2" or "vllm" (nichelm.backends).
    compile: torch.compile the torch engine; "auto" = when all the inputs (every task's) hold at least
    COMPILE_MIN_BYTES of input (compiling costs ~15 s on a 2-core CPU and then decodes faster).
    draft_tokens: copy drafts per greedy step of the torch engine (nichelm.generate; same output);
    None: the engine's default. dtype: the torch engine's weights ("auto": bf16 on CUDA, fp32 on CPU).
    guard_margin: the guard's margin in nats/token (nichelm.inference); None: the one `nichelm evaluate`
    chose for this model, if any. output_field: the jsonl field / parquet column added; None: the task's
    (OUTPUT_FIELDS: "corrected", or "label" for a classification model, which labels records: .jsonl and
    .parquet inputs only)."""
    short_openmp_spin()
    import torch
    from nichelm.inference import DEFAULT_MAX_CHANGE
    if threads:
        torch.set_num_threads(threads)
    model, out = Path(model), Path(output)
    units = plan.tasks[rank]
    stamps = input_stamps(units)
    for u in units:
        if u.name and u.rel in stamps and stamps[u.rel] != plan.stamps[u.name]:
            raise UserError(f"{u.path}: changed since the work was planned (size or modification time); "
                            "re-run the same command to plan it again")
    parquet = next((u for u in units if u.kind == "parquet"), None)
    if parquet is not None:
        pyarrow_for(parquet.path)                  # a missing pyarrow is named before the model loads
    if compile == "auto":
        compile = plan.total_bytes >= COMPILE_MIN_BYTES
    corrector = cached_corrector(model, device=device, batch_size=batch_size, guard_max_change=guard_max_change,
                               window_overlap=window_overlap, backend=backend,
                               compile=bool(compile) and backend == "torch", dtype=dtype, guard_margin=guard_margin,
                               **({} if draft_tokens is None else {"draft_tokens": draft_tokens}))
    # None: the length cap the model's margin was chosen with (guard.json); a classifier has none
    guard_max_change = getattr(corrector, "guard_max_change",
                               DEFAULT_MAX_CHANGE if guard_max_change is None else guard_max_change)
    guard = guard_max_change >= 0
    decoding = corrector.task.decoding
    output_field = output_field or OUTPUT_FIELDS[decoding]
    if not TXT_INPUTS[decoding]:
        text = next((u for u in units if u.kind == "text"), None)
        if text is not None:
            raise UserError(f"{text.path}: a classification model labels records, and a .txt file has none; give "
                            ".jsonl or .parquet inputs (the label goes into a field of each record)")
    ledger = Ledger(out, (rank, len(plan.tasks)))
    resuming = ledger.settings is not None
    try:
        margin = getattr(corrector, "guard_margin", float("-inf"))
        deleted = getattr(corrector, "guard_max_deleted_letters", 0)
        ledger.check_settings({"model": model_identity(model), "guard_max_change": guard_max_change,
                               **({"guard_max_deleted_letters": deleted} if deleted else {}),
                               **({"guard_margin": margin} if margin != float("-inf") else {}),
                               "text_field": text_field, "output_field": output_field,
                               "window_chars": corrector.window_chars,
                               **({"window_overlap": window_overlap} if window_overlap else {}),
                               **({"backend": backend} if backend != "torch" else {}),
                               **({"dtype": dtype} if dtype != "auto" else {}),
                               # where .txt files are cut decides their output: a resume must cut alike
                               **({"text_chunk_bytes": TEXT_CHUNK_BYTES} if TEXT_CHUNK_BYTES != 1 << 16 else {})})
        if resuming:
            remove_stale_temp_files(out, units)
            forget_changed_inputs(units, ledger, stamps)
        report = _run(corrector, units, ledger, out, guard, output_field, text_field,
                      group_windows or 8 * batch_size, stamps)
        join_parts(out, plan, {u.name for u in units if u.name})
        return report
    except OSError as e:
        raise write_error(e, out) from None
    finally:
        ledger.close()


def short_openmp_spin() -> None:
    """Make torch's OpenMP threads sleep soon when they wait (GOMP_SPINCOUNT=OPENMP_SPIN_COUNT), unless the
    user chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT set). By default a waiting thread spins ~300,000 times at
    every parallel operation; decoding a small model is thousands of small operations, and where other work
    holds a core the spinning thread takes the time the thread it waits for needs (250 KB on a busy 2-core
    machine: 202 CPU-s with 2 threads, 25 with 1, 30 with 2 threads and this; same outputs). libgomp reads
    the setting when it loads, so this acts only before the process first imports torch (`nichelm apply`,
    each --workers task)."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def forget_changed_inputs(units: list[Unit], ledger: Ledger, stamps: dict[str, tuple[int, int]]) -> None:
    """An input whose size or modification time is not what the ledger recorded is corrected again from
    its start (its old partial output is cut back or replaced; a finished output is overwritten)."""
    for u in units:
        state = ledger.files.get(u.rel)
        if state is None or state.size < 0 or u.rel not in stamps:
            continue                               # new, recorded before stamps were kept, or unreadable
        if (state.size, state.mtime_ns) != stamps[u.rel]:
            print(f"nichelm apply: {u.path} changed since the last run (size or modification time); "
                  "correcting it again from the start", file=sys.stderr, flush=True)
            del ledger.files[u.rel]


def _run(corrector, units, ledger, out, guard, output_field, text_field, group_windows, stamps) -> ApplyReport:
    from nichelm.inference import cut_windows
    writer, progress = Writer(out, ledger, output_field, stamps), Progress(len(units))
    started = time.time()
    done_before = sum(1 for u in units if (s := ledger.files.get(u.rel)) is not None and s.done)
    progress.update(done_before, 0, 0)
    group, windows = [], 0
    seen, warned = GuardFigures(), False         # this run's windows, for the out-of-domain warning

    def flush():
        nonlocal warned
        docs = [ev for ev in group if isinstance(ev, Doc)]
        results = iter(RESULTS[corrector.task.decoding](corrector, [d.text for d in docs], guard))
        n_files = n_tokens = 0
        for ev in group:
            if isinstance(ev, Doc):
                res = next(results)
                writer.doc(ev, res)
                seen.add(res)
                n_tokens += res.tokens
            elif isinstance(ev, Failure):
                writer.failure(ev)
                n_files += ev.line == 0            # a whole file skipped
            elif isinstance(ev, Blank):
                writer.null(ev.unit, ev.line, None)
            else:
                writer.end(ev.unit)
                n_files += 1
        writer.sync()
        progress.update(n_files, len(docs), n_tokens)
        group.clear()
        warning = None if warned else seen.domain_warning(getattr(corrector, "guard", {}).get("val"))
        if warning:                                # once, as soon as enough windows are seen
            print(warning, file=sys.stderr, flush=True)
            warned = True

    try:
        for ev in events(units, ledger, text_field, writer.resume_at):
            group.append(ev)
            if isinstance(ev, Doc):
                windows += len(cut_windows(ev.text, corrector.window_chars))
            if windows >= group_windows or len(group) >= group_windows:    # (blank or bad lines: no windows)
                flush()
                windows = 0
        flush()
    finally:
        writer.close()
        progress.close()
    return _report(units, ledger, writer, progress, time.time() - started, corrector)


def _report(units, ledger, writer, progress, seconds, corrector=None) -> ApplyReport:
    states = [ledger.files[u.rel] for u in units if u.rel in ledger.files]
    failed = writer.file_failures + [f for s in states for f in s.failed]    # jsonl lines: this run and earlier
    per_file, total = {}, GuardFigures()
    for u in units:
        if u.rel in ledger.files:
            per_file.setdefault(u.output, GuardFigures()).add(ledger.files[u.rel])    # a split file: its ranges
            total.add(ledger.files[u.rel])
    margin = getattr(corrector, "guard_margin", float("-inf"))
    reference = getattr(corrector, "guard", {}).get("val")
    return ApplyReport(files=len({u.output for u in units}), documents=sum(s.docs for s in states),
                       windows=sum(s.windows for s in states),
                       kept_too_different=sum(s.kept_too_different for s in states),
                       kept_hit_limit=sum(s.kept_hit_limit for s in states),
                       tokens=sum(s.tokens for s in states), seconds=seconds,
                       documents_this_run=progress.docs, tokens_this_run=progress.tokens, failed=failed,
                       failed_count=len(writer.file_failures) + sum(s.failed_count for s in states),
                       kept_low_margin=sum(s.kept_low_margin for s in states),
                       documents_out_of_domain=sum(s.docs_out_of_domain for s in states),
                       guard_margin=None if margin == float("-inf") else margin, guard=total.to_dict(),
                       per_file={k: v.to_dict() for k, v in per_file.items()},
                       domain_warning=total.domain_warning(reference), guard_reference=reference)


def merge_reports(reports: list[dict], files: int) -> ApplyReport:
    """One report of the tasks' reports (ApplyReport.to_dict() each; a split file's figures are in several)."""
    sums = ("documents", "windows", "kept_too_different", "kept_hit_limit", "tokens", "documents_this_run",
            "tokens_this_run", "failed_count", "kept_low_margin", "documents_out_of_domain")
    merged = ApplyReport(files=files, seconds=max((r["seconds"] for r in reports), default=0.0), failed=[],
                         **{k: sum(r[k] for r in reports) for k in sums})
    per_file, total = {}, GuardFigures()
    for r in reports:
        merged.failed += r["failed"]
        merged.guard_margin = r["guard_margin"] if merged.guard_margin is None else merged.guard_margin
        merged.guard_reference = merged.guard_reference or r.get("guard_reference")
        for name, figures in r["per_file"].items():
            per_file.setdefault(name, GuardFigures()).add(GuardFigures.from_dict(figures))
            total.add(GuardFigures.from_dict(figures))
    merged.per_file = {k: per_file[k].to_dict() for k in sorted(per_file)}
    merged.guard = total.to_dict()
    merged.domain_warning = total.domain_warning(merged.guard_reference)
    return merged


def print_report(report: ApplyReport, file=sys.stderr) -> None:
    docs_s = report.documents_this_run / max(report.seconds, 1e-9)
    tok_s = report.tokens_this_run / max(report.seconds, 1e-9)
    print(f"nichelm apply: {report.documents} documents in {report.files} files "
          f"({report.documents_this_run} this run, {docs_s:.1f} docs/s, {tok_s:.0f} tok/s); "
          f"guard kept the input in {report.kept_too_different} too-different and {report.kept_hit_limit} "
          f"unfinished windows of {report.windows}", file=file)
    g = report.guard
    if g.get("changed") is not None:
        kept = f"{100 * g['kept_share']:.0f}%" if g.get("kept_share") is not None else "none"
        surprisal = f"{g['input_surprisal']:.2f}" if g.get("input_surprisal") is not None else "n/a"
        margin = (f"guard margin {report.guard_margin:.3f} nats/token kept {report.kept_low_margin} more windows "
                  f"and {report.documents_out_of_domain} unfamiliar documents as they were"
                  if report.guard_margin is not None
                  else "no guard margin (not calibrated: run `nichelm evaluate PROJECT`)")
        print(f"nichelm apply: {margin}; corrections kept: {kept} of the {g['changed']} windows the model changed; "
              f"model's surprisal of the input: {surprisal} nats/token", file=file)
    if report.domain_warning:
        print(report.domain_warning, file=file)
    if report.failed_count:
        print(f"nichelm apply: {report.failed_count} inputs could not be read (files skipped, jsonl lines and "
              "parquet rows given a null output):", file=file)
        for f in report.failed:
            print(f"  {f}", file=file)
        if report.failed_count > len(report.failed):
            print(f"  ... and {report.failed_count - len(report.failed)} more", file=file)
