"""`nichelm prepare --executor ray` (issue 11, "Distributed"): on a local Ray cluster started here
(`ray start --head --num-cpus 2`, stopped at the end whatever happens), the same project gives the same
bytes as the local executor, and a bad record in one task is the same one-line error (exit 2), not a hang.

Needs Ray (`pip install 'nichelm[ray]'`; .ci/run installs it); skips, saying so, without it."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import nichelm
from tests.conftest import run_cli

pytest.importorskip("ray", reason="Ray not installed (pip install 'nichelm[ray]'): the Ray executor test skips")
pytestmark = pytest.mark.slow                     # Ray's start and its per-task actors: about a minute
RAY = Path(sys.executable).parent / "ray"          # the CLI of this environment's Ray


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (the sockets are held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster of 2 CPUs; its processes share the process group of `ray start`, killed
    at the end by that id (`ray stop` would stop every Ray on the machine, other users' too)."""
    if not RAY.is_file():
        pytest.skip(f"{RAY}: no `ray` command in this environment")
    # Ray's fixed default ports too, so that two runs of this test on one machine do not collide
    flags = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port")
    free = _free_ports(len(flags))
    temp = tempfile.mkdtemp(prefix="nlray")         # short: Ray's socket paths live under it (108-byte limit)
    with pytest.MonkeyPatch.context() as mp:
        # A token of its own (Ray >= 2.52 authenticates), not ~/.ray/auth_token; set in this process so that
        # `nichelm prepare` (its child) has it too, without RAY_AUTH_MODE: prepare turns token mode on itself.
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.delenv("RAY_AUTH_MODE", raising=False)
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        # the workers import the nichelm under test (also when it runs from a copy of the tree)
        env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONPATH=os.pathsep.join(
            [str(Path(nichelm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
        head = subprocess.Popen([str(RAY), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                                 "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp,
                                 *[arg for flag, port in zip(flags, free) for arg in (flag, str(port))]],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = head.communicate(timeout=180)
            assert head.returncode == 0, f"ray start failed:\n{out}"
            yield f"127.0.0.1:{free[0]}"
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)    # as `ray stop --force`, for this cluster only
            except ProcessLookupError:
                pass
            head.wait()
            time.sleep(0.5)
            shutil.rmtree(temp, ignore_errors=True)


def _outputs(run: Path) -> dict[str, bytes]:
    """The shards, examples and tokenizer (not the shards' start-index caches, keyed by mtime)."""
    files = sorted((run / "data" / "shards").glob("*.bin")) + sorted((run / "data").glob("examples.*.jsonl"))
    return {str(p.relative_to(run)): p.read_bytes() for p in files + [run / "tokenizer" / "tokenizer.json"]}


def _manifest(run: Path) -> dict:
    m = json.loads((run / "data" / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k not in ("timing", "prepare")}      # run times and the executor


def test_ray_executor_gives_the_same_bytes_as_local(tiny_project, tmp_path, ray_address):
    args = ["prepare", tiny_project, "--piece-mb", "0.005", "--tasks", "2"]
    # 0.5 GB per task (not the default 2): the two tasks fit at once on a small CI machine too
    ray = run_cli(*args, "--executor", "ray", "--address", ray_address, "--mem-per-cpu-gb", "0.5",
                  "--set", f"run_dir={tmp_path / 'ray'}")
    assert ray.returncode == 0, ray.stderr
    assert "Traceback" not in ray.stderr and "WARNING" not in ray.stderr and "INFO" not in ray.stderr
    local = run_cli(*args, "--set", f"run_dir={tmp_path / 'local'}")
    assert local.returncode == 0, local.stderr
    out_ray, out_local = _outputs(tmp_path / "ray"), _outputs(tmp_path / "local")
    assert out_ray == out_local and len(out_ray) >= 6
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")
    info = json.loads((tmp_path / "ray" / "data" / "manifest.json").read_text())["prepare"]
    assert info["executor"] == "ray" and info["tasks"] == 2
    for job in ("examples", "tokens"):                   # every task ran on Ray and left its marker and log
        logs = tmp_path / "ray" / "logs" / "prepare" / job
        assert len(list((logs / "completions").iterdir())) == 2
        assert (logs / "logs" / "task_00001.log").is_file()


def test_ray_task_failure_is_the_one_line_error(tiny_project, tmp_path, ray_address):
    pairs = tiny_project.parent / "pairs.jsonl"
    lines = pairs.read_text().splitlines(keepends=True)
    lines[44] = '{"id": "d44", "ocr": \n'                                # line 45: in a later piece than line 1
    pairs.write_text("".join(lines))
    proc = run_cli("prepare", tiny_project, "--piece-mb", "0.005", "--tasks", "2", "--executor", "ray",
                   "--address", ray_address, "--mem-per-cpu-gb", "0.5", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"{pairs}:45: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tiny_project.parent / "run" / "data").exists()


def test_ray_task_bigger_than_any_node_is_an_error_not_a_hang(tiny_project, ray_address):
    proc = run_cli("prepare", tiny_project, "--executor", "ray", "--address", ray_address, "--cpus-per-task", "3",
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "each task asks for 3 CPU(s)" in proc.stderr and "at most 2 CPUs" in proc.stderr
    assert "Traceback" not in proc.stderr
