"""Run pipeline stages as Ray jobs on a cluster, through the Ray Jobs API (``JobSubmissionClient``).

A stage job is ``python jobs/<stage>.py <args>`` run on the cluster with this project as its working dir, so the
cluster runs the same code as the submitter. Token authentication (``RAY_AUTH_MODE=token`` on the cluster) is
supported by sending ``Authorization: Bearer <token>``; the token comes from ``token=``, ``token_file=``,
``$RAYHASH_TOKEN`` / ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH`` (never from the repo).

Nothing here calls ``ray.init``: submitting only talks HTTP to the cluster's dashboard (Jobs API) port.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, TextIO

from rayhash import settings

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = "jobs"

# Never uploaded with the working dir (gitignore syntax, anchored at the project root).
WORKING_DIR_EXCLUDES = ["/.venv", "/venv", "/runs", "/data", "/.git", "/.pytest_cache", "/*.egg-info",
                        "/build", "/dist", "**/__pycache__", "*.pyc"]
# Forwarded from the submitter's environment to the job, when set: an allow-list, so no other variable of the
# submitter's shell (a cluster token, cloud keys) ever reaches the job's runtime_env, which the Jobs API shows.
PASSTHROUGH_ENV = settings.forwarded()  # rayhash.settings marks which variables are forwarded

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitAuthError(PermissionError):
    """The cluster refused the request: token authentication failed."""


@dataclass
class JobResult:
    job_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "SUCCEEDED" else 1

    @property
    def error(self) -> str:
        """One line: the cluster's reason and the last line the job printed (its error) when it did not succeed."""
        lines = [ln.strip() for ln in self.message.strip().splitlines() if ln.strip()]
        if not lines or self.status == "SUCCEEDED":
            return ""
        return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} -- {lines[-1]}"


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else ``$RAYHASH_ADDRESS``, else ``$RAY_ADDRESS`` (``http://`` added)."""
    address = address or settings.ADDRESS.get() or settings.RAY_ADDRESS.get()
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the dashboard / Jobs API port, "
                         "reached through an SSH tunnel or port-forward) or set $RAYHASH_ADDRESS")
    if address == "auto" or address.startswith("ray://"):
        raise ValueError(f"address {address!r} is not a Jobs API address: use http://HEAD:8265 "
                         "(the dashboard port), not the Ray client/GCS address")
    return address if "://" in address else f"http://{address}"


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str | None:
    """The auth token from the argument, a file, ``$RAYHASH_TOKEN``/``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH``."""
    token = token or settings.TOKEN.get() or settings.RAY_TOKEN.get()
    token_file = token_file or (None if token else (settings.TOKEN_FILE.get() or settings.RAY_TOKEN_FILE.get()))
    if not token and token_file:
        token = read_token_file(str(token_file))
    return token.strip() if token else None


def read_token_file(token_file: str) -> str:
    """``-`` reads standard input; a pipe (``<(...)``) is read as it is; a regular file must be private (no
    group or other permission bits, as ssh requires of keys)."""
    if token_file == "-":
        token, where = sys.stdin.readline().strip(), "standard input"
    else:
        path = Path(token_file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"token file {path} not found: pass --token-file with the cluster's token file")
        mode = path.stat().st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            raise PermissionError(f"token file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                                  f"run `chmod 600 {path}`")
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"token file {path} is a folder; pass the file that holds the token")
        token, where = path.read_text().strip(), f"token file {path}"
    if not token:
        raise ValueError(f"{where} is empty: it must hold the cluster's token")
    return token


def _auth_error(address: str, had_token: bool, detail: str) -> SubmitAuthError:
    why = ("the token was rejected (wrong token for this cluster?)" if had_token
           else "the cluster requires a token (RAY_AUTH_MODE=token) and none was given")
    return SubmitAuthError(
        f"authentication failed at {address}: {why}. Pass the cluster's token with --token-file PATH, "
        f"--token TOKEN or $RAYHASH_TOKEN (server said: {detail.strip().splitlines()[0] if detail else '?'})")


def _is_auth_failure(e: Exception) -> bool:
    from ray.exceptions import AuthenticationError

    return isinstance(e, AuthenticationError) or any(f"status code {c}" in str(e) for c in (401, 403))


