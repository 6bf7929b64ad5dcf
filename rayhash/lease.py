"""One writer per output folder: a lease file that a second writer sees and is refused by.

A stage that writes a folder holds ``FOLDER/_LEASE.json`` (owner id, Ray job id, host, pid, start time and an
expiry that a background thread renews) from start to finish; a second writer of the same folder, from any node,
is refused with a :class:`FolderBusy` error that names the owner. Nothing is mixed and nothing is lost: the
first writer completes, and the second one can be re-run after it (the stages resume from what is on storage).

A lease whose owner died is taken over: at once when the owner ran on this host and its process is gone, else
once it has expired (``RAYHASH_LEASE_TTL`` seconds after its last renewal, default 120).

Atomicity: on a local or shared POSIX filesystem the lease is written under a unique name and hard-linked into
place (exactly one of racing writers gets it, and it is never seen without its content). Object stores have no
create-if-absent through pyarrow, so there the lease is written and read
back after a short settle time, and the writer whose lease is read back proceeds; two writers that start
within the same second may, rarely, both be refused — never both admitted in the common case of one starting
while the other runs.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from rayhash import settings, storage
from rayhash.runtime import get_logger

log = get_logger("lease")

LEASE_FILE = "_LEASE.json"
_SETTLE_S = 1.0  # object stores: wait this long before reading a written lease back


class FolderBusy(RuntimeError):
    """Another writer holds the folder's lease."""


def _ttl() -> float:
    return settings.LEASE_TTL.number()


def _job_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:  # no Ray, or no job context
        return None


def _alive_here(doc: dict) -> bool:
    """False when the owner ran on this host and its process is gone (True when unsure)."""
    if doc.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(doc["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        doc = storage.read_json(path)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def _stale(doc: dict | None) -> bool:
    return doc is None or float(doc.get("expires", 0)) < time.time() or not _alive_here(doc)


def _refuse(folder: str, doc: dict, what: str) -> FolderBusy:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("since", 0))))
    return FolderBusy(
        f"{folder}: another writer is using this folder ({doc.get('what', '?')} by Ray job {doc.get('job_id')} on "
        f"{doc.get('host')} pid {doc.get('pid')}, since {since}); {what} refused so that neither's output is "
        f"mixed. Wait for it to finish and run again (it resumes), or write elsewhere. If that writer is dead, its "
        f"lease expires {max(0, int(float(doc.get('expires', 0)) - time.time()))} s from now; or delete "
        f"{storage.join(folder, LEASE_FILE)}.")


def _create_local(path: str, body: bytes) -> bool:
    """Create ``path`` with ``body`` only if it does not exist: written under a unique name, then hard-linked
    into place (``link`` fails when the name exists), so no reader ever sees a lease without its content."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _take_over_local(path: str, stale: dict) -> None:
    """Move a stale lease aside; when another writer took it over in the meantime, put theirs back."""
    aside = f"{path}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read(aside)
    if moved is not None and moved.get("owner") != stale.get("owner"):
        try:
            os.link(aside, path)  # a fresh lease of another writer: restore it (unless yet another exists)
        except FileExistsError:
            pass
    os.remove(aside)


def _acquire(folder: str, doc: dict) -> None:
    path = storage.join(folder, LEASE_FILE)
    body = json.dumps(doc).encode()
    if not storage.is_remote(path):
        while not _create_local(path, body):
            held = _read(path)
            if held is None:  # removed since our attempt (try again), or unreadable (corrupt: taken over)
                if os.path.exists(path):
                    log.warning("%s: replacing an unreadable lease file", folder)
                    _take_over_local(path, {})
                continue
            if not _stale(held):
                raise _refuse(folder, held, doc["what"])
            log.warning("%s: taking over the stale lease of %s (job %s)", folder, held.get("what"), held.get("job_id"))
            _take_over_local(path, held)
        return
    held = _read(path)
    if held is not None and not _stale(held):
        raise _refuse(folder, held, doc["what"])
    storage.write_json(path, doc)
    time.sleep(_SETTLE_S)
    back = _read(path)
    if not back or back.get("owner") != doc["owner"]:
        raise _refuse(folder, back or doc, doc["what"])


@contextmanager
def hold(folder: str | os.PathLike, what: str) -> Iterator[dict]:
    """Hold ``folder``'s writer lease for the ``with`` block (``what``: the stage, named in a refusal)."""
    folder = str(folder)
    ttl = _ttl()
    now = time.time()
    doc = {"owner": uuid.uuid4().hex, "what": what, "job_id": _job_id(), "host": socket.gethostname(),
           "pid": os.getpid(), "since": now, "expires": now + ttl}
    _acquire(folder, doc)
    path = storage.join(folder, LEASE_FILE)
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 3):
            held = _read(path)
            if held is None or held.get("owner") != doc["owner"]:
                log.warning("%s: lease lost (taken over by %s)", folder, (held or {}).get("job_id"))
                return
            storage.write_json(path, {**doc, "expires": time.time() + ttl})

    renewer = threading.Thread(target=renew, name="rayhash-lease", daemon=True)
    renewer.start()
    try:
        yield doc
    finally:
        stop.set()
        renewer.join(timeout=5)
        held = _read(path)
        if held is not None and held.get("owner") == doc["owner"]:
            storage.delete(path)
