"""argparse types that refuse out-of-range numbers with the option's rule (``--shard-size 0`` is an error, not the
default), and the action that refuses a secret on the command line. Shared by every stage's ``cli.py``."""
from __future__ import annotations

import argparse


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: must be at least 1")
    return v


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: must be 0 or more")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    v = _number(float, text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: must be at least 0 and below 1")
    return v


def nonnegative_float(text: str) -> float:
    """A number >= 0."""
    v = _number(float, text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: must be 0 or more")
    return v


class RefuseToken(argparse.Action):
    """``--token VALUE`` would put the secret in every process listing and in shell history."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--token would show the token to every user of this machine (ps, shell history); pass "
                     "--token-file PATH (chmod 600), --token-file - (read from standard input), or set "
                     "$RAYHASH_TOKEN")


def default_of(fn, name: str):
    """The default of ``fn``'s parameter ``name``: a CLI option states it once, where the function defines it."""
    import inspect

    return inspect.signature(fn).parameters[name].default
