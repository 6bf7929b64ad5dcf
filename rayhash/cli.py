"""The ``rayhash`` command line: one entry point, one sub-command per pipeline stage.

Each stage package owns its sub-commands in ``rayhash/<stage>/cli.py`` through ``register(subparsers)``;
those modules import nothing heavy at module level, so ``rayhash --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order = order in --help. Each module defines register(subparsers) and sets a `func(args) -> int|None`.
STAGE_CLIS = (
    "rayhash.data.cli",      # data wordnet | convert | embed-captions
    "rayhash.config_cli",    # config show
    "rayhash.train.cli",     # train
    "rayhash.encode.cli",    # encode
    "rayhash.index.cli",     # index build | query
    "rayhash.eval.cli",      # eval
    "rayhash.serve.cli",     # serve
    "rayhash.submit.cli",    # submit | status | logs | stop
    "rayhash.pipeline",      # demo / pipeline
)

# The pipeline's stages as Ray jobs, the one list: `rayhash submit NAME ...`, `ray job submit -- python
# jobs/NAME.py ...` (file name with _ for -) and `python -m rayhash WORDS ...` all run `rayhash WORDS ...`.
JOB_STAGES = {
    "convert": ("data", "convert"),
    "embed-captions": ("data", "embed-captions"),
    "train": ("train",),
    "encode": ("encode",),
    "index": ("index", "build"),
    "eval": ("eval",),
    "serve": ("serve",),
    "pipeline": ("pipeline",),
}

DESCRIPTION = """\
rayhash learns semantic binary hash codes for images (Arponen & Bishop 2020) and serves Hamming search
over sharded FAISS binary indices, on Ray.

pipeline:  data convert -> [data embed-captions] -> train -> encode -> index build -> query / eval / serve
quick start (local Ray, offline synthetic data):  rayhash demo --out runs/demo
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayhash", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in STAGE_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and name.startswith(e.name)):  # a missing dependency, not a missing stage
                raise
            continue  # stage not built yet
        module.register(sub)
    return parser


def job_stage(words: list[str]) -> tuple[str, list[str]]:
    """(stage name, remaining args) for a stage given by its job name (``convert``) or its CLI words
    (``data convert``); ValueError naming the choices otherwise."""
    for name, cli_words in JOB_STAGES.items():  # the CLI's words first: `index build` is the index stage too
        if len(cli_words) > 1 and tuple(words[:len(cli_words)]) == cli_words:
            return name, words[len(cli_words):]
    if words and words[0] in JOB_STAGES:
        return words[0], words[1:]
    raise ValueError(f"unknown stage {' '.join(words[:2])!r}; stages: {', '.join(JOB_STAGES)} (or the CLI's "
                     "words: data convert, index build, ...)")


def job_script_name(stage: str) -> str:
    """``jobs/<this>`` of a stage."""
    return f"{stage.replace('-', '_')}.py"


def job_script(stage: str) -> str:
    """The text of ``jobs/<stage>.py`` (tests/test_submit.py keeps every file equal to it)."""
    words = " ".join(JOB_STAGES[stage])
    return (f'"""Ray job entrypoint: `rayhash {words}` (the stage list is rayhash.cli.JOB_STAGES).\n\n'
            f"    ray job submit --working-dir . -- python jobs/{job_script_name(stage)} <args of rayhash {words}>\n"
            f"    rayhash submit --address http://HEAD:8265 {stage} <args>\n"
            '"""\n'
            "import sys\n"
            "from pathlib import Path\n\n"
            "sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (this checkout)\n\n"
            "from rayhash.cli import job_main  # noqa: E402\n\n"
            'if __name__ == "__main__":\n'
            "    sys.exit(job_main(__file__))\n")


def job_main(script: str) -> int:
    """What ``jobs/<stage>.py`` runs: the stage's CLI words, then the script's own arguments."""
    from pathlib import Path

    stage = Path(script).stem.replace("_", "-")
    return main([*JOB_STAGES[stage], *sys.argv[1:]])


def _version() -> str:
    from rayhash import __version__

    return f"rayhash {__version__}"


# Arguments that name files or folders: made absolute before any stage runs, so Ray workers (whose working
# directory is not the caller's) resolve them the same way.
PATH_ARGS = ("out", "data", "checkpoint", "codes", "index", "queries", "caption_embeddings", "src", "contact_sheet",
             "token_file")


def _absolute_paths(args: argparse.Namespace) -> None:
    from rayhash.storage import absolute

    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, absolute(value))
        elif isinstance(value, list):
            setattr(args, name, [absolute(v) for v in value])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _absolute_paths(args)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        # User errors: one clear line, no traceback (set RAYHASH_DEBUG=1 for it).
        from rayhash import settings

        if settings.DEBUG.is_set():
            raise
        print(f"rayhash {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
