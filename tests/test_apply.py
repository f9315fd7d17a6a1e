"""`nichelm apply`: a corpus of .txt/.jsonl in, mirrored corrections out; resumable after SIGKILL with
byte-identical results (also inside a large .txt), bad inputs reported by name, shards that cover every
input exactly once, changed inputs redone, an output folder apart from the inputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nichelm.apply
from nichelm.apply import Ledger, apply, correct_documents, discover, shard_of, text_chunks
from nichelm.errors import UserError
from tests.conftest import SENTENCES


def build_run(root: Path, arch: str, extra: list[str] = ()) -> Path:
    """prepare + train a tiny model in-process (seconds on one thread); its outputs need not be good,
    only the same in every engine."""
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train
    clean = root / "clean"
    clean.mkdir(parents=True)
    for doc in range(12):
        lines = [SENTENCES[(doc + i) % len(SENTENCES)] + f" Item {doc}.{i}." for i in range(20)]
        (clean / f"doc{doc}.txt").write_text("\n".join(lines) + "\n")
    pairs = root / "pairs.jsonl"
    gold = [SENTENCES[i % len(SENTENCES)] + f" No. {i}." for i in range(60)]
    pairs.write_text("".join(json.dumps({"input": g.replace("e", "c", 1), "output": g, "id": f"p{i}"}) + "\n"
                             for i, g in enumerate(gold)))
    (root / "project.toml").write_text(f"""
run_dir = "{root / 'run'}"
seed = 3
[task]
window_chars = 60
[[sources]]
name = "clean"
path = "clean"
role = "clean"
licence = "test text licence"
[[sources]]
name = "pairs"
path = "pairs.jsonl"
format = "jsonl"
id_field = "id"
licence = "test pairs licence"
[split]
val_fraction = 0.1
test_fraction = 0.1
[tokenizer]
vocab_size = 320
[model]
arch = "{arch}"
preset = "nano"
n_layer = 2
n_embd = 64
block_size = 96
[train]
max_steps = 12
batch_size = 8
eval_every = 100
warmup_steps = 2
threads = 1
""")
    project = load_project(root / "project.toml", list(extra))
    prepare(project)
    train(project)
    return project.run_path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("apply_run"), "llama")


def noisy(i: int) -> str:
    text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 3))
    return text.replace("e", "c", 1 + i % 2).replace("th", "tb", i % 2)


def make_corpus(root: Path, n_files: int, n_lines: int = 0) -> Path:
    """n_files .txt files in nested folders (+ a .jsonl of n_lines records, first in sorted order)."""
    for i in range(n_files):
        path = root / f"part{i % 3}" / f"doc{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(noisy(i) + ("\n" if i % 4 else ""))
    if n_lines:
        with (root / "00-records.jsonl").open("w") as f:
            for i in range(n_lines):
                f.write(json.dumps({"id": i, "text": noisy(i + 7), "meta": "é"}, ensure_ascii=False) + "\n")
    return root


def tree(out: Path) -> dict[str, bytes]:
    """Every output file (ledgers and partial files excluded) -> its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def ledger_lines(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob(".nichelm-ledger.*")) for line in p.read_text().splitlines()
            if line.endswith("}")]


OPTS = dict(batch_size=32, threads=1, guard_max_change=-1)      # guard off: compare the model's own outputs


def apply_cmd(run: Path, corpus: Path, out: Path, *extra: str, **constants) -> list[str]:
    """`nichelm apply` in a subprocess, as a user runs it; `constants` first set module constants of
    nichelm.apply (sizes that make a small test cut, roll or flush like a big corpus)."""
    setup = "".join(f"a.{k} = {v!r}; " for k, v in constants.items())
    return [sys.executable, "-c", f"import sys, nichelm.apply as a; {setup}"
            "from nichelm.cli import main; sys.exit(main(sys.argv[1:]))",
            "apply", "--model", str(run), "--input", str(corpus), "--output", str(out), "--threads", "1", *extra]


