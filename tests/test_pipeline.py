"""prepare on datatrove (nichelm.data.pipeline, nichelm.prepare_pipeline): each step alone on tiny data,
then whole runs: workers/tasks do not change the output, a killed run resumes to the same bytes, the
Slurm job scripts, bad records."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nichelm.config import load_project
from nichelm.data import pipeline as pl
from nichelm.data.readers import Document, Segment, pair_segments_to_windows, read_documents
from nichelm.data.shards import read_shard
from nichelm.tasks import CorrectionTask
from tests.conftest import SENTENCES, run_cli

WORDS = "the of and to in that he shall his they unto him be for with which".split()


def _paragraphs(rng: random.Random, n: int) -> str:
    return "\n\n".join("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
                                 for _ in range(rng.randint(1, 5))) for _ in range(n))


# ------------------------------------------------------------------ pieces and reading


@pytest.mark.parametrize("trial", range(12))
def test_text_file_in_ranges_reads_as_the_whole_file(tmp_path, monkeypatch, trial):
    rng = random.Random(trial)
    monkeypatch.setattr(pl, "DOC_BYTES", rng.choice([64, 128, 300]))
    text = "\ufeff" + _paragraphs(rng, rng.randint(20, 150))
    if trial % 3 == 0:
        text = text.replace("\n\n", "\n")            # no blank line: documents cut at line ends
    if trial % 4 == 0:
        text = text.replace("\n", "\r\n")
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())
    with open(path, "rb") as f:
        whole = list(pl.read_text_docs(f, "big.txt"))
    assert b"".join(data for _, _, data in whole) == text.encode()[3:]        # every byte once, BOM dropped
    assert len(whole) > 1 and all(doc_id.startswith("big.txt@") for doc_id, _, _ in whole)
    for doc_id, line, _ in whole:                                             # first lines are right
        assert text.encode()[: int(doc_id.split("@")[1])].count(b"\n") + 1 == line
    ranges = pl._ranges(path, path.stat().st_size, pl.DOC_BYTES * rng.choice([1, 2, 3]), "text")
    assert len(ranges) > 1
    got = []
    for start, end, line in ranges:
        with open(path, "rb") as f:
            f.seek(start)
            got += list(pl.read_text_docs(f, "big.txt", start, end, line))
    assert got == whole


def test_small_text_file_is_one_document_as_before(tmp_path):
    (tmp_path / "a.txt").write_text("One line.\n\nTwo lines\nhere.\n")
    with open(tmp_path / "a.txt", "rb") as f:
        assert [d for d, _, _ in pl.read_text_docs(f, "a.txt")] == ["a.txt"]


def _project(tmp_path, sources: str, extra: str = "") -> Path:
    proj = tmp_path / "project.toml"
    proj.write_text(f'run_dir = "{tmp_path / "run"}"\nseed = 3\n[task]\nwindow_chars = 80\n{sources}\n'
                    f'[noise]\ntarget_cer = 0.05\n[split]\nval_fraction = 0.1\ntest_fraction = 0.1\n'
                    f'[tokenizer]\nvocab_size = 320\n{extra}')
    return proj


def _pairs_file(path: Path, n: int, bad_line: int = 0) -> None:
    with path.open("w") as f:
        for i in range(1, n + 1):
            gold = SENTENCES[i % len(SENTENCES)] + f" No. {i}."
            f.write('{"ocr": "broken\n' if i == bad_line else json.dumps({"ocr": gold.replace("e", "c", 1), "gold": gold})
                    + "\n")


def _read(project, pieces) -> list[Document]:
    step = pl.ReadSources(project, pieces)
    return [doc for batch in step.run(None, 0, 1) for doc in batch.metadata["docs"]]


def test_jsonl_ranges_read_like_readers_py(tmp_path):
    _pairs_file(tmp_path / "pairs.jsonl", 300)
    proj = load_project(_project(tmp_path, '[[sources]]\nname = "p"\npath = "pairs.jsonl"\nformat = "jsonl"\n'
                                           'input_field = "ocr"\noutput_field = "gold"\n'))
    pieces = pl.plan_pieces(proj, piece_bytes=2048)
    assert len(pieces) > 4 and pieces[0].start == 0 and pieces[-1].end == (tmp_path / "pairs.jsonl").stat().st_size
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    got = _read(proj, pieces)
    want = read_documents(tmp_path / "pairs.jsonl", "jsonl", input_field="ocr", output_field="gold")
    assert [(d.doc_id, d.segments) for d in got] == [(d.doc_id, d.segments) for d in want]
    # one task per piece reads exactly that piece
    step = pl.ReadSources(proj, pieces)
    per_task = [[doc.doc_id for b in step.run(None, rank, len(pieces)) for doc in b.metadata["docs"]]
                for rank in range(len(pieces))]
    assert sum(per_task, []) == [d.doc_id for d in want] and all(per_task)


def test_text_folder_is_grouped_into_pieces(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(9):
        (folder / f"b{i}.txt").write_text(_paragraphs(random.Random(i), 30))
    proj = load_project(_project(tmp_path, '[[sources]]\npath = "books"\nrole = "clean"\n'))
    pieces = pl.plan_pieces(proj, piece_bytes=3000)
    assert 1 < len(pieces) < 9
    assert [f for pc in pieces for f, _ in pc.files] == [f"b{i}.txt" for i in range(9)]
    docs = _read(proj, pieces)
    assert [d.doc_id for d in docs] == [f"b{i}.txt" for i in range(9)]
    assert all(s.input is None for d in docs for s in d.segments)                  # clean: no input side
    assert docs == read_documents(folder, "text")


# ------------------------------------------------------------------ steps alone


def _batches(docs: list[Document], size: int, source: str = "s", piece: int = 0):
    """ReadSources' batches of documents."""
    from datatrove.data import Document as DT
    for i in range(0, len(docs), size):
        yield DT(text="", id=f"{piece}/{i}", metadata={"piece": piece, "source": source, "docs": docs[i:i + size]})


