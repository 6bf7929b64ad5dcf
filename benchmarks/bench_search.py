"""Search throughput: sharded index (flat and multi-index hashing; local threads, Ray actors) vs one FAISS
IndexBinaryFlat vs numpy brute force.

    python benchmarks/bench_search.py --n 100000 --bits 64 --nq 1000 --shards 4
    python benchmarks/bench_search.py --codes clustered --n 1000000 --skip-ray

``--codes random``: uniform codes (multi-index hashing falls back to its scan). ``--codes clustered``: learned-code
stand-ins from :func:`clustered_codes` — ``--supers`` superclass prototypes, ``--classes`` class prototypes that
flip each superclass bit with probability ``--class-noise``, items that flip each class bit with probability
``--item-noise``; queries are fresh items of the same classes. ``--codes real``: codes that a trained checkpoint
wrote (``--real-codes``: a `rayhash encode` output folder, e.g. the CIFAR recipe's training split), replicated to
``--n`` with each copy's bits flipped with probability ``--item-noise`` (the originals kept once); queries are
``--real-queries`` codes when given (e.g. the held-out split's), else noisy copies of random database codes.
Exactness of every sharded method against the single
FAISS index is checked in the same run on ``--check`` queries.

The "cold" column times what a driver that opens an index meets: a fresh open (or, for the single FAISS index, a
fresh index), one warm-up search of 5 queries, then one batch, timed once (no earlier batches to learn from).

Prints queries/s and codes compared/s for each, the ratio of best times to the single FAISS index in its faster
k-selection setting (heap or counting, whichever wins on this machine), the median over rounds of the same ratio
taken within each round (what a typical batch sees, less sensitive to one lucky round), memory per code, build
times and the Ray mode's fan-out overhead per query batch. All on the same codes, in this process.
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


def clustered_codes(n: int, bits: int, classes: int, supers: int, class_noise: float, item_noise: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes, class of each) of n items under a two-level hierarchy of prototypes with per-bit noise."""
    top = rng.integers(0, 2, (supers, bits), dtype=np.uint8)
    cls = top[rng.integers(0, supers, classes)] ^ (rng.random((classes, bits)) < class_noise).astype(np.uint8)
    labels = rng.integers(0, classes, n)
    raw = cls[labels] ^ (rng.random((n, bits)) < item_noise).astype(np.uint8)
    return np.packbits(raw, axis=1), labels


def replicate_codes(base: np.ndarray, n: int, noise: float, rng: np.random.Generator,
                    keep_originals: bool = True) -> np.ndarray:
    """n packed codes from ``base``: the originals first (when ``keep_originals``), then copies of random base
    codes with each bit flipped with probability ``noise``."""
    start = min(n, len(base)) if keep_originals else 0
    picks = base[rng.integers(0, len(base), n - start)]
    flips = np.packbits(rng.random((n - start, base.shape[1] * 8)) < noise, axis=1)
    return np.concatenate([base[:start], picks ^ flips])


def real_codes(args, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries) for ``--codes real`` (see the module docstring)."""
    from rayhash.index import read_codes

    base = read_codes(args.real_codes).codes
    db = replicate_codes(base, args.n, args.item_noise, rng)
    if args.real_queries:
        q = read_codes(args.real_queries).codes
        q = q[rng.permutation(len(q))[:args.nq]] if len(q) >= args.nq else replicate_codes(q, args.nq,
                                                                                           args.item_noise, rng)
    else:
        q = replicate_codes(base[rng.integers(0, len(base), args.nq)], args.nq, args.item_noise, rng,
                            keep_originals=False)
    return db, q


def popcount_limit() -> float:
    """Compares/s of one 64-bit XOR+POPCNT per cycle on every core, at the clock /proc/cpuinfo reports."""
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    return (len(mhz) or os.cpu_count() or 1) * (max(mhz) if mhz else 2000.0) * 1e6


def _rss() -> int:
    """Resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best_time(fn, repeat: int) -> float:
    return min(round_times({"": fn}, repeat)[""])


