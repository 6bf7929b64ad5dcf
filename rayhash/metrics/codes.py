"""Binary codes: packing (sign, 0 -> +1, big-endian bits) and Hamming / feature distance matrices."""
from __future__ import annotations

import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def pack_codes(z) -> np.ndarray:
    """Pack codes into uint8 (n, d/8), big-endian within a byte (``np.packbits``).

    Floats (network outputs z): bit = ``z >= 0`` (sign, 0 -> +1). Booleans: the bits. Integers: values in {0, 1}
    or {-1, 1}, bit = ``value > 0``. d must be a multiple of 8.
    """
    a = np.asarray(z.detach().cpu() if hasattr(z, "detach") else z)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] % 8:
        raise ValueError(f"codes must be (n, d) with d a multiple of 8, got shape {a.shape}")
    bits = a >= 0 if np.issubdtype(a.dtype, np.floating) else a > 0
    return np.packbits(bits, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Inverse of ``pack_codes``: uint8 (n, d) array of 0/1 bits (first ``bits`` bits when given)."""
    out = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, bitorder="big")
    return out if bits is None else out[:, :bits]


def hamming_distances(q: np.ndarray, db: np.ndarray, block: int | None = None,
                      max_bytes: int = 64 << 20) -> np.ndarray:
    """int32 (nq, n) Hamming distances between packed codes q (nq, B) and db (n, B).

    XOR of 64-bit words + popcount (``np.bitwise_count``, else a byte lookup table), ``block`` query rows at a
    time so the temporary stays under ``max_bytes``.
    """
    q, db = _as_words(q), _as_words(db)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code widths differ: queries {q.shape[1] * 8} bytes vs database {db.shape[1] * 8} bytes")
    nq, n = q.shape[0], db.shape[0]
    block = block or max(1, max_bytes // max(1, n * q.shape[1] * 8))
    out = np.empty((nq, n), dtype=np.int32)
    for s in range(0, nq, block):
        x = q[s:s + block, None, :] ^ db[None, :, :]
        out[s:s + block] = _popcount(x).sum(axis=2, dtype=np.int32)
    return out


def _as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 (n, B) -> uint64 (n, ceil(B/8)), zero-padded (zeros do not change Hamming distances)."""
    c = np.ascontiguousarray(np.atleast_2d(np.asarray(codes)))
    if c.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 (use pack_codes), got {c.dtype}")
    pad = -c.shape[1] % 8
    if pad:
        c = np.concatenate([c, np.zeros((c.shape[0], pad), np.uint8)], axis=1)
    return c.view(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT[x.view(np.uint8)].reshape(x.shape + (8,)).sum(axis=-1, dtype=np.uint8)


def distance_matrix(queries, database, metric: str = "hamming") -> np.ndarray:
    """(nq, n) distances, smaller = closer. ``hamming``: packed uint8 codes, or float outputs (packed by sign);
    ``euclidean`` / ``cosine`` (1 - cos): float features."""
    if metric == "hamming":
        q, db = (c if np.asarray(c).dtype == np.uint8 else pack_codes(c) for c in (queries, database))
        return hamming_distances(q, db)
    q, db = (np.asarray(c, dtype=np.float64) for c in (queries, database))
    if metric == "euclidean":
        sq = (q**2).sum(1)[:, None] + (db**2).sum(1)[None, :] - 2 * q @ db.T
        return np.sqrt(np.maximum(sq, 0.0))
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        dn = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ dn.T
    raise ValueError(f"unknown metric {metric!r}; use 'hamming', 'euclidean' or 'cosine'")
