"""Hash networks: a backbone (:data:`rayhash.model.backbones.BACKBONES`) -> linear -> tanh (d bits) -> classifier."""
from __future__ import annotations

import torch
from torch import nn

from rayhash.model.backbones import build_backbone


class HashNet(nn.Module):
    """features -> z = tanh(W h + b) in (-1,1)^bits -> logits = classifier(z) (when num_classes > 0).

    ``hash_norm=True`` puts a BatchNorm between the hash layer and tanh: every bit's pre-activation is centred on the
    batch, so no bit saturates to a constant (balanced bits from the first step)."""

    def __init__(self, backbone: str = "tiny_cnn", bits: int = 64, num_classes: int = 0, *,
                 pretrained: str | None = None, width: int = 32, hash_norm: bool = False):
        super().__init__()
        self.bits, self.num_classes = bits, num_classes
        self.backbone, dim = build_backbone(backbone, pretrained=pretrained, width=width)
        self.hash = nn.Sequential(nn.Linear(dim, bits), nn.BatchNorm1d(bits)) if hash_norm else nn.Linear(dim, bits)
        self.classifier = nn.Linear(bits, num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
