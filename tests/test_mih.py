"""The multi-index hashing kernels (rayhash.index.mih) against numpy brute force: exact k-NN by (distance, rank) and
exact radius search, for every table count, code width and k, on codes with many ties."""
from __future__ import annotations

import math

import numpy as np
import pytest
from fixtures_index import brute_distances

from rayhash.index.mih import MultiIndex
from rayhash.index.types import mih_tables


def _codes(kind: str, n: int, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    bits = nbytes * 8
    if kind == "ties":  # few distinct codes: large groups at equal distance
        return np.packbits(rng.random((n, bits)) < 0.08, axis=1)
    if kind == "duplicates":  # each code present 20 times
        base = rng.integers(0, 256, (n // 20, nbytes), dtype=np.uint8)
        return base[rng.permutation(np.repeat(np.arange(len(base)), 20))]
    protos = rng.integers(0, 2, (12, bits), dtype=np.uint8)  # clustered
    raw = protos[rng.integers(0, 12, n)] ^ (rng.random((n, bits)) < 0.06).astype(np.uint8)
    return np.packbits(raw, axis=1)


def _expected(q, db, rank, stride, k):
    c = brute_distances(q, db) * stride + rank[None, :]
    return np.sort(c, axis=1)[:, :k]


@pytest.mark.parametrize("kind,nbytes,tables", [("ties", 2, None), ("ties", 3, 3), ("duplicates", 4, 2),
                                                ("duplicates", 8, 4), ("clustered", 8, None), ("clustered", 6, 4),
                                                ("clustered", 16, 5)])
def test_knn_equals_brute_force_by_distance_then_rank(kind, nbytes, tables):
    """Every query answered by probing alone (unlimited budget) equals brute force for k from 1 past the largest tie
    group (and k = n on narrow codes, where probing every substring value is affordable); split across threads too.
    Ranks are a permutation, so ties are not in position order."""
    rng = np.random.default_rng(nbytes * 10 + (tables or 0))
    n = 1500
    db = _codes(kind, n, nbytes, rng)
    rank = rng.permutation(n).astype(np.int64)
    stride = n + 1
    near = db[rng.integers(0, n, 10)] ^ np.packbits(rng.random((10, nbytes * 8)) < 0.03, axis=1)
    q = np.concatenate([db[:6], near])
    narrow = nbytes <= 3  # exhaustive probing is affordable: random queries, and k = n
    if narrow:
        q = np.concatenate([q, rng.integers(0, 256, (4, nbytes), dtype=np.uint8)])
    mi = MultiIndex(db, rank, stride, tables)
    assert (mi.m, mi.b) == ((tables, nbytes * 8 // tables) if tables else mih_tables(nbytes * 8, n))
    dist = brute_distances(q, db)
    largest_tie = max(np.unique(row, return_counts=True)[1].max() for row in dist)
    for k in sorted({1, 5, 37, int(largest_tie) + 3} | ({n} if narrow else set())):
        got, gave_up = mi.search(q, min(k, n), threads=1 + k % 2, scan_units=math.inf)
        assert not gave_up.any()
        np.testing.assert_array_equal(got, _expected(q, db, rank, stride, min(k, n)), err_msg=f"k={k}")


def test_queries_dearer_than_a_scan_are_flagged_and_the_rest_exact():
    """Far queries are predicted (from their buckets' occupancy) or found (out of budget) dearer than a scan and
    flagged for their caller to scan; near ones are probed, exactly."""
    rng = np.random.default_rng(7)
    n = 4000
    db = _codes("clustered", n, 8, rng)
    rank = np.arange(n, dtype=np.int64)
    q = np.concatenate([db[:20], rng.integers(0, 256, (20, 8), dtype=np.uint8)])
    got, gave_up = MultiIndex(db, rank, n + 1).search(q, 10, scan_units=40 * n)
    assert gave_up[20:].any() and not gave_up[:20].all()  # random queries need far more work than near ones
    ok = ~gave_up
    np.testing.assert_array_equal(got[ok], _expected(q[ok], db, rank, n + 1, 10))


@pytest.mark.parametrize("kind,nbytes,tables", [("ties", 2, None), ("clustered", 8, 2), ("clustered", 8, 3),
                                                ("duplicates", 4, 4)])
def test_range_search_equals_brute_force(kind, nbytes, tables):
    """All codes within radius 0..8, each once, with its distance and rank."""
    rng = np.random.default_rng(11)
    n = 1200
    db = _codes(kind, n, nbytes, rng)
    rank = rng.permutation(n).astype(np.int64)
    q = np.concatenate([db[:5], db[5:10] ^ np.packbits(rng.random((5, nbytes * 8)) < 0.05, axis=1)])
    mi = MultiIndex(db, rank, n + 1, tables)
    dist = brute_distances(q, db)
    for radius in range(9):
        qid, d, r = mi.range_search(q, radius, threads=2)
        got = sorted(zip(qid.tolist(), d.tolist(), r.tolist()))
        want = sorted((i, int(dist[i, j]), int(rank[j])) for i, j in zip(*np.nonzero(dist <= radius)))
        assert got == want, radius


def test_tables_are_a_view_of_the_codes_and_their_memory_is_bounded():
    """64-bit codes are not copied; the tables cost at most 4 + 2 + 1 bytes per code and table."""
    rng = np.random.default_rng(3)
    n = 50_000
    db = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    mi = MultiIndex(db, np.arange(n), n + 1)
    assert np.shares_memory(mi.words, db)
    assert mi.nbytes <= mi.m * 7 * n
    with pytest.raises(ValueError, match="each table takes 1 to 32 of the 64 bits"):
        MultiIndex(db, np.arange(n), n + 1, tables=1)
