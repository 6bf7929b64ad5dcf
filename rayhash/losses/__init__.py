"""The method's losses: k-NN KL to a binary target, relative similarity loss, and their combination."""
from __future__ import annotations

from rayhash.losses.distributed import all_gather_with_grad, world_size
from rayhash.losses.hashing import HashingLoss, beta_at
from rayhash.losses.kl import knn_kl_divergence, sample_binary_target
from rayhash.losses.similarity import (code_distance, embedding_target_distance, label_target_distance,
                                       relative_similarity_loss)

__all__ = ["beta_at", "knn_kl_divergence", "sample_binary_target", "relative_similarity_loss", "HashingLoss",
           "all_gather_with_grad", "world_size", "label_target_distance", "embedding_target_distance",
           "code_distance"]
