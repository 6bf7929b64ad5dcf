"""Ray Train loop (1 worker) vs a plain single-process PyTorch loop on the same model and in-memory batches;
plus the share of step time spent in the hashing losses (L_sim + L_KL).

    .venv/bin/python benchmarks/bench_train.py --steps 200 --batch-size 64 --backbone tiny_cnn

The plain loop also runs inside a 1-CPU Ray task: that splits the gap into what running in a Ray worker process
costs on this machine and what Ray Train + Ray Data add on top. Each epoch starts a new Ray Data iterator
(~0.4 s here): use epochs of a few hundred steps or more, as real training has.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAYHASH_PROGRESS", "0")


def _batches(args):
    """(images uint8 (n,3,S,S), labels int64 (n,), similarity (C,C), num_classes) from real shards, decoded once."""
    import numpy as np

    from rayhash.data import convert_synthetic, load_dataset_info, read_shards

    ds_dir = args.data
    if ds_dir is None:
        ds_dir = os.path.join(tempfile.mkdtemp(prefix="bench-train-"), "ds")
        convert_synthetic(ds_dir, per_class={"train": 40, "test": 2}, image_size=args.image_size)
    info = load_dataset_info(ds_dir)
    n = args.steps * args.batch_size
    rows = read_shards(os.path.join(ds_dir, "train"), mode="eval", image_size=args.image_size).limit(n)
    batch = {"image": [], "label": []}
    for b in rows.select_columns(["image", "label"]).iter_batches(batch_size=512, batch_format="numpy"):
        batch["image"].append(b["image"])
        batch["label"].append(b["label"])
    images, labels = np.concatenate(batch["image"]), np.concatenate(batch["label"])
    reps = -(-n // len(images))  # repeat a small dataset up to the requested steps
    return np.tile(images, (reps, 1, 1, 1))[:n], np.tile(labels, reps)[:n], info.similarity_matrix(), info.num_classes


def plain_loop(config, images, labels, S, num_classes, epochs):
    """Single process: the same build_training / loss_step as the workers; returns steps/s per epoch."""
    import torch

    from rayhash.train import build_training, loss_step

    steps = len(images) // config.train.batch_size
    torch.manual_seed(config.train.seed)
    model, opt, sched, loss_fn = build_training(config, num_classes, steps, S)
    bs = config.train.batch_size
    rates = []
    gen = torch.Generator()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i in range(steps):
            x = torch.from_numpy(images[i * bs:(i + 1) * bs])
            y = torch.from_numpy(labels[i * bs:(i + 1) * bs])
            gen.manual_seed(i)
            total, _, _ = loss_step(model, loss_fn, {"image": x, "label": y}, config, gen)
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
        rates.append(steps / (time.perf_counter() - t0))
    return rates


def loss_share(config, images, labels, S, num_classes, reps=20):
    """Share of a training step spent in L_sim + L_KL: (t_full - t_ce_only) / t_full, forward + backward."""
    import torch

    from rayhash.train import build_training, loss_step

    bs = config.train.batch_size
    x, y = torch.from_numpy(images[:bs]), torch.from_numpy(labels[:bs])
    out = {}
    for name, cfg in (("full", config), ("ce_only", config.model_copy(update={"loss": config.loss.model_copy(
            update={"alpha": 0.0, "beta": 0.0})}))):
        model, opt, _, loss_fn = build_training(cfg, num_classes, 1, S)
        for warm in (True, False):
            t0 = time.perf_counter()
            for _ in range(3 if warm else reps):
                total, _, _ = loss_step(model, loss_fn, {"image": x, "label": y}, cfg, torch.Generator().manual_seed(0))
                opt.zero_grad()
                total.backward()
                opt.step()
            out[name] = (time.perf_counter() - t0) / reps
    # the losses alone, forward + backward on a fixed z
    z = (torch.rand(bs, config.model.bits) * 2 - 1).requires_grad_()
    _, _, _, loss_fn = build_training(config, num_classes, 1, S)
    t0 = time.perf_counter()
    for _ in range(reps):
        total, _ = loss_fn(z, None, labels=y, generator=torch.Generator().manual_seed(0))
        total.backward()
    out["losses_only"] = (time.perf_counter() - t0) / reps
    return out


def plain_loop_in_ray_task(config, images, labels, S, num_classes, epochs):
    """:func:`plain_loop` in a Ray task with 1 CPU: the Ray worker environment without Ray Train / Ray Data."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a script: workers cannot import it
    task = ray.remote(num_cpus=1)(plain_loop)
    return ray.get(task.remote(config, images, labels, S, num_classes, epochs))


