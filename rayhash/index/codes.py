"""Parquet code shards (file names in :class:`rayhash.layout.CodesDir`): ``codes-%05d.parquet`` with ``key``
(string), ``code`` (fixed_size_binary d/8), ``label``
(int32, -1 when unlabelled), plus ``codes.json`` (bits, checkpoint, per-shard counts, skipped corrupt inputs)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayhash import storage
from rayhash.layout import CodesDir, CodesSummary


@dataclass
class CodeTable:
    """Codes in memory: ``keys`` object (n,), ``codes`` uint8 (n, bits/8), ``labels`` int32 (n,)."""

    keys: np.ndarray
    codes: np.ndarray
    labels: np.ndarray
    bits: int

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, sl) -> "CodeTable":
        return CodeTable(self.keys[sl], self.codes[sl], self.labels[sl], self.bits)

    @staticmethod
    def concat(tables: Sequence["CodeTable"], bits: int) -> "CodeTable":
        if not tables:
            return CodeTable(np.empty(0, object), np.empty((0, bits // 8), np.uint8), np.empty(0, np.int32), bits)
        return CodeTable(np.concatenate([t.keys for t in tables]), np.concatenate([t.codes for t in tables]),
                         np.concatenate([t.labels for t in tables]), bits)


def codes_to_arrow(keys, codes: np.ndarray, labels) -> pa.Table:
    """An Arrow table in the code-shard schema (``codes`` uint8 (n, B))."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape
    code_arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(nbytes), n, [None, pa.py_buffer(codes.tobytes())])
    return pa.table({"key": pa.array([str(k) for k in keys], pa.string()), "code": code_arr,
                     "label": pa.array(np.asarray(labels, dtype=np.int32), pa.int32())})


def write_codes(uri: str, keys, codes: np.ndarray, labels, metadata: dict[str, str] | None = None) -> None:
    """Write one code shard atomically (nothing half-written under its final name)."""
    table = codes_to_arrow(keys, codes, labels)
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    with storage.atomic_output(uri) as tmp:
        pq.write_table(table, tmp)


def _code_matrix(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_binary(arr.type):
        raise ValueError(f"{where}: column 'code' has type {arr.type}, expected fixed_size_binary(bits/8); "
                         "re-create the codes with `rayhash encode`")
    if arr.null_count:
        raise ValueError(f"{where}: column 'code' has {arr.null_count} null values; re-create the codes")
    width = arr.type.byte_width
    buf = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
    return buf[arr.offset * width:(arr.offset + len(arr)) * width].reshape(len(arr), width).copy()


def read_code_file(uri: str) -> CodeTable:
    """Read one code shard (local path or URI)."""
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: code shard not found") from e
    except pa.ArrowInvalid as e:
        raise ValueError(f"{uri}: not a readable Parquet file ({e}); re-create it with `rayhash encode`") from e
    missing = {"key", "code", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"{uri}: missing column(s) {sorted(missing)}; expected key, code, label")
    codes = _code_matrix(table.column("code"), uri)
    keys = np.array(table.column("key").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int32)
    return CodeTable(keys, codes, labels, codes.shape[1] * 8)


def list_code_files(codes: str | os.PathLike | Sequence[str]) -> list[str]:
    """The code shard files of a codes dir (sorted), a single file, or an explicit list."""
    if not isinstance(codes, (str, os.PathLike)):
        return [storage.absolute(c) for c in codes]
    codes = storage.absolute(codes)
    if codes.endswith(".parquet"):
        return [codes]
    files = storage.list_files(codes, ".parquet")
    if not files:
        raise FileNotFoundError(f"{codes}: no code shards (codes-*.parquet) found; run `rayhash encode` first")
    return files


def code_file_rows(uri: str) -> tuple[int, int]:
    """``(rows, bytes per code)`` of a code shard, from its Parquet footer only."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        field = pf.schema_arrow.field("code") if "code" in pf.schema_arrow.names else None
        if field is None or not pa.types.is_fixed_size_binary(field.type):
            raise ValueError(f"{uri}: no fixed_size_binary 'code' column; not a rayhash code shard")
        return pf.metadata.num_rows, field.type.byte_width


def read_codes(codes_dir: str | os.PathLike | Sequence[str]) -> CodeTable:
    """All code shards of ``codes_dir`` (sorted by file name, rows in file order) as one :class:`CodeTable`."""
    files = list_code_files(codes_dir)
    tables = [read_code_file(f) for f in files]
    widths = {t.bits for t in tables}
    if len(widths) > 1:
        detail = ", ".join(f"{os.path.basename(f)}: {t.bits}" for f, t in zip(files, tables))
        raise ValueError(f"{codes_dir}: code shards have different code widths ({detail} bits); "
                         "they come from different checkpoints — encode them into separate folders")
    bits = tables[0].bits
    summary = read_codes_summary(codes_dir) if isinstance(codes_dir, (str, os.PathLike)) else {}
    if summary and summary.bits != bits:
        raise ValueError(f"{CodesDir.of(codes_dir).summary}: says bits={summary.bits} but the code shards hold "
                         f"{bits}-bit codes; the folder mixes runs — re-encode into an empty folder")
    return CodeTable.concat(tables, bits)


def read_codes_summary(codes_dir: str) -> CodesSummary | dict:
    """``codes.json`` of a codes folder as a typed record (:class:`rayhash.layout.CodesSummary`), or ``{}`` when
    absent."""
    return CodesDir.of(codes_dir).read_summary() or {}


def check_keys(files: Sequence[str]) -> None:
    """The keys of code shards must be non-empty strings without NUL characters (numpy's unicode arrays, which the
    index's key tables are, would silently drop trailing NULs and merge ``'k\\x00'`` with ``'k'``) and unique over
    all ``files``: otherwise ties by key are not well defined. Refused naming the file, the row and the fix."""
    import pyarrow.compute as pc

    fix = "give every item its own non-empty key without NUL characters and re-encode"
    seen = []
    for uri in files:
        fs, path = storage.resolve(uri)
        col = pq.read_table(path, filesystem=fs, columns=["key"]).column("key").combine_chunks()
        bad = pc.or_kleene(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0)),
                           pc.match_substring(col, "\x00"))
        rows = np.flatnonzero(bad.fill_null(True).to_numpy(zero_copy_only=False))
        if len(rows):
            raise ValueError(f"{uri}: row {rows[0]} has key {col[int(rows[0])].as_py()!r}: keys must be non-empty "
                             f"and hold no NUL character ({len(rows)} such row(s)); {fix}")
        seen.append(col)
    if not seen:
        return
    keys = pa.chunked_array(seen)
    counts = pc.value_counts(keys)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        key = dup[0]["values"].as_py()
        where = [(uri, int(np.flatnonzero(pc.equal(c, key).to_numpy(zero_copy_only=False))[0]))
                 for uri, c in zip(files, seen) if pc.any(pc.equal(c, key)).as_py()]
        places = ", ".join(f"{u} row {r}" for u, r in where[:3])
        raise ValueError(f"key {key!r} occurs {dup[0]['counts'].as_py()} times ({places}; {len(dup)} duplicated "
                         f"key(s) in all): keys must be unique; {fix}")