def _flat(batches, key: str) -> list:
    return [x for b in batches for x in b.metadata[key]]


def test_split_windows_and_noise_steps(tmp_path):
    from nichelm.data.noise import OCRNoise
    from nichelm.prepare import split_of
    proj = load_project(_project(tmp_path, '[[sources]]\nname = "s"\npath = "project.toml"\nrole = "clean"\n'))
    docs = [Document(f"d{i}", [Segment(None, SENTENCES[j % 6] + "\n") for j in range(i, i + 5)]) for i in range(40)]
    docs.append(Document("blank", [Segment(None, "   \n")]))            # no window: its batch gives none
    split = list(pl.SplitDocuments(proj).run(_batches(docs, 7)))
    assert _flat(split, "splits") == [split_of(3, "s", d.doc_id, 0.1, 0.1) for d in docs]
    assert set(_flat(split, "splits")) == {"train", "val", "test"}
    windows = list(pl.MakeWindows(CorrectionTask(window_chars=80)).run(iter(split)))
    want = [(d.doc_id, w, win.output) for d in docs for w, win in enumerate(pair_segments_to_windows(d, 80))]
    assert list(zip(_flat(windows, "doc_ids"), _flat(windows, "ws"), _flat(windows, "outputs"))) == want
    assert len(windows) == 6 and all(b.metadata["piece"] == 0 and b.metadata["source"] == "s" for b in windows)
    assert set(_flat(windows, "inputs")) == {None}
    noisy = list(pl.AddNoise(proj).run(iter(windows)))
    noise = OCRNoise(target_cer=0.05, seed=3)
    assert _flat(noisy, "inputs") == [noise.corrupt(out, f"s\x00{doc_id}\x00{w}") for doc_id, w, out in want]
    assert _flat(noisy, "inputs") != _flat(noisy, "outputs") and all(_flat(noisy, "synthetic"))


