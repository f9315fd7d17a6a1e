"""Training data over a list of memory-mapped shards: the order of rows, rank slices, shard boundaries,
the cached index of example starts, and the errors a user sees for broken or too-small splits."""

import os

import numpy as np
import pytest

from nichelm.data import shards as shards_mod
from nichelm.data.loader import TaskBatches, permute
from nichelm.data.shards import OnDisk, example_starts, index_path, load_split, read_shard, write_shard, write_shards
from nichelm.errors import UserError
from tests.conftest import run_cli

IN, OUT, END = 1, 2, 3            # marker ids; content tokens are 10..99
SEQ = 16


def synthetic_stream(n_examples: int, seed: int = 0) -> np.ndarray:
    """Examples of varied length: IN input... OUT output... END."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_examples):
        a, b = rng.integers(2, 12, size=2)
        parts.append([IN, *rng.integers(10, 100, a), OUT, *rng.integers(10, 100, b), END])
    return np.concatenate([np.asarray(p) for p in parts])


def make_split(tmp_path, n_examples=300, shard_tokens=1000, boundary=True, name="train"):
    tokens = synthetic_stream(n_examples)
    write_shards(tmp_path, name, tokens, vocab_size=100, shard_tokens=shard_tokens,
                 boundary_id=IN if boundary else None)
    return tokens


def batches(tmp_path, seed=5, rank=0, world_size=1, name="train"):
    return TaskBatches(load_split(tmp_path, name), SEQ, IN, OUT, END, seed=seed, rank=rank, world_size=world_size)


def all_row_starts(data):
    """(shard, start) of every example the loader may use, in file order, from the shards themselves."""
    out = []
    for k, path in enumerate(data.split.paths):
        tokens = np.asarray(read_shard(path))
        out += [(k, int(s)) for s in np.flatnonzero(tokens == IN) if s + SEQ + 1 <= len(tokens)]
    return out


@pytest.mark.parametrize("boundary", [True, False])
def test_an_epoch_visits_every_example_once_inside_its_shard(tmp_path, boundary):
    make_split(tmp_path, boundary=boundary)
    data = batches(tmp_path)
    assert len(data.split.paths) >= 3
    expected = all_row_starts(data)
    assert len(data) == len(expected)
    for epoch in range(2):
        examples = data.order(np.arange(epoch * len(data), (epoch + 1) * len(data)))
        seen = [data.locate(int(e)) for e in examples]
        assert sorted(seen) == expected                            # a permutation of all examples
        assert [s for s in seen] != expected                        # ... and shuffled
    # Each row is a slice of one shard, starting at an example and ending inside the shard.
    rows = data.rows(0, len(data))
    for row, (k, s) in zip(rows, (data.locate(int(e)) for e in data.order(np.arange(len(data))))):
        shard = np.asarray(read_shard(data.split.paths[k]))
        assert row[0] == IN and s + SEQ + 1 <= len(shard)
        assert row.tolist() == shard[s:s + SEQ + 1].tolist()


def test_order_is_a_pure_function_of_seed_and_row(tmp_path):
    make_split(tmp_path)
    a, b, other = batches(tmp_path, seed=5), batches(tmp_path, seed=5), batches(tmp_path, seed=6)
    n = len(a)
    rows = np.arange(3 * n)
    assert a.order(rows).tolist() == b.order(rows).tolist()
    # A row asked alone (a resumed run starting mid-epoch) gets the same example.
    assert [int(a.order([g])[0]) for g in (0, 7, n - 1, n, 2 * n + 3)] == a.order([0, 7, n - 1, n, 2 * n + 3]).tolist()
    assert a.order(rows[:n]).tolist() != other.order(rows[:n]).tolist()   # the seed matters
    assert a.order(rows[:n]).tolist() != a.order(rows[n:2 * n]).tolist()  # each epoch differs
    x1, y1, m1 = a.get(step=3, micro=1, grad_accum=2, batch_size=4)
    x2, y2, m2 = b.get(step=3, micro=1, grad_accum=2, batch_size=4)
    assert (x1 == x2).all() and (y1 == y2).all() and (m1 == m2).all()


def test_rank_slices_are_disjoint_and_make_the_global_batch(tmp_path):
    make_split(tmp_path)
    one = batches(tmp_path)
    ranks = [batches(tmp_path, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        whole = one.get(step, micro=0, grad_accum=1, batch_size=8)[0]
        parts = [r.get(step, micro=0, grad_accum=1, batch_size=4)[0] for r in ranks]
        assert whole.tolist() == parts[0].tolist() + parts[1].tolist()
    # Over an epoch the ranks' rows are disjoint example sets.
    n = len(one)
    seen = [set(), set()]
    for r in range(2):
        for first in range(r * 4, n - n % 8, 8):
            seen[r] |= set(one.order(np.arange(first, first + 4)).tolist())
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_validation_batches_are_file_order(tmp_path):
    make_split(tmp_path, name="val")
    data = batches(tmp_path, name="val")
    x, _, _ = data.fixed(1, 4)
    starts = all_row_starts(data)[4:8]
    assert x.tolist() == [data.split.shards[k][s:s + SEQ].tolist() for k, s in starts]
    assert data.fixed(len(data), 1)[0].tolist() == data.fixed(0, 1)[0].tolist()   # wraps around


def test_permutation_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 5, 17, 64, 65, 1000):
        assert sorted(permute(np.arange(n), n, seed=3, epoch=1).tolist()) == list(range(n))


def test_write_shards_cuts_at_example_starts_and_writes_the_index(tmp_path):
    tokens = make_split(tmp_path, shard_tokens=1000)
    paths = sorted(tmp_path.glob("train_*.bin"))
    parts = [np.asarray(read_shard(p)) for p in paths]
    assert np.concatenate(parts).tolist() == tokens.tolist()               # nothing lost or repeated
    assert all(0 < len(p) <= 1000 for p in parts) and len(parts) >= 3
    assert all(p[0] == IN for p in parts)                                   # each shard starts an example
    for p, part in zip(paths, parts):
        assert index_path(p).is_file()
        assert np.asarray(example_starts(p, IN)).tolist() == np.flatnonzero(part == IN).tolist()


def test_write_shards_without_a_boundary_keeps_fixed_cuts(tmp_path):
    tokens = synthetic_stream(300)
    write_shards(tmp_path, "train", tokens, vocab_size=100, shard_tokens=1000)
    parts = [len(read_shard(p)) for p in sorted(tmp_path.glob("train_*.bin"))]
    assert parts[:-1] == [1000] * (len(parts) - 1) and sum(parts) == len(tokens)
    assert not list(tmp_path.glob("*.npy"))


def test_the_index_cache_is_used_and_rebuilt_when_the_shard_changes(tmp_path):
    shard = tmp_path / "train_000000.bin"
    write_shard(shard, [IN, 10, OUT, 11, END, IN, 12, OUT, END], vocab_size=100)
    assert np.asarray(example_starts(shard, IN)).tolist() == [0, 5]
    cache = index_path(shard)
    assert cache.is_file()
    # The cache is what is read: a planted index with the right key is believed ...
    planted = np.load(cache, allow_pickle=False)
    planted[4:] = [0, 3]
    np.save(cache, planted, allow_pickle=False)
    assert np.asarray(example_starts(shard, IN)).tolist() == [0, 3]
    assert isinstance(example_starts(shard, IN), OnDisk)                     # read from disk, not loaded
    # ... but another marker, or a rewritten shard (same size, new mtime), is indexed again.
    assert np.asarray(example_starts(shard, OUT)).tolist() == [2, 7]
    assert np.asarray(example_starts(shard, IN)).tolist() == [0, 5]      # the cache now holds IN for this file
    write_shard(shard, [10, IN, 10, OUT, 11, END, IN, OUT, END], vocab_size=100)
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))    # a coarse-clock file system
    assert np.asarray(example_starts(shard, IN)).tolist() == [1, 6]
    # A damaged cache is rebuilt, not trusted.
    cache.write_bytes(b"not numpy")
    assert np.asarray(example_starts(shard, IN)).tolist() == [1, 6]


def test_indexing_reads_the_shard_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "SCAN_TOKENS", 7)      # markers on both sides of every piece boundary
    tokens = synthetic_stream(40)
    write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=100)
    assert np.asarray(example_starts(tmp_path / "train_000000.bin", IN)).tolist() == np.flatnonzero(tokens == IN).tolist()


def test_a_split_too_small_for_one_row_names_the_split_and_the_fix(tmp_path):
    write_shards(tmp_path, "val", np.array([IN, 10, OUT, 11, END] * 3), vocab_size=100, boundary_id=IN)  # 15 < 17
    with pytest.raises(UserError, match=r"val_\*\.bin.*lower model\.block_size or add data") as err:
        batches(tmp_path, name="val")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"no train_\*\.bin token shards.*nichelm prepare"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("damage", ["truncate", "magic", "short_header"])
def test_a_damaged_shard_is_a_one_line_user_error(tmp_path, damage):
    make_split(tmp_path)
    shard = tmp_path / "train_000001.bin"
    raw = shard.read_bytes()
    shard.write_bytes({"truncate": raw[:-10], "magic": b"\0\0\0\0" + raw[4:], "short_header": raw[:100]}[damage])
    with pytest.raises(UserError) as err:
        batches(tmp_path)
    message = str(err.value)
    assert str(shard) in message and "nichelm prepare" in message and "--force" in message and "\n" not in message


def test_cli_train_reports_a_truncated_shard_in_one_line(tiny_project):
    assert run_cli("prepare", tiny_project).returncode == 0
    shard = tiny_project.parent / "run" / "data" / "shards" / "train_000000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    proc = run_cli("train", tiny_project, "--set", "train.max_steps=1")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert any(str(shard) in line and "--force" in line for line in lines), proc.stderr


def test_train_memory_bench_runs(tmp_path):
    """bench/train_memory.py end to end on a tiny split (its figures are taken at full size)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import train_memory
    finally:
        sys.path.pop(0)
    result = train_memory.main(["--shards", "2", "--shard-tokens", "4000", "--steps", "1", "--workdir", str(tmp_path)])
    runs = result["nichelm"]
    assert set(runs) == {"1_shard", "2_shards", "small_split", "ratio", "ratio_to_small"}
    assert all(runs[r]["returncode"] == 0 and runs[r]["step"] == 1 for r in ("1_shard", "2_shards", "small_split"))
    assert runs["1_shard"]["peak_rss_mb"] > 50
    assert runs["ratio"] == round(runs["2_shards"]["peak_rss_mb"] / runs["1_shard"]["peak_rss_mb"], 3)
    assert runs["2_shards"]["data_s_per_step"] >= 0 and result["train_tokens"] == 8000


def test_on_disk_arrays_read_like_arrays(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(100, 140), vocab_size=100_000)   # uint32 tokens
    tokens = load_split(tmp_path, "train").shards[0]
    assert len(tokens) == 40 and tokens[3] == 103 and tokens[-1] == 139
    assert tokens[5:9].tolist() == [105, 106, 107, 108] and tokens[38:99].tolist() == [138, 139]
    assert tokens[7:3].tolist() == []
    with pytest.raises(IndexError):
        tokens[40]