def round_times(fns: dict, repeat: int) -> dict:
    """Each function's time in each of ``repeat`` rounds that run every function once, in an order that rotates
    from round to round: load that comes and goes (a shared machine) falls on all of them alike, so their ratios
    hold where one-after-another timings would not."""
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def cold_time(make, q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(seconds, distances) of one batch on a freshly made index (``make()`` returns something with ``search`` and
    maybe ``close``) after one warm-up search of 5 queries."""
    index = make()
    try:
        index.search(q[:5], k)
        t = time.perf_counter()
        res = index.search(q, k)
        return time.perf_counter() - t, res[0] if isinstance(res, tuple) else res.distances
    finally:
        getattr(index, "close", lambda: None)()


def faiss_flat(db: np.ndarray, bits: int, use_heap: bool):
    """One FAISS IndexBinaryFlat over ``db`` with the heap or the counting k-selection."""
    import faiss

    index = faiss.IndexBinaryFlat(bits)
    index.use_heap = use_heap
    index.add(db)
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="database codes")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--nq", type=int, default=1000, help="queries per batch")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--actors", type=int, default=2, help="Ray actors for mode='ray'")
    p.add_argument("--numpy-queries", type=int, default=50, help="queries timed for the (slow) numpy baseline")
    p.add_argument("--repeat", type=int, default=5, help="timing rounds (each times every method once)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--codes", choices=["random", "clustered", "real"], default="random")
    p.add_argument("--real-codes", default=None, help="--codes real: a `rayhash encode` output folder")
    p.add_argument("--real-queries", default=None, help="--codes real: codes folder of the queries (optional)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--supers", type=int, default=20)
    p.add_argument("--class-noise", type=float, default=0.15)
    p.add_argument("--item-noise", type=float, default=0.04)
    p.add_argument("--check", type=int, default=200, help="queries whose results are compared for exactness")
    args = p.parse_args(argv)

    import faiss

    from rayhash.index import ShardedIndex, build_index
    from rayhash.index.codes import write_codes
    from rayhash.runtime import init_ray

    rng = np.random.default_rng(0)
    if args.codes == "real":
        if not args.real_codes:
            p.error("--codes real needs --real-codes FOLDER (codes written by `rayhash encode`)")
        db, q = real_codes(args, rng)
        args.bits, args.nq = db.shape[1] * 8, len(q)
    elif args.codes == "random":
        db = rng.integers(0, 256, (args.n, args.bits // 8), dtype=np.uint8)
        q = rng.integers(0, 256, (args.nq, args.bits // 8), dtype=np.uint8)
    else:
        both, _ = clustered_codes(args.n + args.nq, args.bits, args.classes, args.supers, args.class_noise,
                                  args.item_noise, rng)
        db, q = both[:args.n], both[args.n:]
    keys = np.array([f"k{i:09d}" for i in range(args.n)], dtype=object)
    labels = np.zeros(args.n, np.int32)
    print(f"codes={args.codes} n={args.n} bits={args.bits} nq={args.nq} k={args.k} shards={args.shards} "
          f"cpus={os.cpu_count()} faiss_omp_threads={faiss.omp_get_max_threads()}")

    tmp = tempfile.mkdtemp(prefix="bench-search-")
    write_codes(os.path.join(tmp, "codes", "codes-00000.parquet"), keys, db, labels)
    init_ray("local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    build_index(os.path.join(tmp, "codes"), os.path.join(tmp, "index"), shards=args.shards)
    print(f"build flat ({args.shards} Ray tasks): {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    build_index(os.path.join(tmp, "codes"), os.path.join(tmp, "mih"), index_type="mih", shards=args.shards)
    print(f"build mih ({args.shards} Ray tasks): {time.perf_counter() - t:.2f}s")

    cold = {"faiss IndexBinaryFlat (1 index)": cold_time(lambda: faiss_flat(db, args.bits, True), q, args.k),
            "faiss IndexBinaryFlat (1 index, use_heap=False)": cold_time(lambda: faiss_flat(db, args.bits, False), q,
                                                                         args.k),
            f"sharded local ({args.shards} shards)": cold_time(
                lambda: ShardedIndex.open(os.path.join(tmp, "index"), mode="local"), q, args.k),
            f"sharded local mih ({args.shards} shards)": cold_time(
                lambda: ShardedIndex.open(os.path.join(tmp, "mih"), mode="local"), q, args.k)}
    single = faiss_flat(db, args.bits, True)
    flat_bytes = single.ntotal * single.code_size  # what a flat index holds: the codes
    from rayhash.index.mih import MultiIndex

    t = time.perf_counter()
    tables = MultiIndex(db, np.arange(args.n), args.n + 1)  # over db itself (64-bit multiples: a view, no copy)
    mih_build, mih_bytes = time.perf_counter() - t, flat_bytes + tables.nbytes
    print(f"memory per code (one index over all codes): flat {flat_bytes / args.n:.1f} B, "
          f"mih {mih_bytes / args.n:.1f} B"
          f" (the codes + {tables.m} tables of {tables.b} bits; {mih_bytes / max(1, flat_bytes):.1f}x flat; tables "
          f"built in {mih_build:.2f}s); the id maps (keys) come on top of either")
    del tables
    rss = _rss()
    local = ShardedIndex.open(os.path.join(tmp, "index"), mode="local")
    local_bytes = _rss() - rss
    t = time.perf_counter()
    mih = ShardedIndex.open(os.path.join(tmp, "mih"), mode="local")
    print(f"open mih (load, merge, build tables): {time.perf_counter() - t:.2f}s")
    keymaps = max(0.0, local_bytes / args.n - flat_bytes / args.n)
    print(f"memory per code of the opened sharded flat index: {local_bytes / args.n:.1f} B (its key and label maps "
          f"~{keymaps:.0f} B); mih with the same maps: ~{keymaps + mih_bytes / args.n:.0f} B "
          f"({(keymaps + mih_bytes / args.n) / max(1e-9, local_bytes / args.n):.1f}x)")
    counting = faiss_flat(db, args.bits, False)  # the same codes, FAISS's counting k-selection
    rounds = round_times({
        "faiss IndexBinaryFlat (1 index)": lambda: single.search(q, args.k),
        "faiss IndexBinaryFlat (1 index, use_heap=False)": lambda: counting.search(q, args.k),
        f"sharded local ({args.shards} shards)": lambda: local.search(q, args.k),
        f"sharded local mih ({args.shards} shards)": lambda: mih.search(q, args.k),
    }, args.repeat)
    results = {name: min(t) for name, t in rounds.items()}
    # per round, against the faster FAISS setting of that same round: the median says what a typical batch sees
    base_rounds = np.minimum(*(np.array(t) for name, t in rounds.items() if name.startswith("faiss")))
    median_ratio = {name: float(np.median(base_rounds / np.array(t))) for name, t in rounds.items()}
    sample = q[:args.check]
    want = single.search(sample, args.k)[0]
    for name, (_, got) in cold.items():
        same = np.array_equal(got[:args.check], want)
        print(f"exactness, cold {name}: {'identical' if same else 'DIFFERENT'} distances on {len(sample)} queries")
    cold = {name: sec for name, (sec, _) in cold.items()}
    for name, index in (("flat", local), ("mih", mih)):
        got = index.search(sample, args.k).distances
        print(f"exactness, sharded {name}: {'identical' if np.array_equal(got, want) else 'DIFFERENT'} distances "
              f"to one IndexBinaryFlat on {len(sample)} queries")
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
    cold_base = min(v for name, v in cold.items() if name.startswith("faiss"))
    limit = popcount_limit() * 64 / args.bits
    print(f"{'method':<50} {'queries/s':>12} {'scan-equivalent compares/s':>27} {'of popcount limit':>18} "
          f"{'vs 1 FAISS':>10} {'median of rounds':>17} {'cold q/s':>9} {'cold vs 1 FAISS':>16}")
    for name, sec in results.items():
        qps = args.nq / sec
        median = f"{median_ratio[name]:.2f}x" if name in median_ratio else "-"
        cold_cols = (f"{args.nq / cold[name]:>9.1f} {cold_base / cold[name]:>15.2f}x" if name in cold
                     else f"{'-':>9} {'-':>16}")
        print(f"{name:<50} {qps:>12.1f} {qps * args.n:>27.3e} {qps * args.n / limit:>17.1%} {base / sec:>9.2f}x "
              f"{median:>17} {cold_cols}")
    print(f"popcount limit: {limit:.3e} {args.bits}-bit compares/s ({os.cpu_count()} cores, one XOR+POPCNT per "
          "64 bits per cycle); a multi-index search above 100% compares fewer codes than a scan would")
    if not args.skip_ray:
        t_local = results[f"sharded local ({args.shards} shards)"]
        t_ray = results[f"sharded ray ({args.actors} actors)"]
        print(f"ray fan-out overhead per batch: {1000 * (t_ray_one - t_local_one):.1f} ms "
              f"(1-query batch: ray {1000 * t_ray_one:.1f} ms vs local {1000 * t_local_one:.1f} ms); "
              f"{args.nq}-query batch: ray {1000 * t_ray:.1f} ms vs local {1000 * t_local:.1f} ms")
        remote.close()
    local.close()
    mih.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
