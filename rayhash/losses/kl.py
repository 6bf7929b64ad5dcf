"""Empirical KL divergence to a binary target: the k-NN estimator of Wang, Kulkarni & Verdu (2009)."""
from __future__ import annotations

import math

import torch


def knn_kl_divergence(x: torch.Tensor, y: torch.Tensor, k: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Estimate KL(P_x || Q_y) in nats from samples x (n, d) ~ P and y (m, d) ~ Q.

    ``(d/n) sum_i log(nu_k(i) / rho_k(i)) + log(m / (n-1))`` with rho_k(i) the Euclidean distance from x_i to its
    k-th nearest other x (self excluded) and nu_k(i) to its k-th nearest y; distances clamped at ``eps`` (so
    duplicate outputs give a finite value, and no gradient through that clamped distance).
    Differentiable in x (and y); batched with ``torch.cdist`` (exact mode). O(n (n + m) d) time and O(n (n + m))
    memory: fine for global batches of a few thousand.
    """
    n, d = x.shape
    m = y.shape[0]
    if y.shape[1] != d:
        raise ValueError(f"x has {d} dimensions but y has {y.shape[1]}")
    if not 1 <= k <= min(n - 1, m):
        raise ValueError(f"k={k} needs at least k+1 outputs and k targets (got n={n}, m={m})")
    exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut blurs the small distances that matter here
    dxx = torch.cdist(x, x, compute_mode=exact)
    dxx = dxx.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf"))
    rho = dxx.topk(k, dim=1, largest=False).values[:, k - 1]
    nu = torch.cdist(x, y, compute_mode=exact).topk(k, dim=1, largest=False).values[:, k - 1]
    log_ratio = torch.log(nu.clamp_min(eps)) - torch.log(rho.clamp_min(eps))
    return d * log_ratio.mean() + math.log(m / (n - 1))


def sample_binary_target(n: int, d: int, uniformity: float = 0.1, generator: torch.Generator | None = None,
                         device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n samples ``(1-u) r + u e`` with r uniform on {-1,1}^d and e uniform on [-1,1]^d (u = ``uniformity``)."""
    if not 0.0 <= uniformity <= 1.0:
        raise ValueError(f"uniformity must be in [0, 1], got {uniformity}")
    gen_device = generator.device if generator is not None else device
    r = torch.randint(0, 2, (n, d), generator=generator, device=gen_device).to(dtype) * 2 - 1
    e = torch.rand((n, d), generator=generator, device=gen_device, dtype=dtype) * 2 - 1
    return ((1 - uniformity) * r + uniformity * e).to(device=device)
