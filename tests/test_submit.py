"""`rayhash submit/status/logs/stop` against a real local multi-node Ray cluster (cluster/local.sh), plus the
pure helpers of rayhash.submit."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from fixtures_cluster import CLUSTER_ROOT, LOCAL_SH
from rayhash import submit as S


# ---- pure helpers (no cluster) -------------------------------------------------------------------------------

def test_stage_entrypoint_quotes_args_and_maps_stage_to_jobs_script():
    ep = S.stage_entrypoint("embed-captions", ["my ds", "--out", "a'b.parquet"])
    assert shlex.split(ep) == ["python", "jobs/embed_captions.py", "my ds", "--out", "a'b.parquet"]
    assert S.stage_entrypoint("data", ["convert", "synthetic"]) == "python jobs/convert.py synthetic"
    assert S.stage_entrypoint("index", ["build", "--codes", "c"]) == "python jobs/index.py --codes c"
    with pytest.raises(ValueError, match="unknown stage 'trian'.*stages: convert"):
        S.stage_entrypoint("trian")


def test_every_stage_is_reachable_from_the_one_list(capsys):
    """rayhash.cli.JOB_STAGES is the one stage list: each entry is a real CLI command (its --help parses), each
    has exactly the generated jobs/ script, `rayhash submit` maps its name and its CLI words to that script, and
    nothing else lives in jobs/."""
    from rayhash.cli import JOB_STAGES, build_parser, job_script, job_script_name

    parser = build_parser()
    for stage, words in JOB_STAGES.items():
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*words, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: rayhash {' '.join(words)} ")
        script = S.PROJECT_ROOT / "jobs" / job_script_name(stage)
        assert script.read_text() == job_script(stage), f"{script} differs from rayhash.cli.job_script({stage!r})"
        expect = f"python jobs/{job_script_name(stage)} --x"
        assert S.stage_entrypoint(stage, ["--x"]) == expect
        assert S.stage_entrypoint(words[0], [*words[1:], "--x"]) == expect
    assert sorted(p.name for p in (S.PROJECT_ROOT / "jobs").glob("*.py")) == sorted(
        job_script_name(s) for s in JOB_STAGES)


@pytest.mark.parametrize("script,usage", [
    ("convert", "rayhash data convert"), ("embed_captions", "rayhash data embed-captions"), ("train", "rayhash train"),
    ("encode", "rayhash encode"), ("index", "rayhash index build"), ("eval", "rayhash eval"),
    ("pipeline", "rayhash pipeline"), ("serve", "rayhash serve")])
def test_jobs_scripts_run_their_stage_cli(script, usage, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", [f"jobs/{script}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(S.PROJECT_ROOT / "jobs" / f"{script}.py"), run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {usage} ")


def test_job_env_forwards_rayhash_vars_but_not_secrets(monkeypatch):
    monkeypatch.setenv("RAYHASH_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("RAYHASH_TOKEN", "secret")
    monkeypatch.setenv("RAYHASH_ADDRESS", "http://h:8265")
    monkeypatch.setenv("NLTK_DATA", "/nltk")
    monkeypatch.setenv("UNRELATED", "1")
    monkeypatch.setenv("RAYHASH_LOCAL_TOKEN", "local-cluster-secret")  # cluster/local.sh's token: never forwarded
    monkeypatch.setenv("RAYHASH_SOMETHING_NEW", "x")  # an allow-list: unknown RAYHASH_* variables stay here too
    env = S.job_env(["A=1", "B=x=y"])
    assert env["RAYHASH_LOG_LEVEL"] == "DEBUG" and env["NLTK_DATA"] == "/nltk"
    assert env["A"] == "1" and env["B"] == "x=y"
    never = {"RAYHASH_TOKEN", "RAYHASH_ADDRESS", "UNRELATED", "RAYHASH_LOCAL_TOKEN", "RAYHASH_SOMETHING_NEW"}
    assert not never & set(env)
    assert set(env) - {"A", "B"} <= set(S.PASSTHROUGH_ENV)
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
    (tmp_path / "tok").chmod(0o600)  # a token file must be private (see test_token_file_must_be_private...)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert S.resolve_token() == "abc"
    assert S.resolve_token(token="direct") == "direct"
    with pytest.raises(FileNotFoundError, match="missing"):
        S.resolve_token(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        S.resolve_token(token_file=tmp_path / "empty")


# ---- against a real local cluster: head + 1 worker node, token authentication on ---------------------------
# One cluster for this module (start-up is the slow part); `cluster_local_token.rayhash(...)` runs the CLI in a
# subprocess with a clean environment, the cluster's address and (unless token=False) its token file.

@pytest.mark.slow
def test_submit_stage_job_succeeds_and_streams_its_output(cluster_local_token, tmp_path):
    ds = tmp_path / "ds"
    r = cluster_local_token.rayhash("submit", "convert", "synthetic", "--out", str(ds), "--per-class", "2", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SUCCEEDED" in r.stderr.strip().splitlines()[-1]
    assert "jobs/convert.py synthetic" in r.stderr  # the entrypoint it ran
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


@pytest.mark.slow
def test_failing_job_is_reported_failed_with_its_error(cluster_local_token, tmp_path):
    r = cluster_local_token.rayhash("submit", "train", "--config", "configs/demo.yaml",
                                    "--out", str(tmp_path / "run"), "model.no_such_field=3")
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "model.no_such_field: unknown key" in last, last
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_status_logs_and_stop_of_a_running_job_on_two_nodes(cluster_local_token):
    c = cluster_local_token
    # Python API in this process (one connection: CLI start-up costs seconds on a loaded machine) ...
    client = S.connect(c.address, token_file=c.token_file)
    driver = ("import time, ray; ray.init(); print('nodes_alive', sum(n['Alive'] for n in ray.nodes()), "
              "flush=True); time.sleep(300)")
    job_id = S.submit(shlex.join(["python", "-c", driver]), client=client)
    deadline = time.monotonic() + 150
    while not (m := re.search(r"^nodes_alive (\d+)$", logs := S.logs(client, job_id), re.M)):
        assert time.monotonic() < deadline, (S.job_result(client, job_id), logs)
        time.sleep(1)
    assert m.group(1) == "2"  # the job's driver sees the head and the worker node
    assert S.job_result(client, job_id).status == "RUNNING"
    # ... and the CLI to stop it.
    stop = c.rayhash("stop", "--wait", job_id)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stderr, stop.stderr
    result = S.job_result(client, job_id)
    assert result.status == "STOPPED" and result.exit_code == 1
    with pytest.raises(ValueError, match="raysubmit_doesnotexist does not exist"):
        S.job_result(client, "raysubmit_doesnotexist")


@pytest.mark.slow
def test_submit_without_or_with_a_wrong_token_is_refused_clearly(cluster_local_token, tmp_path):
    c = cluster_local_token
    # No token anywhere: clean environment, HOME without ~/.ray/auth_token.
    r = c.rayhash("submit", "convert", "synthetic", "--out", str(tmp_path / "ds"), token=False, HOME=str(tmp_path))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "authentication failed" in r.stderr and "none was given" in r.stderr and "--token-file" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ds").exists()
    with pytest.raises(S.SubmitAuthError, match="token was rejected"):
        S.connect(c.address, token="not-the-token")


@pytest.mark.slow
def test_token_never_in_an_argv_a_log_or_a_jobs_environment(cluster_local_token, tmp_path):
    """Every process started by `rayhash submit` and by `cluster/local.sh status` (its HTTP calls with the token) is
    traced (strace: every execve's argv); `ps` is sampled while the job runs; every file the cluster wrote (Ray's
    logs, the script's logs) and the job's runtime_env as the Jobs API shows it are searched for the token."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed: cannot trace the argv of every process")
    c, token = cluster_local_token, cluster_local_token.token
    seen, stop = [], threading.Event()

    def sample_ps():
        while not stop.is_set():
            seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_ps)
    sampler.start()
    trace = tmp_path / "execve.log"
    try:
        env = {**c.env, "RAYHASH_ADDRESS": c.address, "RAYHASH_TOKEN_FILE": str(c.token_file)}
        run = subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-s", "4096", "-o", str(trace),
                              sys.executable, "-m", "rayhash.cli", "submit", "convert", "synthetic",
                              "--out", str(tmp_path / "ds"), "--per-class", "2", "1"],
                             env=env, capture_output=True, text=True, timeout=300, cwd=CLUSTER_ROOT)
        status = subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-s", "4096", "-o",
                                 str(tmp_path / "status.log"), "bash", str(LOCAL_SH), "status"],
                                env=c.env, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        sampler.join()
    assert run.returncode == 0, run.stderr[-3000:]
    assert status.returncode == 0 and "node(s) alive" in status.stdout, status.stderr
    execs = trace.read_text() + (tmp_path / "status.log").read_text()
    assert "execve(" in execs and "curl" in execs  # the traces saw the processes, curl with its auth header
    assert token not in execs
    assert len(seen) >= 3 and not any(token in ps for ps in seen)
    assert token not in run.stdout + run.stderr
    leaked = [str(p) for p in c.dir.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "auth_token"
              and p.stat().st_size < 64 << 20 and token.encode() in p.read_bytes()]
    assert not leaked, leaked
    client = S.connect(c.address, token_file=c.token_file)
    jobs = client.list_jobs()
    assert jobs and not any(token in json.dumps(j.runtime_env or {}) + json.dumps(j.metadata or {}) for j in jobs)


