"""The training objective ``L = CE + alpha * L_sim + beta(t) * L_KL / d`` with a per-term breakdown."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayhash.config import BETA_SCHEDULES
from rayhash.losses.distributed import all_gather_with_grad, world_size
from rayhash.losses.kl import DISTANCES, ESTIMATORS
from rayhash.losses.similarity import (embedding_target_distance, label_target_distance,
                                       relative_similarity_loss)


def beta_at(beta: float, progress: float, schedule: str = "constant", start: float = 0.0,
            ramp: float = 0.0) -> float:
    """β at ``progress`` (fraction of training done, 0..1): ``constant`` is β throughout; ``ramp`` is 0 until
    ``start``, then rises linearly to β over the next ``ramp`` of training (a step at ``start`` when ramp = 0)."""
    if schedule == "constant":
        return beta
    if schedule != "ramp":
        raise ValueError(f"loss.beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if progress < start:
        return 0.0
    return beta if ramp <= 0 else beta * min(1.0, (progress - start) / ramp)


class HashingLoss(nn.Module):
    """CE on labelled samples + ``alpha`` * relative similarity loss + ``beta`` * k-NN KL to the binary target / d.

    Scales: CE in nats; L_sim is O(1) (squared relative error); L_KL is divided by the code length d so that it is a
    per-bit KL (nats/bit). That does not make ``beta`` length-free: the corners estimator's pull on one coordinate
    grows as 1/(d * (1 - |z_i|)), and at 16 bits beta = 0.3 saturated the outputs and collapsed the codes (README).
    KL estimator: ``kl_estimator`` (``sampled`` | ``blockwise`` | ``corners`` | ``boxes``,
    :mod:`rayhash.losses.kl`) with ``kl_samples`` x n target samples, its ``k`` (and ``kl_nu_k``, the target
    neighbour's rank), the
    ``kl_distance`` (l2 | l1), ``kl_block`` bits per block and ``kl_tc`` (blockwise), and an optional queue of
    the last ``kl_queue`` detached outputs that enlarges the output sample (a FIFO kept on the module); every
    estimator uses the queue in its entropy term.
    ``label_smoothing`` of the CE term. All terms are computed in (at least) float32 whatever the surrounding
    autocast (bf16 rounds tanh outputs near ±1 and turns
    the estimator's small distances into ties).
    Under DDP (torch.distributed initialised) L_sim and L_KL use the global batch (``all_gather_with_grad``) and
    their gradient is multiplied by world_size, which DDP's gradient averaging divides out again;
    ``equal_batches=True`` (training: every worker's local batch has the same size) gathers without exchanging sizes.
    ``similarity``: optional (C, C) class similarity S, so that targets come from labels as ``1 - S[y_i, y_j]``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, k: int = 3, uniformity: float = 0.1,
                 sim_form: str = "relative", tau: float = 0.1, similarity=None, global_batch: bool = True,
                 kl_samples: float = 1.0, kl_distance: str = "l2", kl_queue: int = 0, label_smoothing: float = 0.0,
                 equal_batches: bool = False, kl_estimator: str = "sampled", kl_block: int = 4,
                 kl_tc: str = "rho", kl_nu_k: int | None = None):
        super().__init__()
        if sim_form not in ("relative", "softmax"):
            raise ValueError(f"loss similarity form must be 'relative' or 'softmax', got {sim_form!r}")
        if kl_distance not in DISTANCES:
            raise ValueError(f"loss.kl_distance must be one of {sorted(DISTANCES)}, got {kl_distance!r}")
        if kl_estimator not in ESTIMATORS:
            raise ValueError(f"loss.kl_estimator must be one of {tuple(ESTIMATORS)}, got {kl_estimator!r}")
        self.alpha, self.beta, self.k, self.uniformity = alpha, beta, k, uniformity
        self.sim_form, self.tau, self.global_batch = sim_form, tau, global_batch
        self.kl_samples, self.kl_p, self.kl_queue = kl_samples, DISTANCES[kl_distance], kl_queue
        self.label_smoothing, self.equal_batches = label_smoothing, equal_batches
        self.kl_estimator = ESTIMATORS[kl_estimator]
        self.kl_settings = {"k": k, "l": kl_nu_k, "p": self.kl_p, "uniformity": uniformity, "block": kl_block,
                            "tc": kl_tc}
        S = None if similarity is None else torch.tensor(np.asarray(similarity), dtype=torch.float32)  # a copy
        self.register_buffer("similarity", S, persistent=False)
        self.register_buffer("queue", None, persistent=False)

    @classmethod
    def from_config(cls, loss_cfg, similarity=None, equal_batches: bool = False) -> "HashingLoss":
        c = loss_cfg
        return cls(alpha=c.alpha, beta=c.beta, k=c.k, uniformity=c.uniformity, sim_form=c.similarity, tau=c.tau,
                   similarity=similarity, kl_samples=c.kl_samples, kl_distance=c.kl_distance, kl_queue=c.kl_queue,
                   label_smoothing=c.label_smoothing, equal_batches=equal_batches, kl_estimator=c.kl_estimator,
                   kl_block=c.kl_block, kl_tc=c.kl_tc, kl_nu_k=c.kl_nu_k)

    def forward(self, z: torch.Tensor, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                target_distance: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
                generator: torch.Generator | None = None, beta: float | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, terms)``; ``terms`` holds detached 0-dim (at least float32) tensors
        ``loss, ce, sim, kl`` (``float()``
        them to log). Targets, in order of precedence: ``target_distance`` (for the gathered batch), caption
        ``embeddings``, or ``labels`` with the ``similarity`` matrix; none -> no L_sim. ``beta`` overrides the
        constructor's β for this call (a schedule)."""
        beta = self.beta if beta is None else beta
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.promote_types(z.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
            z = z.to(dtype)
            logits = logits.to(dtype) if logits is not None else None
            zero = z.sum() * 0.0
            ce = self._cross_entropy(logits, labels, zero)
            gather = ((lambda t: all_gather_with_grad(t, self.equal_batches)) if self.global_batch
                      else (lambda t: t))
            zg = gather(z)
            sim = kl = zero
            if self.alpha:
                t = self._target(target_distance, embeddings, labels, gather)
                if t is not None:
                    sim = relative_similarity_loss(zg, t.to(dtype), form=self.sim_form, tau=self.tau)
            if beta or self.beta:  # computed (and logged) whenever the run uses L_KL, even while β(t) = 0
                kl = self._kl(zg, generator)
            shared = self.alpha * sim + beta * kl
            w = world_size() if self.global_batch else 1
            total = ce + w * shared - (w - 1) * shared.detach()  # value unchanged, gradient x world_size
        terms = {"loss": total.detach(), "ce": ce.detach(), "sim": sim.detach(), "kl": kl.detach()}
        return total, terms

    def _kl(self, zg: torch.Tensor, generator) -> torch.Tensor:
        extra = self.queue if self.kl_queue and self.queue is not None else None
        n_pool = zg.shape[0] + (0 if extra is None else extra.shape[0])
        m = max(self.k, self.kl_settings["l"] or 1, int(round(self.kl_samples * n_pool)))
        kl = self.kl_estimator(zg, extra, m, generator, self.kl_settings) / zg.shape[1]
        if self.kl_queue and self.training:
            q = zg.detach() if extra is None else torch.cat([zg.detach(), extra])
            self.queue = q[: self.kl_queue]
        return kl

    def _cross_entropy(self, logits, labels, zero):
        """Mean CE over the labelled samples (label >= 0), with no data-dependent branch or indexing: no host sync,
        and a batch whose labels are all -1 still gives the classifier a (zero) gradient, as DDP requires of every
        parameter on every step."""
        if logits is None or labels is None:
            return zero
        valid = (labels >= 0).to(logits.dtype)
        per = F.cross_entropy(logits, labels.clamp_min(0), label_smoothing=self.label_smoothing, reduction="none")
        return (per * valid).sum() / valid.sum().clamp_min(1.0)

    def _target(self, target_distance, embeddings, labels, gather):
        if target_distance is not None:
            return target_distance
        if embeddings is not None:
            return embedding_target_distance(gather(embeddings))
        if labels is not None and self.similarity is not None:
            return label_target_distance(gather(labels), self.similarity)
        return None
