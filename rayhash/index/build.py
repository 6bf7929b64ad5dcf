"""Build sharded FAISS binary indices from Parquet code shards: one Ray task per index shard.

An index folder holds, per shard, ``shard-%05d.faiss`` (``faiss.write_index_binary``) and ``shard-%05d.ids.parquet``
(key, label in FAISS id order), and ``manifest.json`` (written atomically, last): code bits, index type and
parameters, per-shard counts and sha256 of both files, the checkpoint the codes came from, the code files indexed.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from rayhash import storage
from rayhash.index.codes import (CodeTable, check_keys, code_file_rows, list_code_files, read_code_file,
                                 read_codes_summary)
from rayhash.index.types import INDEX_TYPES, check_params, default_params, make_faiss_index
from rayhash.layout import IndexDir, IndexManifest
from rayhash.runtime import get_logger

FORMAT, FORMAT_VERSION = IndexManifest.FORMAT, IndexManifest.SCHEMA_VERSION
log = get_logger("rayhash.index")


def _build_shard(out: str, no: int, pieces: list[tuple[str, int, int]], index_type: str,
                 params: dict[str, Any], bits: int) -> dict[str, Any]:
    """Build one shard from row slices of code files; write its index + id map atomically."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = CodeTable.concat([read_code_file(f)[lo:hi] for f, lo, hi in pieces], bits)
    index = make_faiss_index(index_type, bits, params, table.codes, seed=no)
    index_name, ids_name = IndexDir.shard_names(no)
    with storage.atomic_output(IndexDir(out).file(index_name)) as tmp:
        faiss.write_index_binary(index, tmp)
        index_sha = storage.sha256_file(tmp)
    with storage.atomic_output(IndexDir(out).file(ids_name)) as tmp:
        pq.write_table(pa.table({"key": pa.array(list(table.keys), pa.string()),
                                 "label": pa.array(table.labels, pa.int32())}), tmp)
        ids_sha = storage.sha256_file(tmp)
    return {"index": index_name, "idmap": ids_name, "count": len(table), "index_sha256": index_sha,
            "idmap_sha256": ids_sha, "sources": [[f, lo, hi] for f, lo, hi in pieces]}


def read_manifest(index_dir: str) -> IndexManifest:
    """The manifest of an index folder as a typed record (:class:`rayhash.layout.IndexManifest`: fields, types,
    schema version), its index type known and its parameters in range."""
    m = IndexDir.of(index_dir).read_manifest()
    path = IndexDir.of(index_dir).manifest
    if m.index_type not in INDEX_TYPES:
        raise ValueError(f"{path}: field 'index_type' = {m.index_type!r} is not one of "
                         f"{', '.join(INDEX_TYPES.names())}; the manifest is corrupt or from a newer rayhash")
    check_params(m.index_type, dict(m.params), m.bits, f"{path}: field 'params'", "rebuild the index")
    return m


def _plan_shards(files: list[str], rows: list[int], shards: int) -> list[list[tuple[str, int, int]]]:
    """Split the concatenated rows of ``files`` into ``shards`` contiguous, near-equal row ranges."""
    starts = np.concatenate([[0], np.cumsum(rows)])
    bounds = np.linspace(0, starts[-1], shards + 1).round().astype(int)
    plan = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces = []
        for f, fs, fe in zip(files, starts[:-1], starts[1:]):
            a, b = max(lo, fs), min(hi, fe)
            if a < b:
                pieces.append((f, int(a - fs), int(b - fs)))
        plan.append(pieces)
    return plan


def _check_same_model(manifest: dict, digest: str | None, checkpoint: str | None, codes, out: str) -> None:
    """Codes of two models are not comparable: appending is refused when the weights' sha256 differs (or, where an
    index or a code folder predates it, the checkpoint path)."""
    theirs = manifest.get("model_sha256")
    if digest and theirs:
        differ = digest != theirs
    else:
        differ = bool(checkpoint and manifest.get("checkpoint")) and checkpoint != manifest.get("checkpoint")
    if differ:
        raise ValueError(
            f"{codes}: codes from checkpoint {checkpoint} (weights sha256 {(digest or '?')[:12]}) cannot be appended "
            f"to {out}, built from checkpoint {manifest.get('checkpoint')} (weights sha256 {(theirs or '?')[:12]}): "
            "codes of two models are not comparable; build a new index into an empty --out")


