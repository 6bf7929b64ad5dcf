"""Hash networks, checkpoints and the inference encoder.

Backbone names (:data:`BACKBONES`) are importable without torch; the rest imports torch on first access."""
from __future__ import annotations

import importlib

from rayhash.model.backbones import BACKBONES, build_backbone

_LAZY = {"HashNet": "network", "Encoder": "checkpoint", "LoadedModel": "checkpoint", "load_checkpoint": "checkpoint",
         "checkpoint_dir": "checkpoint", "save_model_files": "checkpoint"}

__all__ = ["BACKBONES", "build_backbone", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"rayhash.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
