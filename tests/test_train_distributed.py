"""Global-batch losses under DDP: 2 gloo processes give the same loss value and gradients as one process on
the concatenated batch (L_sim / L_KL on the all-gathered z, CE local, DDP gradient averaging)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rayhash.config import load_config

WORLD, N_LOCAL, BITS, CLASSES = 2, 6, 16, 4


class _Net(nn.Module):
    """Linear features -> tanh hash -> classifier (no BatchNorm, whose per-worker statistics would differ)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.ReLU())
        self.hash = nn.Linear(32, BITS)
        self.classifier = nn.Linear(BITS, CLASSES)

    def forward(self, x):
        z = torch.tanh(self.hash(self.features(x)))
        return z, self.classifier(z)


def _inputs():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(WORLD * N_LOCAL, 3, 4, 4, generator=g)
    y = torch.randint(0, CLASSES, (WORLD * N_LOCAL,), generator=g)
    S = np.array([[1, .5, 0, 0], [.5, 1, 0, 0], [0, 0, 1, .5], [0, 0, .5, 1]], np.float32)
    cfg = load_config(None, ["loss.alpha=2.0", "loss.beta=0.5", "loss.k=2", "model.bits=16"])
    return x, y, S, cfg


def _loss_and_grads(model, x, y, S, cfg):
    from rayhash.train import build_training, loss_step

    _, _, _, loss_fn = build_training(cfg, CLASSES, steps_per_epoch=1, similarity=S)
    total, terms, _ = loss_step(model, loss_fn, {"image": x, "label": y}, cfg, torch.Generator().manual_seed(7))
    total.backward()
    inner = getattr(model, "module", model)
    return float(total.detach()), {k: float(v) for k, v in terms.items()}, [p.grad.clone() for p in inner.parameters()]


def _worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y, S, cfg = _inputs()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        model = nn.parallel.DistributedDataParallel(_Net())
        out[rank] = _loss_and_grads(model, x[sl], y[sl], S, cfg)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_gathered_loss_equals_single_process_loss_value_and_gradient():
    x, y, S, cfg = _inputs()
    single_total, single_terms, single_grads = _loss_and_grads(_Net(), x, y, S, cfg)
    assert single_terms["sim"] > 0 and single_terms["kl"] != 0 and single_terms["ce"] > 0

    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    totals = [out[r][0] for r in range(WORLD)]
    terms = [out[r][1] for r in range(WORLD)]
    # L_sim and L_KL are global-batch terms: identical on every worker and equal to the single-process value
    for key in ("sim", "kl"):
        assert terms[0][key] == pytest.approx(single_terms[key], rel=1e-5, abs=1e-6)
        assert terms[1][key] == pytest.approx(single_terms[key], rel=1e-5, abs=1e-6)
    # CE is local: the mean over workers of local means is the global mean (equal local batch sizes)
    assert np.mean([t["ce"] for t in terms]) == pytest.approx(single_terms["ce"], rel=1e-5)
    assert np.mean(totals) == pytest.approx(single_total, rel=1e-5)
    # DDP-averaged gradients equal the single-process gradient of the global-batch loss (on both workers)
    for r in range(WORLD):
        for g_ddp, g_one in zip(out[r][2], single_grads):
            torch.testing.assert_close(g_ddp, g_one, rtol=1e-4, atol=1e-6)
    # the check has teeth: the global-batch terms carry a sizeable share of the gradient (halving them, as
    # DDP averaging would without the world-size scaling, would fail the comparison above)
    ce_only = _loss_and_grads(_Net(), x, y, S, cfg.model_copy(update={"loss": cfg.loss.model_copy(
        update={"alpha": 0.0, "beta": 0.0})}))[2]
    diff = sum(float((a - b).norm()) for a, b in zip(single_grads, ce_only))
    assert diff > 0.05 * sum(float(a.norm()) for a in single_grads)
