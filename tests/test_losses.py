"""Losses against analytic values and independent computations; the global-batch gather on real torch.distributed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayhash.losses import (HashingLoss, all_gather_with_grad, code_distance, embedding_target_distance,
                            knn_kl_divergence, label_target_distance, relative_similarity_loss,
                            sample_binary_target)


def gaussian_kl(d, mu, s):
    """KL(N(0, I) || N(m, s^2 I)) with |m| = mu, in nats."""
    return 0.5 * (d / s**2 + mu**2 / s**2 - d + d * math.log(s**2))


@pytest.mark.parametrize("d", [1, 2, 4])
def test_knn_kl_matches_gaussian_kl(d):
    """n = m = 4000, k = 3, mean of 3 draws; tolerance 0.1 nats + 10 % (the estimator's bias grows with d)."""
    g = torch.Generator().manual_seed(d)
    mu, s, n = 1.0, 1.5, 4000
    est = [float(knn_kl_divergence(torch.randn(n, d, generator=g, dtype=torch.float64),
                                   torch.randn(n, d, generator=g, dtype=torch.float64) * s + mu / math.sqrt(d)))
           for _ in range(3)]
    truth = gaussian_kl(d, mu, s)
    assert abs(sum(est) / 3 - truth) < 0.1 + 0.1 * truth, (est, truth)
    # and P == Q gives ~0
    same = knn_kl_divergence(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    assert abs(float(same)) < 0.1


def test_knn_kl_larger_far_from_corners():
    g = torch.Generator().manual_seed(0)
    n, d = 512, 16
    y = sample_binary_target(n, d, 0.1, generator=g)
    signs = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    near = signs * (1 - 0.1 * torch.rand(n, d, generator=g))  # like the target: |z| in [0.9, 1]
    far = 0.3 * (torch.rand(n, d, generator=g) * 2 - 1)  # |z| <= 0.3
    mid = signs * (0.6 + 0.1 * torch.rand(n, d, generator=g))  # right signs, |z| in [0.6, 0.7]
    kl_near, kl_mid, kl_far = (float(knn_kl_divergence(x, y)) for x in (near, mid, far))
    assert kl_far > kl_mid + d > kl_near + d + 1  # nats; KL(near) ~ 0
    assert abs(kl_near) < 0.1 * d


def test_gradients_finite_at_saturated_outputs():
    g = torch.Generator().manual_seed(1)
    z = (torch.randint(0, 2, (64, 4), generator=g).float() * 2 - 1).requires_grad_()  # exactly +-1, duplicates
    y = sample_binary_target(64, 4, 0.1, generator=g)
    t = torch.rand(64, 64, generator=g)
    loss = knn_kl_divergence(z, y) + relative_similarity_loss(z, (t + t.T) / 2)
    loss = loss + relative_similarity_loss(z, (t + t.T) / 2, form="softmax")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def test_sample_binary_target():
    g = torch.Generator().manual_seed(2)
    y = sample_binary_target(4000, 8, 0.1, generator=g)
    assert y.abs().min() >= 0.8 - 1e-6 and y.abs().max() <= 1.0
    assert abs(float((y > 0).float().mean()) - 0.5) < 0.02
    assert set(sample_binary_target(10, 8, 0.0, generator=g).unique().tolist()) == {-1.0, 1.0}


def test_relative_loss_zero_iff_positive_multiple():
    g = torch.Generator().manual_seed(3)
    z = torch.randint(0, 2, (20, 32), generator=g).float() * 2 - 1
    h = code_distance(z)
    # the normalised Hamming distance, checked bit by bit
    assert torch.allclose(h[0, 1], (z[0] != z[1]).float().mean())
    for c in (0.01, 0.37, 5.0):
        assert float(relative_similarity_loss(z, c * h)) < 1e-12
    zc = torch.tanh(torch.randn(20, 32, generator=g))  # continuous outputs too
    assert float(relative_similarity_loss(zc, 2.5 * code_distance(zc))) < 1e-12
    noisy = h * (1 + 0.3 * torch.rand(20, 20, generator=g))
    assert float(relative_similarity_loss(z, (noisy + noisy.T) / 2)) > 1e-3
    assert float(relative_similarity_loss(z, h + 0.2 * (1 - torch.eye(20)))) > 1e-3  # shift is not a multiple
    # softmax form: 0 when t == h, > 0 otherwise
    assert float(relative_similarity_loss(z, h, form="softmax")) < 1e-10
    assert float(relative_similarity_loss(z, (noisy + noisy.T) / 2, form="softmax")) > 1e-4


def test_target_distances_and_unlabelled_pairs():
    S = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    labels = torch.tensor([0, 1, -1, 0])
    t = label_target_distance(labels, S)
    assert t[0, 1] == 0.75 and t[0, 3] == 0.0 and torch.isnan(t[2]).all() and torch.isnan(t[:, 2]).all()
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    te = embedding_target_distance(e)
    c = 1 - 2**-0.5  # cos 45 degrees; the first pair is orthogonal, the first and last at 135 degrees (clipped)
    assert torch.allclose(te, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, c], [1.0, c, 0.0]]), atol=1e-6)
    # pairs with an unlabelled item are left out: same loss as on the labelled subset
    z = torch.tanh(torch.randn(4, 16))
    keep = labels >= 0
    assert torch.allclose(relative_similarity_loss(z, t), relative_similarity_loss(z[keep], t[keep][:, keep]))


