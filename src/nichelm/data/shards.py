"""Token shards in llm.c's layout, and the loader that reads them.

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:
header[0] = magic, header[1] = version, header[2] = number of tokens.
  magic 20240520, version 1: uint16 tokens (vocabulary up to 65,535)
  magic 20240801, version 7: uint32 tokens (larger vocabularies)
Any language can read it: skip 1024 bytes, read N integers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nichelm.io import atomic_write_bytes

HEADER_INTS = 256
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7


def write_shard(path: Path, tokens, vocab_size: int) -> None:
    wide = vocab_size > 65535
    dtype = np.uint32 if wide else np.uint16
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= (2**32 if wide else 2**16)):
        raise ValueError(f"token id out of range for {dtype.__name__} shard")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = (MAGIC_U32, VERSION_U32, len(tokens)) if wide else (MAGIC_U16, VERSION_U16, len(tokens))
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u4" if wide else "<u2").tobytes())


def read_shard(path: Path) -> np.memmap:
    """Memory-map a shard's tokens (no copy)."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) < 3:
        raise ValueError(f"{path}: too short to be a token shard")
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if (magic, version) == (MAGIC_U16, VERSION_U16):
        dtype = "<u2"
    elif (magic, version) == (MAGIC_U32, VERSION_U32):
        dtype = "<u4"
    else:
        raise ValueError(f"{path}: not an llm.c token shard (magic {magic}, version {version})")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def write_shards(out_dir: Path, split: str, tokens: np.ndarray, vocab_size: int,
                 shard_tokens: int = 50_000_000) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = out_dir / f"{split}_{i:06d}.bin"
        write_shard(path, tokens[start:start + shard_tokens], vocab_size)
        paths.append(path)
    return paths


def shard_paths(shards_dir: Path, split: str) -> list[Path]:
    return sorted(shards_dir.glob(f"{split}_*.bin"))


def load_split(shards_dir: Path, split: str) -> np.ndarray:
    """All of a split's tokens as one array (memmapped when there is a single shard)."""
    parts = [read_shard(p) for p in shard_paths(shards_dir, split)]
    if not parts:
        raise FileNotFoundError(f"no {split}_*.bin shards in {shards_dir}; run `nichelm prepare` first")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