def ray_loop(config, images, labels, S, num_classes, workdir):
    """Ray Train TorchTrainer, 1 worker, the project's train_loop_per_worker, fed the same batches via Ray Data."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    import functools

    from rayhash.train.driver import _entry
    from rayhash.train.plan import WorkerPlan

    ds = ray.data.from_items([{"image": im, "label": int(lb)} for im, lb in zip(images, labels)])
    plan = WorkerPlan(config=config, num_classes=num_classes,
                      steps_per_epoch=len(images) // config.train.batch_size, similarity=S)
    t0 = time.perf_counter()
    result = TorchTrainer(functools.partial(_entry, plan), datasets={"train": ds},
                          scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=ray.train.RunConfig(name="bench", storage_path=workdir)).fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    return [h["steps_per_s"] for h in result.return_value], wall, result.return_value[-1]["data_wait_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (default: a fresh synthetic one)")
    p.add_argument("--steps", type=int, default=200, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--bits", type=int, default=64)
    args = p.parse_args()

    import ray

    from rayhash.runtime import init_ray
    import torch

    from rayhash.config import load_config

    torch.set_num_threads(1)  # a Ray worker with 1 CPU gets 1 thread: compare like with like
    init_ray("local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    images, labels, S, C = _batches(args)
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.bits={args.bits}", "model.width=16",
                             f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
                             "train.num_workers=1", "train.use_gpu=false", "data.shuffle_buffer=0",
                             "train.checkpoint_every=1000", "validation.subset=0"])
    plain = plain_loop(cfg, images, labels, S, C, args.epochs)
    in_task = plain_loop_in_ray_task(cfg, images, labels, S, C, args.epochs)
    with tempfile.TemporaryDirectory() as work:
        ray_rates, wall, wait = ray_loop(cfg, images, labels, S, C, work)
    share = loss_share(cfg, images, labels, S, C)
    best = lambda r: max(r[1:] or r)  # noqa: E731 - steady state: skip the warm-up epoch
    print(f"model {args.backbone} {args.bits} bits, batch {args.batch_size}, {args.steps} steps x {args.epochs} epochs")
    print(f"plain PyTorch loop : {best(plain):7.2f} steps/s  (per epoch {[round(r, 2) for r in plain]})")
    print(f"Ray Train, 1 worker: {best(ray_rates):7.2f} steps/s  (per epoch {[round(r, 2) for r in ray_rates]}; "
          f"fit() wall {wall:.1f}s incl. startup)")
    print(f"plain loop, Ray task: {best(in_task):6.2f} steps/s  (per epoch {[round(r, 2) for r in in_task]})")
    print(f"ratio Ray/plain    : {best(ray_rates) / best(plain):.3f}  (goal >= 0.9); Ray worker waited "
          f"{wait * 1e3:.1f} ms/step on the input pipeline (last epoch)")
    print(f"split of the gap   : plain loop in a Ray task / plain {best(in_task) / best(plain):.3f}; "
          f"Ray Train / plain loop in a Ray task {best(ray_rates) / best(in_task):.3f}")
    print(f"step time: full loss {share['full'] * 1e3:.1f} ms, CE only {share['ce_only'] * 1e3:.1f} ms, "
          f"hashing losses alone (fwd+bwd) {share['losses_only'] * 1e3:.2f} ms")
    print(f"share of step time in hashing losses: {max(0.0, 1 - share['ce_only'] / share['full']):.3f} "
          f"(difference method), {share['losses_only'] / share['full']:.3f} (direct)")
    ray.shutdown()


if __name__ == "__main__":
    main()
