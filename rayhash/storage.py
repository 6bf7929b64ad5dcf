"""Storage helpers shared by every stage: local paths and object-store URIs (s3://, gs://) alike.

Every writer goes through :func:`open_output` / :func:`atomic_output` so that nothing half-written is ever visible
under its final name: files are written under a hidden staging name beside the target and renamed (local files,
fsynced first) or moved (object stores) to it only when the writer succeeded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, BinaryIO, Iterator

import pyarrow.fs as pafs

_REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")
_OBJECT_STORES = ("s3://", "gs://", "gcs://")  # no directories: a folder is a key prefix, nothing to create


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object-store / remote URIs, False for local paths (``file://`` included)."""
    return str(uri).startswith(_REMOTE_PREFIXES)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or URI."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def filesystem_path(uri: str | os.PathLike) -> str:
    """The path of ``uri`` inside its filesystem, as :func:`resolve` (and so Ray Data's ``__url__`` column) names it:
    ``bucket/key`` for object stores, the absolute path for local files. String work only, no filesystem."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return uri.split("://", 1)[1]
    return os.path.abspath(uri)


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


def stat(uri: str | os.PathLike) -> tuple[int, int | None] | None:
    """(size in bytes, modification time in ns or None where the store has none) of a file; None if absent."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return info.size, info.mtime_ns


def makedirs(uri: str | os.PathLike) -> None:
    """Create a folder; nothing to do on object stores (a folder there is the prefix of the keys inside it)."""
    if not str(uri).startswith(_OBJECT_STORES):
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


def list_dirs(uri: str | os.PathLike, prefix: str = "") -> list[str]:
    """Sorted full URIs/paths of the folders directly inside ``uri`` whose names start with ``prefix``."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return [join(uri, n) for n in sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                                         and i.base_name.startswith(prefix))]


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


def _staging(path: str) -> str:
    """A sibling name for a file being written: hidden (``.NAME.<id>.tmp``), never listed, never taken as done."""
    folder, name = path.rsplit("/", 1)  # absolute local paths and bucket/key paths alike have a folder
    return f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"


@contextlib.contextmanager
def open_output(uri: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream whose bytes appear under ``uri`` only when the ``with`` block succeeds, all at once; when it
    raises, nothing appears and nothing is left behind.

    Local files: written to a staging sibling, fsynced, renamed. Object stores: streamed to a staging object beside
    the target, then moved to the final name (a server-side copy publishes a whole object; S3 copies objects up to
    5 GB); the staging object is deleted whatever happens (closing an object-store stream completes its upload, so
    an error mid-stream would otherwise publish a partial object)."""
    uri = str(uri)
    if not is_remote(uri):
        with atomic_output(uri) as tmp, open(tmp, "wb") as f:
            yield f
        return
    makedirs(uri.rsplit("/", 1)[0])
    fs, path = resolve(uri)
    staging = _staging(path)
    try:
        with fs.open_output_stream(staging) as f:
            yield f
        fs.move(staging, path)
    finally:
        if fs.get_file_info(staging).type != pafs.FileType.NotFound:
            fs.delete_file(staging)


@contextlib.contextmanager
def atomic_output(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local path to write ``uri``'s bytes to (for writers that want a path); on success the bytes appear
    under ``uri`` at once (see :func:`open_output`), on error nothing does and the temporary file is removed."""
    uri = str(uri)
    if is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="rayhash-") as tmpdir:
            tmp = os.path.join(tmpdir, uri.rstrip("/").rsplit("/", 1)[-1])
            yield tmp
            with open(tmp, "rb") as src, open_output(uri) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
        return
    final = os.path.abspath(uri)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = _staging(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def delete(uri: str | os.PathLike) -> None:
    """Delete a file, or a folder with everything in it."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def is_dir(uri: str | os.PathLike) -> bool:
    """A local folder, or an object-store prefix with objects under it."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def remove_staging(folder: str | os.PathLike, prefix: str = "") -> None:
    """Delete the staging files (``.PREFIX*.tmp``) that killed writers left directly inside ``folder``. Only for a
    folder no one else is writing to right now."""
    fs, path = resolve(folder)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name.startswith(f".{prefix}") and info.base_name.endswith(".tmp"):
            fs.delete_file(info.path)


def finished(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a file with content: what resumable stages take for done. A zero-length file is never
    a finished output (a store or tool that left an empty object behind), so it is redone."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.type == pafs.FileType.File and bool(info.size)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically; a file that already holds exactly these bytes is left alone (re-runs that
    produce the same metadata rewrite nothing)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and info.size == len(data) and read_bytes(uri) == data:
        return
    with open_output(uri) as f:
        f.write(data)


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
