"""Relative similarity loss: code distances must match target distances up to scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_target_distance(labels: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """(n, n) target distances ``1 - S[y_i, y_j]``; NaN where a label is negative (unlabelled: pair ignored)."""
    S = torch.as_tensor(similarity, device=labels.device)
    valid = labels >= 0
    y = labels.clamp_min(0)
    t = 1.0 - S[y[:, None], y[None, :]].float()
    return t.masked_fill(~(valid[:, None] & valid[None, :]), float("nan"))


def embedding_target_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """(n, n) target distances ``1 - max(0, cos(e_i, e_j))`` from caption embeddings."""
    e = F.normalize(embeddings.float(), dim=1)
    return 1.0 - (e @ e.T).clamp(0.0, 1.0)


def code_distance(z: torch.Tensor) -> torch.Tensor:
    """(n, n) ``||z_i - z_j||_1 / (2d)``: the normalised Hamming distance when z is in {-1, 1}^d."""
    return torch.cdist(z, z, p=1) / (2 * z.shape[1])


def relative_similarity_loss(z: torch.Tensor, target_distance: torch.Tensor, form: str = "relative",
                             tau: float = 0.1, eps: float = 1e-8) -> torch.Tensor:
    """Loss between code distances h = ``code_distance(z)`` and target distances t over pairs i != j.

    ``relative``: ``mean (h/mean(h) - t/mean(t))^2`` (0 iff h is a positive multiple of t);
    ``softmax``: mean over anchors of KL(softmax(-t_i/tau) || softmax(-h_i/tau)).
    NaN entries of ``target_distance`` (unlabelled pairs) are left out.
    """
    n = z.shape[0]
    h = code_distance(z)
    t = target_distance.to(h.dtype)
    # Pairs enter as weights, never by boolean indexing or a branch on their count: no host sync, one graph
    # (torch.compile fullgraph), and a batch without any labelled pair gives 0 with a (zero) gradient.
    valid = ~torch.eye(n, dtype=torch.bool, device=z.device) & ~torch.isnan(t)
    w = valid.to(h.dtype)
    t = torch.nan_to_num(t, nan=0.0)
    if form == "relative":
        count = w.sum().clamp_min(1.0)
        hm, tm = (h * w).sum() / count, (t * w).sum() / count
        return (((h / hm.clamp_min(eps) - t / tm.clamp_min(eps)) ** 2) * w).sum() / count
    if form == "softmax":
        rows = w.amax(dim=1)  # 1 for anchors with at least one valid pair
        low = torch.finfo(h.dtype).min  # masked logits: exp() is exactly 0, and a row with none stays finite
        logq = (-h / tau).masked_fill(~valid, low).log_softmax(dim=1)
        logp = (-t / tau).masked_fill(~valid, low).log_softmax(dim=1)
        per_anchor = (logp.exp() * w * (logp - logq)).sum(dim=1)
        return (per_anchor * rows).sum() / rows.sum().clamp_min(1.0)
    raise ValueError(f"unknown similarity loss form {form!r}; use 'relative' or 'softmax'")
