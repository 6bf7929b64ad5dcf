"""Decode + transform throughput (images/s): the Ray Data pipeline (``read_shards``) vs webdataset's own
``WebDataset`` + ``WebLoader`` (a torch DataLoader) on the same shards, transform and CPU count.

    python benchmarks/bench_data.py                       # CIFAR-100 subset from $RAYHASH_DATA, else synthetic
    python benchmarks/bench_data.py --ds DS/train --cpus 4 --image-size 64 --epochs 2

Both sides do the same work per sample: PNG/JPEG decode -> RGB -> random resized crop + flip -> normalise, with
file shuffle and row mixing over about one shard (Ray: each shard's rows permuted; webdataset: a shuffle buffer of
``--shuffle-buffer`` samples, default the shard size), batched. Epochs of the two alternate (one warm-up
epoch each, not counted) so background load hits both alike; reported: images/s per epoch, medians, and the ratio
Ray Data / webdataset (goal >= 0.8). Ray runs with ``num_cpus=--cpus``, webdataset with ``--cpus`` workers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# a folder holding cifar-100-python.tar.gz (as the other benchmarks); synthetic data when absent
CIFAR = Path(os.environ.get("RAYHASH_DATA", ".")) / "cifar-100-python.tar.gz"


def make_data(args) -> str:
    from rayhash.data import convert_cifar100, convert_synthetic

    out = os.path.join(tempfile.mkdtemp(prefix="bench-data-"), "ds")
    if CIFAR.exists() and not args.synthetic:
        convert_cifar100(str(CIFAR), out, shard_size=args.shard_size, splits=["train"],
                         limit_per_class=args.images // 100)
    else:
        convert_synthetic(out, image_size=args.image_size or 32, shard_size=args.shard_size,
                          per_class={"train": args.images // 16})
    return os.path.join(out, "train")


def ray_epochs(split: str, args):
    """Generator: one Ray Data epoch per ``next()``, returning images/s."""
    from rayhash.data import collate_torch, read_shards

    ds = read_shards(split, mode="train", image_size=args.image_size, shuffle=True, batch_size=args.batch_size)
    while True:
        t, n = time.perf_counter(), 0
        for batch in ds.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate_torch, prefetch_batches=4):
            n += len(batch["label"])
        yield n / (time.perf_counter() - t)


def webdataset_epochs(urls: list[str], args):
    """Generator: one webdataset WebLoader epoch (``--cpus`` DataLoader workers) per ``next()``, images/s."""
    import webdataset as wds

    from rayhash.data import decode_image, train_transform

    transform = train_transform(args.image_size)

    def sample(s):
        return transform(decode_image(s.get("png", s.get("jpg")))), int(s["cls"])

    pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, empty_check=False)
                .shuffle(args.shuffle_buffer).map(sample).batched(args.batch_size))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=args.cpus, persistent_workers=True)
    while True:
        t, n = time.perf_counter(), 0
        for _, y in loader:
            n += len(y)
        yield n / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", default=None, help="an existing split folder (DS/train); default: convert a subset")
    p.add_argument("--images", type=int, default=3000, help="images to convert when --ds is not given")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset even if CIFAR is present")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: native)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for each side (Ray num_cpus / DataLoader workers)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=None, help="webdataset buffer (default: --shard-size)")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs per side (after one warm-up)")
    args = p.parse_args(argv)
    args.shuffle_buffer = args.shuffle_buffer or args.shard_size

    os.environ.setdefault("RAYHASH_PROGRESS", "0")
    import ray

    from rayhash.runtime import init_ray

    init_ray("local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from rayhash.data import shard_urls

    split = args.ds or make_data(args)
    urls = shard_urls(split)
    if len(urls) < args.cpus:
        print(f"warning: {len(urls)} shards < {args.cpus} workers; webdataset workers will idle", file=sys.stderr)
    runs = {"ray_data": ray_epochs(split, args), "webdataset": webdataset_epochs(urls, args)}
    rates = {k: [] for k in runs}
    for epoch in range(args.epochs + 1):  # alternate the two so background load hits both alike
        for name, run in runs.items():
            rate = next(run)
            if epoch:  # epoch 0 warms up workers
                rates[name].append(rate)
    print(f"shards={len(urls)} cpus={args.cpus} "
          f"batch={args.batch_size} image_size={args.image_size or 'native'} epochs={args.epochs} (after 1 warm-up)")
    for name, r in rates.items():
        print(f"{name:11s} img/s per epoch: {' '.join(f'{x:.0f}' for x in r)}  median {statistics.median(r):.0f}")
    ratio = statistics.median(rates["ray_data"]) / statistics.median(rates["webdataset"])
    print(f"ratio ray_data / webdataset (medians): {ratio:.2f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
