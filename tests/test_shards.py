"""Token shards follow llm.c's documented layout byte for byte."""

import numpy as np

from nichelm.data.shards import read_shard, write_shard


def test_uint16_layout(tmp_path):
    tokens = np.array([0, 1, 2, 65535, 300], dtype=np.int64)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, vocab_size=50257)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
    assert (header[3:] == 0).all()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()


def test_uint32_layout_for_large_vocab(tmp_path):
    tokens = np.array([5, 70000, 128000], dtype=np.int64)
    path = tmp_path / "val_000000.bin"
    write_shard(path, tokens, vocab_size=128256)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert (header[0], header[1], header[2]) == (20240801, 7, 3)
    assert np.frombuffer(raw[1024:], dtype="<u4").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()


def test_a_shard_whose_size_disagrees_with_its_header_is_a_user_error(tmp_path):
    import pytest

    from nichelm.errors import UserError
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(50), vocab_size=50257)
    raw = path.read_bytes()
    for bad in (raw[:-2], raw + b"\0\0"):                  # cut short, or with bytes the header does not count
        path.write_bytes(bad)
        with pytest.raises(UserError, match=r"train_000000\.bin: token shard is truncated or corrupt.*--force"):
            read_shard(path)


def test_an_empty_split_still_writes_one_readable_shard(tmp_path):
    from nichelm.data.shards import write_shards
    paths = write_shards(tmp_path, "val", np.zeros(0, dtype=np.int64), vocab_size=100, boundary_id=1)
    assert [p.name for p in paths] == ["val_000000.bin"] and len(read_shard(paths[0])) == 0
