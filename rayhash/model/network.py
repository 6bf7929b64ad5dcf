"""Hash networks: a backbone (:data:`rayhash.model.backbones.BACKBONES`) -> linear -> tanh (d bits) -> classifier."""
from __future__ import annotations

import torch
from torch import nn

from rayhash.data.images import IMAGE_MEAN, IMAGE_STD
from rayhash.model.backbones import build_backbone


def normalise_images(x: torch.Tensor, mean255: torch.Tensor | None = None,
                     inv_std255: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (n,3,S,S) -> float32 ``(x/255 - IMAGE_MEAN) / IMAGE_STD`` (memory format kept). ``mean255`` /
    ``inv_std255``: the constants as (1,3,1,1) tensors already on x's device (``HashNet`` keeps them as buffers:
    making them from Python lists on every call would be a host-to-device copy, which synchronises)."""
    if mean255 is None or inv_std255 is None:
        mean255, inv_std255 = _normalisation_constants(x.device)
    return (x.float() - mean255) * inv_std255


def _normalisation_constants(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGE_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std.reciprocal()


class HashNet(nn.Module):
    """features -> z = tanh(W h + b) in (-1,1)^bits -> logits = classifier(z) (when num_classes > 0).

    ``hash_norm=True`` puts a BatchNorm between the hash layer and tanh: every bit's pre-activation is centred on the
    batch, so no bit saturates to a constant (balanced bits from the first step).

    Input: uint8 images (n,3,S,S) as the data pipeline ships them, normalised here on the model's device; a float
    tensor is taken as already normalised."""

    def __init__(self, backbone: str = "tiny_cnn", bits: int = 64, num_classes: int = 0, *,
                 pretrained: str | None = None, width: int = 32, hash_norm: bool = False):
        super().__init__()
        self.bits, self.num_classes = bits, num_classes
        self.backbone, dim = build_backbone(backbone, pretrained=pretrained, width=width)
        self.hash = nn.Sequential(nn.Linear(dim, bits), nn.BatchNorm1d(bits)) if hash_norm else nn.Linear(dim, bits)
        self.classifier = nn.Linear(bits, num_classes) if num_classes > 0 else None
        mean255, inv_std255 = _normalisation_constants()  # buffers: they move with the model, not in checkpoints
        self.register_buffer("mean255", mean255, persistent=False)
        self.register_buffer("inv_std255", inv_std255, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dtype == torch.uint8:
            x = normalise_images(x, self.mean255, self.inv_std255)
        h = self.backbone(x)
        # The hash layer, tanh and classifier run in float32 whatever the autocast: in bf16, tanh(4.0) rounds to 1.0
        # (units past ~3.5 get no gradient) and the codes' distances in L_KL collapse into ties.
        with torch.autocast(device_type=h.device.type, enabled=False):
            z = torch.tanh(self.hash(h.float()))
            return z, (self.classifier(z) if self.classifier is not None else None)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "HashNet":
        return cls(model_cfg.backbone, model_cfg.bits, num_classes, pretrained=model_cfg.pretrained,
                   width=model_cfg.width, hash_norm=model_cfg.hash_norm)
