"""Benchmark the method's math: Hamming distance throughput vs FAISS IndexBinaryFlat, and the loss terms' time per
step vs a ResNet-18 forward/backward on the same batch (CPU here). Prints ratios; baselines run in this process.

    python benchmarks/bench_metrics.py --n 100000 --nq 1000 --bits 64
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def timed(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_hamming(n: int, nq: int, bits: int, k: int, repeat: int) -> None:
    import faiss

    from rayhash.metrics import hamming_distances

    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, (nq, bits // 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(bits)
    index.add(db)

    def ours_topk():
        d = hamming_distances(q, db)
        np.argpartition(d, k - 1, axis=1)[:, :k]

    t_full = timed(lambda: hamming_distances(q, db), repeat)
    t_topk = timed(ours_topk, repeat)
    t_faiss = timed(lambda: index.search(q, k), repeat)
    pairs = n * nq
    print(f"hamming  n={n} nq={nq} bits={bits} k={k} (faiss threads={faiss.omp_get_max_threads()})")
    print(f"  rayhash hamming_distances (full matrix): {pairs / t_full:12.3e} code pairs/s  ({t_full * 1e3:8.1f} ms)")
    print(f"  rayhash matrix + argpartition top-k    : {pairs / t_topk:12.3e} code pairs/s  ({t_topk * 1e3:8.1f} ms)")
    print(f"  faiss IndexBinaryFlat.search top-k     : {pairs / t_faiss:12.3e} code pairs/s  ({t_faiss * 1e3:8.1f} ms)")
    print(f"  ratio rayhash/faiss: full matrix {t_faiss / t_full:.2f}x, top-k {t_faiss / t_topk:.2f}x "
          "(>1 = rayhash faster)")


def bench_losses(n: int, d: int, image_size: int, repeat: int) -> None:
    import torch
    import torchvision

    from rayhash.losses import HashingLoss, knn_kl_divergence, relative_similarity_loss, sample_binary_target

    torch.manual_seed(0)
    C = 100
    x = torch.randn(n, 3, image_size, image_size)
    labels = torch.randint(0, C, (n,))
    S = torch.rand(C, C)
    S = (S + S.T) / 2
    S.fill_diagonal_(1.0)
    model = torchvision.models.resnet18(num_classes=d)
    t_target = 1 - S[labels[:, None], labels[None, :]]
    loss = HashingLoss(alpha=1.0, beta=1.0, similarity=S)

    def resnet_step():
        model.zero_grad()
        model(x).sum().backward()

    def loss_step(fn):
        z = torch.tanh(torch.randn(n, d)).requires_grad_()
        fn(z).backward()

    terms = {
        "knn_kl_divergence (+ target sample)": lambda z: knn_kl_divergence(z, sample_binary_target(n, d)),
        "relative_similarity_loss": lambda z: relative_similarity_loss(z, t_target),
        "HashingLoss (CE-free, all terms)": lambda z: loss(z, labels=labels)[0],
    }
    t_resnet = timed(resnet_step, max(1, repeat // 3))
    print(f"losses  n={n} d={d}; baseline ResNet-18 fwd+bwd on {n}x3x{image_size}x{image_size}: "
          f"{t_resnet * 1e3:.1f} ms/step (torch threads={torch.get_num_threads()})")
    for name, fn in terms.items():
        t = timed(lambda fn=fn: loss_step(fn), repeat)
        print(f"  {name:38s}: {t * 1e3:8.2f} ms/step = {100 * t / t_resnet:6.2f}% of the ResNet-18 step")


def bench_similarity_matrix(path: str, repeat: int) -> None:
    from rayhash.semantics import ClassHierarchy

    h = ClassHierarchy.from_parent_child_file(path)
    leaves = h.leaves
    t = timed(lambda: h.similarity_matrix(leaves), repeat)
    print(f"similarity_matrix  {len(leaves)} leaves of {path}: {t * 1e3:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="database codes")
    p.add_argument("--nq", type=int, default=1000, help="query codes")
    p.add_argument("--bits", type=int, default=64, help="code length (multiple of 8)")
    p.add_argument("--k", type=int, default=100, help="neighbours for the top-k comparison")
    p.add_argument("--batch", type=int, default=256, help="loss batch size n")
    p.add_argument("--d", type=int, default=64, help="code bits for the loss benchmark")
    p.add_argument("--image-size", type=int, default=32, help="ResNet-18 input size")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hierarchy", default=None, help="optional parent-child file to time similarity_matrix on")
    a = p.parse_args()
    bench_hamming(a.n, a.nq, a.bits, a.k, a.repeat)
    bench_losses(a.batch, a.d, a.image_size, a.repeat)
    if a.hierarchy:
        bench_similarity_matrix(a.hierarchy, a.repeat)


if __name__ == "__main__":
    main()
