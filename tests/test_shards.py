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
