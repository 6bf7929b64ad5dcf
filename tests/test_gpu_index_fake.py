"""The GPU index-search path on a machine without a GPU: faiss's GPU classes replaced by fakes that fail as the
real ones do (``rayhash.testing.fake_faiss_gpu``): concurrent use of a GPU resources object raises, k > 2048
raises, ties come back in arbitrary order, and a GPU newer than the wheel's kernels aborts the process. Results
are checked against numpy brute force by (distance, key)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fixtures_index import brute_distances, index_random_table, index_write_code_dir

from rayhash.index import ShardedIndex, build_index

N, BITS = 5000, 16  # shards of 2500 codes: k = 1100 asks FAISS for 2208 > 2048 candidates


def _brute(q, codes, keys, k):
    dist = brute_distances(q, codes)
    rank = np.argsort(np.argsort(keys.astype(str)))
    order = np.lexsort((np.broadcast_to(rank, dist.shape), dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), keys[order]


@pytest.fixture(scope="module")
def gpu_fake_index(tmp_path_factory, ray_local):
    keys, codes, labels = index_random_table(n=N, bits=BITS, seed=3)
    root = tmp_path_factory.mktemp("fake_gpu")
    build_index(index_write_code_dir(root, keys, codes, labels, files=2), str(root / "idx"), shards=2)
    rng = np.random.default_rng(5)
    q = np.concatenate([codes[:20], np.packbits((rng.random((20, BITS)) < 0.15).astype(np.uint8), axis=1)])
    return str(root / "idx"), keys, codes, q


def test_gpu_shards_searched_one_at_a_time_within_k_limit_exactly(gpu_fake_index):
    from rayhash.testing import fake_faiss_gpu

    idx, keys, codes, q = gpu_fake_index
    with fake_faiss_gpu((8, 0)) as stats:
        with ShardedIndex.open(idx) as index:
            assert stats.indices == 2  # both flat shards were copied to the 'GPU'
            jobs = [(q[i::4], k) for i in range(4) for k in (10, 37, 1100, 3000)]
            with ThreadPoolExecutor(8) as pool:  # concurrent queries: the fake raises on overlapping searches
                results = list(pool.map(lambda job: index.search(*job), jobs))
    assert stats.searches > 0 and stats.max_k <= 2048  # used, and never asked for more than the GPU can select
    for (qs, k), res in zip(jobs, results):
        dist, want_keys = _brute(qs, codes, keys, k)
        np.testing.assert_array_equal(res.distances, dist)
        np.testing.assert_array_equal(res.keys, want_keys)  # ties in key order although the GPU returns any order


def test_gpu_newer_than_the_faiss_wheel_stays_on_cpu(gpu_fake_index):
    """faiss-gpu-cu12 on compute capability 9.0 (H100/H200): the fake aborts the process if a GPU index is made at
    all, as the real wheel does at its first kernel; rayhash must search on CPU instead, with a warning, and give
    exact results."""
    idx, keys, codes, q = gpu_fake_index
    script = textwrap.dedent(f"""
        import numpy as np
        from rayhash.index import ShardedIndex
        from rayhash.testing import fake_faiss_gpu
        q = np.load({os.path.join(os.path.dirname(idx), 'q.npy')!r})
        with fake_faiss_gpu((9, 0)) as stats, ShardedIndex.open({idx!r}) as index:
            res = index.search(q, 37)
        np.save({os.path.join(os.path.dirname(idx), 'd.npy')!r}, res.distances)
        np.save({os.path.join(os.path.dirname(idx), 'k.npy')!r}, res.keys.astype(str))
        print("gpu indices made:", stats.indices)
    """)
    np.save(os.path.join(os.path.dirname(idx), "q.npy"), q)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]  # -6 (SIGABRT) if a GPU index had been made
    assert "gpu indices made: 0" in run.stdout
    assert "compute capability 9.0 is outside what faiss-gpu-cu12 has kernels for (7.0 to 8.9)" in run.stderr
    dist, want_keys = _brute(q, codes, keys, 37)
    np.testing.assert_array_equal(np.load(os.path.join(os.path.dirname(idx), "d.npy")), dist)
    np.testing.assert_array_equal(np.load(os.path.join(os.path.dirname(idx), "k.npy")), want_keys.astype(str))


def test_without_the_lock_the_fake_catches_concurrent_searches(gpu_fake_index, monkeypatch):
    """The fake can fail: with rayhash's one-search-at-a-time lock replaced by a no-op, concurrent searches on the
    shared GPU resources are refused."""
    import contextlib

    from rayhash.index import gpu as search
    from rayhash.testing import fake_faiss_gpu

    idx, _, _, q = gpu_fake_index
    monkeypatch.setattr(search, "_GPU_LOCK", contextlib.nullcontext())
    with fake_faiss_gpu((8, 0)), ShardedIndex.open(idx) as index:
        with ThreadPoolExecutor(8) as pool, pytest.raises(RuntimeError, match="two searches at once"):
            list(pool.map(lambda i: index.search(q, 37), range(64)))


def test_faiss_gpu_cuvs_serves_hopper(gpu_fake_index):
    """faiss-gpu-cuvs carries sm_90 kernels and compute_90 PTX: on 9.0 (and newer) the GPU index is used."""
    from rayhash.testing import fake_faiss_gpu

    idx, keys, codes, q = gpu_fake_index
    for cc in ((9, 0), (10, 0)):
        with fake_faiss_gpu(cc, wheel="faiss-gpu-cuvs") as stats, ShardedIndex.open(idx) as index:
            res = index.search(q, 37)
        assert stats.indices == 2 and stats.searches > 0
        dist, want_keys = _brute(q, codes, keys, 37)
        np.testing.assert_array_equal(res.distances, dist)
        np.testing.assert_array_equal(res.keys, want_keys)
