"""Empirical KL divergence to a binary target: the k-NN estimator of Wang, Kulkarni & Verdu (2009)."""
from __future__ import annotations

import math

import torch

DISTANCES = {"l2": 2.0, "l1": 1.0}  # loss.kl_distance -> Minkowski p


def knn_kl_divergence(x: torch.Tensor, y: torch.Tensor, k: int = 3, eps: float = 1e-6, p: float = 2.0,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate KL(P_x || Q_y) in nats from samples x (n, d) ~ P and y (m, d) ~ Q.

    ``(d/n) sum_i log(nu_k(i) / rho_k(i)) + log(m / (n'-1))`` with rho_k(i) the distance from x_i to its k-th
    nearest other sample of P (self excluded) and nu_k(i) to its k-th nearest y; distances clamped at ``eps`` (so
    duplicate outputs give a finite value, and no gradient through that clamped distance). ``p``: the Minkowski
    norm (2 = Euclidean, 1 = L1, the Hamming distance on corners); the estimator holds for any norm because the
    ball volumes' constants cancel. ``extra`` (q, d): further samples of P (e.g. a queue of recent detached
    outputs) that enlarge the neighbour set of x, so n' = n + q; the average still runs over x only.
    Differentiable in x (and y); batched with ``torch.cdist`` (exact mode). O(n (n' + m) d) time.
    """
    n, d = x.shape
    m = y.shape[0]
    if y.shape[1] != d or (extra is not None and extra.shape[1] != d):
        raise ValueError(f"x has {d} dimensions but y has {y.shape[1]}"
                         + ("" if extra is None else f" and extra has {extra.shape[1]}"))
    pool = x if extra is None or len(extra) == 0 else torch.cat([x, extra.to(x.dtype)])
    n_p = pool.shape[0]
    if not 1 <= k <= min(n_p - 1, m):
        raise ValueError(f"k={k} needs at least k+1 outputs and k targets (got n={n_p}, m={m})")
    exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut blurs the small distances that matter here
    dxx = torch.cdist(x, pool, p=p, compute_mode=exact)
    self_mask = torch.zeros(n, n_p, dtype=torch.bool, device=x.device)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=x.device)
    rho = dxx.masked_fill(self_mask, float("inf")).topk(k, dim=1, largest=False).values[:, k - 1]
    nu = torch.cdist(x, y, p=p, compute_mode=exact).topk(k, dim=1, largest=False).values[:, k - 1]
    log_ratio = torch.log(nu.clamp_min(eps)) - torch.log(rho.clamp_min(eps))
    return d * log_ratio.mean() + math.log(m / (n_p - 1))


def sample_binary_target(n: int, d: int, uniformity: float = 0.1, generator: torch.Generator | None = None,
                         device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n samples ``(1-u) r + u e`` with r uniform on {-1,1}^d and e uniform on [-1,1]^d (u = ``uniformity``)."""
    if not 0.0 <= uniformity <= 1.0:
        raise ValueError(f"uniformity must be in [0, 1], got {uniformity}")
    gen_device = generator.device if generator is not None else device
    r = torch.randint(0, 2, (n, d), generator=generator, device=gen_device).to(dtype) * 2 - 1
    e = torch.rand((n, d), generator=generator, device=gen_device, dtype=dtype) * 2 - 1
    return ((1 - uniformity) * r + uniformity * e).to(device=device)
