"""`rayhash submit/status/logs/stop` against a real local multi-node Ray cluster (cluster/local.sh), plus the
pure helpers of rayhash.submit."""
from __future__ import annotations

import json
import shlex
import tarfile
import time

import pytest

from rayhash import submit as S


# ---- pure helpers (no cluster) -------------------------------------------------------------------------------

def test_stage_entrypoint_quotes_args_and_maps_stage_to_jobs_script():
    ep = S.stage_entrypoint("embed-captions", ["my ds", "--out", "a'b.parquet"])
    assert shlex.split(ep) == ["python", "jobs/embed_captions.py", "my ds", "--out", "a'b.parquet"]
    for stage, script in S.STAGES.items():
        assert (S.PROJECT_ROOT / "jobs" / f"{script}.py").is_file(), stage
    with pytest.raises(ValueError, match="unknown stage 'trian'.*stages: convert"):
        S.stage_entrypoint("trian")


def test_job_env_forwards_rayhash_vars_but_not_secrets(monkeypatch):
    monkeypatch.setenv("RAYHASH_STORAGE", "s3://bucket/x")
    monkeypatch.setenv("RAYHASH_TOKEN", "secret")
    monkeypatch.setenv("RAYHASH_ADDRESS", "http://h:8265")
    monkeypatch.setenv("NLTK_DATA", "/nltk")
    monkeypatch.setenv("UNRELATED", "1")
    env = S.job_env(["A=1", "B=x=y"])
    assert env["RAYHASH_STORAGE"] == "s3://bucket/x" and env["NLTK_DATA"] == "/nltk"
    assert env["A"] == "1" and env["B"] == "x=y"
    assert not {"RAYHASH_TOKEN", "RAYHASH_ADDRESS", "UNRELATED"} & set(env)
    assert S.job_env(["A=1"], forward=False) == {"A": "1"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        S.job_env(["novalue"])


def test_runtime_env_excludes_are_anchored_so_the_data_package_ships():
    from ray._private.runtime_env.packaging import _get_excludes  # what Ray applies when packaging

    root = S.PROJECT_ROOT
    excluded = _get_excludes(root, S.runtime_env()["excludes"])
    for p in ("data/cifar.tar", ".venv/bin/python", "runs/demo/x.pt", "rayhash/__pycache__/cli.cpython-311.pyc"):
        assert excluded(root / p), p
    for p in ("rayhash/data/__init__.py", "jobs/train.py", "configs/demo.yaml"):
        assert not excluded(root / p), p


def test_address_and_token_resolution(monkeypatch, tmp_path):
    for k in ("RAYHASH_ADDRESS", "RAY_ADDRESS", "RAYHASH_TOKEN", "RAY_AUTH_TOKEN", "RAYHASH_TOKEN_FILE",
              "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="--address"):
        S.resolve_address()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert S.resolve_address() == "http://10.0.0.1:8265"
    with pytest.raises(ValueError, match="not a Jobs API address"):
        S.resolve_address("ray://h:10001")
    assert S.resolve_token() is None
    (tmp_path / "tok").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert S.resolve_token() == "abc"
    assert S.resolve_token(token="direct") == "direct"
    with pytest.raises(FileNotFoundError, match="missing"):
        S.resolve_token(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        S.resolve_token(token_file=tmp_path / "empty")


# ---- against a real local cluster (head + 1 worker node) -----------------------------------------------------

@pytest.mark.slow
def test_submit_stage_job_succeeds_and_streams_its_output(cluster_local, tmp_path):
    ds = tmp_path / "ds"
    r = cluster_local.rayhash("submit", "convert", "synthetic", "--out", str(ds), "--per-class", "2", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SUCCEEDED" in r.stderr
    info = json.loads((ds / "dataset.json").read_text())
    n_classes = len(info["label_names"])
    # Count the samples actually written, independently of the converter's own bookkeeping.
    counts = {}
    for split in ("train", "test"):
        keys = set()
        for tar in sorted((ds / split).glob("*.tar")):
            with tarfile.open(tar) as t:
                keys |= {m.name.split(".", 1)[0] for m in t.getmembers() if m.isfile()}
        counts[split] = len(keys)
    assert counts == {"train": 2 * n_classes, "test": n_classes}
    # The job's own stdout came back through the log stream.
    assert f"train: {2 * n_classes} samples" in r.stdout
    assert "jobs/convert.py synthetic" in r.stderr  # the entrypoint it ran


@pytest.mark.slow
def test_failing_job_is_reported_failed_with_its_error(cluster_local, tmp_path):
    r = cluster_local.rayhash("submit", "train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run"),
                              "model.no_such_field=3")
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "model.no_such_field" in last, last
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_status_logs_and_stop_of_a_running_job(cluster_local):
    cmd = "import time; print('rayhash-marker', flush=True); time.sleep(300)"
    r = cluster_local.rayhash("submit", "--no-wait", "--raw", "--", "python", "-c", cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    deadline = time.monotonic() + 120
    while "rayhash-marker" not in (logs := cluster_local.rayhash("logs", job_id).stdout):
        assert time.monotonic() < deadline, logs
        time.sleep(2)
    assert cluster_local.rayhash("status", job_id).stdout.strip() == "RUNNING"
    stop = cluster_local.rayhash("stop", "--wait", job_id)
    assert stop.returncode == 0 and "STOPPED" in stop.stderr, stop.stderr
    assert cluster_local.rayhash("status", job_id).stdout.strip() == "STOPPED"
    missing = cluster_local.rayhash("status", "raysubmit_doesnotexist")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
