"""The reference protocol of Barz & Denzler: queries = database = one held-out split, each query left out of its
own ranking; every figure rayhash reports about a set of codes, and the two references that frame them.

Used by training validation and ``benchmarks/bench_quality.py`` on dense (n, n) matrices (a split of up to a few
ten thousand items); ``rayhash eval --protocol reference`` computes the same through an index.
"""
from __future__ import annotations

import numpy as np

from rayhash.metrics.codes import hamming_distances, pack_codes
from rayhash.metrics.retrieval import (mean_average_hierarchical_precision, mean_average_precision,
                                       precision_at_radius)


def code_statistics(z) -> dict[str, float]:
    """Of outputs ``z`` (n, d) in [-1, 1]: ``quant_error`` mean |z - sign z|, ``bit_balance`` mean over bits of
    |mean bit| (0 = every bit splits the set in half) and ``bit_correlation`` mean |corr| over bit pairs
    (0 = decorrelated bits; constant bits count 1)."""
    z = np.asarray(z, dtype=np.float64)
    b = np.where(z >= 0, 1.0, -1.0)
    d = b.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant bit has no correlation: counted as 1 below
        c = np.abs(np.nan_to_num(np.corrcoef(b, rowvar=False), nan=1.0)) if d > 1 else np.ones((1, 1))
    off = ~np.eye(d, dtype=bool)
    return {"quant_error": float(np.abs(z - b).mean()), "bit_balance": float(np.abs(b.mean(0)).mean()),
            "bit_correlation": float(c[off].mean()) if d > 1 else 0.0}


def reference_metrics(z, labels, S, k: int = 250, map_k: int = 1000, radius: int = 2) -> dict[str, float]:
    """All-vs-all metrics of outputs ``z`` (n, d) with class ``labels`` and class similarity ``S``:
    ``mAHP@k`` (binary codes, ties in database order), ``mAHP@k_expected`` (expectation over tie orders),
    ``mAHP@k_continuous`` (L1 on z, = scaled Hamming at the corners), ``gap`` = continuous - binary,
    ``mAP@map_k``, ``P@r{radius}`` (precision of everything within the Hamming radius; nothing found counts 0),
    bucket occupancy ``within_r{0..radius}`` (mean number of other items at Hamming distance <= r: what a
    hash-table lookup returns), :func:`code_statistics` and ``n`` (the items). k and map_k are capped at n - 1
    internally; the names keep the k asked for (``mAHP@250`` on a split of 160), so they do not change with the
    split's size."""
    z = np.asarray(z, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    kk, mk = min(k, n - 1), min(map_k, n - 1)
    idx = np.arange(n)
    packed = pack_codes(z)
    d_bin = hamming_distances(packed, packed)
    d_cont = _l1(z)
    out = {f"mAHP@{k}": mean_average_hierarchical_precision(d_bin, labels, labels, S, kk, idx),
           f"mAHP@{k}_expected": mean_average_hierarchical_precision(d_bin, labels, labels, S, kk, idx,
                                                                     ties="expected"),
           f"mAHP@{k}_continuous": mean_average_hierarchical_precision(d_cont, labels, labels, S, kk, idx),
           f"mAP@{map_k}": mean_average_precision(d_bin, labels, labels, mk, idx),
           f"P@r{radius}": precision_at_radius(d_bin, labels, labels, radius, idx), "n": n}
    out["gap"] = out[f"mAHP@{k}_continuous"] - out[f"mAHP@{k}"]
    for r in range(radius + 1):
        out[f"within_r{r}"] = ((d_bin <= r).sum() - n) / n
    return {key: float(v) for key, v in {**out, **code_statistics(z)}.items()}


def _l1(z: np.ndarray, block: int = 512) -> np.ndarray:
    import torch

    t = torch.from_numpy(z)
    return torch.cat([torch.cdist(t[i:i + block], t, p=1) for i in range(0, len(t), block)]).numpy()


def flat_classifier_mahp(labels, S, k: int = 250, seed: int = 0) -> float:
    """Reference: a perfect *flat* classifier (every item of the query's class first, then the rest, each group in
    random order), which ignores the hierarchy."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    d = (labels[:, None] != labels[None, :]) + rng.uniform(0, 0.5, (len(labels), len(labels)))
    return mean_average_hierarchical_precision(d, labels, labels, S, min(k, len(labels) - 1), np.arange(len(labels)))


def random_codes_mahp(labels, S, bits: int, k: int = 250, seed: int = 0) -> float:
    """Reference: uniformly random ``bits``-bit codes (ties in database order)."""
    labels = np.asarray(labels, dtype=np.int64)
    codes = pack_codes(np.random.default_rng(seed).standard_normal((len(labels), bits)).astype(np.float32))
    d = hamming_distances(codes, codes)
    return mean_average_hierarchical_precision(d, labels, labels, S, min(k, len(labels) - 1), np.arange(len(labels)))
