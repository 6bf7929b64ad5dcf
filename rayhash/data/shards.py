"""Writing WebDataset shards (parallel Ray tasks, atomic, resumable, byte-deterministic) and ``dataset.json``.

Layout (file names in :class:`rayhash.layout.DatasetDir`): ``DS/<split>/<split>-%06d.tar`` + ``DS/dataset.json``;
finished shards leave a done-marker ``DS/_progress/<split>-%06d.json`` (count, sha256, fingerprint of the shard's
samples), so a re-run skips them.
A sample is a *record* (``key``, ``cls``, ``json`` + a payload) turned into tar members by a ``make`` function
inside the task, where the CPU work (PNG encoding, file reading, image synthesis) happens.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from typing import Any, Callable, Sequence

from rayhash import storage
from rayhash.layout import DatasetDir
from rayhash.runtime import get_logger, init_ray, progress

log = get_logger("data")

FORMAT = "rayhash-webdataset/1"
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A WebDataset sample key: no dots or slashes (the key is the file name up to the first dot)."""
    return _KEY_BAD.sub("_", text)


def unique_keys(stems: Sequence[str], sources: Sequence[str]) -> list[str]:
    """``safe_key`` of each stem; where two differ only in what ``safe_key`` replaces (``a b.jpg`` / ``a_b.jpg``,
    ``猫.jpg`` / ``犬.jpg``) or share a stem (``a.jpg`` / ``a.png``), each of them gets a suffix from a hash of its
    source name, so every sample keeps its own key (WebDataset and Ray Train require unique keys). Keys that did
    not collide are unchanged; the result does not depend on the order of the inputs."""
    keys = [safe_key(s) for s in stems]
    counts = Counter(keys)
    out = [f"{k}-{hashlib.sha1(src.encode()).hexdigest()[:10]}" if counts[k] > 1 else k
           for k, src in zip(keys, sources)]
    if len(set(out)) < len(out):
        dup = next(k for k, n in Counter(out).items() if n > 1)
        raise ValueError(f"two source files give the sample key {dup!r}; rename one of them")
    return out


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_members(record: dict) -> dict[str, bytes]:
    """The non-image members of a record: ``cls`` (when labelled) and ``json``."""
    members = {}
    if record.get("cls") is not None:
        members["cls"] = str(int(record["cls"])).encode()
    members["json"] = json.dumps(record.get("json", {}), sort_keys=True, ensure_ascii=False).encode()
    return members


def fingerprint(records: Sequence[dict], make: Callable, options: dict | None = None) -> str:
    """Identity of a shard's content: maker, options and every record field except in-memory pixel arrays."""
    h = hashlib.sha256(f"{make.__module__}.{make.__qualname__}".encode())
    h.update(json.dumps(options or {}, sort_keys=True, default=str).encode())
    for r in records:
        small = {k: v for k, v in r.items() if not hasattr(v, "__array__") and not isinstance(v, bytes)}
        h.update(json.dumps(small, sort_keys=True, default=str).encode())
    return h.hexdigest()


def write_shard(out: str, split: str, index: int, records: Sequence[dict], make: Callable, fp: str) -> dict:
    """Write one shard atomically (temporary name, rename) and then its done-marker; return its entry."""
    rel = DatasetDir.shard_name(split, index)
    count, labels = 0, Counter()
    with storage.atomic_output(storage.join(out, rel)) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for record in records:
                made = make(record)  # members of one sample, a list of (key, members), or None (unreadable)
                for key, members in made if isinstance(made, list) else [(record["key"], made)] * (made is not None):
                    for ext, data in members.items():
                        _tar_member(tar, f"{key}.{ext}", data)
                    count += 1
                    if "cls" in members:
                        labels[int(members["cls"])] += 1
        entry = {"file": rel, "count": count, "sha256": storage.sha256_file(tmp), "fingerprint": fp,
                 "label_counts": {str(k): v for k, v in sorted(labels.items())}}
    storage.write_json(DatasetDir(out).progress(split, index), entry)
    return entry


def _finished(out: str, entry_path: str, fp: str) -> dict | None:
    try:
        entry = storage.read_json(entry_path)
    except (FileNotFoundError, ValueError):
        return None
    if entry.get("fingerprint") == fp and storage.finished(DatasetDir(out).member(entry["file"], entry_path)):
        return entry
    return None


def write_split(out: str, split: str, records: Sequence[dict], make: Callable, shard_size: int,
                options: dict | None = None) -> dict:
    """Write ``records`` as shards of ``shard_size`` samples with one Ray task per shard; skip finished ones.

    Returns the split's entry for ``dataset.json``: ``{"count": n, "shards": [{file, count, sha256}],
    "label_counts": {label: n}}`` (label counts only for labelled data).
    """
    import ray

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    entries: list[dict | None] = [None] * len(chunks)
    init_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    pending = {}
    for i, chunk in enumerate(chunks):
        fp = fingerprint(chunk, make, options)
        entries[i] = _finished(out, DatasetDir(out).progress(split, i), fp)
        if entries[i] is None:
            pending[task.remote(out, split, i, chunk, make, fp)] = i
    if len(pending) < len(chunks):
        log.info("%s: %d of %d shards already written, skipping them", split, len(chunks) - len(pending), len(chunks))
    refs = list(pending)
    for _ in progress(range(len(refs)), total=len(refs), desc=f"{split} shards", unit="shard"):
        done, refs = ray.wait(refs, num_returns=1)
        entries[pending[done[0]]] = ray.get(done[0])
    _remove_stale(out, split, len(chunks))
    shards = [{k: e[k] for k in ("file", "count", "sha256")} for e in entries]
    labels = sum((Counter({int(k): v for k, v in e.get("label_counts", {}).items()}) for e in entries), Counter())
    split = {"count": sum(e["count"] for e in shards), "shards": shards}
    if labels:
        split["label_counts"] = {str(k): labels[k] for k in sorted(labels)}
    return split


def _remove_stale(out: str, split: str, n: int) -> None:
    """Delete our own shards beyond the new shard count (left by an earlier run with other options) and the
    staging files of writers that were killed (every task of this run has finished when this runs)."""
    folder = DatasetDir(out).split(split)
    for path in storage.list_files(folder, ".tar"):
        m = re.fullmatch(rf"{re.escape(split)}-(\d{{6}})\.tar", path.rsplit("/", 1)[-1])
        if m and int(m.group(1)) >= n:
            storage.delete(path)
    storage.remove_staging(folder, f"{split}-")


def write_dataset_json(out: str, info: dict[str, Any], splits: dict[str, dict]) -> dict:
    """Write ``DS/dataset.json`` last (atomically), after every shard is in place."""
    doc = {"format": FORMAT, **info, "splits": splits}  # no timestamp: re-runs give identical bytes
    storage.write_json(DatasetDir(out).info, doc)
    log.info("wrote %s (%s)", DatasetDir(out).info,
             ", ".join(f"{s}: {v['count']} samples in {len(v['shards'])} shards" for s, v in splits.items()))
    return doc