def test_token_file_must_be_private_and_may_be_a_pipe_or_stdin(tmp_path, monkeypatch):
    for var in ("RAYHASH_TOKEN", "RAY_AUTH_TOKEN", "RAYHASH_TOKEN_FILE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    f.chmod(0o644)
    with pytest.raises(PermissionError, match=r"readable by other users \(mode 644\).*chmod 600"):
        S.resolve_token(token_file=str(f))
    f.chmod(0o600)
    assert S.resolve_token(token_file=str(f)) == "s3cret"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # what `--token-file <(...)` hands over
    writer = threading.Thread(target=lambda: fifo.write_text("from-a-pipe\n"))
    writer.start()
    assert S.resolve_token(token_file=str(fifo)) == "from-a-pipe"
    writer.join()
    r, w = os.pipe()
    os.write(w, b"from-stdin\n")
    os.close(w)
    monkeypatch.setattr(sys, "stdin", os.fdopen(r))
    assert S.resolve_token(token_file="-") == "from-stdin"
    empty = tmp_path / "empty"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        S.resolve_token(token_file=str(empty))


def test_token_on_the_command_line_is_refused(capsys):
    from rayhash.cli import main

    with pytest.raises(SystemExit) as e:
        main(["submit", "--token", "s3cret", "convert", "synthetic", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--token would show the token" in err and "--token-file -" in err and "s3cret" not in err
