"""Token shards in llm.c's layout, the index of example starts kept beside each, and a split as a list of shards.

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:
header[0] = magic, header[1] = version, header[2] = number of tokens.
  magic 20240520, version 1: uint16 tokens (vocabulary up to 65,535)
  magic 20240801, version 7: uint32 tokens (larger vocabularies)
Any language can read it: skip 1024 bytes, read N integers.

A split (`train_000000.bin`, `train_000001.bin`, ...) is never concatenated or loaded: `load_split`
gives a list of its shards as on-disk arrays (OnDisk) that read the few tokens asked for, so a
10B-token split costs a training process no more memory than a small one. Training rows start at
example starts (positions of the input marker); their index for a shard is cached beside it as
`train_000000.starts.npy` (plain .npy, no pickle), keyed by the shard's size and mtime so a rewritten
shard is re-indexed, and read the same way. `write_shards` cuts shards at example boundaries and
writes the index at the same time when it is given the input marker's id.

Why not memory-map the shards for training: the pages of a memmap that a process touches count in
its resident memory until it unmaps them, and on current kernels a touch maps a whole large folio
of the page cache (measured on Linux 6.18: ~2 MB of RSS per random row read), so a long run over a
memmapped split shows all of it as resident. Plain reads leave those pages to the kernel's page cache.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from nichelm.errors import UserError
from nichelm.io import atomic_file, atomic_write_bytes

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7
SCAN_TOKENS = 1 << 22            # scan shards in pieces this long, so indexing needs a few MB, not a shard's size
INDEX_VERSION = 1
FIX = "re-run `nichelm prepare PROJECT.toml --force`"


def write_shard(path: Path, tokens, vocab_size: int) -> None:
    wide = vocab_size > 65535
    dtype = np.uint32 if wide else np.uint16
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= (2**32 if wide else 2**16)):
        raise ValueError(f"token id out of range for {dtype.__name__} shard")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = (MAGIC_U32, VERSION_U32, len(tokens)) if wide else (MAGIC_U16, VERSION_U16, len(tokens))
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u4" if wide else "<u2").tobytes())


def _layout(path: Path) -> tuple[str, int]:
    """(dtype, number of tokens) of a shard, after checking that its header and size agree."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise UserError(f"{path}: cannot read token shard ({e.strerror}); {FIX}") from None
    if size < HEADER_BYTES:
        raise UserError(f"{path}: token shard is truncated ({size} bytes, shorter than its 1024-byte header); {FIX}")
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if (magic, version) == (MAGIC_U16, VERSION_U16):
        dtype = "<u2"
    elif (magic, version) == (MAGIC_U32, VERSION_U32):
        dtype = "<u4"
    else:
        raise UserError(f"{path}: not an llm.c token shard (magic {magic}, version {version}); {FIX}")
    expected = HEADER_BYTES + n * np.dtype(dtype).itemsize
    if n < 0 or size != expected:
        raise UserError(f"{path}: token shard is truncated or corrupt (header says {n} tokens = {expected} bytes, "
                        f"file has {size}); {FIX}")
    return dtype, n


class OnDisk:
    """A 1-D array stored in a file from a byte offset on, read element ranges at a time:
    `len(a)`, `a[i]` and `a[i:j]` (an ndarray of just those elements). Nothing is mapped or kept."""

    def __init__(self, path: Path, offset: int, dtype, length: int):
        self.path, self.offset, self.dtype, self.length = Path(path), offset, np.dtype(dtype), length
        self._file = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            if step != 1:
                raise IndexError("OnDisk reads contiguous ranges only")
            return self._read(start, max(stop - start, 0))
        i = operator.index(index)
        i = i + self.length if i < 0 else i
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for {self.length} elements")
        return self._read(i, 1)[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        if self._file is None:                     # opened once, unbuffered: a read is one seek and one read
            self._file = open(self.path, "rb", buffering=0)
        self._file.seek(self.offset + start * self.dtype.itemsize)
        size = count * self.dtype.itemsize
        data = self._file.read(size)
        if len(data) != size:                      # the file shrank under us
            raise UserError(f"{self.path}: file is shorter than its header says; {FIX}")
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


def open_shard(path: Path) -> OnDisk:
    """A shard's tokens as an on-disk array (checked like read_shard)."""
    dtype, n = _layout(Path(path))
    return OnDisk(path, HEADER_BYTES, dtype, n)


def read_shard(path: Path) -> np.memmap:
    """Memory-map a shard's tokens (no copy). A truncated or corrupt shard is a UserError."""
    path = Path(path)
    dtype, n = _layout(path)
    if n == 0:                                     # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def write_shards(out_dir: Path, split: str, tokens: np.ndarray, vocab_size: int,
                 shard_tokens: int = 50_000_000, boundary_id: int | None = None) -> list[Path]:
    """Cut a split's tokens into shards of at most `shard_tokens` tokens.

    With `boundary_id` (the input marker's id) each shard ends just before an example starts, so
    training rows, which never cross shards, lose nothing; and each shard's index of example starts
    is written beside it. Without it, shards are cut every `shard_tokens` tokens."""
    paths, start, total = [], 0, len(tokens)
    while True:
        end = min(start + shard_tokens, total)
        if boundary_id is not None and end < total:
            end = _last_start(tokens, start, end, boundary_id)
        path = out_dir / f"{split}_{len(paths):06d}.bin"
        write_shard(path, tokens[start:end], vocab_size)
        if boundary_id is not None:
            positions = _positions((tokens[i:min(i + SCAN_TOKENS, end)] for i in range(start, end, SCAN_TOKENS)),
                                   boundary_id)
            _write_index(path, boundary_id, positions)
        paths.append(path)
        start = end
        if start >= total:
            return paths