def connect(address: str | None = None, token: str | None = None,
            token_file: str | os.PathLike | None = None) -> "JobSubmissionClient":
    """A ``JobSubmissionClient`` for the cluster's Jobs API, authenticated when a token is available."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    tok = resolve_token(token, token_file)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:
        if _is_auth_failure(e):
            raise _auth_error(url, bool(tok), str(e)) from None
        raise ConnectionError(f"cannot reach the Ray Jobs API at {url}: {e}. Is the cluster up and the "
                              "dashboard port tunnelled (ray dashboard cluster/aws.yaml, or "
                              "ssh -L 8265:localhost:8265)?"
                              ) from None


def _guard(client: "JobSubmissionClient", fn, *args, **kwargs):
    """Call a client method: auth refusals become :class:`SubmitAuthError`, unknown job ids a ValueError."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if _is_auth_failure(e):
            raise _auth_error(client.get_address(), "Authorization" in (client._headers or {}), str(e)) from None
        if "status code 404" in str(e):
            raise ValueError(f"{str(e).split(': ', 1)[-1]} (cluster {client.get_address()}; "
                             "`ray job list --address ...` lists its jobs)") from None
        raise


def job_env(extra: Mapping[str, str] | Sequence[str] = (), forward: bool = True) -> dict[str, str]:
    """Environment for the job: the variables of :data:`PASSTHROUGH_ENV` set here, then ``extra`` (KEY=VAL)."""
    env = {}
    if forward:
        env = {s.name: s.get() for s in settings.ALL if s.forwarded and s.is_set()}
    items = extra.items() if isinstance(extra, Mapping) else (_split_env(s) for s in extra)
    env.update({k: str(v) for k, v in items})
    return env


def _split_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--env {item!r}: expected KEY=VALUE")
    return key, value


def stage_entrypoint(stage: str, args: Sequence[str] = (), working_dir: str | os.PathLike = PROJECT_ROOT) -> str:
    """``python jobs/<stage>.py <args>`` (shell-quoted), checking that the script exists. ``stage``: a name of
    :data:`rayhash.cli.JOB_STAGES`, or the CLI's own words at the start of ``args``' place (``data convert ...``,
    ``index build ...``)."""
    from rayhash.cli import job_script_name, job_stage

    name, args = job_stage([stage, *args])
    path = Path(working_dir) / JOBS_DIR / job_script_name(name)
    if not path.is_file():
        raise ValueError(f"no {path}: the working dir {working_dir} is not a rayhash checkout (or --raw for any "
                         "command)")
    return shlex.join(["python", f"{JOBS_DIR}/{job_script_name(name)}", *args])


def runtime_env(working_dir: str | os.PathLike = PROJECT_ROOT, env: Mapping[str, str] | None = None,
                pip: Sequence[str] | None = None) -> dict:
    """The job's runtime_env: this project as working dir (minus venvs, runs, data, .git) and env vars."""
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"working dir {working_dir} not found")
    renv: dict = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env:
        renv["env_vars"] = dict(env)
    if pip:
        renv["pip"] = list(pip)
    return renv


def submit(entrypoint: str, *, client: "JobSubmissionClient", runtime_env: dict | None = None,
           submission_id: str | None = None, entrypoint_num_gpus: float | None = None,
           metadata: Mapping[str, str] | None = None) -> str:
    """Submit ``entrypoint``; returns the job id."""
    kwargs = {"entrypoint_num_gpus": entrypoint_num_gpus} if entrypoint_num_gpus else {}
    return _guard(client, client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                  submission_id=submission_id, metadata=dict(metadata or {}), **kwargs)


def job_result(client: "JobSubmissionClient", job_id: str) -> JobResult:
    info = _guard(client, client.get_job_info, job_id)
    return JobResult(job_id, str(info.status.value if hasattr(info.status, "value") else info.status),
                     info.message or "")


def follow(client: "JobSubmissionClient", job_id: str, out: TextIO = sys.stdout,
           poll_s: float = 1.0) -> JobResult:
    """Stream the job's logs to ``out`` until it ends; returns its final status and message."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as e:  # the log socket dropped: fall back to polling the status
        print(f"(log stream interrupted: {e}; waiting for the job to end)", file=sys.stderr)
    while True:
        result = job_result(client, job_id)
        if result.status in TERMINAL:
            return result
        time.sleep(poll_s)


def logs(client: "JobSubmissionClient", job_id: str) -> str:
    """The job's logs so far."""
    return _guard(client, client.get_job_logs, job_id)


def stop(client: "JobSubmissionClient", job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it was not running."""
    return _guard(client, client.stop_job, job_id)


def wait(client: "JobSubmissionClient", job_id: str, timeout_s: float | None = None,
         poll_s: float = 1.0) -> JobResult:
    """Poll until the job ends (or ``timeout_s`` passes; then the last status is returned)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        result = job_result(client, job_id)
        if result.status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return result
        time.sleep(poll_s)