def kill_when(proc: subprocess.Popen, out: Path, ready, what: str) -> None:
    """SIGKILL proc as soon as ready(ledger records) holds; fail if it never did."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ready(ledger_lines(out)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"not killed {what}: " + proc.stderr.read().decode()[-2000:]


def test_outputs_are_corrector_outputs_and_mirror_inputs(run, tmp_path):
    import nichelm
    corpus = make_corpus(tmp_path / "in", 6, n_lines=4)
    report = apply(run, [corpus], tmp_path / "out", **OPTS)
    corrector = nichelm.load(run)
    texts = [noisy(i) + ("\n" if i % 4 else "") for i in range(6)]
    for guard in (True, False):
        assert [r.text for r in correct_documents(corrector, texts, guard)] == corrector.correct(texts, guard)
    out = tree(tmp_path / "out")
    assert set(out) == {u.rel for u in discover([corpus])}
    assert [out[f"part{i % 3}/doc{i:04d}.txt"].decode() for i in range(6)] == corrector.correct(texts, guard=False)
    rows = [json.loads(line) for line in out["00-records.jsonl"].decode().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and all(r["meta"] == "é" for r in rows)
    assert [r["corrected"] for r in rows] == corrector.correct([noisy(i + 7) for i in range(4)], guard=False)
    assert report.documents == 10 and report.files == 7 and not report.failed and report.tokens > 0


def test_sigkill_then_resume_equals_an_uninterrupted_run(run, tmp_path):
    corpus = make_corpus(tmp_path / "in", 200, n_lines=150)     # the jsonl spans more than one group
    apply(run, [corpus], tmp_path / "ref", **OPTS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nichelm", "apply", "--model", str(run), "--input", str(corpus), "--output",
           str(out), "--batch-size", "32", "--threads", "1", "--guard", "-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if len(ledger_lines(out)) >= 2:                     # the first record after "start"
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = {r["file"] for r in ledger_lines(out) if r["event"] == "done"}
    assert len(done) < 201, "the kill came too late to test resuming"

    report = apply(run, [corpus], out, **OPTS)
    assert tree(out) == tree(tmp_path / "ref")
    assert len(tree(out)) == 201 and report.files == 201 and report.documents == 350
    assert not list(out.rglob("*.partial")) and not report.failed
    finished = [r["file"] for r in ledger_lines(out) if r["event"] == "done"]
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 201    # nothing done twice


class Crash(BaseException):
    """A kill at one exact point: raised instead of writing one ledger record."""


def crash_on_ledger(monkeypatch, file: str, event: str, nth: int):
    """The nth ledger record `event` of `file` raises Crash instead of being written (the process
    "dies" just before it); returns the function that puts the real ledger back."""
    real, seen = Ledger.append, []

    def append(self, rec):
        if rec.get("file") == file and rec["event"] == event:
            seen.append(rec)
            if len(seen) == nth:
                raise Crash()
        real(self, rec)

    monkeypatch.setattr(Ledger, "append", append)
    return lambda: monkeypatch.setattr(Ledger, "append", real)


@pytest.mark.parametrize("when", ["progress", "done", "partial-lost"])
def test_crash_between_data_and_ledger_loses_nothing(run, tmp_path, monkeypatch, when):
    """'progress': the partial jsonl holds lines the ledger does not count yet (cut back on resume).
    'done': the finished jsonl was renamed into place but not recorded (taken back and finished).
    'partial-lost': someone deleted the partial output after the crash (that file starts over)."""
    corpus = make_corpus(tmp_path / "in", 3, n_lines=40)
    apply(run, [corpus], tmp_path / "ref", **OPTS)
    undo = crash_on_ledger(monkeypatch, "00-records.jsonl", when.replace("partial-lost", "progress"),
                           nth=1 if when == "done" else 2)
    with pytest.raises(Crash):
        apply(run, [corpus], tmp_path / "out", group_windows=16, **OPTS)
    undo()
    partial = tmp_path / "out" / ".00-records.jsonl.partial"
    assert partial.exists() == (when != "done")
    if when == "partial-lost":
        partial.unlink()
    report = apply(run, [corpus], tmp_path / "out", group_windows=16, **OPTS)
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")
    assert report.documents == 43


def test_bad_inputs_are_reported_by_name_and_skipped(run, tmp_path):
    corpus = make_corpus(tmp_path / "in", 3)
    (corpus / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (corpus / "mixed.jsonl").write_text("\n".join([
        json.dumps({"text": SENTENCES[0]}), "{not json", json.dumps({"body": "x"}), json.dumps([1]),
        json.dumps({"text": 3}), "", json.dumps({"text": SENTENCES[1]})]) + "\n")
    cmd = [sys.executable, "-m", "nichelm", "apply", "--model", str(run), "--input", str(corpus),
           "--output", str(tmp_path / "out"), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    for name in ("binary.txt: binary file", "latin1.txt: not UTF-8 (byte 3)", "mixed.jsonl:2: not JSON",
                 "mixed.jsonl:3: no field 'text'", "mixed.jsonl:4: not a JSON object",
                 "mixed.jsonl:5: field 'text' is not a string"):
        assert name in proc.stderr
    out = tree(tmp_path / "out")
    assert set(out) == {f"part{i}/doc{i:04d}.txt" for i in range(3)} | {"mixed.jsonl"}
    rows = [json.loads(line) for line in out["mixed.jsonl"].decode().splitlines()]     # every line keeps its place
    assert [r["corrected"] is None for r in rows] == [False, True, True, True, True, True, False]
    assert rows[2] == {"body": "x", "corrected": None} and rows[4] == {"text": 3, "corrected": None}
    assert rows[1] == rows[3] == rows[5] == {"corrected": None}
    again = apply(run, [corpus], tmp_path / "out", threads=1)        # nothing left to do; failures still known
    assert len(again.failed) == again.failed_count == 6 and again.documents_this_run == 0
    assert tree(tmp_path / "out") == out


def test_shards_cover_every_input_exactly_once(run, tmp_path):
    corpus = make_corpus(tmp_path / "in", 30, n_lines=5)
    apply(run, [corpus], tmp_path / "ref", **OPTS)
    reports = [apply(run, [corpus], tmp_path / "out", shard=f"{i}/2", **OPTS) for i in range(2)]
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")
    per_shard = [{r["file"] for r in map(json.loads, p.read_text().splitlines()) if r["event"] == "done"}
                 for p in sorted((tmp_path / "out").glob(".nichelm-ledger.*"))]
    assert len(per_shard) == 2 and not per_shard[0] & per_shard[1]
    assert per_shard[0] | per_shard[1] == set(tree(tmp_path / "ref")) and all(per_shard)
    assert sum(r.files for r in reports) == 31
    assert {shard_of(u.rel, 2) for u in discover([corpus])} == {0, 1}


def test_user_errors(run, tmp_path):
    corpus = make_corpus(tmp_path / "in", 2)
    with pytest.raises(UserError, match="--shard"):
        apply(run, [corpus], tmp_path / "out", shard="2/2")
    with pytest.raises(UserError, match="no such file"):
        apply(run, [tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "part0").mkdir()
    (tmp_path / "other" / "part0" / "doc0000.txt").write_text("x")
    with pytest.raises(UserError, match="both be written to part0/doc0000.txt"):
        apply(run, [corpus, tmp_path / "other"], tmp_path / "out")
    apply(run, [corpus], tmp_path / "out", threads=1)
    with pytest.raises(UserError, match="guard_max_change"):
        apply(run, [corpus], tmp_path / "out", guard_max_change=0.5)
    with pytest.raises(UserError, match="dtype"):            # bf16 outputs may differ: not a resume
        apply(run, [corpus], tmp_path / "out", threads=1, dtype="bfloat16")
    with pytest.raises(UserError, match="dtype 'float16': use one of auto, float32, bfloat16"):
        apply(run, [corpus], tmp_path / "out2", dtype="float16")


def test_bf16_on_cpu_decodes_with_bf16_weights(run, tmp_path):
    import nichelm
    corrector = nichelm.load(run, dtype="bfloat16")
    assert next(corrector.model.parameters()).dtype == torch.bfloat16
    assert next(nichelm.load(run).model.parameters()).dtype == torch.float32        # auto on a CPU: fp32
    corpus = make_corpus(tmp_path / "in", 3)
    report = apply(run, [corpus], tmp_path / "out", dtype="bfloat16", **OPTS)
    assert set(tree(tmp_path / "out")) == {u.rel for u in discover([corpus])} and report.tokens > 0


def write_parquet(path: Path, n_rows: int, row_group_size: int = 4, **extra) -> Path:
    """id, text (row 3 null), meta and any extra columns; small row groups so a resume skips some."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(n_rows)), "text": [None if i == 3 else noisy(i) for i in range(n_rows)],
                      "meta": ["é"] * n_rows, **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_keeps_every_column_and_row_and_reports_bad_rows(run, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    from nichelm import load
    corpus = tmp_path / "in"
    write_parquet(corpus / "books.parquet", 10, corrected=list(range(10)))    # an old 'corrected' is replaced
    write_parquet(corpus / "sub" / "other.parquet", 2, row_group_size=1)
    pq.write_table(pq.read_table(corpus / "books.parquet").drop_columns(["text"]), corpus / "no_text.parquet")
    (corpus / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    report = apply(run, [corpus], tmp_path / "out", group_windows=8, **OPTS)
    err = capsys.readouterr().err
    for name in ("books.parquet:4: column 'text' is null, not a string", "no_text.parquet:1: no column 'text'",
                 "no_text.parquet:10: no column 'text'", "broken.parquet: not a readable parquet file"):
        assert name in err and any(name in f for f in report.failed)
    assert report.failed_count == 1 + 10 + 1 and report.documents == 9 + 2
    out = tmp_path / "out"
    assert set(tree(out)) == {"books.parquet", "sub/other.parquet", "no_text.parquet"}
    assert not list(out.rglob("*.partial"))
    books = pq.read_table(out / "books.parquet")
    assert books.column_names == ["id", "text", "meta", "corrected"] and books.num_rows == 10
    rows = books.to_pylist()
    assert [r["id"] for r in rows] == list(range(10)) and all(r["meta"] == "é" for r in rows)
    expected = load(run, guard_max_change=-1).correct([noisy(i) for i in range(10) if i != 3], guard=False)
    assert [r["corrected"] for r in rows] == expected[:3] + [None] + expected[3:]
    assert pq.read_table(out / "no_text.parquet").column("corrected").null_count == 10
    again = apply(run, [corpus], out, group_windows=8, **OPTS)          # only the broken file is left to try
    assert again.documents_this_run == 0 and again.failed_count == report.failed_count


@pytest.mark.parametrize("when", ["progress", "done", "parts-lost"])
def test_parquet_crash_then_resume_equals_an_uninterrupted_run(run, tmp_path, monkeypatch, when):
    """'progress': a part file was written but the ledger does not count it (deleted on resume).
    'done': the output was renamed into place but not recorded (combined again).
    'parts-lost': someone deleted the partial folder after the crash (that file starts over)."""
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(nichelm.apply, "PART_SECONDS", 0)     # a part file at every group
    corpus = tmp_path / "in"
    write_parquet(corpus / "books.parquet", 24)
    make_corpus(corpus, 2)
    apply(run, [corpus], tmp_path / "ref", group_windows=8, **OPTS)
    undo = crash_on_ledger(monkeypatch, "books.parquet", when.replace("parts-lost", "progress"),
                           nth=1 if when == "done" else 2)
    with pytest.raises(Crash):
        apply(run, [corpus], tmp_path / "out", group_windows=8, **OPTS)
    undo()
    partial = tmp_path / "out" / ".books.parquet.partial"
    if when == "done":
        assert (tmp_path / "out" / "books.parquet").exists() and partial.exists()
    else:
        assert sorted(p.name for p in partial.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    if when == "parts-lost":
        import shutil
        shutil.rmtree(partial)
    report = apply(run, [corpus], tmp_path / "out", group_windows=8, **OPTS)
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")
    assert report.documents == 23 + 2 and report.failed_count == 1 and not partial.exists()


def test_parquet_sigkill_then_resume_equals_an_uninterrupted_run(run, tmp_path):
    pytest.importorskip("pyarrow")
    corpus = write_parquet(tmp_path / "in" / "books.parquet", 60)
    apply(run, [corpus], tmp_path / "ref", batch_size=8, threads=1, guard_max_change=-1)
    out = tmp_path / "out"
    cmd = apply_cmd(run, corpus, out, "--batch-size", "8", "--guard", "-1", PART_SECONDS=0)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, out, lambda recs: any(r["event"] == "progress" for r in recs), "after a part file")
    assert not any(r["event"] == "done" for r in ledger_lines(out)), "the kill came too late to test resuming"
    report = apply(run, [corpus], out, batch_size=8, threads=1, guard_max_change=-1)
    assert tree(out) == tree(tmp_path / "ref") and report.documents == 59
    assert report.documents_this_run < 59                    # it resumed; it did not start over


def test_parquet_without_pyarrow_names_the_file_and_the_fix(run, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "in" / "books.parquet", 2)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"books.parquet: reading parquet needs pyarrow: pip install 'nichelm\[parquet\]'"):
        apply(run, [tmp_path / "in"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- large .txt files, changed inputs, overlap

def test_text_pieces_cut_at_paragraphs_then_lines_then_spaces_and_restart_anywhere(tmp_path, monkeypatch):
    """A .txt file's pieces: at most TEXT_CHUNK_BYTES, cut after a blank line, else a line end, else a
    space, else between two characters; together the file; and read from any piece's end they are the
    same pieces (so a resumed run cuts as an uninterrupted one)."""
    monkeypatch.setattr(nichelm.apply, "TEXT_CHUNK_BYTES", 32)
    text = ("First paragraph, short.\n\nline one of two\nline two of two, longer\n\n"
            "one long line without a break in it at all\n\n" + "é€𝄞" * 12 + "\n")
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(text_chunks(path, 0))
    data = [p for _, p in pieces]
    assert b"".join(data) == text.encode() and all(len(p) <= 32 for p in data)
    assert data[0] == b"First paragraph, short.\n\n"                # a paragraph break
    assert data[1] == b"line one of two\n"                         # no break fits: a line end
    assert data[3] == b"one long line without a break "            # no line end fits: a space
    assert all(p.decode() for p in data)                           # never inside a character
    assert [len(p) for p in data[5:8]] == [32, 31, 32]               # no space: cut between characters
    for end, _ in pieces:
        assert list(text_chunks(path, end)) == [p for p in pieces if p[0] > end]
    path.write_bytes(b"")
    assert list(text_chunks(path, 0)) == [(0, b"")]                   # an empty file is one empty document


def large_text(n: int) -> str:
    """n paragraphs, blank lines between; some longer than a piece of 4 KB: one of many lines (cut at a
    line end) or one long line (cut at a space)."""
    paras = []
    for i in range(n):
        if i % 10 == 3:
            paras.append("\n".join(noisy(i + j) for j in range(40)))
        elif i % 10 == 7:
            paras.append(" ".join(noisy(i + j) for j in range(40)))
        else:
            paras.append(noisy(i))
    return "\n\n".join(paras) + "\n"


def test_sigkill_inside_a_large_txt_resumes_mid_file(run, tmp_path, monkeypatch, capsys):
    """The acceptance test of a mid-file resume: SIGKILL inside a large .txt, re-run: the output is byte for
    byte the uninterrupted run's, the re-run starts at the byte the ledger recorded (it says so) and
    decodes only the pieces after it."""
    chunk = 4096
    monkeypatch.setattr(nichelm.apply, "TEXT_CHUNK_BYTES", chunk)
    corpus = tmp_path / "in"
    corpus.mkdir()
    big = corpus / "big.txt"
    big.write_text(large_text(60), encoding="utf-8")
    (corpus / "small.txt").write_text(noisy(1) + "\n")
    pieces = list(text_chunks(big, 0))
    assert len(pieces) >= 12 and big.stat().st_size > 10 * chunk
    opts = dict(batch_size=8, threads=1, guard_max_change=-1)
    ref = apply(run, [corpus], tmp_path / "ref", **opts)
    assert ref.documents == len(pieces) + 1

    out = tmp_path / "out"
    proc = subprocess.Popen(apply_cmd(run, corpus, out, "--batch-size", "8", "--guard", "-1",
                                      TEXT_CHUNK_BYTES=chunk), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, out, lambda recs: any(r.get("file") == "big.txt" and r.get("offset", 0) > 0 for r in recs),
              "inside big.txt")
    records = [r for r in ledger_lines(out) if r.get("file") == "big.txt"]
    assert records and records[-1]["event"] == "progress", "the kill came too late to test resuming"
    at = records[-1]["offset"]
    assert 0 < at < big.stat().st_size and at in {end for end, _ in pieces}
    capsys.readouterr()

    report = apply(run, [corpus], out, **opts)
    err = capsys.readouterr().err
    assert tree(out) == tree(tmp_path / "ref")
    assert f"resuming {big} at byte {at}" in err
    assert report.documents_this_run == len([p for p in pieces if p[0] > at]) + ("small.txt" not in
                                                                                   {r["file"] for r in records})
    assert report.documents == ref.documents and not list(out.rglob("*.partial"))


def test_changed_input_is_corrected_again_and_said(run, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "in", 3, n_lines=4)
    apply(run, [corpus], tmp_path / "out", **OPTS)
    (corpus / "part1" / "doc0001.txt").write_text(noisy(9) + " And more.\n")
    with (corpus / "00-records.jsonl").open("a") as f:
        f.write(json.dumps({"id": 4, "text": noisy(20)}) + "\n")
    capsys.readouterr()
    report = apply(run, [corpus], tmp_path / "out", **OPTS)
    err = capsys.readouterr().err
    assert "doc0001.txt changed since the last run" in err and "00-records.jsonl changed" in err
    assert "doc0000.txt changed" not in err and report.documents_this_run == 1 + 5
    apply(run, [corpus], tmp_path / "fresh", **OPTS)
    assert tree(tmp_path / "out") == tree(tmp_path / "fresh")


def test_output_overlapping_an_input_is_refused(tmp_path):
    corpus = make_corpus(tmp_path / "in", 2)
    model = tmp_path / "no-model-needed"          # refused before any model is loaded
    for inputs, output, says in (([corpus], corpus / "out", "is inside --input"),
                                 ([corpus], corpus, "is the same as --input"),
                                 ([corpus / "part0" / "doc0000.txt"], corpus / "part0", "holds --input"),
                                 ([tmp_path / "x.txt", corpus], tmp_path, "holds --input")):
        with pytest.raises(UserError, match=f"--output .* {says}") as e:
            apply(model, inputs, output)
        assert "\n" not in str(e.value)
    assert not (corpus / "out").exists()


def test_parquet_part_files_roll_by_size_or_age(run, tmp_path, monkeypatch):
    """Many small groups make one part file unless the part grows past PART_BYTES or PART_SECONDS pass;
    the combined output is the same whatever the parts."""
    pytest.importorskip("pyarrow")
    corpus = write_parquet(tmp_path / "in" / "books.parquet", 24, row_group_size=5)
    real, parts = nichelm.apply.combine_parts, []

    def combine(source, folder, n, final, output_field):
        parts.append(n)
        real(source, folder, n, final, output_field)

    monkeypatch.setattr(nichelm.apply, "combine_parts", combine)
    outputs = []
    for part_bytes, part_seconds in ((1 << 30, 1e9), (1000, 1e9), (1 << 30, 0)):
        monkeypatch.setattr(nichelm.apply, "PART_BYTES", part_bytes)
        monkeypatch.setattr(nichelm.apply, "PART_SECONDS", part_seconds)
        out = tmp_path / f"out-{part_bytes}-{part_seconds}"
        apply(run, [corpus], out, group_windows=4, **OPTS)
        outputs.append(tree(out))
    assert parts[0] == 1 and 1 < parts[1] < parts[2]
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("env, first, spin", [({}, "", "1000"),                       # apply's short spin
                                              ({"OMP_WAIT_POLICY": "ACTIVE"}, "", None),  # the user's choice
                                              ({"GOMP_SPINCOUNT": "5"}, "", "5"),
                                              ({}, "import torch", None)])             # too late: not set
def test_apply_makes_openmp_threads_sleep_soon_before_torch_loads(tmp_path, env, first, spin):
    """libgomp reads GOMP_SPINCOUNT when torch loads it: apply sets it before its first `import torch`
    (a busy machine otherwise costs 2 threads ~8x the CPU time of 1), never over the user's setting."""
    import os
    corpus = make_corpus(tmp_path / "in", 1)
    code = (f"{first}\nimport os, sys\nfrom nichelm.apply import apply\nfrom nichelm.errors import UserError\n"
            f"try:\n    apply({str(tmp_path / 'no-model')!r}, [{str(corpus)!r}], {str(tmp_path / 'out')!r})\n"
            "except UserError:\n    pass\nprint(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(spin), "True"]       # torch loaded: the model load was reached
