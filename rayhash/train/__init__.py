"""Distributed training on Ray Train: DDP hash network, global-batch hashing losses, checkpoints, metrics."""
from __future__ import annotations

from rayhash.train.driver import TrainResult, export_final, plan_steps, plot_curves, train
from rayhash.train.loop import (build_training, code_stats, load_train_state, loss_step, lr_lambda,
                                save_train_state, train_loop_per_worker, validate)

__all__ = ["train", "TrainResult", "plan_steps", "export_final", "plot_curves", "build_training", "loss_step",
           "code_stats", "lr_lambda", "save_train_state", "load_train_state", "train_loop_per_worker", "validate"]
