"""Empirical KL divergence of the network outputs to the binary target, by k-nearest-neighbour estimators.

The target ``Q`` has ``y = (1-u) r + u e`` with ``r`` uniform on the corners {-1,1}^d and ``e`` uniform on the cube:
a product over bits. Every estimator here is built from the two k-NN terms of Wang, Kulkarni & Verdu (2009):

* the *entropy* term ``rho``: the distance from each output to its k-th nearest other output, which estimates
  ``-H(P)`` (Kozachenko-Leonenko) and spreads the outputs apart;
* the *cross-entropy* term ``nu``: the distance to the l-th nearest target sample, which estimates ``H(P, Q)`` and
  pulls each output towards where the target has mass.

They differ in how ``H(P, Q)`` is estimated (README "Method definitions" derives each):

``sampled``   the original estimator: nu against m target samples in all d dimensions. At 64 bits the nearest of m
              random corners disagrees with ``sign(z)`` on ~21 bits, so nu pulls a third of the coordinates
              through zero.
``blockwise`` Q factorises over blocks of b bits, so ``H(P, Q) = sum_B H(P_B, Q_B)`` exactly; each block's
              cross-entropy is estimated in b dimensions against m >= 16 * 2^b samples that cover every corner
              of the block. ``KL(P || Q) = sum_B KL(P_B || Q_B) + TC(P)``, TC = the total correlation between
              blocks (>= 0). ``tc="none"``: the entropy term also runs per block, and the result estimates the
              lower bound ``sum_B KL(P_B || Q_B)`` (accurately: both terms in b dimensions, their boundary biases
              cancel); ``tc="gaussian"``: that bound + the Gaussian total correlation between blocks (0 iff the
              blocks are uncorrelated: a decorrelation penalty); ``tc="rho"``: the entropy term over the whole
              code, so the result estimates KL(P || Q) itself, with the d-dimensional entropy estimate's bias.
``corners``   the large-m limit for u = 0: the target sample is every corner once (m = 2^d), and nu is computed
              exactly: the l-th nearest corner flips the smallest |z_i| (an l-th smallest subset sum), so no
              sample is drawn. ``l = 1`` (default) is the own corner ``sign(z)``.
``boxes``     the same limit for u > 0: nu is the distance to the own box of the target (|y_i| in [1-2u, 1] on
              the side of sign(z)), floored at the in-box neighbour distance, so the pull stops once an output
              lies in its box instead of growing without bound as it nears the corner (README derives it).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from rayhash.config import KL_ESTIMATORS, KL_TC

DISTANCES = {"l2": 2.0, "l1": 1.0}  # loss.kl_distance -> Minkowski p
BLOCK_SAMPLES_PER_CORNER = 16  # blockwise: at least this many target samples per corner of a block
_EXACT = "donot_use_mm_for_euclid_dist"  # the matmul shortcut blurs the small distances that matter here


def _log_kth(dist: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """log of the k-th smallest entry along the last dimension, clamped at ``eps`` (no gradient below it)."""
    return torch.log(dist.topk(k, dim=-1, largest=False).values[..., k - 1].clamp_min(eps))


def _log_ball_volume(d: int, p: float) -> float:
    """log volume of the unit ball of the Minkowski-p norm in d dimensions (p = 1 or 2)."""
    if p == 2.0:
        return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    if p == 1.0:
        return d * math.log(2.0) - math.lgamma(d + 1)
    raise ValueError(f"no ball volume for p={p}; use p=1 or p=2")


def _pool(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    if extra is not None and extra.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} dimensions but extra has {extra.shape[1]}")
    return x if extra is None or len(extra) == 0 else torch.cat([x, extra.to(x.dtype)])


def _log_rho(x: torch.Tensor, pool: torch.Tensor, k: int, p: float, eps: float) -> torch.Tensor:
    """(..., n) log distance from each x_i to its k-th nearest *other* sample of ``pool`` (x = pool's first rows).
    Works batched over leading block dimensions: x (..., n, b), pool (..., n', b)."""
    n, n_p = x.shape[-2], pool.shape[-2]
    if not 1 <= k <= n_p - 1:
        raise ValueError(f"k={k} needs at least k+1 outputs (got n={n_p})")
    self_mask = torch.zeros(n, n_p, dtype=torch.bool, device=x.device)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=x.device)
    dxx = torch.cdist(x, pool, p=p, compute_mode=_EXACT).masked_fill(self_mask, float("inf"))
    return _log_kth(dxx, k, eps)


def _check_rank(name: str, k: int, available: int) -> None:
    if not 1 <= k <= available:
        raise ValueError(f"{name}={k} needs at least {name} target samples (got m={available})")


def knn_kl_divergence(x: torch.Tensor, y: torch.Tensor, k: int = 3, eps: float = 1e-6, p: float = 2.0,
                      extra: torch.Tensor | None = None, l: int | None = None) -> torch.Tensor:
    """Estimate KL(P_x || Q_y) in nats from samples x (n, d) ~ P and y (m, d) ~ Q.

    ``(d/n) sum_i log(nu_l(i) / rho_k(i)) + psi(k) - psi(l) + log(m / (n'-1))`` with rho_k(i) the distance from
    x_i to its k-th nearest other sample of P (self excluded) and nu_l(i) to its l-th nearest y (l = k by default,
    the digamma terms then cancel); distances clamped at ``eps`` (so duplicate outputs give a finite value, and no
    gradient through that clamped distance). ``p``: the Minkowski norm (2 = Euclidean, 1 = L1, the Hamming distance
    on corners); the estimator holds for any norm because the ball volumes' constants cancel. ``extra`` (q, d):
    further samples of P (e.g. a queue of recent detached outputs) that enlarge the neighbour set of x, so
    n' = n + q; the average still runs over x only.
    Differentiable in x (and y); batched with ``torch.cdist`` (exact mode). O(n (n' + m) d) time.
    """
    n, d = x.shape
    if y.shape[1] != d:
        raise ValueError(f"x has {d} dimensions but y has {y.shape[1]}")
    l = k if l is None else l
    pool = _pool(x, extra)
    _check_rank("k", k, y.shape[0])
    _check_rank("l", l, y.shape[0])
    log_rho = _log_rho(x, pool, k, p, eps)
    log_nu = _log_kth(torch.cdist(x, y, p=p, compute_mode=_EXACT), l, eps)
    return (d * (log_nu - log_rho).mean() + math.log(y.shape[0] / (pool.shape[0] - 1))
            + _digamma(k) - _digamma(l))


def _digamma(k: int) -> float:
    """psi(k) for a positive integer: -gamma + sum_{j<k} 1/j."""
    return -0.5772156649015329 + sum(1.0 / j for j in range(1, k))


def block_kl_divergence(x: torch.Tensor, k: int = 3, block: int = 4, m: int | None = None,
                        uniformity: float = 0.1, tc: str = "rho", p: float = 2.0, eps: float = 1e-6,
                        extra: torch.Tensor | None = None, l: int | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Blockwise estimate of KL(P_x || Q) to the binary target Q (``sample_binary_target`` with ``uniformity``).

    Q is a product over blocks of ``block`` bits, so ``KL(P||Q) = -H(P) + sum_B H(P_B, Q_B)``. Each block's
    cross-entropy ``H(P_B, Q_B)`` is the k-NN estimate ``b mean log nu_l + log m_B + log V_b - psi(l)`` against
    ``m_B = max(m, 16 * 2^b)`` target samples of that block (one draw of m_B full-width samples: its column
    blocks are independent samples of the blocks). The entropy: ``tc="rho"``: the Kozachenko-Leonenko estimate
    ``d mean log rho_k + log(n'-1) + log V_d - psi(k)`` over the whole code, so the result estimates KL(P || Q)
    itself (the total correlation between blocks included); ``tc="none"``: the same per block, so the result
    estimates ``sum_B KL(P_B || Q_B)``, a lower bound of KL(P || Q) that ignores dependence between blocks.
    ``tc="gaussian"``: ``tc="none"`` + :func:`gaussian_total_correlation` of the blocks (of x and ``extra``).
    V_b: volume of the unit ball of the norm ``p`` in b dimensions. ``extra``: as in :func:`knn_kl_divergence`.
    """
    n, d = x.shape
    if block < 1 or d % block:
        raise ValueError(f"loss.kl_block={block} must divide the code length {d} (e.g. 4 or 8)")
    if tc not in KL_TC:
        raise ValueError(f"loss.kl_tc must be one of {KL_TC}, got {tc!r}")
    l = k if l is None else l
    pool = _pool(x, extra)
    n_p, nb = pool.shape[0], d // block
    m_b = max(int(m or 0), BLOCK_SAMPLES_PER_CORNER * 2 ** block, l)
    y = sample_binary_target(m_b, d, uniformity, generator, x.device, x.dtype)
    blocks = lambda t: t.reshape(t.shape[0], nb, block).transpose(0, 1)  # noqa: E731  (nb, rows, b)
    log_nu = _log_kth(torch.cdist(blocks(x), blocks(y), p=p, compute_mode=_EXACT), l, eps)  # (nb, n)
    cross = block * log_nu.mean(dim=1).sum() + nb * (math.log(m_b) + _log_ball_volume(block, p) - _digamma(l))
    if tc == "rho":
        log_rho = _log_rho(x, pool, k, p, eps)
        entropy = d * log_rho.mean() + math.log(n_p - 1) + _log_ball_volume(d, p) - _digamma(k)
    else:
        log_rho = _log_rho(blocks(x), blocks(pool), k, p, eps)  # (nb, n)
        entropy = (block * log_rho.mean(dim=1).sum()
                   + nb * (math.log(n_p - 1) + _log_ball_volume(block, p) - _digamma(k)))
        if tc == "gaussian":
            entropy = entropy - gaussian_total_correlation(pool, block)
    return cross - entropy


def gaussian_total_correlation(x: torch.Tensor, block: int, ridge: float = 1e-3) -> torch.Tensor:
    """Total correlation between blocks of ``block`` columns of a Gaussian with x's correlation matrix R:
    ``(sum_B log det R_BB - log det R) / 2`` in nats, >= 0 and 0 iff the blocks are uncorrelated. ``ridge`` is
    added to R's diagonal (a batch of n < d samples, or constant bits, would make R singular)."""
    n, d = x.shape
    xc = x - x.mean(dim=0)
    cov = xc.T @ xc / max(n - 1, 1)
    sd = cov.diagonal().clamp_min(1e-12).sqrt()
    r = cov / (sd[:, None] * sd[None, :]) + ridge * torch.eye(d, dtype=x.dtype, device=x.device)
    nb = d // block
    diag = torch.stack([r[i * block:(i + 1) * block, i * block:(i + 1) * block] for i in range(nb)])
    return 0.5 * (torch.logdet(diag).sum() - torch.logdet(r))


def corner_kl_divergence(x: torch.Tensor, k: int = 3, l: int = 1, p: float = 2.0, eps: float = 1e-6,
                         extra: torch.Tensor | None = None, uniformity: float = 0.0) -> torch.Tensor:
    """:func:`knn_kl_divergence` against *every* corner of {-1,1}^d once (m = 2^d), computed without the corners;
    with ``uniformity`` u > 0, the same limit for the target's boxes (the ``boxes`` estimator).

    The distance^p from z to the corner that agrees with sign(z) except on a set F of bits is
    ``sum_i (1-|z_i|)^p + sum_{i in F} g_i`` with ``g_i = (1+|z_i|)^p - (1-|z_i|)^p``, increasing in |z_i|; so the
    l-th nearest corner is the l-th smallest subset sum of the g_i, which lies among the subsets of the l-1
    smallest g_i (2^(l-1) sums). ``l = 1``: the own corner sign(z). This is the sampled estimator's large-m limit
    for a target of pure corners (u = 0): each corner is one sample. O(n (n' + l) d) time; exact for any d.

    u > 0: Q has mass only in the boxes ``s * y_i in [c, 1]`` (c = 1 - 2u) around the corners, with density
    (4u)^-d. The distance to the l-th nearest box is the same subset sum with ``max(0, c - |z_i|)`` for the own
    side and ``|z_i| + c`` for the other; it is floored (in the p-norm sense) at ``nu_in = 2u (e^psi(l) / V_d)^(1/d)``,
    the l-th neighbour distance of m = 2^d samples inside a box, so that for P inside the boxes the estimate is
    ``d log(4u) - H_hat(P)``: consistent, with no pull on a coordinate once it lies in its box.
    """
    n, d = x.shape
    if l < 1:
        raise ValueError(f"l={l} must be >= 1")
    if not 0.0 <= uniformity < 0.5:
        raise ValueError(f"uniformity={uniformity} must be in [0, 0.5) for the boxes around the corners to be apart")
    pool = _pool(x, extra)
    log_rho = _log_rho(x, pool, k, p, eps)
    a = x.abs()
    c = 1.0 - 2.0 * uniformity
    own = (c - a).clamp_min(0.0) if uniformity else 1 - a
    base = (own ** p).sum(dim=1)
    if l > 1:
        g = ((c + a) ** p - own ** p).topk(min(l - 1, d), dim=1, largest=False).values  # (n, l-1)
        subsets = torch.tensor(list(itertools.product((0.0, 1.0), repeat=g.shape[1])), dtype=x.dtype,
                               device=x.device)  # (2^(l-1), l-1)
        base = base + (g @ subsets.T).sort(dim=1).values[:, l - 1]
    if uniformity:
        base = base + math.exp(p * (math.log(2.0 * uniformity) + (_digamma(l) - _log_ball_volume(d, p)) / d))
    log_nu = torch.log(base.clamp_min(eps ** p)) / p
    return d * (log_nu - log_rho).mean() + d * math.log(2.0) - math.log(pool.shape[0] - 1) + _digamma(k) - _digamma(l)


def sample_binary_target(n: int, d: int, uniformity: float = 0.1, generator: torch.Generator | None = None,
                         device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n samples ``(1-u) r + u e`` with r uniform on {-1,1}^d and e uniform on [-1,1]^d (u = ``uniformity``)."""
    if not 0.0 <= uniformity <= 1.0:
        raise ValueError(f"uniformity must be in [0, 1], got {uniformity}")
    gen_device = generator.device if generator is not None else device
    r = torch.randint(0, 2, (n, d), generator=generator, device=gen_device).to(dtype) * 2 - 1
    e = torch.rand((n, d), generator=generator, device=gen_device, dtype=dtype) * 2 - 1
    return ((1 - uniformity) * r + uniformity * e).to(device=device)


# loss.kl_estimator -> fn(z, extra, m, generator, settings) with settings: k, l, p, uniformity, block, tc
def _sampled(z, extra, m, generator, s) -> torch.Tensor:
    y = sample_binary_target(m, z.shape[1], s["uniformity"], generator, z.device, z.dtype)
    return knn_kl_divergence(z, y, k=s["k"], p=s["p"], extra=extra, l=s["l"])


def _blockwise(z, extra, m, generator, s) -> torch.Tensor:
    return block_kl_divergence(z, k=s["k"], block=s["block"], m=m, uniformity=s["uniformity"], tc=s["tc"],
                               p=s["p"], extra=extra, l=s["l"], generator=generator)


def _corners(z, extra, m, generator, s) -> torch.Tensor:
    return corner_kl_divergence(z, k=s["k"], l=s["l"] or 1, p=s["p"], extra=extra)


def _boxes(z, extra, m, generator, s) -> torch.Tensor:
    return corner_kl_divergence(z, k=s["k"], l=s["l"] or 1, p=s["p"], extra=extra, uniformity=s["uniformity"])


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {"sampled": _sampled, "blockwise": _blockwise,
                                                      "corners": _corners, "boxes": _boxes}
assert tuple(ESTIMATORS) == KL_ESTIMATORS, "rayhash.config.KL_ESTIMATORS lists the estimators of this module"
