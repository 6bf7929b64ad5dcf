"""Training's collectives on two real gloo processes: a worker whose batch is all unlabelled, and a worker whose
shard is short or empty, neither error nor hang, and the short worker adds no gradient (issue: GPU readiness).

Under DDP every optimiser step's backward is a collective, and so is the epoch's metric all-reduce: a worker
that skips a step, sends a differently sized tensor, or leaves a parameter without gradient makes the others
wait (NCCL) or fail. gloo runs the same collectives on CPU."""
from __future__ import annotations

import datetime
import os

import numpy as np
import pytest
import torch

from rayhash.config import load_config

STEPS, LOCAL_BATCH, CLASSES = 3, 4, 4
OVERRIDES = ["model.backbone=tiny_cnn", "model.bits=16", "model.width=4", "model.hash_norm=false",
             "data.image_size=8", f"train.batch_size={2 * LOCAL_BATCH}", "train.optimizer=sgd", "train.lr=0.1",
             "train.warmup_epochs=0", "train.epochs=1", "train.mixed_precision=false"]


def _batches(rank: int, case: str) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        out.append({"image": torch.randint(0, 256, (LOCAL_BATCH, 3, 8, 8), generator=g, dtype=torch.uint8),
                    "label": torch.randint(0, CLASSES, (LOCAL_BATCH,), generator=g)})
    if rank == 0:
        return out
    if case == "unlabelled":
        return [{**b, "label": torch.full((LOCAL_BATCH,), -1)} for b in out]
    return {"short": out[:1], "empty": []}[case]


def _config(case: str, loss: list[str]):
    return load_config(None, OVERRIDES + loss)


def _worker(rank, world, init_file, out_dir, case, loss):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rayhash.train.loop import _reduce_mean, _run_epoch, _seed, build_training
    from rayhash.train.plan import WorkerPlan

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a mismatched collective raises, not hangs
    torch.set_num_threads(1)
    cfg = _config(case, loss)
    _seed(0)
    model, opt, sched, loss_fn = build_training(cfg, CLASSES, STEPS, np.eye(CLASSES, dtype=np.float32) * 0.5 + 0.5)
    ddp = DistributedDataParallel(model)
    plan = WorkerPlan(config=cfg, num_classes=CLASSES, steps_per_epoch=STEPS)
    totals, n, _ = _run_epoch(_batches(rank, case), STEPS, 0, (ddp, opt, sched, loss_fn), cfg, plan, rank,
                              torch.Generator(), False)
    metrics = _reduce_mean(totals, n, torch.device("cpu"))
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "metrics": metrics, "n": n,
                "totals": totals}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _run_two(tmp_path, case, loss):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), case, loss), nprocs=2, join=False)
    waited = 0
    while not ctx.join(timeout=10):
        waited += 10
        if waited > 600:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{case}: the two workers did not finish in 600 s (a collective hung)")
    return [torch.load(tmp_path / f"{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", ["unlabelled", "short", "empty"])
def test_two_workers_agree_when_one_has_no_labels_or_runs_short(tmp_path, case):
    res = _run_two(tmp_path, case, ["loss.alpha=1.0", "loss.beta=0.1", "loss.beta_schedule=constant"])
    assert res[0]["n"] == STEPS and res[1]["n"] == {"unlabelled": STEPS, "short": 1, "empty": 0}[case]
    for a, b in zip(res[0]["params"], res[1]["params"]):  # DDP kept the replicas identical
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in res[0]["params"])
    assert res[0]["metrics"] == res[1]["metrics"]  # same keys, same all-reduced values on both workers
    # the mean over counted steps only: rank 1's padding steps add nothing to the sums or the count
    n0, n1 = res[0]["n"], res[1]["n"]
    for key in ("ce", "sim", "kl"):
        expect = (res[0]["totals"][key] + res[1]["totals"][key]) / (n0 + n1)
        assert res[0]["metrics"][key] == pytest.approx(expect, rel=1e-9)
    if case == "unlabelled":
        assert res[1]["totals"]["ce"] == 0.0  # all labels -1: no CE, yet DDP got a gradient for the classifier


def test_an_empty_worker_adds_no_gradient(tmp_path):
    """CE only (no gathered terms): with worker 1 empty, DDP's average is half of worker 0's gradient, so the two
    workers must end exactly where one process ends that trains on worker 0's batches with the loss halved."""
    from rayhash.train.loop import _seed, build_training, loss_step

    loss = ["loss.alpha=0.0", "loss.beta=0.0"]
    res = _run_two(tmp_path, "empty", loss)
    cfg = _config("empty", loss)
    _seed(0)
    model, opt, sched, loss_fn = build_training(cfg, CLASSES, STEPS, None)
    model.train()
    for batch in _batches(0, "empty"):
        total, _, _ = loss_step(model, loss_fn, batch, cfg)
        opt.zero_grad(set_to_none=True)
        (0.5 * total).backward()
        opt.step()
        sched.step()
    for got, want in zip(res[0]["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
