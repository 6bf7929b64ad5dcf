"""The training objective ``L = CE + alpha * L_sim + beta * L_KL / d`` with a per-term breakdown."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayhash.losses.distributed import all_gather_with_grad, world_size
from rayhash.losses.kl import knn_kl_divergence, sample_binary_target
from rayhash.losses.similarity import (embedding_target_distance, label_target_distance,
                                       relative_similarity_loss)


class HashingLoss(nn.Module):
    """CE on labelled samples + ``alpha`` * relative similarity loss + ``beta`` * k-NN KL to the binary target / d.

    Scales: CE in nats; L_sim is O(1) (squared relative error); L_KL is divided by the code length d so that it is a
    per-bit KL (nats/bit) and ``beta`` does not need retuning across code lengths.
    Under DDP (torch.distributed initialised) L_sim and L_KL use the global batch (``all_gather_with_grad``) and
    their gradient is multiplied by world_size, which DDP's gradient averaging divides out again.
    ``similarity``: optional (C, C) class similarity S, so that targets come from labels as ``1 - S[y_i, y_j]``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, k: int = 3, uniformity: float = 0.1,
                 sim_form: str = "relative", tau: float = 0.1, similarity=None, global_batch: bool = True):
        super().__init__()
        if sim_form not in ("relative", "softmax"):
            raise ValueError(f"loss similarity form must be 'relative' or 'softmax', got {sim_form!r}")
        self.alpha, self.beta, self.k, self.uniformity = alpha, beta, k, uniformity
        self.sim_form, self.tau, self.global_batch = sim_form, tau, global_batch
        S = None if similarity is None else torch.tensor(np.asarray(similarity), dtype=torch.float32)  # a copy
        self.register_buffer("similarity", S, persistent=False)

    def forward(self, z: torch.Tensor, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                target_distance: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, terms)``; ``terms`` holds detached 0-dim tensors ``loss, ce, sim, kl`` (``float()`` them
        to log). Targets, in order of precedence: ``target_distance`` (for the gathered batch), caption
        ``embeddings``, or ``labels`` with the ``similarity`` matrix; none -> no L_sim."""
        zero = z.sum() * 0.0
        ce = self._cross_entropy(logits, labels, zero)
        gather = all_gather_with_grad if self.global_batch else (lambda t: t)
        zg = gather(z)
        sim = kl = zero
        if self.alpha:
            t = self._target(target_distance, embeddings, labels, gather)
            if t is not None:
                sim = relative_similarity_loss(zg, t, form=self.sim_form, tau=self.tau)
        if self.beta:
            y = sample_binary_target(zg.shape[0], zg.shape[1], self.uniformity, generator, zg.device, zg.dtype)
            kl = knn_kl_divergence(zg, y, k=self.k) / zg.shape[1]
        shared = self.alpha * sim + self.beta * kl
        w = world_size() if self.global_batch else 1
        total = ce + w * shared - (w - 1) * shared.detach()  # value unchanged, gradient x world_size
        terms = {"loss": total.detach(), "ce": ce.detach(), "sim": sim.detach(), "kl": kl.detach()}
        return total, terms

    def _cross_entropy(self, logits, labels, zero):
        if logits is None or labels is None:
            return zero
        mask = labels >= 0
        return F.cross_entropy(logits[mask], labels[mask]) if mask.any() else zero

    def _target(self, target_distance, embeddings, labels, gather):
        if target_distance is not None:
            return target_distance
        if embeddings is not None:
            return embedding_target_distance(gather(embeddings))
        if labels is not None and self.similarity is not None:
            return label_target_distance(gather(labels), self.similarity)
        return None
