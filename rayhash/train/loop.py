"""What every Ray Train worker runs: DDP hash-net training with global-batch hashing losses, checkpoints, metrics."""
from __future__ import annotations

import math
import os
import pickle
import random
import tempfile
import time

import numpy as np
import torch

from rayhash import storage
from rayhash.config import RunConfig
from rayhash.layout import CheckpointDir
from rayhash.model import HashNet, save_model_files
from rayhash.runtime import bf16_supported, get_logger
from rayhash.train.plan import WorkerPlan

log = get_logger("rayhash.train")


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` (as a LambdaLR multiplier of the step)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_training(config: RunConfig, num_classes: int, steps_per_epoch: int, similarity=None):
    """(model, optimizer, scheduler, loss) on CPU, unwrapped; the same for every worker and for benchmarks.
    ``similarity`` (C, C) is the L_sim target for ``data.targets=hierarchy``; captions use the batch embeddings.
    The model is in channels-last memory format (faster convolutions on CPU and GPU)."""
    from rayhash.losses import HashingLoss

    model = HashNet.from_config(config.model, num_classes).to(memory_format=torch.channels_last)
    t = config.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    total = t.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(int(round(t.warmup_epochs * steps_per_epoch)), total, t.min_lr_ratio))
    # equal local batches on every worker (drop_last, equal splits, padded short shards): no size exchange
    loss = HashingLoss.from_config(config.loss, similarity if config.data.targets == "hierarchy" else None,
                                   equal_batches=True)
    return model, opt, sched, loss


def loss_step(model, loss_fn, batch: dict, config: RunConfig, generator: torch.Generator | None = None,
              autocast: bool = False, beta: float | None = None):
    """Forward (under bf16 autocast when ``autocast``) + hashing loss in float32 on one (local) batch; L_sim / L_KL
    see the global batch under DDP. ``beta``: the scheduled β of this step (default: the configured one).

    Returns (total, terms, z) with ``terms`` detached floats-as-tensors (loss, ce, sim, kl)."""
    x = batch["image"].contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        z, logits = model(x)
    emb = batch.get("target") if config.data.targets == "captions" else None
    total, terms = loss_fn(z, logits, labels=batch.get("label"), embeddings=emb, generator=generator, beta=beta)
    return total, terms, z.float()


def scheduled_beta(config: RunConfig, step: int, total_steps: int) -> float:
    """β of ``loss.beta_schedule`` at optimiser step ``step`` of ``total_steps``."""
    from rayhash.losses.hashing import beta_at

    c = config.loss
    return beta_at(c.beta, step / max(1, total_steps), c.beta_schedule, c.beta_start, c.beta_ramp)


def code_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bit balance (mean over bits of |mean bit|; 0 = balanced) and quantisation error mean |z - sign z|, as
    0-d tensors on z's device."""
    b = torch.where(z >= 0, 1.0, -1.0)
    return {"bit_balance": b.mean(0).abs().mean(), "quant_error": (z - b).abs().mean()}


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_train_state(directory: str, model, opt, sched, config: RunConfig, meta: dict, state: dict) -> None:
    """A full resumable checkpoint folder: model.pt/meta.json/config.yaml + train_state.pt."""
    save_model_files(directory, model, config, meta)
    # tensors and plain values only, so that resuming loads it with weights_only=True (no code runs on load)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state},
               os.path.join(directory, CheckpointDir.STATE))


def load_train_state(directory: str, model, opt, sched) -> dict:
    """Restore model/optimizer/scheduler from a checkpoint folder; returns the rest (epoch, step, history...)."""
    target = getattr(model, "module", model)
    target.load_state_dict(torch.load(os.path.join(directory, CheckpointDir.MODEL), map_location="cpu",
                                      weights_only=True))
    path = os.path.join(directory, CheckpointDir.STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: holds objects other than tensors and plain values, so it is not loaded (loading "
                         "them could run code from the checkpoint's author). Resume from a checkpoint written by "
                         f"rayhash, or train afresh without --resume. ({str(e).splitlines()[0][:160]})") from None
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    return state


def _val_arrays(plan: WorkerPlan) -> dict[str, np.ndarray] | None:
    """The held-out validation subset (images, labels) as numpy, read once by rank 0."""
    from ray.data import DataContext

    from rayhash.data import read_shards

    DataContext.get_current().enable_progress_bars = False  # inside a worker: keep the logs readable
    config = plan.config
    n = config.validation.subset
    if not plan.val_source or n == 0:
        return None
    total = plan.val_count
    # about n images spread over the whole split, chosen by key hash before decoding: the first n rows of
    # class-ordered shards (ImageNet folders) would hold a few classes and overstate mAHP
    sample = n / total if n and total and n < total else None
    ds = read_shards(plan.val_source, mode="eval", image_size=config.data.image_size,
                     num_classes=plan.num_classes, sample=sample)
    ds = ds.limit(n) if n and not total else ds
    images, labels = [], []
    for b in ds.select_columns(["image", "label"]).iter_batches(batch_size=256, batch_format="numpy"):
        images.append(np.asarray(b["image"]))  # uint8: the network normalises on the device
        labels.append(np.asarray(b["label"], np.int64))
    if not images:
        return None
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


@torch.no_grad()
def validate(model, val: dict[str, np.ndarray], similarity: np.ndarray, k: int, device) -> dict[str, float]:
    """The reference protocol on the validation split (queries = database, each query left out of its own
    ranking): ``rayhash.metrics.reference_metrics`` of the model's outputs, keys prefixed ``val_``."""
    from rayhash.metrics import reference_metrics

    model.eval()
    zs = [model(torch.from_numpy(val["image"][i:i + 256]).to(device))[0].float().cpu()
          for i in range(0, len(val["image"]), 256)]
    model.train()
    metrics = reference_metrics(torch.cat(zs).numpy(), val["label"], similarity, k=k)
    return {f"val_{key}": v for key, v in metrics.items()}


STEP_METRICS = ("loss", "ce", "sim", "kl", "beta", "bit_balance", "quant_error")  # summed per step by _run_epoch


def _reduce_mean(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Average per-step sums over steps and workers. Every worker sends the same keys in the same order (a worker
    with zero steps too), so the all-reduce tensors match in size."""
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return {k: float(v) / max(1.0, float(t[-1])) for k, v in zip(keys, t[:-1].tolist())}


def train_loop_per_worker(plan: WorkerPlan) -> list[dict]:
    """Ray Train entry point (each worker), with the driver's :class:`~rayhash.train.plan.WorkerPlan`."""
    import ray
    import ray.train
    import ray.train.torch

    config, hooks = plan.config, plan.hooks
    t = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    steps_per_epoch = plan.steps_per_epoch
    local_bs = t.batch_size // world
    similarity = plan.similarity
    if device.type == "cpu":
        torch.set_num_threads(t.threads or max(1, int(t.cpus_per_worker)))
    _seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model, opt, sched, loss_fn = build_training(config, plan.num_classes, steps_per_epoch, similarity)
    loss_fn.to(device)
    model = ray.train.torch.prepare_model(model)
    autocast = t.mixed_precision and bf16_supported(device)
    if rank == 0:
        log.info("worker on %s: bf16 autocast %s, %d torch threads", device, "on" if autocast else "off",
                 torch.get_num_threads())

    start_epoch, step, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_train_state(d, model, opt, sched)
        start_epoch, step, history = state["epoch"] + 1, state["step"], state.get("history", [])
        if rank == 0:
            log.info("resumed from checkpoint after epoch %d (step %d)", state["epoch"], step)
        hooks.train_restored(rank, state["epoch"], step, _state_fingerprint(model, opt))

    val = _val_arrays(plan) if rank == 0 and similarity is not None else None
    writer = _tensorboard(plan.tensorboard_dir) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator(device=device)
    for epoch in range(start_epoch, t.epochs):
        _seed(t.seed + 1000 * epoch + rank)  # reproducible per epoch regardless of resume
        t0 = time.perf_counter()
        batches = shard.iter_torch_batches(batch_size=local_bs, drop_last=True, device=device, prefetch_batches=4,
                                           pin_memory=device.type == "cuda",
                                           local_shuffle_buffer_size=config.data.shuffle_buffer or None,
                                           local_shuffle_seed=t.seed + 1000 * epoch + rank)
        sums, n_steps, seen = _run_epoch(batches, steps_per_epoch, step, (model, opt, sched, loss_fn), config,
                                         plan, rank, gen, autocast)
        step += n_steps
        lr = sched.base_lrs[0] * sched.lr_lambdas[0](max(0, sched.last_epoch - 1))  # the epoch's last step's, not
        # the next one's (which the schedule's final step sets to its floor, often 0)
        metrics = {"epoch": epoch, "step": step, "lr": lr, **_reduce_mean(sums, n_steps, device),
                   "steps_per_s": n_steps / max(1e-9, time.perf_counter() - t0), "workers": world}
        hooks.train_epoch(rank, epoch, seen, ray.get_runtime_context().get_node_id())
        last = epoch == t.epochs - 1
        if val is not None and (last or (epoch + 1) % config.validation.every == 0):
            metrics.update(validate(getattr(model, "module", model), val, similarity, config.validation.k, device))
        history = [h for h in history if h["epoch"] < epoch] + [metrics]
        if rank == 0:
            _write_history(plan.metrics_path, history)  # the driver prints each epoch's line from this file
            if writer:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, epoch)
        save = last or (epoch + 1) % t.checkpoint_every == 0
        with tempfile.TemporaryDirectory(prefix="rayhash-ckpt-") as tmp:
            checkpoint = None
            if save and rank == 0:
                meta = {**plan.meta, "epoch": epoch, "step": step}
                save_train_state(tmp, model, opt, sched, config, meta,
                                 {"epoch": epoch, "step": step, "history": history})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
    if writer:
        writer.close()
    return history


def _run_epoch(batches, max_steps: int, step: int, training, config: RunConfig, plan: WorkerPlan, rank: int,
               gen: torch.Generator, autocast: bool) -> tuple[dict[str, float], int, list[int]]:
    """One pass over this worker's shard: (per-step sums of loss terms and code stats, steps, labels seen).

    Every worker runs exactly ``max_steps`` optimiser steps: under DDP each step's backward is a collective, so a
    worker whose shard ran short (samples skipped as corrupt, or an empty shard) would leave the others waiting
    forever. A short worker repeats its last batch (or a blank one) with the loss multiplied by zero: it joins the
    collectives, contributes no gradient, and its padding steps are not counted in the metrics."""
    model, opt, sched, loss_fn = training
    model.train()
    sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
    seen: list[int] = []
    n, wait, t_prev, last = 0, 0.0, time.perf_counter(), None
    source = iter(batches)
    for i in range(max_steps):
        batch = next(source, None)
        wait += time.perf_counter() - t_prev
        real = batch is not None
        if not real:  # padding: the last batch again (a blank one if there was none), without gradient
            if i == n:
                log.warning("worker %d: its shard ended after %d of %d steps (samples skipped?); it joins the "
                            "remaining steps without gradient", rank, n, max_steps)
            batch = last if last is not None else _blank_batch(config, model, plan.embedding_dim)
        last = batch
        plan.hooks.train_step(rank, step + i)
        gen.manual_seed(config.train.seed * 1_000_003 + step + i)  # same KL target sample on every rank
        beta = scheduled_beta(config, step + i, max_steps * config.train.epochs)
        total, terms, z = loss_step(model, loss_fn, batch, config, gen, autocast, beta)
        opt.zero_grad(set_to_none=True)
        (total if real else total * 0.0).backward()
        opt.step()
        sched.step()
        if real:
            n += 1
            if plan.hooks.wants_labels:
                seen.extend(batch["label"].tolist())
            for key, v in {**terms, "beta": torch.tensor(beta), **code_stats(z.detach())}.items():
                sums[key] = sums[key] + v if key in sums else v
        t_prev = time.perf_counter()
    totals = {k: float(sums[k]) if k in sums else 0.0 for k in STEP_METRICS}
    totals["data_wait_s"] = wait  # time blocked on the input pipeline (summed; averaged per step on report)
    return totals, n, seen


def _blank_batch(config: RunConfig, model, embedding_dim: int = 0) -> dict[str, torch.Tensor]:
    """A local batch of black images, all unlabelled (-1), on the model's device: what a worker with an empty
    shard steps with (its loss is multiplied by zero)."""
    from rayhash.losses import world_size

    device = next(model.parameters()).device
    n, size = config.train.batch_size // world_size(), config.data.image_size
    batch = {"image": torch.zeros(n, 3, size, size, dtype=torch.uint8, device=device),
             "label": torch.full((n,), -1, dtype=torch.int64, device=device)}
    if config.data.targets == "captions":
        batch["target"] = torch.zeros(n, embedding_dim, device=device)
    return batch


def _write_history(path: str | None, history: list[dict]) -> None:
    import json

    if path:
        storage.write_bytes(path, "".join(json.dumps(h) + "\n" for h in history).encode())


def _state_fingerprint(model, opt) -> dict[str, float]:
    """Float64 sums of all parameters and optimizer moments (to check exact restores)."""
    params = sum(float(p.detach().double().sum()) for p in model.parameters())
    moments = sum(float(v.double().sum()) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return {"params": params, "optimizer": moments}


def _tensorboard(logdir: str | None):
    if not logdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSON lines only
        log.info("train.tensorboard is on but tensorboard is not installed (pip install rayhash[tracking])")
        return None
    return SummaryWriter(logdir)
