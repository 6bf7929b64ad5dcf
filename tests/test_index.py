"""Sharded FAISS binary indices against numpy brute force: exact top-k with key tie-break, range search, index
types, append, verification errors, CLI."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from fixtures_index import brute_distances, index_random_table, index_write_code_dir

from rayhash.index import ShardedIndex, build_index, read_codes, write_codes


def brute_topk(q, db, keys, k):
    """Indices of the k nearest by (distance, key), independent of FAISS."""
    dist = brute_distances(q, db)
    order = np.array([sorted(range(len(db)), key=lambda j: (dist[r, j], keys[j]))[:k] for r in range(len(q))])
    return order, np.take_along_axis(dist, order, axis=1)


def assert_same_topk(res, keys, labels, order, dist):
    np.testing.assert_array_equal(res.distances, dist)
    np.testing.assert_array_equal(res.keys, keys[order])
    np.testing.assert_array_equal(res.labels, labels[order])


@pytest.fixture(scope="module")
def queries(index_random_codes):
    _, keys, codes, _ = index_random_codes
    rng = np.random.default_rng(1)
    fresh = np.packbits((rng.random((12, 16)) < 0.15).astype(np.uint8), axis=1)
    return np.concatenate([codes[:8], fresh])  # database members (distance 0 to themselves) and new codes


def test_codes_parquet_roundtrip_and_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, codes, labels = index_random_table(n=50, bits=24)
    index_write_code_dir(tmp_path, keys, codes, labels, files=2)
    t = read_codes(tmp_path)
    assert t.bits == 24 and t.codes.dtype == np.uint8
    np.testing.assert_array_equal(t.codes, codes)
    np.testing.assert_array_equal(t.keys, keys)
    np.testing.assert_array_equal(t.labels, labels)
    schema = pq.read_schema(tmp_path / "codes-00000.parquet")
    assert schema.field("code").type == pa.binary(3) and schema.field("label").type == pa.int32()
    write_codes(str(tmp_path / "codes-00002.parquet"), keys[:3], np.zeros((3, 4), np.uint8), labels[:3])
    with pytest.raises(ValueError, match="different code widths"):
        read_codes(tmp_path)


@pytest.mark.parametrize("shards", [1, 3, 7])
@pytest.mark.parametrize("mode", ["local", "ray"])
def test_sharded_search_equals_brute_force(index_flat_indices, index_random_codes, queries, shards, mode):
    _, keys, codes, labels = index_random_codes
    k = 37  # large enough that the k-th distance is a big tie group that straddles shards
    order, dist = brute_topk(queries, codes, keys, k)
    assert (dist[:, -1:] == dist[:, -2:-1]).mean() > 0.5  # the test really exercises tie-breaking
    with ShardedIndex.open(index_flat_indices[shards], mode=mode, actors=2) as index:
        assert index.ntotal == len(codes) and index.bits == 16 and index.num_shards == shards
        res = index.search(queries, k)
        assert_same_topk(res, keys, labels, order, dist)
        assert (res.distances[:8, 0] == 0).all()
        rr = index.range_search(queries, 2)
        full = brute_distances(queries, codes)
        for i in range(len(queries)):
            want = sorted((int(full[i, j]), keys[j]) for j in np.flatnonzero(full[i] <= 2))
            assert list(zip(rr[i].distances.tolist(), rr[i].keys.tolist())) == want
        np.testing.assert_array_equal(index.label_counts(), np.bincount(labels))
        assert sorted(index.keys()) == sorted(keys)


def test_k_larger_than_database_returns_every_code(index_flat_indices, index_random_codes):
    """k over the index size: ntotal columns (no (nq, k) allocation), every code in (distance, key) order."""
    _, keys, codes, labels = index_random_codes
    small = codes[:1]
    with ShardedIndex.open(index_flat_indices[3]) as index:
        res = index.search(small, 10 ** 9)
    assert res.distances.shape == (1, len(codes)) and (res.distances >= 0).all()
    order, dist = brute_topk(small, codes, keys, len(codes))
    np.testing.assert_array_equal(res.keys[0], keys[order[0]])


def test_index_types_against_brute_force(tmp_path, index_random_codes, queries, ray_local):
    codes_dir, keys, codes, labels = index_random_codes
    full = brute_distances(queries, codes)
    # ivf scanning all lists is exact k-NN
    build_index(codes_dir, tmp_path / "ivf", index_type="ivf", shards=3, nlist=8)
    with ShardedIndex.open(tmp_path / "ivf", nprobe=8) as index:
        order, dist = brute_topk(queries, codes, keys, 20)
        assert_same_topk(index.search(queries, 20), keys, labels, order, dist)
    # hash and multihash: exact Hamming-radius lookups; k-NN hits are true distances in (distance, key) order
    for kind, params in (("hash", {"hash_bits": 8, "nflip": 1}), ("multihash", {"nhash": 2, "hash_bits": 8})):
        build_index(codes_dir, tmp_path / kind, index_type=kind, shards=3, **params)
        with ShardedIndex.open(tmp_path / kind) as index:
            for radius in (0, 1, 3):
                rr = index.range_search(queries, radius)
                for i in range(len(queries)):
                    want = sorted((int(full[i, j]), keys[j]) for j in np.flatnonzero(full[i] <= radius))
                    assert list(zip(rr[i].distances.tolist(), rr[i].keys.tolist())) == want, (kind, radius)
            res = index.search(queries, 10)
            key_pos = {k: j for j, k in enumerate(keys)}
            for i in range(len(queries)):
                hits = [(d, k) for d, k in zip(res.distances[i], res.keys[i]) if k is not None]
                assert hits == sorted(hits)
                assert all(full[i, key_pos[k]] == d for d, k in hits)
            assert (res.distances[:8, 0] == 0).all()


def test_append_adds_new_shards_only(tmp_path, ray_local):
    keys, codes, labels = index_random_table(n=600, seed=5)
    a, b = tmp_path / "codes_a", tmp_path / "codes_b"
    a.mkdir(), b.mkdir()
    index_write_code_dir(a, keys[:400], codes[:400], labels[:400], files=2)
    index_write_code_dir(b, keys[400:], codes[400:], labels[400:], files=1)
    out = tmp_path / "idx"
    build_index(str(a), out, shards=2)
    before = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.startswith("shard-")}
    with pytest.raises(FileExistsError, match="--append"):
        build_index(str(b), out, shards=1)
    m = build_index(str(b), out, shards=1, append=True)
    assert [s["count"] for s in m["shards"]] == [200, 200, 200] and m["ntotal"] == 600
    assert {p: os.stat(out / p).st_mtime_ns for p in before} == before
    assert build_index(str(b), out, shards=1, append=True)["shards"] == m["shards"]  # already indexed: no-op
    q = codes[395:405]
    order, dist = brute_topk(q, codes, keys, 15)
    with ShardedIndex.open(out) as index:
        assert_same_topk(index.search(q, 15), keys, labels, order, dist)


def _copy_index(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_shard_file_is_named(tmp_path, index_flat_indices, ray_local):
    idx = _copy_index(index_flat_indices[3], tmp_path / "idx")
    target = idx / "shard-00001.faiss"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    for mode in ("local", "ray"):
        with pytest.raises(ValueError, match=r"shard-00001\.faiss: sha256 does not match.*corrupted.*rebuild"):
            ShardedIndex.open(idx, mode=mode)
    os.remove(idx / "shard-00002.ids.parquet")
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.ids\.parquet.*missing"):
        ShardedIndex.open(idx, verify=False)


def test_manifest_of_other_width_is_rejected(tmp_path, index_flat_indices):
    idx = _copy_index(index_flat_indices[1], tmp_path / "idx")
    m = json.loads((idx / "manifest.json").read_text())
    m["bits"] = 32
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard-00000\.faiss: holds 16-bit codes but manifest.json says bits=32"):
        ShardedIndex.open(idx)
    m["bits"] = 12
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="bits.*not a positive multiple of 8"):
        ShardedIndex.open(idx)


def test_query_of_wrong_byte_length(index_flat_indices):
    with ShardedIndex.open(index_flat_indices[1]) as index:
        with pytest.raises(ValueError, match=r"queries have 4 bytes per code, index expects 2 \(16 bits / 8\)"):
            index.search(np.zeros((3, 4), np.uint8), 5)
        with pytest.raises(ValueError, match="dtype uint8"):
            index.search(np.zeros((3, 2), np.int64), 5)


def test_missing_index_and_codes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a rayhash index"):
        ShardedIndex.open(tmp_path)
    with pytest.raises(FileNotFoundError, match="no code shards"):
        build_index(str(tmp_path), tmp_path / "idx")


def test_cli_build_and_query_by_key(tmp_path, index_random_codes, capsys, ray_local):
    from rayhash.cli import main

    codes_dir, keys, codes, labels = index_random_codes
    out = str(tmp_path / "idx")
    assert main(["index", "build", "--codes", codes_dir, "--out", out, "--shards", "2"]) == 0
    assert "2 shards, 1500 codes" in capsys.readouterr().out
    assert main(["query", "--index", out, "--key", keys[3], keys[7], "--k", "5"]) == 0
    text = capsys.readouterr().out
    order, dist = brute_topk(codes[[3, 7]], codes, keys, 5)
    blocks = text.split(f"query {keys[7]}")
    for block, o, d in zip(blocks, order, dist):
        rows = [line.split() for line in block.splitlines() if line.strip()[:1].isdigit()]
        assert [r[2] for r in rows] == list(keys[o]) and [int(r[1]) for r in rows] == list(d)
        assert [r[3] for r in rows] == [str(labels[j]) for j in o]  # no label names recorded: the label ids
    assert main(["query", "--index", out, "--key", "no-such-key"]) == 2
    assert "no-such-key" in capsys.readouterr().err


def _clustered_codes(n: int, bits: int, prototypes: int, noise: float, seed: int):
    """Codes near a few prototypes (per-bit flip probability ``noise``), with exact duplicates: many ties."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 2, (prototypes, bits), dtype=np.uint8)
    raw = protos[rng.integers(0, prototypes, n)] ^ (rng.random((n, bits)) < noise).astype(np.uint8)
    raw[: n // 10] = raw[n // 10: 2 * (n // 10)]  # duplicates
    return np.packbits(raw, axis=1)


@pytest.mark.parametrize("shards", [1, 3, 7])
@pytest.mark.parametrize("mode", ["local", "ray"])
def test_mih_is_exact_k_nn_on_clustered_and_random_codes(tmp_path, mode, shards, ray_local):
    """Multi-index hashing answers k-NN exactly (against numpy brute force, ties by key) for every k, whether the
    query's neighbours are close (found by probing) or far (answered by the scan fallback), and range search too."""
    bits, n = 32, 3000
    codes = _clustered_codes(n, bits, prototypes=40, noise=0.05, seed=3)
    rng = np.random.default_rng(4)
    keys = np.array([f"item-{i:05d}" for i in rng.permutation(n)])
    labels = rng.integers(0, 9, n).astype(np.int32)
    codes_dir = index_write_code_dir(tmp_path / "codes", keys, codes, labels)
    build_index(codes_dir, tmp_path / "mih", index_type="mih", shards=shards)
    manifest = json.loads((tmp_path / "mih" / "manifest.json").read_text())
    assert manifest["params"] == {"nhash": None, "hash_bits": None}  # tables chosen over the codes a process holds
    queries = np.concatenate([codes[rng.choice(n, 10, replace=False)],  # near: found within the probed radius
                              rng.integers(0, 256, (6, bits // 8), dtype=np.uint8)])  # random: scan fallback
    full = brute_distances(queries, codes)
    with ShardedIndex.open(tmp_path / "mih", mode=mode) as index:
        if mode == "local":  # the shards merged into one index over 3,000 codes: floor(32 / log2(3000)) tables
            assert [(s.mih.m, s.mih.b) for s in index._group.shards] == [(2, 16)]
        for k in (1, 10, 57, n + 5):
            order, dist = brute_topk(queries, codes, keys, min(k, n))
            res = index.search(queries, k)
            assert_same_topk(_first(res, min(k, n)), keys, labels, order, dist)
        far = queries[10:]  # queries that probing cannot answer cheaply: scanned, still exact
        order, dist = brute_topk(far, codes, keys, 10)
        assert_same_topk(index.search(far, 10), keys, labels, order, dist)
        if mode == "local":  # a scan made to look dear: every query probes (to the end of its budget), still exact
            for shard in index._group.shards:
                shard.mih.scan_units = float("inf")
            for k in (1, 10, 57):
                order, dist = brute_topk(queries, codes, keys, k)
                assert_same_topk(index.search(queries, k), keys, labels, order, dist)
        for radius in (0, 2, 5):
            rr = index.range_search(queries, radius)
            for i in range(len(queries)):
                want = sorted((int(full[i, j]), keys[j]) for j in np.flatnonzero(full[i] <= radius))
                assert sorted(zip(rr[i].distances.tolist(), rr[i].keys.tolist())) == want, radius


def _first(res, k):
    """The first k columns of a search result (k > the database pads with empty slots)."""
    return type(res)(res.distances[:, :k], res.keys[:, :k], res.labels[:, :k])


def test_mih_tables_follow_the_shard_size_and_refuse_oversized_tables():
    """m = floor(bits / log2 n) tables (substrings of at least about log2 n bits, Norouzi et al.), at most 32 bits
    each; a given nhash is checked against that."""
    from rayhash.index.types import default_params, mih_tables

    # 64 / log2(n): 250k -> 3.57, 2.5M -> 3.01, 10M -> 2.75, 1G -> 2.14; 128 / log2(1M) -> 6.4; 16 codes -> 4 tables
    assert mih_tables(64, 250_000) == (3, 21) and mih_tables(64, 2_500_000) == (3, 21)
    assert mih_tables(64, 10**7) == (2, 32) and mih_tables(64, 10**9) == (2, 32)
    assert mih_tables(128, 10**6) == (6, 21) and mih_tables(16, 10) == (4, 4)
    assert default_params("mih", 64, nhash=3) == {"nhash": 3, "hash_bits": 21}
    assert default_params("mih", 128) == {"nhash": None, "hash_bits": None}
    with pytest.raises(ValueError, match="'nhash' = 1 is out of range: it must be an integer from 2 to 64"):
        default_params("mih", 64, nhash=1)


def test_capacity_plan_follows_its_model():
    """benchmarks/capacity.py: cores grow with the query rate, shards with the corpus over what one core scans in
    half the latency budget, memory with the code and id-map bytes; multi-index hashing trades memory for cores."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("capacity", os.path.join(os.path.dirname(__file__), "..",
                                                                           "benchmarks", "capacity.py"))
    cap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cap)
    kw = dict(bits=64, latency_ms=200, compares_per_core=4e8, node_cores=32, node_memory_gib=256, usable=0.7,
              id_bytes=48)
    a = cap.plan(1e9, qps=100, speedup=1, tables=0, **kw)
    b = cap.plan(1e9, qps=200, speedup=1, tables=0, **kw)
    m = cap.plan(1e9, qps=100, speedup=4, tables=4, **kw)
    assert b["cores for rate"] == 2 * a["cores for rate"] == 2 * 1e9 / 4e8 * 100
    assert a["shards"] == 1e9 // (0.1 * 4e8) and a["bytes/code"] == 8 + 48 and m["bytes/code"] == 8 + 48 + 7 * 4
    assert m["cores for rate"] == a["cores for rate"] / 4 and m["nodes"] < a["nodes"]
    assert a["latency ms"] <= 200 and a["utilisation"] <= 0.7


def test_flat_search_is_exact_with_either_k_selection(index_flat_indices, index_random_codes, queries):
    """A key-ordered flat group times FAISS's two k-selections (counting, heap) on live batches and keeps the
    faster: both must give the exact top-k by (distance, key), whichever a call uses, for k across tie groups."""
    _, keys, codes, labels = index_random_codes
    with ShardedIndex.open(index_flat_indices[3]) as index:
        shard = index._group.shards[0]
        assert len(index._group.shards) == 1 and shard.key_ordered  # the 3 flat shards merged in key order
        for k in (1, 5, 37, 200, 1499):
            order, dist = brute_topk(queries, codes, keys, k)
            for _ in range(3):  # the first two calls try both selections, the rest use the faster
                assert_same_topk(index.search(queries, k), keys, labels, order, dist)
        assert all(n > 0 for _, n in shard._selection.values())  # both selections answered some of the calls


def test_bench_search_real_codes_are_replicated_with_the_asked_noise(tmp_path):
    """benchmarks/bench_search.py --codes real: the originals are kept once, copies flip each bit with the given
    probability (measured against their source code), and the database has the size asked."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_search", os.path.join(os.path.dirname(__file__), "..",
                                                                               "benchmarks", "bench_search.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    keys, codes, labels = index_random_table(n=300, bits=64, seed=4)
    index_write_code_dir(tmp_path, keys, codes, labels, files=2)
    args = bench.argparse.Namespace(real_codes=str(tmp_path), real_queries=None, n=20_000, nq=500,
                                    item_noise=0.05)
    db, q = bench.real_codes(args, np.random.default_rng(0))
    assert db.shape == (20_000, 8) and q.shape == (500, 8)
    np.testing.assert_array_equal(db[:300], codes)
    # every copy is within a few bits of some original; the mean distance to the nearest is ~ 64 * 0.05
    nearest = np.unpackbits(db[300:2300, None, :] ^ codes[None], axis=2).sum(2).min(1)
    assert 2.4 < nearest.mean() < 3.6


def test_mih_index_files_of_earlier_versions_still_load(tmp_path):
    """mih shards written before the tables moved into rayhash.index.mih hold a FAISS IndexBinaryMultiHash; they load
    (its codes serve, the tables are built anew) and search exactly."""
    import hashlib

    import faiss

    bits, n = 32, 1200
    codes = _clustered_codes(n, bits, prototypes=20, noise=0.05, seed=5)
    keys = np.array([f"old-{i:05d}" for i in range(n)])
    labels = np.zeros(n, np.int32)
    build_index(index_write_code_dir(tmp_path / "codes", keys, codes, labels), tmp_path / "mih", index_type="mih",
                shards=2)
    path = tmp_path / "mih" / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        flat = faiss.read_index_binary(str(tmp_path / "mih" / entry["index"]))
        old = faiss.index_binary_factory(bits, "BHash2x16")
        old.add(faiss.vector_to_array(flat.xb).reshape(flat.ntotal, bits // 8))
        faiss.write_index_binary(old, str(tmp_path / "mih" / entry["index"]))
        entry["index_sha256"] = hashlib.sha256((tmp_path / "mih" / entry["index"]).read_bytes()).hexdigest()
    manifest.update(faiss_class="IndexBinaryMultiHash", params={"nhash": None, "hash_bits": None, "max_flips": 3})
    path.write_text(json.dumps(manifest))
    q = codes[:12] ^ np.uint8(1)
    order, dist = brute_topk(q, codes, keys, 10)
    with ShardedIndex.open(tmp_path / "mih") as index:
        assert_same_topk(index.search(q, 10), keys, labels, order, dist)


def test_actor_groups_count_the_mih_tables():
    """Ray mode sizes actors by what their shards take in memory: an mih shard also holds its tables (7 bytes a code
    and table), so the same shards need more actors under the same memory limit."""
    from rayhash.index.sharded import plan_groups
    from rayhash.index.types import mih_tables

    entries = [{"count": 1000} for _ in range(4)]
    flat_shard = 1000 * (8 + 4 * 32 + 4)  # codes, 32-character unicode keys, labels
    mih_shard = flat_shard + 1000 * 7 * mih_tables(64, 1000)[0]
    limit = 4 * flat_shard + 1
    assert len(plan_groups(entries, {"bits": 64, "index_type": "flat"}, None, limit)) == 1
    assert len(plan_groups(entries, {"bits": 64, "index_type": "mih"}, None, limit)) == -(-4 * mih_shard // limit) == 2
