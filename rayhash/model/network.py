"""Hash networks: a backbone (torchvision ResNet, CIFAR ResNet, tiny CNN) -> linear -> tanh (d bits) -> classifier."""
from __future__ import annotations

import torch
from torch import nn


def _tiny_cnn(width: int) -> tuple[nn.Module, int]:
    """Three conv blocks + global average pool: fast on CPU, for demos and tests."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    layers = [*block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * w


def _resnet9(width: int) -> tuple[nn.Module, int]:
    """The fast CIFAR ResNet-9 of the DAWNBench entries (prep, 3 stages with 2 residual blocks, global max-pool),
    channels ``width``..``8·width``: at width 32 it trains at ~600 img/s on 2 CPU cores (bf16), ~40 % of the cost of
    width 64."""
    def cbr(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    w = width
    net = nn.Sequential(cbr(3, w), cbr(w, 2 * w), nn.MaxPool2d(2), _Residual(cbr(2 * w, 2 * w), cbr(2 * w, 2 * w)),
                        cbr(2 * w, 4 * w), nn.MaxPool2d(2), cbr(4 * w, 8 * w), nn.MaxPool2d(2),
                        _Residual(cbr(8 * w, 8 * w), cbr(8 * w, 8 * w)), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return net, 8 * w


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def _torchvision_resnet(name: str, pretrained: str | None, cifar_stem: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                  strict=False)
        missing = [m for m in missing if not m.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"model.pretrained: {pretrained} is not a {name} state_dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cifar_stem:  # 32-px inputs: 3x3 stride-1 stem, no max-pool
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_backbone(name: str, *, pretrained: str | None = None, width: int = 32) -> tuple[nn.Module, int]:
    """(feature extractor, feature dim) for a backbone name from rayhash.config.BACKBONES."""
    if name == "tiny_cnn":
        return _tiny_cnn(width)
    if name == "resnet9":
        return _resnet9(width)
    if name == "cifar_resnet":
        return _torchvision_resnet("resnet18", pretrained, cifar_stem=True)
    if name in ("resnet18", "resnet34", "resnet50"):
        return _torchvision_resnet(name, pretrained, cifar_stem=False)
    raise ValueError(f"model.backbone: unknown backbone {name!r}")


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
        z = torch.tanh(self.hash(self.backbone(x)))
        return z, (self.classifier(z) if self.classifier is not None else None)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "HashNet":
        return cls(model_cfg.backbone, model_cfg.bits, num_classes, pretrained=model_cfg.pretrained,
                   width=model_cfg.width, hash_norm=model_cfg.hash_norm)