def test_noise_step_drops_empty_examples_and_keeps_paired_inputs(tmp_path):
    """Examples with an empty side go, with every list of the batch; paired inputs are kept as they are."""
    from datatrove.data import Document as DT
    proj = load_project(_project(tmp_path, '[[sources]]\nname = "s"\npath = "project.toml"\n'))
    batch = {"piece": 0, "source": "s", "doc_ids": ["a", "b", "c", "d"], "ws": [0, 0, 1, 0],
             "splits": ["train", "val", "train", "test"], "inputs": ["ocr a", " ", None, "ocr d"],
             "outputs": ["gold a", "gold b", "gold c", "gold d"]}
    step = pl.AddNoise(proj)
    [out] = list(step.run(iter([DT(text="", id="0/a", metadata=batch)])))
    m = out.metadata
    assert m["doc_ids"] == ["a", "c", "d"] and m["ws"] == [0, 1, 0] and m["splits"] == ["train", "train", "test"]
    assert m["inputs"][0] == "ocr a" and m["inputs"][2] == "ocr d" and m["inputs"][1].strip()
    assert m["synthetic"] == [False, True, False] and m["outputs"] == ["gold a", "gold c", "gold d"]
    got = {k: v.total for k, v in step.stats.stats.items()}
    assert got["s::windows_empty_dropped"] == 1 and got["s::examples_train"] == 2 and got["s::examples_test"] == 1
    assert got["::noise_chars"] == len("gold c")


def test_read_batches_are_cut_by_count_and_bytes(tmp_path, monkeypatch):
    """A batch holds at most BATCH_DOCS documents and stops once BATCH_BYTES are read; max_documents holds."""
    _pairs_file(tmp_path / "pairs.jsonl", 50)
    src = '[[sources]]\nname = "p"\npath = "pairs.jsonl"\nformat = "jsonl"\ninput_field = "ocr"\noutput_field = "gold"\n'
    proj = load_project(_project(tmp_path, src))
    pieces = pl.plan_pieces(proj)
    monkeypatch.setattr(pl, "BATCH_DOCS", 8)
    sizes = [len(b.metadata["docs"]) for b in pl.ReadSources(proj, pieces).run(None, 0, 1)]
    assert sizes == [8] * 6 + [2]
    lines = [len(raw) for raw in (tmp_path / "pairs.jsonl").read_bytes().splitlines(True)]
    monkeypatch.setattr(pl, "BATCH_BYTES", 3 * lines[0])
    sizes = [len(b.metadata["docs"]) for b in pl.ReadSources(proj, pieces).run(None, 0, 1)]
    assert sum(sizes) == 50 and len(set(sizes)) > 1
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    for start, end in zip([0] + ends, ends[:-1]):        # each batch but the last ends once it has the bytes
        assert sum(lines[start:end - 1]) < pl.BATCH_BYTES <= sum(lines[start:end])
    limited = load_project(_project(tmp_path, src + "max_documents = 19\n"))
    batches = list(pl.ReadSources(limited, pl.plan_pieces(limited)).run(None, 0, 1))
    assert [d.doc_id for b in batches for d in b.metadata["docs"]] == [str(i) for i in range(1, 20)]


def test_dedupe_drops_val_and_test_texts_seen_in_train(tmp_path):
    from datatrove.data import Document as DT
    train = np.unique(np.array([pl.digest(t) for t in ("seen in", "seen out")], dtype=np.uint64))
    np.save(tmp_path / "dedupe-train.npy", train)
    np.save(tmp_path / "dedupe-test.npy", np.union1d(train, np.array([pl.digest("kept val")], dtype=np.uint64)))
    batches = {"val": [("seen in", "new"), ("new", "kept val"), ("x", "seen out"), ("y", "z")],
               "test": [("kept val", "x"), ("a", "b")], "train": [("seen in", "seen out")]}
    docs = [DT(text="", id="0", metadata={"split": split, "lines": [f"{i}\n".encode() for i in range(len(rows))],
                                          "inputs": [i for i, _ in rows], "outputs": [o for _, o in rows]})
            for split, rows in batches.items()]                  # one Document per batch, as ReadExampleParts
    kept = {d.metadata["split"]: (d.metadata["inputs"], d.metadata["lines"]) for d in pl.DedupeEval(tmp_path).run(iter(docs))}
    assert kept == {"val": (["new", "y"], [b"1\n", b"3\n"]), "test": (["a"], [b"1\n"]),
                    "train": (["seen in"], [b"0\n"])}


