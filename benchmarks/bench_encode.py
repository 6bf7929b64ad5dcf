"""Encoding throughput: the Ray Data pipeline (``rayhash.encode.encode_dataset``) vs a plain PyTorch DataLoader loop
over the same WebDataset tars with the same model (goal: Ray Data >= 0.8x).

    python benchmarks/bench_encode.py --per-class 20 --bits 64 --batch-size 256

Uses real CIFAR-100 from ../shared/data when present (else the synthetic dataset), a seeded untrained HashNet
(throughput does not depend on the weights). Both paths decode + transform + run the model on CPU/GPU alike.
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
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar-100-python.tar.gz")


def make_dataset(root: str, per_class: int, shard_size: int) -> str:
    from rayhash.data import convert_cifar100, convert_synthetic

    out = os.path.join(root, "ds")
    if os.path.exists(SHARED):
        convert_cifar100(SHARED, out, shard_size=shard_size, limit_per_class={"train": per_class, "test": 1})
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

    import ray

    from rayhash.data import shard_urls
    from rayhash.encode import encode_dataset

    os.environ["RAYHASH_PROGRESS"] = "0"
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    root = tempfile.mkdtemp(prefix="bench-encode-")
    data = make_dataset(root, args.per_class, args.shard_size)
    ckpt = make_checkpoint(root, data, args.backbone, args.bits, args.width, args.image_size)
    urls = shard_urls(data)

    def ray_run(tag: str) -> tuple[float, int]:
        out = os.path.join(root, f"codes-{tag}")
        t = time.perf_counter()
        s = encode_dataset(ckpt, data, out, batch_size=args.batch_size, concurrency=args.concurrency)
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return dt, s["count"]

    t_ray_cold, n = ray_run("cold")  # includes Ray Data / actor start-up
    t_ray, n = ray_run("warm")
    dataloader_encode(urls[:1], ckpt, args.image_size, args.batch_size, 0)  # warm-up (imports)
    t = time.perf_counter()
    n_dl = dataloader_encode(urls, ckpt, args.image_size, args.batch_size, args.workers)
    t_dl = time.perf_counter() - t
    assert n_dl == n, (n_dl, n)
    print(f"{n} images {args.image_size}px, {len(urls)} tars, {args.backbone} width={args.width} bits={args.bits}, "
          f"batch {args.batch_size}, cpus={os.cpu_count()}")
    print(f"{'method':<44} {'seconds':>8} {'images/s':>10} {'vs DataLoader':>14}")
    for name, sec in ((f"Ray Data encode ({args.concurrency} actors, warm)", t_ray),
                      (f"Ray Data encode (first run, incl. start-up)", t_ray_cold),
                      (f"PyTorch DataLoader loop ({args.workers} workers)", t_dl)):
        print(f"{name:<44} {sec:>8.2f} {n / sec:>10.1f} {t_dl / sec:>13.2f}x")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
