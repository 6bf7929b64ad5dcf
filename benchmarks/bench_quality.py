"""Does each loss term help? Real CIFAR-100, 64 bits, same backbone / steps / seed for:
(a) CE only, (b) CE + L_sim, (c) CE + L_sim + L_KL. Reports binary-code mAHP@250 on held-out images and the
binarisation gap (continuous-feature mAHP - binary mAHP), plus random codes as the floor.

    .venv/bin/python benchmarks/bench_quality.py --train-per-class 100 --test-per-class 10 --epochs 6
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAYHASH_PROGRESS", "0")

VARIANTS = {"a: CE": ("0", "0"), "b: CE+L_sim": ("1", "0"), "c: CE+L_sim+L_KL": ("1", "1")}


def random_codes_mahp(labels, S, bits: int, k: int, seed: int = 0) -> float:
    import numpy as np

    from rayhash.metrics import hamming_distances, mean_average_hierarchical_precision, pack_codes

    codes = pack_codes(np.random.default_rng(seed).standard_normal((len(labels), bits)).astype(np.float32))
    d = hamming_distances(codes, codes)
    return float(mean_average_hierarchical_precision(d, labels, labels, S, k=k, query_db_index=np.arange(len(labels))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "cifar-100-python.tar.gz"))
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    p.add_argument("--kl-beta", type=float, default=1.0, help="beta (weight of L_KL / bits) of the KL variant")
    args = p.parse_args()

    import numpy as np
    import ray

    from rayhash.config import load_config
    from rayhash.data import convert_cifar100, load_dataset_info
    from rayhash.train import train

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-quality-")
    ds = os.path.join(work, "cifar")
    convert_cifar100(args.cifar, ds, shard_size=2500,
                     limit_per_class={"train": args.train_per_class, "test": args.test_per_class})
    info = load_dataset_info(ds)
    n_val = info.count("test")
    k = min(250, n_val - 1)
    rows = []
    for name in args.variants.split(","):
        alpha, beta = VARIANTS[name]
        beta = args.kl_beta if beta == "1" else beta
        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
            f"data.path={ds}", f"model.backbone={args.backbone}", f"model.bits={args.bits}",
            f"model.width={args.width}", f"loss.alpha={alpha}", f"loss.beta={beta}", f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"train.num_workers={args.workers}",
            f"train.seed={args.seed}", "train.use_gpu=false", f"validation.subset={n_val}", f"validation.k={k}",
            f"validation.every={args.epochs}", f"train.checkpoint_every={args.epochs}"])
        t0 = time.perf_counter()
        last = train(cfg, os.path.join(work, name.split(":")[0])).metrics[-1]
        rows.append((name, last[f"val_mAHP@{k}_binary"], last[f"val_mAHP@{k}_continuous"], last["val_gap"],
                     last["val_mAP_binary"], last["val_quant_error"], last["val_bit_balance"], time.perf_counter() - t0))
        print(f"done {name} in {rows[-1][-1]:.0f}s", flush=True)
    val_labels = np.repeat(np.arange(info.num_classes), args.test_per_class)
    rand = random_codes_mahp(val_labels, info.similarity_matrix(), args.bits, k)
    print(f"\nCIFAR-100 {args.train_per_class}/class train, {n_val} held-out queries (= database), "
          f"{args.backbone} {args.bits} bits, {args.epochs} epochs x batch {args.batch_size}, KL beta {args.kl_beta:g}")
    print(f"{'variant':18s} {'mAHP@' + str(k) + ' bin':>13s} {'continuous':>11s} {'gap':>7s} {'mAP bin':>8s} "
          f"{'quant err':>9s} {'bit bal':>8s} {'time':>6s}")
    for r in rows:
        print(f"{r[0]:18s} {r[1]:13.4f} {r[2]:11.4f} {r[3]:7.4f} {r[4]:8.4f} {r[5]:9.3f} {r[6]:8.3f} {r[7]:5.0f}s")
    print(f"{'random codes':18s} {rand:13.4f}")
    for r in rows:
        print(f"ratio {r[0]} / random: {r[1] / rand:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