def _last_start(tokens: np.ndarray, start: int, limit: int, marker: int) -> int:
    """The last position in (start, limit] holding `marker`, searched backwards piece by piece;
    `limit` when there is none (one example longer than a shard: it has to be cut)."""
    hi = limit + 1
    while hi > start + 1:
        lo = max(start + 1, hi - SCAN_TOKENS)
        hits = np.flatnonzero(np.asarray(tokens[lo:hi]) == marker)
        if hits.size:
            return lo + int(hits[-1])
        hi = lo
    return limit


def shard_paths(shards_dir: Path, split: str) -> list[Path]:
    return sorted(Path(shards_dir).glob(f"{split}_*.bin"))


def index_path(shard: Path) -> Path:
    return shard.with_suffix(".starts.npy")        # train_000000.bin -> train_000000.starts.npy


def _index_key(shard: Path, marker: int) -> np.ndarray:
    # The index is valid for this marker and this exact file: a rewritten shard has a new mtime.
    st = shard.stat()
    return np.array([INDEX_VERSION, marker, st.st_size, st.st_mtime_ns], dtype="<i8")


def _write_index(shard: Path, marker: int, positions: np.ndarray) -> bool:
    """Cache a shard's marker positions beside it: one int64 .npy, the 4-number key then the positions.
    False when the folder is read-only: the index is then recomputed by every run."""
    try:
        with atomic_file(index_path(shard)) as f:
            np.save(f, np.concatenate([_index_key(shard, marker), positions.astype("<i8")]), allow_pickle=False)
    except OSError:
        return False
    return True


def _cached_index(shard: Path, marker: int) -> OnDisk | None:
    """The cached positions as an on-disk array, if the cache is whole and was made from this very shard file."""
    path = index_path(shard)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            key = np.frombuffer(f.read(32), dtype="<i8")
        size = path.stat().st_size
    except (OSError, ValueError, KeyError):        # missing or unreadable: rebuild it
        return None
    if dtype != np.dtype("<i8") or len(shape) != 1 or shape[0] < 4 or size != offset + 8 * shape[0] \
            or not np.array_equal(key, _index_key(shard, marker)):
        return None
    return OnDisk(path, offset + 32, "<i8", shape[0] - 4)


def _positions(chunks, marker: int) -> np.ndarray:
    """Positions of `marker` in a token stream given as consecutive pieces."""
    found, offset = [], 0
    for chunk in chunks:
        found.append(np.flatnonzero(chunk == marker) + offset)
        offset += len(chunk)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def example_starts(shard: Path, marker: int) -> OnDisk | np.ndarray:
    """Sorted positions of `marker` in a shard: read from the cached index when it matches the shard,
    else found by reading the shard piece by piece (a few MB of RAM) and cached. An on-disk array,
    or an ndarray where the cache cannot be written (a read-only folder)."""
    shard = Path(shard)
    cached = _cached_index(shard, marker)
    if cached is not None:
        return cached
    dtype, n = _layout(shard)
    width = np.dtype(dtype).itemsize
    with open(shard, "rb") as f:
        f.seek(HEADER_BYTES)
        chunks = (np.frombuffer(f.read(width * min(SCAN_TOKENS, n - i)), dtype=dtype) for i in range(0, n, SCAN_TOKENS))
        positions = _positions(chunks, marker)
    if _write_index(shard, marker, positions):
        cached = _cached_index(shard, marker)      # on disk: a big split's starts stay out of RAM
        if cached is not None:
            return cached
    return positions


class Split:
    """A split as the list of its shards, each an on-disk array: nothing is concatenated, copied or mapped."""

    def __init__(self, shards_dir: Path, name: str):
        self.dir, self.name = Path(shards_dir), name
        self.paths = shard_paths(self.dir, name)
        if not self.paths:
            raise UserError(f"{self.dir}: no {name}_*.bin token shards; run `nichelm prepare PROJECT.toml` first")
        self.shards = [open_shard(p) for p in self.paths]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def __str__(self) -> str:
        return f"{self.dir / self.name}_*.bin"


def load_split(shards_dir: Path, split: str) -> Split:
    """A split's shards, read on demand (see Split)."""
    return Split(shards_dir, split)
