"""What the training driver hands each Ray Train worker: one frozen, picklable record instead of a loose dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayhash.config import RunConfig
from rayhash.hooks import NO_HOOKS, Hooks


@dataclass(frozen=True, eq=False)
class WorkerPlan:
    """Everything a worker needs besides its dataset shard, decided once by the driver (``train/driver.py``).

    ``steps_per_epoch``: optimiser steps every worker runs per epoch (the time budget; short shards pad);
    ``similarity``: (C, C) class similarity for L_sim and validation (None: no hierarchy);
    ``embedding_dim``: caption-embedding width when ``data.targets=captions`` (0 otherwise);
    ``val_source`` / ``val_count``: the held-out split's folder and size (None / 0: no validation);
    ``metrics_path``: where rank 0 writes ``metrics.jsonl``; ``tensorboard_dir``: optional;
    ``meta``: what every checkpoint's ``meta.json`` records besides epoch and step;
    ``hooks``: instrumentation (tests only; :data:`rayhash.hooks.NO_HOOKS` otherwise).
    """

    config: RunConfig
    num_classes: int
    steps_per_epoch: int
    similarity: np.ndarray | None = None
    embedding_dim: int = 0
    val_source: str | None = None
    val_count: int = 0
    metrics_path: str | None = None
    tensorboard_dir: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    hooks: Hooks = NO_HOOKS
