"""Encoding throughput: the Ray Data pipeline (``rayhash.encode.encode_dataset``) vs a plain PyTorch DataLoader loop
over the same WebDataset tars with the same model (goal: Ray Data >= 0.8x).

    python benchmarks/bench_encode.py --per-class 20 --bits 64 --batch-size 256

Uses real CIFAR-100 from $RAYHASH_DATA/cifar-100-python.tar.gz when present (else the synthetic dataset), a seeded
untrained HashNet (throughput does not depend on the weights). Both paths decode + transform + run the model on
CPU/GPU alike.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
CIFAR = os.path.join(os.environ.get("RAYHASH_DATA", "."), "cifar-100-python.tar.gz")


def make_dataset(root: str, per_class: int, shard_size: int) -> str:
    from rayhash.data import convert_cifar100, convert_synthetic

    out = os.path.join(root, "ds")
    if os.path.exists(CIFAR):
        convert_cifar100(CIFAR, out, shard_size=shard_size, limit_per_class={"train": per_class, "test": 1})
    else:
        convert_synthetic(out, per_class={"train": per_class * 6, "test": 1}, shard_size=shard_size)
    return os.path.join(out, "train")


def make_checkpoint(root: str, data: str, backbone: str, bits: int, width: int, image_size: int) -> str:
    import torch

    from rayhash.config import load_config
    from rayhash.data import load_dataset_info
    from rayhash.model import HashNet
    from rayhash.model.checkpoint import save_model_files

    info = load_dataset_info(data)
    cfg = load_config({"data": {"image_size": image_size}, "model": {"backbone": backbone, "bits": bits,
                                                                     "width": width}}, [f"data.path={data}"])
    torch.manual_seed(0)
    save_model_files(os.path.join(root, "run", "final"), HashNet.from_config(cfg.model, info.num_classes), cfg,
                     {"num_classes": info.num_classes, "label_names": info.label_names})
    return os.path.join(root, "run")


class TarImages(torch.utils.data.IterableDataset):
    """A plain torch IterableDataset over WebDataset tars (tars split across DataLoader workers)."""

    def __init__(self, urls: list[str], image_size: int):
        self.urls, self.image_size = urls, image_size

    def __iter__(self):
        from rayhash.data import decode_image, eval_transform

        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        transform = eval_transform(self.image_size)
        for url in urls:
            with tarfile.open(url) as tf:
                for m in tf:
                    if m.name.endswith((".png", ".jpg", ".jpeg", ".webp")):
                        yield transform(decode_image(tf.extractfile(m).read()))


def dataloader_encode(urls, checkpoint, image_size, batch_size, workers) -> int:
    """The baseline: the same Encoder fed by a plain DataLoader."""
    from rayhash.model import Encoder

    encoder = Encoder(checkpoint)
    loader = torch.utils.data.DataLoader(TarImages(urls, image_size), batch_size=batch_size, num_workers=workers)
    n = 0
    for x in loader:
        n += len(encoder.encode_tensor(x)[1])
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=20, help="CIFAR-100 train images per class (x100 images)")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=2, help="Ray Data encoder actors")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = p.parse_args(argv)


    from rayhash.runtime import init_ray

    from rayhash.data import shard_urls
    from rayhash.encode import encode_dataset

    os.environ["RAYHASH_PROGRESS"] = "0"
    init_ray("local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    root = tempfile.mkdtemp(prefix="bench-encode-")
    data = make_dataset(root, args.per_class, args.shard_size)
    ckpt = make_checkpoint(root, data, args.backbone, args.bits, args.width, args.image_size)
    urls = shard_urls(data)

    def ray_run(tars: list[str], tag: str) -> tuple[float, int]:
        out = os.path.join(root, f"codes-{tag}")
        t = time.perf_counter()
        s = encode_dataset(ckpt, tars, out, batch_size=args.batch_size, concurrency=args.concurrency)
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return dt, s["count"]

    def dl_run(tars: list[str]) -> tuple[float, int]:
        t = time.perf_counter()
        n = dataloader_encode(tars, ckpt, args.image_size, args.batch_size, args.workers)
        return time.perf_counter() - t, n

    half = urls[:max(1, len(urls) // 2)]
    t_cold, _ = ray_run(urls, "cold")  # first run: includes starting Ray worker processes
    t_ray, n = ray_run(urls, "all")
    t_ray_half, n_half = ray_run(half, "half")
    dl_run(urls[:1])  # warm-up (imports, page cache)
    t_dl, n_dl = dl_run(urls)
    t_dl_half, _ = dl_run(half)
    assert n_dl == n, (n_dl, n)
    print(f"{n} images {args.image_size}px, {len(urls)} tars, {args.backbone} width={args.width} bits={args.bits}, "
          f"batch {args.batch_size}, cpus={os.cpu_count()}")
    print(f"{'method':<48} {'seconds':>8} {'images/s':>10} {'vs DataLoader':>14}")
    rows = [(f"Ray Data encode ({args.concurrency} actors), whole run", t_ray, n, t_dl),
            ("Ray Data encode, first run (cold workers)", t_cold, n, t_dl),
            (f"PyTorch DataLoader loop ({args.workers} workers), whole run", t_dl, n, t_dl),
            ("Ray Data marginal rate (all - half tars)", t_ray - t_ray_half, n - n_half, t_dl - t_dl_half),
            ("DataLoader marginal rate (all - half tars)", t_dl - t_dl_half, n - n_half, t_dl - t_dl_half)]
    for name, sec, count, base in rows:
        print(f"{name:<48} {sec:>8.2f} {count / sec:>10.1f} {base / sec:>13.2f}x")
    print("(marginal rate = extra images / extra seconds between a run over half the tars and one over all: "
          "start-up costs cancel)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
