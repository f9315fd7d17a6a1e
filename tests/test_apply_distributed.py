"""`nichelm apply` on datatrove's executors (issue 12, "Distributed"): a 200-file folder plus one large .txt
(split into byte ranges at the pieces one process cuts) through 2 local workers and through a local Ray
cluster started here gives outputs byte-identical to one process; a re-run skips the finished tasks;
the Slurm path writes the job script it would submit."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import nichelm.apply
from nichelm.apply import PARTS_DIR, apply, plan_tasks, text_chunks
from tests.test_apply import OPTS, apply_cmd, build_run, large_text, make_corpus


def tree(out: Path) -> dict[str, bytes]:
    """Every output file -> its bytes; hidden files and folders (ledgers, parts, datatrove's logs) left out."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}

try:     # a local Ray cluster of 2 CPUs, started for the module and stopped at its end
    from tests.test_prepare_ray import ray_address  # noqa: F401
except pytest.skip.Exception:
    @pytest.fixture(scope="module")
    def ray_address():
        pytest.skip("Ray not installed (pip install 'nichelm[ray]'): the Ray executor test skips")

CHUNK = 4096                         # .txt pieces of 4 KB: the large file is many pieces, cut into several ranges


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run(tmp_path_factory.mktemp("apply_run"), "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, run):
    root = make_corpus(tmp_path_factory.mktemp("corpus") / "in", 200)
    (root / "big.txt").write_text(large_text(40), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(corpus, run, tmp_path_factory):
    """The outputs of one process."""
    out = tmp_path_factory.mktemp("ref") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nichelm.apply, "TEXT_CHUNK_BYTES", CHUNK)
        report = apply(run, [corpus], out, **OPTS)
    assert report.files == 201 and not report.failed
    return tree(out)


def _split_ranges(out: Path) -> dict[int, set[str]]:
    """Task -> the ranges of split files it corrected (their ledger records)."""
    done = {}
    for p in out.glob(".nichelm-ledger.shard-*-of-2.jsonl"):
        task = int(p.name.split("-")[2])
        done[task] = {r["file"] for r in map(json.loads, p.read_text().splitlines())
                      if r["event"] == "done" and r["file"].startswith(PARTS_DIR)}
    return done


def _check_distributed(out: Path, reference: dict, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(out) == reference                             # every output, byte for byte
    assert not [p for p in (out / PARTS_DIR).rglob("*") if p.is_file() and p.name != ".lock"]   # parts joined
    ranges = _split_ranges(out)
    assert set(ranges) == {0, 1} and all(ranges.values()), ranges    # both tasks took ranges of big.txt
    assert "201 files" in proc.stderr.splitlines()[-2] or "in 201 files" in proc.stderr


def test_plan_cuts_big_txt_at_the_pieces_of_one_process(corpus, monkeypatch):
    monkeypatch.setattr(nichelm.apply, "TEXT_CHUNK_BYTES", CHUNK)
    big = corpus / "big.txt"
    ends = {end for end, _ in text_chunks(big, 0)}
    plan = plan_tasks([corpus], 2)
    ranges = plan.parts("big.txt")
    assert len(ranges) >= 3 and {u.end for u in ranges} <= ends and ranges[-1].end == big.stat().st_size
    assert [u.start for u in ranges] == [0] + [u.end for u in ranges[:-1]]       # contiguous, in order
    whole = [u.rel for units in plan.tasks for u in units if not u.name]
    assert sorted(whole) == sorted(u for u in tree(corpus) if u != "big.txt")    # every other file once, whole
    assert all(plan.tasks) and plan_tasks([corpus], 1).parts("big.txt") == []    # one task: nothing is split
    # a range's pieces are the whole file's pieces there, so its output is one process's
    mid = ranges[1]
    assert [e for e, _ in text_chunks(big, mid.start, mid.end)] == sorted(e for e in ends if mid.start < e <= mid.end)


def test_two_local_workers_give_the_bytes_of_one_process(run, corpus, reference, tmp_path):
    out = tmp_path / "out"
    cmd = apply_cmd(run, corpus, out, "--batch-size", "32", "--guard", "-1", "--workers", "2",
                    TEXT_CHUNK_BYTES=CHUNK)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    _check_distributed(out, reference, proc)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)    # finished: tasks skipped
    assert again.returncode == 0 and "(0 this run" in again.stderr, again.stderr
    assert tree(out) == reference


def test_ray_cluster_gives_the_bytes_of_one_process(run, corpus, reference, tmp_path, ray_address):
    out = tmp_path / "out"
    proc = subprocess.run(apply_cmd(run, corpus, out, "--batch-size", "32", "--guard", "-1", "--executor", "ray",
                                    "--address", ray_address, "--tasks", "2", "--mem-per-cpu-gb", "0.5",
                                    TEXT_CHUNK_BYTES=CHUNK), capture_output=True, text=True, timeout=600)
    _check_distributed(out, reference, proc)
    logs = out / ".nichelm-apply" / "logs"
    assert len(list((logs / "completions").iterdir())) == 2 and (logs / "logs" / "task_00001.log").is_file()


def test_slurm_job_script(run, corpus, tmp_path):
    from nichelm.apply_pipeline import apply_with_executor
    from nichelm.prepare_pipeline import ExecutorOptions
    out = tmp_path / "out"
    res = apply_with_executor(run, [corpus], out, ExecutorOptions(
        executor="slurm", partition="gpu-long", time="01:30:00", tasks=3, cpus_per_task=4, dry_run=True,
        env_command="source /opt/env/bin/activate"), **OPTS)
    script = res["script"].splitlines()
    assert res["submitted"] is False
    for line in ("#SBATCH --partition=gpu-long", "#SBATCH --time=01:30:00", "#SBATCH --array=0-2",
                 "#SBATCH --job-name=nichelm-apply", "#SBATCH --cpus-per-task=4"):
        assert line in script, res["script"]
    assert "source /opt/env/bin/activate" in res["script"]
    assert any("launch_pickled_pipeline" in x and ".nichelm-apply/logs/executor.pik" in x for x in script)
    assert (out / ".nichelm-apply" / "slurm" / "correct.sbatch").read_text() == res["script"]
    assert tree(out) == {}                                    # nothing corrected, nothing submitted
    proc = subprocess.run(apply_cmd(run, corpus, tmp_path / "o2", "--executor", "slurm"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--partition" in proc.stderr and "Traceback" not in proc.stderr
