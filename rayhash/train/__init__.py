"""Distributed training on Ray Train: DDP hash network, global-batch hashing losses, checkpoints, metrics.

The per-worker loop (``rayhash.train.loop``, which imports torch) loads on first use, so ``rayhash --help``
stays fast."""
from __future__ import annotations

import importlib

from rayhash.train.driver import TrainResult, export_final, plan_steps, plot_curves, train

_LOOP = ("build_training", "code_stats", "load_train_state", "loss_step", "lr_lambda", "save_train_state",
         "train_loop_per_worker", "validate")

__all__ = ["train", "TrainResult", "plan_steps", "export_final", "plot_curves", *_LOOP]


def __getattr__(name: str):
    if name in _LOOP:
        return getattr(importlib.import_module("rayhash.train.loop"), name)
    raise AttributeError(f"module 'rayhash.train' has no attribute {name!r}")