def build_index(codes: str | os.PathLike | Sequence[str], out: str | os.PathLike, *, index_type: str = "flat",
                shards: int = 1, append: bool = False, checkpoint: str | None = None,
                address: str | None = None, **params: Any) -> dict[str, Any]:
    """Build a sharded FAISS binary index from code shards (one Ray task per index shard); return the manifest.

    ``append=True`` indexes only code files not yet in the index at ``out``, as NEW shards (old shards untouched,
    manifest replaced atomically). ``params``: see :func:`default_params`.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    index = IndexDir(storage.absolute(out))
    with index.lease("index build"):  # a second build into the same folder is refused while this one runs
        return _build(codes, index, index_type, shards, append, checkpoint, address, params)


def _build(codes, index: IndexDir, index_type: str, shards: int, append: bool, checkpoint: str | None,
           address: str | None, params: dict[str, Any]) -> dict[str, Any]:
    import ray

    from rayhash.runtime import init_ray

    out = index.path
    files = list_code_files(codes)
    info = [code_file_rows(f) for f in files]
    widths = {w for _, w in info}
    if len(widths) != 1:
        raise ValueError(f"{codes}: code shards have different code widths {sorted(w * 8 for w in widths)} bits; "
                         "index codes of one checkpoint at a time")
    bits = widths.pop() * 8
    summary = read_codes_summary(str(codes)) if isinstance(codes, (str, os.PathLike)) else {}
    check_keys(files)
    checkpoint = checkpoint or summary.get("checkpoint")
    manifest_path = index.manifest
    old = None
    if storage.finished(manifest_path):  # an empty manifest is no index: built again
        if not append:
            raise FileExistsError(f"{manifest_path} already exists; pass --append to add new codes as new shards, "
                                  "or choose an empty --out")
        old = read_manifest(out)
        if old["bits"] != bits:
            raise ValueError(f"{codes}: {bits}-bit codes cannot be appended to {out}, which holds {old['bits']}-bit "
                             "codes; build a separate index")
        _check_same_model(old, summary.get("model_sha256"), checkpoint, codes, out)
        if old["index_type"] != index_type:
            raise ValueError(f"{out} is a {old['index_type']!r} index; append with --type {old['index_type']}")
        params = {**old["params"], **{k: v for k, v in params.items() if v is not None}}
        done = {src[0] for s in old["shards"] for src in s["sources"]}
        keep = [i for i, f in enumerate(files) if f not in done]
        if len(keep) < len(files):
            log.info("append: %d code file(s) already indexed, skipped", len(files) - len(keep))
        files, info = [files[i] for i in keep], [info[i] for i in keep]
    params = default_params(index_type, bits, **params)
    rows = [r for r, _ in info]
    total = sum(rows)
    if total == 0:
        if old is not None:
            log.info("append: no new codes; index unchanged")
            return old
        raise ValueError(f"{codes}: the code shards hold no rows; nothing to index")
    shards = min(shards, total)
    first = 1 + max((IndexDir.shard_number(s["index"]) for s in old["shards"]), default=-1) if old else 0
    plan = _plan_shards(files, rows, shards)
    init_ray(address)
    task = ray.remote(num_cpus=1)(_build_shard)
    refs = [task.remote(out, first + i, pieces, index_type, params, bits) for i, pieces in enumerate(plan)]
    log.info("building %d %s shard(s) over %d codes (%d bits) in %s", len(refs), index_type, total, bits, out)
    new = ray.get(refs)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for s in new:
        s["created"] = now
    all_shards = ([s.to_json() for s in old.shards] if old else []) + new
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bits": bits, "index_type": index_type,
        "faiss_class": INDEX_TYPES[index_type].faiss_class, "params": params, "checkpoint": checkpoint,
        "model_sha256": summary.get("model_sha256") or (old or {}).get("model_sha256"),
        "label_names": summary.get("label_names") or (old or {}).get("label_names"),
        "data": summary.get("data") or (old or {}).get("data"),
        "created": old["created"] if old else now, "updated": now,
        "ntotal": sum(s["count"] for s in all_shards), "shards": all_shards,
    }
    storage.write_json(manifest_path, manifest)
    log.info("index %s: %d shards, %d codes", out, len(all_shards), manifest["ntotal"])
    return IndexManifest.parse(manifest, manifest_path)
