"""Search throughput: sharded index (local threads, Ray actors) vs one FAISS IndexBinaryFlat vs numpy brute force.

    python benchmarks/bench_search.py --n 100000 --bits 64 --nq 1000 --shards 4

Prints queries/s and codes compared/s for each, the ratio to the single FAISS index in its faster k-selection
setting (heap or counting, whichever wins on this machine; goal: local sharded >= 0.9x)
and the Ray mode's fan-out overhead per query batch. All on the same random codes, in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def numpy_topk(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """Brute-force Hamming k-NN (byte popcount table + argpartition), the baseline without FAISS."""
    out = np.empty((len(q), k), np.int64)
    for i, row in enumerate(q):
        d = POPCOUNT[np.bitwise_xor(db, row)].sum(axis=1, dtype=np.int32)
        out[i] = np.argpartition(d, k)[:k]
    return out


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="database codes")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--nq", type=int, default=1000, help="queries per batch")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--actors", type=int, default=2, help="Ray actors for mode='ray'")
    p.add_argument("--numpy-queries", type=int, default=50, help="queries timed for the (slow) numpy baseline")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args(argv)

    import faiss
    import ray

    from rayhash.index import ShardedIndex, build_index
    from rayhash.index.codes import write_codes

    rng = np.random.default_rng(0)
    nbytes = args.bits // 8
    db = rng.integers(0, 256, (args.n, nbytes), dtype=np.uint8)
    q = rng.integers(0, 256, (args.nq, nbytes), dtype=np.uint8)
    keys = np.array([f"k{i:09d}" for i in range(args.n)], dtype=object)
    labels = np.zeros(args.n, np.int32)
    print(f"n={args.n} bits={args.bits} nq={args.nq} k={args.k} shards={args.shards} "
          f"cpus={os.cpu_count()} faiss_omp_threads={faiss.omp_get_max_threads()}")

    tmp = tempfile.mkdtemp(prefix="bench-search-")
    write_codes(os.path.join(tmp, "codes", "codes-00000.parquet"), keys, db, labels)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    build_index(os.path.join(tmp, "codes"), os.path.join(tmp, "index"), shards=args.shards)
    print(f"build ({args.shards} Ray tasks): {time.perf_counter() - t:.2f}s")

    single = faiss.IndexBinaryFlat(args.bits)
    single.add(db)
    results = {}
    results["faiss IndexBinaryFlat (1 index)"] = best_time(lambda: single.search(q, args.k), args.repeat)
    single.use_heap = False  # the counting k-selection rayhash's flat shards use
    results["faiss IndexBinaryFlat (1 index, use_heap=False)"] = best_time(lambda: single.search(q, args.k),
                                                                          args.repeat)
    local = ShardedIndex.open(os.path.join(tmp, "index"), mode="local")
    results[f"sharded local ({args.shards} shards)"] = best_time(lambda: local.search(q, args.k), args.repeat)
    one = q[:1]
    t_local_one = best_time(lambda: local.search(one, args.k), args.repeat * 3)
    if not args.skip_ray:
        remote = ShardedIndex.open(os.path.join(tmp, "index"), mode="ray", actors=args.actors)
        remote.search(q[:2], args.k)  # warm-up
        results[f"sharded ray ({args.actors} actors)"] = best_time(lambda: remote.search(q, args.k), args.repeat)
        t_ray_one = best_time(lambda: remote.search(one, args.k), args.repeat * 3)
    nq_np = min(args.numpy_queries, args.nq)
    t_np = best_time(lambda: numpy_topk(q[:nq_np], db, args.k), 1)
    results[f"numpy brute force ({nq_np} queries, scaled)"] = t_np * args.nq / nq_np

    base = min(v for name, v in results.items() if name.startswith("faiss"))  # the faster single-index setting
    print(f"{'method':<50} {'queries/s':>12} {'codes compared/s':>18} {'vs 1 FAISS':>10}")
    for name, sec in results.items():
        qps = args.nq / sec
        print(f"{name:<50} {qps:>12.1f} {qps * args.n:>18.3e} {base / sec:>9.2f}x")
    if not args.skip_ray:
        t_local = results[f"sharded local ({args.shards} shards)"]
        t_ray = results[f"sharded ray ({args.actors} actors)"]
        print(f"ray fan-out overhead per batch: {1000 * (t_ray_one - t_local_one):.1f} ms "
              f"(1-query batch: ray {1000 * t_ray_one:.1f} ms vs local {1000 * t_local_one:.1f} ms); "
              f"{args.nq}-query batch: ray {1000 * t_ray:.1f} ms vs local {1000 * t_local:.1f} ms")
        remote.close()
    local.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
