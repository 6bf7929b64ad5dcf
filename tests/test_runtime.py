"""Local means local: a command without an address starts its own private Ray instance, never joins another one
running on the machine, and writes nothing into the user's ~/.ray."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayhash.runtime import ray_address

PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("PROBE", json.dumps([sum(n["Alive"] for n in ray.nodes()), len(ray._private.state.state.job_table())]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_under(folder: str) -> list[int]:
    """Processes whose command line names ``folder``: the Ray processes of the instance started there."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and folder.encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _stop_instance(folder: str) -> None:
    """Stop only the Ray instance started in ``folder`` (never `ray stop`: it stops every instance here)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in _pids_under(folder):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_under(folder) and time.monotonic() < deadline:
            time.sleep(0.5)


def _probe(address: str, env: dict) -> tuple[int, int]:
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alive, jobs = json.loads(proc.stdout.split("PROBE", 1)[1])
    return alive, jobs


@pytest.fixture
def other_instance():
    """A second Ray instance started the way a user does (`ray start --head`), discoverable through
    RAY_TMPDIR/ray/ray_current_cluster by any process that looks for one — as the old code did."""
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the second instance's processes")
    root = tempfile.mkdtemp(prefix="rhiso-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYHASH_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_TMPDIR=root, RAY_AUTH_MODE="disabled", HOME=os.path.join(root, "other-home"))
    ports = {f"--{name}": str(_free_port()) for name in ("port", "ray-client-server-port",
                                                          "dashboard-agent-listen-port", "metrics-export-port")}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    try:
        subprocess.run([ray_cli, "start", "--head", *[f"{k}={v}" for k, v in ports.items()], "--num-cpus=1",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={root}/ray"],
                       env=env, check=True, capture_output=True, timeout=180)
        address = Path(root, "ray", "ray_current_cluster").read_text().strip()
        yield root, address, env
    finally:
        _stop_instance(root)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(600)
def test_local_command_starts_its_own_instance_and_leaves_another_alone(tmp_path, other_instance):
    root, address, probe_env = other_instance
    nodes_before, jobs_before = _probe(address, probe_env)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYHASH_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), RAY_TMPDIR=root, RAYHASH_PROGRESS="0")  # the other instance is the one Ray finds
    proc = subprocess.run([sys.executable, "-m", "rayhash.cli", "data", "convert", "synthetic", "--out",
                           str(tmp_path / "ds"), "--per-class", "1", "1", "--image-size", "8"],
                          capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 16 samples" in proc.stdout
    for noise in ("Connecting to existing", "Found multiple active Ray instances", "Token authentication",
                  "Traceback"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert "private local Ray instance" in proc.stderr
    # init_ray("local") (the benchmarks' start) stays private even when RAYHASH_ADDRESS names the other instance
    code = ("from rayhash.runtime import init_ray; init_ray('local', num_cpus=1, log_to_driver=False); "
            "import ray; print('CPUS', ray.cluster_resources()['CPU'])")
    bench = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=dict(env, RAYHASH_ADDRESS=address))
    assert bench.returncode == 0 and "CPUS 1.0" in bench.stdout, bench.stderr[-3000:]
    assert "Token authentication" not in bench.stderr, bench.stderr[-3000:]
    assert not (home / ".ray").exists(), list((home / ".ray").iterdir())
    # the other instance: still alive, the same nodes, and no job joined it but the second probe
    assert _probe(address, probe_env) == (nodes_before, jobs_before + 1)


def test_ray_address_rules(monkeypatch):
    for name in ("RAYHASH_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert ray_address() is None  # a private local instance
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # set by Ray inside `ray job submit`
    assert ray_address() == "10.0.0.2:6379"
    monkeypatch.setenv("RAYHASH_ADDRESS", "10.0.0.1:6379")
    assert ray_address() == "10.0.0.1:6379" and ray_address("auto") == "auto"
    monkeypatch.setenv("RAYHASH_ADDRESS", "http://127.0.0.1:8265")  # the Jobs API of `rayhash submit`
    assert ray_address() == "10.0.0.2:6379"
    with pytest.raises(ValueError, match="rayhash submit"):
        ray_address("http://127.0.0.1:8265")


def test_a_failed_start_is_cleaned_up_by_its_folder(tmp_path):
    """What a second start (after Ray's 30 s registration limit ran out) first does: every process that a private
    instance started under its folder is stopped, found by that folder — checked with pgrep on a real instance."""
    from rayhash.runtime import _stop_processes_under

    code = ("from rayhash.runtime import init_ray; init_ray('local', num_cpus=1, log_to_driver=False); "
            "import ray, sys; print('TEMP', ray._private.worker._global_node.get_temp_dir_path(), flush=True); "
            "sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYHASH_ADDRESS")}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        line = child.stdout.readline()
        assert line.startswith("TEMP "), line
        folder = line.split()[1]
        pgrep = lambda: {int(p) for p in subprocess.run(["pgrep", "-f", folder], capture_output=True,  # noqa: E731
                                                         text=True).stdout.split()}
        started = pgrep()
        assert len(started) >= 2, started  # at least the GCS and the raylet
        assert child.pid not in started  # the driver's own command line does not name the folder
        assert set(_stop_processes_under(folder)) >= started
        deadline = time.time() + 60
        while pgrep() and time.time() < deadline:
            time.sleep(0.2)
        assert not pgrep()
        assert child.poll() is None  # the driver itself is left alone
    finally:
        child.kill()
        child.wait()