def test_hashing_loss_combines_terms():
    g = torch.Generator().manual_seed(4)
    n, d, C = 32, 16, 3
    z = torch.tanh(torch.randn(n, d, generator=g)).requires_grad_()
    logits = torch.randn(n, C, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    labels[:4] = -1
    S = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = HashingLoss(alpha=0.7, beta=0.3, k=3, uniformity=0.1, similarity=S)
    total, terms = loss(z, logits, labels, generator=torch.Generator().manual_seed(9))
    y = sample_binary_target(n, d, 0.1, generator=torch.Generator().manual_seed(9))
    ce = F.cross_entropy(logits[4:], labels[4:])
    sim = relative_similarity_loss(z, label_target_distance(labels, S))
    kl = knn_kl_divergence(z, y) / d
    assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["sim"], sim) and torch.allclose(terms["kl"], kl)
    assert torch.allclose(total, ce + 0.7 * sim + 0.3 * kl)
    total.backward()
    assert torch.isfinite(z.grad).all()
    # caption targets
    emb = torch.randn(n, 8, generator=g)
    _, terms = loss(z, embeddings=emb)
    assert torch.allclose(terms["sim"], relative_similarity_loss(z, embedding_target_distance(emb)))
    assert terms["ce"] == 0


def test_all_gather_identity_without_distributed():
    z = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(z) is z


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = torch.tanh(torch.randn(8, 16, dtype=torch.float64))
    t = torch.rand(8, 8, dtype=torch.float64)
    t = (t + t.T) / 2
    rows = [slice(0, 3), slice(3, 8)][rank]  # unequal local batch sizes
    z = full[rows].clone().requires_grad_()
    gathered = all_gather_with_grad(z)
    total, _ = HashingLoss(alpha=1.0, beta=0.0)(z, target_distance=t)
    total.backward()
    torch.save({"gathered": gathered.detach(), "grad": z.grad, "loss": total.detach()}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_all_gather_with_grad_on_real_gloo(tmp_path):
    """Two real processes: gathered batch = the full batch; per-rank gradients (x world, as DDP averages them)
    equal the single-process gradient of the full-batch loss."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    full = torch.tanh(torch.randn(8, 16, dtype=torch.float64)).requires_grad_()
    t = torch.rand(8, 8, dtype=torch.float64)
    t = (t + t.T) / 2
    loss = relative_similarity_loss(full, t)
    loss.backward()
    for r in res:
        assert torch.allclose(r["gathered"], full.detach())
        assert torch.allclose(r["loss"], loss.detach())
    ddp_grad = torch.cat([res[0]["grad"], res[1]["grad"]]) / 2  # DDP averages over the 2 workers
    assert torch.allclose(ddp_grad, full.grad)
