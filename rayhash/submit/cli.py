"""``rayhash submit | status | logs | stop``: pipeline stages as Ray jobs on a cluster (Ray Jobs API)."""
from __future__ import annotations

import argparse
import shlex
import sys

from rayhash.cli import JOB_STAGES
from rayhash.cliargs import RefuseToken, nonnegative_float

SUBMIT_EPILOG = """\
stages: {stages} (= python jobs/<stage>.py <args>; the CLI's words work too: data convert, index build)
examples:
  rayhash submit --address http://127.0.0.1:8265 convert synthetic --out s3://bucket/ds
  rayhash submit --token-file ~/.ray/cluster_token train --config configs/cifar100.yaml --data s3://bucket/ds --out s3://bucket/run
  rayhash submit --no-wait encode --checkpoint s3://bucket/run --data s3://bucket/ds/val --out s3://bucket/codes
  rayhash submit --raw -- python -c "import ray; ray.init(); print(ray.cluster_resources())"
The project dir is uploaded as the job's working dir (without .venv, runs, data, .git); the cluster's Python
must already have rayhash's dependencies (see cluster/README.md). Exit status: 0 when the job SUCCEEDED,
1 when it FAILED or was STOPPED (its error is printed), 3 when the cluster refused the token.
"""


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--address", help="Jobs API URL, http://HEAD:8265 (default: $RAYHASH_ADDRESS, $RAY_ADDRESS)")
    g.add_argument("--token", action=RefuseToken, help=argparse.SUPPRESS)
    g.add_argument("--token-file", help="file holding the Ray auth token, private (chmod 600), or - to read it from "
                                        "standard input (default: $RAYHASH_TOKEN_FILE, $RAY_AUTH_TOKEN_PATH; or the "
                                        "token itself in $RAYHASH_TOKEN). Never on the command line: `ps` shows it")


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="run a stage (or the whole pipeline) as a Ray job on a cluster",
                              description="Submit `python jobs/<stage>.py <args>` to a Ray cluster through the "
                                          "Jobs API, follow its logs and exit with its status.",
                              epilog=SUBMIT_EPILOG.format(stages=", ".join(JOB_STAGES)),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(p)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="environment variable for the job (repeatable); the variables rayhash.settings marks "
                        "forwarded (RAYHASH_LOG_LEVEL, NLTK_DATA, HF_HOME, ...; README table) go from here "
                        "unless --no-forward-env")
    p.add_argument("--no-forward-env", action="store_true",
                   help="forward none of this shell's variables (RAYHASH_LOG_LEVEL, NLTK_DATA, ...) to the job")
    p.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                   help="extra pip package installed for this job only (Ray runtime_env pip; repeatable)")
    p.add_argument("--working-dir", default=None, help="directory uploaded as the job's working dir "
                                                       "(default: this rayhash checkout)")
    p.add_argument("--submission-id", help="job id to use (default: generated); resubmitting an id fails")
    p.add_argument("--num-gpus", type=nonnegative_float, default=None,
                   help="GPUs reserved for the job's driver process")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--raw", action="store_true", help="the arguments are a shell command to run as the job "
                                                      "(e.g. --raw -- python my_driver.py)")
    p.add_argument("stage", help="pipeline stage (see below), or the command with --raw")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the stage")
    p.set_defaults(func=_submit)

    for name, help_, fn in (("status", "show a Ray job's status", _status),
                            ("logs", "print (or --follow) a Ray job's logs", _logs),
                            ("stop", "stop a running Ray job", _stop)):
        q = subparsers.add_parser(name, help=help_, description=help_ + " (Ray Jobs API).")
        _connection_args(q)
        q.add_argument("job_id", help="job id printed by `rayhash submit`")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            q.add_argument("--wait", action="store_true", help="wait until the job has stopped")
        q.set_defaults(func=fn)


def _client(args):
    import logging

    from rayhash import submit as S

    client = S.connect(args.address, args.token, args.token_file)
    for name in ("ray", "ray.dashboard.modules.job.sdk"):  # packaging chatter; failures surface as exceptions
        logging.getLogger(name).setLevel(logging.ERROR)
    return client


def _auth_guard(fn):
    """Exit status 3 with one clear line when the cluster refuses our credentials."""

    def run(args) -> int:
        from rayhash.submit import SubmitAuthError

        try:
            return fn(args)
        except SubmitAuthError as e:
            print(f"rayhash {args.command}: error: {e}", file=sys.stderr)
            return 3
        except ConnectionError as e:
            print(f"rayhash {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def _report(result) -> int:
    print(f"job {result.job_id} {result.status}" + (f": {result.error}" if result.error else ""), file=sys.stderr)
    return result.exit_code


@_auth_guard
def _submit(args) -> int:
    from rayhash import submit as S

    client = _client(args)
    stage_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    working_dir = args.working_dir or S.PROJECT_ROOT
    if args.raw:
        parts = ([] if args.stage == "--" else [args.stage]) + stage_args
        if not parts:
            raise ValueError("--raw needs a command, e.g. rayhash submit --raw -- python my_driver.py")
        entrypoint = shlex.join(parts)
    else:
        entrypoint = S.stage_entrypoint(args.stage, stage_args, working_dir)
    renv = S.runtime_env(working_dir, S.job_env(args.env, not args.no_forward_env), pip=args.pip)
    job_id = S.submit(entrypoint, client=client, runtime_env=renv, submission_id=args.submission_id,
                      entrypoint_num_gpus=args.num_gpus, metadata={"rayhash_stage": "raw" if args.raw else args.stage})
    print(f"submitted job {job_id} to {client.get_address()}: {entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        print(f"follow: rayhash logs --follow {job_id}   stop: rayhash stop {job_id}", file=sys.stderr)
        return 0
    try:
        result = S.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\ndetached; job {job_id} keeps running (rayhash stop {job_id} to stop it)", file=sys.stderr)
        return 130
    return _report(result)


@_auth_guard
def _status(args) -> int:
    from rayhash import submit as S

    result = S.job_result(_client(args), args.job_id)
    print(result.status)
    if result.message:
        print(result.message.strip(), file=sys.stderr)
    return 0


@_auth_guard
def _logs(args) -> int:
    from rayhash import submit as S

    client = _client(args)
    if args.follow:
        return _report(S.follow(client, args.job_id))
    sys.stdout.write(S.logs(client, args.job_id))
    return 0


@_auth_guard
def _stop(args) -> int:
    from rayhash import submit as S

    client = _client(args)
    if not S.stop(client, args.job_id):
        print(f"job {args.job_id} was not running", file=sys.stderr)
    if args.wait:
        result = S.wait(client, args.job_id)
        print(f"job {args.job_id} {result.status}", file=sys.stderr)
        return 0 if result.status in S.TERMINAL else 1
    return 0
