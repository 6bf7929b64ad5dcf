"""A real multi-node Ray cluster on this machine (``cluster/local.sh``: head + worker node(s) on loopback).

Separate from the session's ``ray_local``: its own ports (a free range) and its own temp dir, started in
subprocesses, always torn down with ``cluster/local.sh down`` (only its own nodes).

    def test_x(cluster_local):          # module-scoped: one cluster per test module, 1 worker node
        r = cluster_local.rayhash("submit", "convert", "synthetic", "--out", str(ds))  # CompletedProcess
    cluster_local_token                 # the same with Ray token authentication on (rayhash() passes it)
    with local_cluster(workers=2, token="...") as c: ...   # any other shape
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

CLUSTER_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = CLUSTER_ROOT / "cluster" / "local.sh"
# Client-side auth settings that must not leak from the test process (ray.init() may set RAY_AUTH_MODE=token).
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAYHASH_ADDRESS",
             "RAYHASH_TOKEN", "RAYHASH_TOKEN_FILE")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus Ray address/auth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_ENV}
    env.update(RAYHASH_PROGRESS="0", **extra)
    return env


@dataclass
class LocalCluster:
    """A running ``cluster/local.sh`` cluster: ``address`` is the Jobs API URL (http://127.0.0.1:PORT+1)."""

    port: int
    dir: Path
    workers: int
    token: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_file(self) -> Path | None:
        return self.dir / "auth_token" if self.token else None

    def local_sh(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def rayhash(self, *args: str, token: bool = True, timeout: float = 300, **env: str
                ) -> subprocess.CompletedProcess:
        """Run ``python -m rayhash.cli ARGS`` against this cluster (address set; the token unless ``token=False``)."""
        extra = {"RAYHASH_ADDRESS": self.address, **env}
        if token and self.token:
            extra["RAYHASH_TOKEN_FILE"] = str(self.token_file)
        return subprocess.run([sys.executable, "-m", "rayhash.cli", *args], cwd=CLUSTER_ROOT, env=clean_env(**extra),
                              capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        """PIDs of every process belonging to this cluster (their command lines name its temp dir)."""
        out = subprocess.run(["pgrep", "-f", f"{self.dir}/ray/"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if int(p) != os.getpid()]


def _port_band() -> range:
    """Base ports this test process may use: 20000-28999, split between pytest-xdist workers (gw0, gw1, ...) so two
    workers' clusters, whose nodes take ports up to base + 100 * (nodes + 1), never share a range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    i = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = 9000 // max(n, 1)
    return range(20000 + i * width, 20000 + (i + 1) * width - 1000, 10)


def _free_base_port(tries: int = 50) -> int:
    """A base port whose node ports (base .. base+99, worker ranges above) are free right now."""
    band = _port_band()
    for _ in range(tries):
        base = random.choice(band)
        probe = [base, base + 1, base + 2, *range(base + 10, base + 40), base + 100, base + 200]
        if all(_port_free(p) for p in probe):
            return base
    raise RuntimeError("no free port range for a local Ray cluster")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def local_cluster(workers: int = 1, token: str | None = None, cpus: int = 4, **env: str) -> Iterator[LocalCluster]:
    """Start ``cluster/local.sh up WORKERS`` on a free port range and a private temp dir; always ``down`` after.
    ``env``: further variables for local.sh (e.g. ``RAYHASH_RAY``)."""
    if not shutil.which("curl") or not shutil.which("setsid"):
        pytest.skip("cluster/local.sh needs curl and setsid")
    port = _free_base_port()
    tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 chars
    env = clean_env(RAYHASH_LOCAL_PORT=str(port), RAYHASH_LOCAL_DIR=str(tmp), RAYHASH_LOCAL_CPUS=str(cpus),
                    RAYHASH_LOCAL_WAIT_S="150", **({"RAYHASH_LOCAL_TOKEN": token} if token else {}), **env)
    cluster = LocalCluster(port=port, dir=tmp, workers=workers, token=token, env=env)
    try:
        try:
            up = cluster.local_sh("up", str(workers), timeout=300)
            failed = f"exit status {up.returncode}:\n{up.stdout}\n{up.stderr}" if up.returncode else ""
        except subprocess.TimeoutExpired:
            failed = "timed out"
        if failed:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp.glob("node-*.log")))
            raise RuntimeError(f"cluster/local.sh up failed, {failed}\n{logs}")
        yield cluster
    finally:
        down = cluster.local_sh("down", timeout=120)
        left = cluster.pids()
        shutil.rmtree(tmp, ignore_errors=True)
    # Checked after the cluster's own tests: `down` must stop exactly and all of its nodes' processes.
    if down.returncode != 0 or left:
        raise RuntimeError(f"cluster/local.sh down failed ({down.returncode}, processes left: {left}): {down.stderr}")


@pytest.fixture(scope="module")
def cluster_local() -> Iterator[LocalCluster]:
    """Head + 1 worker node on loopback, no auth (one per test module)."""
    with local_cluster(workers=1) as c:
        yield c


@pytest.fixture(scope="module")
def cluster_local_token() -> Iterator[LocalCluster]:
    """Head + 1 worker node with Ray token authentication (RAY_AUTH_MODE=token)."""
    with local_cluster(workers=1, token=f"rayhash-test-{random.getrandbits(64):016x}") as c:
        yield c
