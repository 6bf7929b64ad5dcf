"""Converters, listed once, and :func:`convert`, the one way to run them.

``rayhash data convert KIND``, ``rayhash pipeline --dataset KIND`` and their ``--help`` read :data:`CONVERTERS`;
a converter registers itself where it is written (``@CONVERTERS.register(...)``) with:

- ``source``: what SRC is (None: the converter takes no source; needed unless the converter can ``download``);
- ``limit``: its option that ``--limit`` sets (images per class, or images), or None;
- ``config`` / ``demo_config``: the run config ``rayhash pipeline`` / ``rayhash demo`` use for it.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from rayhash import storage
from rayhash.layout import DatasetDir
from rayhash.registry import Registry

CONVERTERS = Registry("converter", "rayhash data convert KIND")


def convert(kind: str, src: str | os.PathLike | None, out: str | os.PathLike, **options: Any) -> dict:
    """Run converter ``kind`` from ``src`` into the dataset folder ``out``; returns the ``dataset.json`` document.

    ``options`` set to None are left at the converter's defaults; one the converter does not take is refused by
    name. The dataset folder's writer lease is held throughout (:mod:`rayhash.lease`): a second conversion into
    the same folder is refused while this one runs; a re-run afterwards keeps the finished shards."""
    conv = CONVERTERS[kind]
    if conv.source and not src and not options.get("download"):
        raise ValueError(f"`rayhash data convert {kind}` needs SRC: {conv.source}")
    if src and not storage.is_remote(src) and not os.path.exists(src) and not options.get("download"):
        raise FileNotFoundError(f"{src}: not found; SRC of {kind} is {conv.source}")
    given = {k: v for k, v in options.items() if v is not None}
    takes = set(inspect.signature(conv.target).parameters) - {"src", "root", "out"}
    wrong = sorted(set(given) - takes)
    if wrong:
        raise ValueError(f"converter {kind!r} takes no option {', '.join(wrong)}; it takes {', '.join(sorted(takes))}")
    ds = DatasetDir(storage.absolute(out))
    with ds.lease(f"convert {kind}"):
        if conv.source is None:
            return conv.target(ds.path, **given)
        return conv.target(src, ds.path, **given)


def limit_option(kind: str, limit: int | None) -> dict[str, int]:
    """The converter option that ``--limit`` sets (images per class, or images), as ``{name: limit}``."""
    if limit is None:
        return {}
    conv = CONVERTERS[kind]
    if not conv.limit:
        raise ValueError(f"--limit: the {kind} converter takes no limit")
    return {conv.limit: limit}
