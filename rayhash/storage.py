"""Storage helpers shared by every stage: local paths and object-store URIs (s3://, gs://) alike.

Every writer goes through :func:`atomic_output` so that nothing half-written is ever visible under its final
name: local files are written to a temporary sibling and renamed; object-store files are staged locally and
uploaded in one PUT (object stores publish whole objects only).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

_REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object-store / remote URIs, False for local paths (``file://`` included)."""
    return str(uri).startswith(_REMOTE_PREFIXES)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or URI."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str | os.PathLike) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); URIs unchanged."""
    uri = str(uri)
    return uri if is_remote(uri) or uri.startswith("file://") else os.path.abspath(os.path.expanduser(uri))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts, keeping URI schemes intact."""
    base = str(base).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]]) if is_remote(base) else os.path.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Sorted full URIs/paths of the files directly inside ``uri`` whose names end with ``suffix``.

    Temporary files of in-flight writers (names starting with ``.``) are never listed.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                   and i.base_name.endswith(suffix) and not i.base_name.startswith("."))
    return [join(uri, n) for n in names]


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(uri: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming it."""
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: file not found") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e}); the file is corrupt, re-create it") from e


@contextlib.contextmanager
def atomic_output(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local temporary path; on success it becomes ``uri`` atomically, on error it is removed."""
    uri = str(uri)
    if is_remote(uri):
        tmpdir = tempfile.mkdtemp(prefix="rayhash-")
        tmp = os.path.join(tmpdir, os.path.basename(uri))
        try:
            yield tmp
            fs, path = resolve(uri)
            parent = path.rsplit("/", 1)[0]
            fs.create_dir(parent, recursive=True)
            with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    final = os.path.abspath(uri)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    with atomic_output(uri) as tmp:
        Path(tmp).write_bytes(data)


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(uri: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    fs, path = resolve(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_copy(uri: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local path for ``uri``: the path itself when local, else a downloaded copy."""
    if not is_remote(uri):
        return os.path.abspath(str(uri))
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="rayhash-dl-")
    dst = os.path.join(cache_dir, str(uri).rstrip("/").rsplit("/", 1)[-1])
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, length=8 << 20)
    return dst
