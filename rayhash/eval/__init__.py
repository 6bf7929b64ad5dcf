"""Evaluation: encode a query split, retrieve from a sharded index, score mAHP@250 / mAP@1000 / P@r2, plot."""
from __future__ import annotations

from rayhash.eval.evaluate import caption_metrics, evaluate, hierarchy_metrics, rank

__all__ = ["evaluate", "hierarchy_metrics", "caption_metrics", "rank"]
