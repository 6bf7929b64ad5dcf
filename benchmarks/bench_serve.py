"""Serving throughput and latency: `rayhash serve` over loopback HTTP vs the same queries through
`ShardedIndex.search` in the driver (the same shard actors), for /search (codes) and /search/image (uploads).

    python benchmarks/bench_serve.py --requests 200 --concurrency 8
    python benchmarks/bench_serve.py --index INDEX --images DS/test --replicas 2

Without --index it builds a small index first: the synthetic dataset (``--per-class`` train images per class, 16
classes), a seeded untrained HashNet (latency does not depend on the weights), `rayhash encode`, a flat index of
``--shards`` shards. Each kind sends ``--requests`` requests, one query each, from ``--concurrency`` client threads
(at most that many in flight), to 127.0.0.1 only, and stops. The driver baseline runs the same queries from the
same number of threads: ``index.search(code)`` and ``index.search_images([image])`` (its own encoder, in the
driver). Every HTTP answer is checked against the driver's (keys, distances, labels); a mismatch fails the run.
Prints q/s and p50 / p99 latency of both and their ratio (serve / driver).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def build_small_index(root: str, per_class: int, shards: int) -> tuple[str, str]:
    """(index, query split) over the synthetic dataset: train indexed, test the image queries."""
    from bench_encode import make_checkpoint

    from rayhash.data import convert_synthetic
    from rayhash.encode import encode_dataset
    from rayhash.index import build_index

    ds = os.path.join(root, "ds")
    convert_synthetic(ds, per_class={"train": per_class, "test": 4}, shard_size=256)
    run = make_checkpoint(root, ds, "tiny_cnn", 32, 8, 32)
    encode_dataset(run, os.path.join(ds, "train"), os.path.join(root, "codes"), batch_size=256)
    build_index(os.path.join(root, "codes"), os.path.join(root, "index"), index_type="flat", shards=shards)
    return os.path.join(root, "index"), os.path.join(ds, "test")


def split_images(split: str, n: int) -> list[bytes]:
    """Up to ``n`` encoded images (as stored) from a dataset split's tars, reused round-robin to ``n``."""
    from rayhash.data import shard_urls
    from rayhash.data.images import IMAGE_EXTENSIONS

    out = []
    for url in shard_urls(split):
        with tarfile.open(url) as tf:
            for m in tf:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    out.append(tf.extractfile(m).read())
                if len(out) == n:
                    return out
    if not out:
        raise ValueError(f"{split}: no images in its tars")
    return [out[i % len(out)] for i in range(n)]


def timed(fn, items: list, concurrency: int) -> tuple[list, np.ndarray, float]:
    """(results, per-call seconds, wall seconds) of ``fn`` over ``items`` from ``concurrency`` threads."""
    def one(item):
        t0 = time.perf_counter()
        out = fn(item)
        return out, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        pairs = list(pool.map(one, items))
    return [p[0] for p in pairs], np.array([p[1] for p in pairs]), time.perf_counter() - t0


def row(name: str, lat: np.ndarray, wall: float) -> dict:
    return {"name": name, "qps": len(lat) / wall, "p50": np.percentile(lat, 50) * 1e3,
            "p99": np.percentile(lat, 99) * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="an index to serve (default: build a small synthetic one)")
    p.add_argument("--images", help="dataset split whose images are the /search/image queries (with --index)")
    p.add_argument("--per-class", type=int, default=20, help="synthetic train images per class (16 classes)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--requests", type=int, default=200, help="requests per kind (one query each)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads = requests in flight at most")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args(argv)

    import requests
    from ray import serve

    from rayhash.data import decode_image
    from rayhash.runtime import init_ray
    from rayhash.serve import start_service

    init_ray()
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    if args.index:
        index_dir, image_split = args.index, args.images
    else:
        t0 = time.perf_counter()
        index_dir, image_split = build_small_index(tmp, args.per_class, args.shards)
        print(f"built {index_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = start_service(index_dir, host="127.0.0.1", port=port, replicas=args.replicas)
    index, url = service.index, service.url
    print(f"{index}: served at {url} with {args.replicas} replica(s); {args.requests} requests per kind from "
          f"{args.concurrency} threads, k={args.k}", flush=True)
    rows, mismatches = [], 0
    try:
        local = threading.local()

        def session() -> "requests.Session":
            if not hasattr(local, "s"):
                local.s = requests.Session()
            return local.s

        def http(kind: str, payload):
            if kind == "codes":
                r = session().post(url + "search", json={"codes": [payload.tobytes().hex()], "k": args.k}, timeout=300)
            else:
                r = session().post(url + "search/image", params={"k": args.k},
                                   files={"image": ("q.png", payload, "image/png")}, timeout=300)
            r.raise_for_status()
            return r.json()

        codes = np.random.default_rng(0).integers(0, 256, (args.requests, index.bits // 8), dtype=np.uint8)
        kinds = {"codes": (list(codes), lambda c: index.search(c[None, :], args.k))}
        if image_split and index.checkpoint:
            images = split_images(image_split, args.requests)
            kinds["image"] = (images, lambda b: index.search_images([decode_image(b)], args.k))
        for kind, (items, driver_fn) in kinds.items():
            driver_fn(items[0]), http(kind, items[0])  # warm-up: encoder loaded, connections open
            want, lat_d, wall_d = timed(driver_fn, items, args.concurrency)
            got, lat_s, wall_s = timed(lambda x, kind=kind: http(kind, x), items, args.concurrency)
            for w, g in zip(want, got):
                mismatches += g != {"keys": w.keys.tolist(), "distances": w.distances.tolist(),
                                    "labels": w.labels.tolist()}
            endpoint = "/search" if kind == "codes" else "/search/image"
            rows.append((row(f"{endpoint} HTTP", lat_s, wall_s), row(f"{endpoint} driver", lat_d, wall_d)))
    finally:
        service.stop()
        serve.shutdown()

    print(f"\n{'':<22}{'q/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for served, driver in rows:
        for r in (served, driver):
            print(f"{r['name']:<22}{r['qps']:>9.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}")
        print(f"{'  ratio serve/driver':<22}{served['qps'] / driver['qps']:>9.2f}{served['p50'] / driver['p50']:>9.2f}"
              f"{served['p99'] / driver['p99']:>9.2f}")
    checked = sum(len(x[0]) for x in kinds.values())
    print(f"\nanswers checked against the driver's: {checked}, mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