def test_batched_example_encoding_gives_the_ids_of_encode_examples():
    """encode_examples_array (the tokens job's encoder) = prepare.encode_examples, quoted markers,
    lone surrogates and empty sides included, and a marker that BPE rebuilds from text spelled out."""
    from nichelm.data.tokenizer import encode_examples_array, special_tokens, train_tokenizer
    from nichelm.prepare import Example, encode_examples
    texts = SENTENCES + ["Tho man said <|endoftext|> and went homc.", "A ### Correction ### B", "### Text ###",
                         "x<|endoftext|>y", "", " ", "lone \ud800 surrogate", "@@@ and @@@", "%%% x\n@@@"]
    for template, end in (("### Text ###\n{input}\n### Correction ###\n", "<|endoftext|>"),
                          ("@@@\n{input}\n%%%\n", "<|endoftext|>"), ("Q: ### {input} ### A: @@@ ", "<END>")):
        tok = train_tokenizer(texts * 20 + ["@@@"] * 50, 400, special_tokens(template, end))
        rng = random.Random(0)
        pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(300)]
        want = encode_examples(tok, [Example(i, o, "", "", False) for i, o in pairs], template, end)
        got = encode_examples_array(tok, template, end, [i for i, _ in pairs], [o for _, o in pairs], np.uint16)
        assert got.dtype == np.uint16 and got.tolist() == want.tolist(), template
        if template.startswith("@@@"):           # BPE rebuilds the marker "@@@" from text: spelled out
            assert tok.encode("@@@ and @@@").ids.count(tok.token_to_id("@@@")) == 2
            assert got.tolist().count(tok.token_to_id("@@@")) == len(pairs)


def test_tokens_task_loads_its_tokenizer_once(tmp_path, monkeypatch):
    """load_examples_encoder (the Tokenize step's): encode_examples_array's ids from one load of the file,
    no second, marker-safe copy (a load costs more than a batch of short examples)."""
    from nichelm.data import tokenizer as tk
    template, end = "### Text ###\n{input}\n### Correction ###\n", "<|endoftext|>"
    tok = tk.train_tokenizer(SENTENCES * 20 + ["### Text ###"], 400, tk.special_tokens(template, end))
    tk.save_tokenizer(tok, tmp_path / "tok.json")
    inputs, outputs = SENTENCES + ["A ### Correction ### B"], SENTENCES[::-1] + ["x<|endoftext|>y"]
    want = tk.encode_examples_array(tok, template, end, inputs, outputs, np.uint16)
    loads, real = [], tk.Tokenizer

    class Counting:                     # tokenizers.Tokenizer, counting the loads
        @staticmethod
        def from_file(path):
            loads.append(path)
            return real.from_file(path)

        @staticmethod
        def from_str(text):
            loads.append("str")
            return real.from_str(text)

    monkeypatch.setattr(tk, "Tokenizer", Counting)
    vocab, encode = tk.load_examples_encoder(tmp_path / "tok.json")
    got = encode(template, end, inputs, outputs, np.uint16)
    assert vocab == tok.get_vocab_size() and got.tolist() == want.tolist() and len(loads) == 1


def test_shard_writer_cuts_between_examples(tmp_path):
    end = 7
    rng = np.random.default_rng(0)
    examples = [np.append(rng.integers(10, 300, size=rng.integers(1, 40)), end) for _ in range(200)]
    stream = np.concatenate(examples).astype(np.uint16)
    writer = pl.ShardWriter(tmp_path, "train", 320, shard_tokens=100, end_id=end)
    for i in range(0, len(stream), 37):                        # chunks that end mid-example
        writer.write(stream[i:i + 37])
    paths = writer.close()
    assert [p.name for p in paths] == [f"train_{i:06d}.bin" for i in range(len(paths))] and len(paths) > 10
    shards = [np.asarray(read_shard(p)) for p in paths]
    assert np.array_equal(np.concatenate(shards), stream)
    assert all(0 < len(s) <= 100 and s[-1] == end for s in shards)
    empty = pl.ShardWriter(tmp_path, "val", 320, 100, end).close()
    assert [p.name for p in empty] == ["val_000000.bin"] and read_shard(empty[0]).size == 0
    head = np.fromfile(paths[0], dtype="<i4", count=256)
    assert (head[0], head[1], head[2]) == (20240520, 1, len(shards[0])) and paths[0].stat().st_size == 1024 + 2 * head[2]


# ------------------------------------------------------------------ whole runs


