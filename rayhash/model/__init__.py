"""Hash networks, checkpoints and the inference encoder."""
from __future__ import annotations

from rayhash.model.checkpoint import Encoder, LoadedModel, checkpoint_dir, load_checkpoint, save_model_files
from rayhash.model.network import HashNet, build_backbone

__all__ = ["HashNet", "build_backbone", "Encoder", "LoadedModel", "load_checkpoint", "checkpoint_dir",
           "save_model_files"]
