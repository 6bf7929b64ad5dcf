"""Instrumentation points of the long-running stages, passed in explicitly: no-ops unless a caller gives its own.

Training and encoding call a :class:`Hooks` object at fixed points (a training step, a restore, an epoch's end, a
written code shard). The default :data:`NO_HOOKS` does nothing and nothing in rayhash reads a switch to change
that; tests build hooks that record, fail or crash at those points in :mod:`rayhash.testing`, the one place that
does. Hooks travel to Ray Train workers inside the :class:`~rayhash.train.plan.WorkerPlan`, so they must pickle.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hooks:
    """Every method is a no-op; subclasses override what they observe. ``wants_labels``: whether
    :meth:`train_epoch` gets the labels a worker trained on (collecting them costs a host sync a step)."""

    wants_labels: bool = False

    def train_step(self, rank: int, step: int) -> None:
        """Before global optimiser step ``step`` on worker ``rank``."""

    def train_restored(self, rank: int, epoch: int, step: int, fingerprint: dict[str, float]) -> None:
        """After worker ``rank`` restored a checkpoint of ``epoch`` (``step``): sums of its weights and moments."""

    def train_epoch(self, rank: int, epoch: int, labels: list[int], node: str) -> None:
        """After worker ``rank`` (on Ray node ``node``) finished ``epoch``, having trained on ``labels``."""

    def encode_output(self, written: int) -> None:
        """After the encode driver wrote its ``written``-th code shard (atomically)."""


NO_HOOKS = Hooks()
