"""Global-batch helpers for DDP (Ray Train): gather a tensor from all workers, keeping the local gradient."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of torch.distributed workers (1 when not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(t: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``t`` (n_w, ...) from every worker along dim 0, in rank order.

    The local slice is ``t`` itself, so gradients flow back to this worker's inputs; other workers' slices are
    constants. Identity when torch.distributed is not initialised. ``equal_sizes=True``: every worker's n_w is the
    same (training's local batches are, by ``drop_last`` and equal splits), so no sizes are exchanged, which would
    cost a device-to-host sync per call; otherwise batch sizes may differ between workers.
    Note: DDP averages parameter gradients over workers, so a loss on the gathered batch gets 1/world_size of
    its true gradient unless scaled (``HashingLoss`` does this).
    """
    if world_size() == 1:
        return t
    if equal_sizes:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t.detach().contiguous())
    else:
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[dist.get_rank()] = t
    return torch.cat(parts)