def _corpus(tmp_path, bad_line: int = 0) -> Path:
    """A project of four pieces or more at --piece-mb 0.01: a folder of clean books and a pairs file."""
    books = tmp_path / "books"
    books.mkdir(exist_ok=True)
    for i in range(6):
        (books / f"book{i}.txt").write_text(_paragraphs(random.Random(i), 40))
    _pairs_file(tmp_path / "pairs.jsonl", 400, bad_line)
    return _project(tmp_path, '[[sources]]\nname = "books"\npath = "books"\nrole = "clean"\nlicence = "test"\n'
                              '[[sources]]\nname = "pairs"\npath = "pairs.jsonl"\nformat = "jsonl"\n'
                              'input_field = "ocr"\noutput_field = "gold"\n')


def _outputs(run: Path) -> dict[str, bytes]:
    files = sorted((run / "data" / "shards").glob("*.bin")) + sorted((run / "data").glob("examples.*.jsonl"))
    return {p.name: p.read_bytes() for p in files + [run / "tokenizer" / "tokenizer.json"]}


def test_workers_and_tasks_do_not_change_the_output(tmp_path):
    proj = _corpus(tmp_path)
    a = run_cli("prepare", proj, "--piece-mb", "0.01", "--workers", "1", "--tasks", "1", "--set", f"run_dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.stderr
    b = run_cli("prepare", proj, "--piece-mb", "0.01", "--workers", "2", "--tasks", "5", "--set", f"run_dir={tmp_path / 'b'}")
    assert b.returncode == 0, b.stderr
    out_a, out_b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert out_a == out_b and len(out_a) >= 6
    manifest = json.loads((tmp_path / "b" / "data" / "manifest.json").read_text())
    assert manifest["prepare"]["pieces"] >= 5 and manifest["prepare"]["tasks"] == 5
    assert set(manifest["timing"]["task_s"]) == {"read", "noise", "tokenize", "write"}
    assert manifest["timing"]["tokens_per_s"] > 0 and manifest["tokens"]["train"] > 0
    assert "Traceback" not in b.stderr and "INFO" not in b.stderr            # datatrove's console kept quiet
    assert (tmp_path / "b" / "logs" / "prepare" / "tokens" / "logs" / "task_00004.log").is_file()
    assert not (tmp_path / "b" / ".prepare").exists()                      # intermediate parts dropped


def test_killed_prepare_resumes_to_the_same_shards(tmp_path):
    proj = _corpus(tmp_path)
    args = [sys.executable, "-m", "nichelm", "prepare", str(proj), "--piece-mb", "0.01", "--tasks", "4",
            "--workers", "1"]
    killed = subprocess.Popen(args + ["--set", f"run_dir={tmp_path / 'k'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    done = tmp_path / "k" / "logs" / "prepare" / "examples" / "completions"
    deadline = time.time() + 240
    while not (done.is_dir() and any(done.iterdir())) and time.time() < deadline and killed.poll() is None:
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = len(list(done.iterdir()))
    assert 1 <= finished < 4, "kill the run after one examples task and before the last"
    assert not (tmp_path / "k" / "data").exists()
    again = subprocess.run(args + ["--set", f"run_dir={tmp_path / 'k'}"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"examples {finished}/4 tasks already done (skipped)" in again.stderr
    whole = run_cli("prepare", proj, "--piece-mb", "0.01", "--tasks", "4", "--set", f"run_dir={tmp_path / 'w'}")
    assert whole.returncode == 0, whole.stderr
    assert _outputs(tmp_path / "k") == _outputs(tmp_path / "w")


def test_bad_record_fails_with_file_line_or_is_skipped(tmp_path):
    proj = _corpus(tmp_path)
    run = tmp_path / "run"
    assert run_cli("prepare", proj, "--piece-mb", "0.01").returncode == 0
    before = _outputs(run)
    _pairs_file(tmp_path / "pairs.jsonl", 400, bad_line=333)            # deep in the file, in a late piece
    proc = run_cli("prepare", proj, "--piece-mb", "0.01")
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'pairs.jsonl'}:333: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert _outputs(run) == before                                     # the data prepared before is intact
    proc = run_cli("prepare", proj, "--piece-mb", "0.01", "--set", "sources.1.on_bad_record=skip")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    pairs = next(s for s in manifest["sources"] if s["name"] == "pairs")
    assert pairs["skip"] == {"bad_records": 1} and pairs["documents"] == 399


def test_prepare_reads_each_source_sha256_once(tmp_path, monkeypatch):
    """The fingerprint's sha256 of a small source is the manifest's: the source is not hashed a second time."""
    import hashlib

    from nichelm import prepare as prep
    from nichelm.prepare_pipeline import PrepareOptions
    proj = load_project(_corpus(tmp_path))
    hashed = []
    real = prep.file_sha256

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(prep, "file_sha256", counting)
    manifest = prep.prepare(proj, options=PrepareOptions(workers=1, piece_mb=0.01))    # tasks run in this process
    assert hashed.count("pairs.jsonl") == 1 and hashed.count("books") == 1
    sha = {s["name"]: s["sha256"] for s in manifest["sources"]}
    assert sha["pairs"] == hashlib.sha256((tmp_path / "pairs.jsonl").read_bytes()).hexdigest()
    assert sha["books"] == real(tmp_path / "books")


def test_task_loggers_do_not_ask_sysconfig_each_time(monkeypatch):
    """A handler added (three per task) does not recompute loguru's library folders (~3 ms each)."""
    import sys
    import sysconfig

    from loguru import logger

    def refuse(*args, **kwargs):
        raise AssertionError("sysconfig asked again")

    monkeypatch.setattr(sysconfig, "get_path", refuse)
    handler = logger.add(sys.stderr, level="ERROR")
    logger.remove(handler)


def test_slurm_job_scripts(tmp_path):
    from nichelm.prepare_pipeline import PrepareOptions, prepare_with_pipeline
    project = load_project(_corpus(tmp_path))
    out = prepare_with_pipeline(project, options=PrepareOptions(
        executor="slurm", partition="cpu-long", time="02:30:00", tasks=3, piece_mb=0.01, dry_run=True,
        env_command="source /opt/env/bin/activate"))
    assert out["submitted"] is False and list(out["scripts"]) == ["examples", "tokenizer", "tokens", "finish"]
    examples = out["scripts"]["examples"].splitlines()
    for line in ("#SBATCH --partition=cpu-long", "#SBATCH --time=02:30:00", "#SBATCH --array=0-2",
                 "#SBATCH --job-name=nichelm-examples", "#SBATCH --cpus-per-task=1"):
        assert line in examples, out["scripts"]["examples"]
    assert "source /opt/env/bin/activate" in out["scripts"]["examples"]
    assert any("launch_pickled_pipeline" in x and "logs/prepare/examples/executor.pik" in x for x in examples)
    assert "#SBATCH --array=0-0" in out["scripts"]["finish"].splitlines()
    assert (project.run_path / "logs" / "prepare" / "slurm" / "tokens.sbatch").read_text() == out["scripts"]["tokens"]
    proc = run_cli("prepare", tmp_path / "project.toml", "--executor", "slurm")
    assert proc.returncode == 2 and "--partition" in proc.stderr


def test_prepare_reuses_a_tokenizer_and_imports_no_torch(tmp_path):
    """tokenizer.from (a run folder, a tokenizer.json): the same tokenizer, hence the same shards, and no
    training sample; a changed file is a changed project. No process of prepare imports torch."""
    proj = _corpus(tmp_path)
    first = run_cli("prepare", proj, "--piece-mb", "0.01", "--set", f"run_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr
    reuse = tmp_path / "reuse.toml"                     # vocab_size left out: it comes from the tokenizer
    reuse.write_text(proj.read_text().replace("vocab_size = 320\n", f'from = "{tmp_path / "a"}"\n'))
    proc = subprocess.run([sys.executable, "-m", "nichelm", "prepare", str(reuse), "--piece-mb", "0.01", "--workers", "2",
                           "--tasks", "3", "--set", f"run_dir={tmp_path / 'b'}"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported.count("nichelm.data.pipeline") >= 2 and "datatrove.executor.local" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    assert _outputs(tmp_path / "b") == _outputs(tmp_path / "a")
    manifest = json.loads((tmp_path / "b" / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["from"] == str(tmp_path / "a" / "tokenizer" / "tokenizer.json")
    assert manifest["tokenizer"]["sample_chars"] == 0
    assert "reuse tokenizer" in manifest["timing"]["step_s"] and "train tokenizer" not in manifest["timing"]["step_s"]
    # a tokenizer.json named directly; rewritten in place, the data is rebuilt with it
    from nichelm.data.tokenizer import load_tokenizer, save_tokenizer, special_tokens, train_tokenizer
    own = tmp_path / "own.json"
    own.write_bytes((tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes())
    args = ("prepare", reuse, "--set", f"run_dir={tmp_path / 'c'}", "--set", f"tokenizer.from={own}")
    assert run_cli(*args).returncode == 0
    assert "already prepared" in run_cli(*args).stderr
    save_tokenizer(train_tokenizer(SENTENCES * 5, 300, special_tokens("### Text ###\n{input}\n### Correction ###\n",
                                                                       "<|endoftext|>")), own)
    again = run_cli(*args)
    assert again.returncode == 0 and "already prepared" not in again.stderr, again.stderr
    assert (tmp_path / "c" / "tokenizer" / "tokenizer.json").read_bytes() == own.read_bytes()
    assert load_tokenizer(own).get_vocab_size() != load_tokenizer(tmp_path / "a" / "tokenizer" / "tokenizer.json").get_vocab_size()


@pytest.mark.parametrize("sets,fragments", [
    (["tokenizer.vocab_size=999"], ["'tokenizer.vocab_size' is 999", "remove vocab_size"]),
    (["task.end_marker=<END>"], ["'tokenizer.from'", "no marker token '<END>'", "task.end_marker"]),
])
def test_a_reused_tokenizer_that_does_not_fit_the_task_is_one_line(tmp_path, sets, fragments):
    from nichelm.data.tokenizer import save_tokenizer, special_tokens, train_tokenizer
    tok = tmp_path / "tok.json"
    save_tokenizer(train_tokenizer(SENTENCES * 5, 300, special_tokens("### Text ###\n{input}\n### Correction ###\n",
                                                                       "<|endoftext|>")), tok)
    proj = _corpus(tmp_path)
    proj.write_text(proj.read_text().replace("vocab_size = 320\n", f'from = "{tok}"\n'))
    proc = run_cli("prepare", proj, *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert all(f in error for f in fragments), error
    assert not (tmp_path / "run").exists()                   # refused before any work


def test_example_line_is_json_line_of_the_row():
    """examples.*.jsonl lines are built by hand (example_line) for speed: the bytes json.dumps gives."""
    texts = ["plain", "quote \" and \\ back", "tab\tnew\nline\r", "\x00\x1f\x7f control", "é ü 中文 🙂",
             "\u2028\u2029 separators", "lone \ud800 surrogate", "", "</script>"]
    rng = random.Random(0)
    for _ in range(200):
        row = {"input": rng.choice(texts), "output": rng.choice(texts), "source": rng.choice(texts),
               "doc_id": rng.choice(texts), "synthetic_input": rng.random() < 0.5}
        assert pl.example_line(*row.values()) == pl.json_line(row), row
        assert json.loads(pl.example_line(*row.values())) == row


def test_raw_ocr_step_sums_corpus_scores(tmp_path):
    """MeasureRawOCR's per-source sums are metrics.CorpusScore's over prepare.scoring_units."""
    from nichelm.metrics import score_pairs
    from nichelm.prepare import scoring_units
    proj = load_project(_project(tmp_path, '[[sources]]\nname = "s"\npath = "project.toml"\nformat = "jsonl"\n'))
    rng = random.Random(1)
    docs = [Document(str(i), [Segment(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))),
                                      " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))])
            for i in range(60)] + [Document("clean", [Segment(None, "no ocr side")])]
    step = pl.MeasureRawOCR(proj)
    assert len(list(step.run(_batches(docs, 16)))) == 4
    want = score_pairs(u for d in docs for u in scoring_units(d, "jsonl"))
    got = {k: v.total for k, v in step.stats.stats.items()}
    assert got == {f"s::raw_{w}": getattr(want, w) for w in ("char_errors", "chars", "word_errors", "words")}
    assert want.char_errors > 0 and want.word_errors > 0
