"""Backbones, listed once: ``model.backbone`` in the config, its validation and :class:`HashNet` read
:data:`BACKBONES`. Each builder returns ``(feature extractor, feature dim)``; torch is imported inside the
builders, so the names are known (to the config and ``--help``) without importing torch."""
from __future__ import annotations

from rayhash.registry import Registry

BACKBONES = Registry("backbone", "model.backbone")


def build_backbone(name: str, *, pretrained: str | None = None, width: int = 32):
    """(feature extractor, feature dim) of the backbone ``name``."""
    return BACKBONES[name].target(pretrained=pretrained, width=width)


@BACKBONES.register("tiny_cnn", help="three conv blocks (width..4·width channels): tests and the quickest CPU runs")
def _tiny_cnn(*, width: int, **_):
    from torch import nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    layers = [*block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * w


@BACKBONES.register("resnet9", help="DAWNBench CIFAR ResNet-9 (width..8·width channels): the CPU recipe at width "
                                    "32, the demo at 16")
def _resnet9(*, width: int, **_):
    """The fast CIFAR ResNet-9 of the DAWNBench entries (prep, 3 stages with 2 residual blocks, global max-pool),
    channels ``width``..``8·width``: at width 32 it trains at ~600 img/s on 2 CPU cores (bf16), ~40 % of the cost of
    width 64."""
    from torch import nn

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    def cbr(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    w = width
    net = nn.Sequential(cbr(3, w), cbr(w, 2 * w), nn.MaxPool2d(2), Residual(cbr(2 * w, 2 * w), cbr(2 * w, 2 * w)),
                        cbr(2 * w, 4 * w), nn.MaxPool2d(2), cbr(4 * w, 8 * w), nn.MaxPool2d(2),
                        Residual(cbr(8 * w, 8 * w), cbr(8 * w, 8 * w)), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return net, 8 * w


def _torchvision_resnet(name: str, pretrained: str | None, cifar_stem: bool):
    import torch
    import torchvision
    from torch import nn

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


@BACKBONES.register("cifar_resnet", help="torchvision ResNet-18 with a 3x3 stride-1 stem for 32-px images")
def _cifar_resnet(*, pretrained: str | None, **_):
    return _torchvision_resnet("resnet18", pretrained, cifar_stem=True)


for _name in ("resnet18", "resnet34", "resnet50"):
    BACKBONES.register(_name, help=f"torchvision {_name.replace('resnet', 'ResNet-')} (model.pretrained: a local "
                                   "state_dict, never downloaded)")(
        lambda *, pretrained, _name=_name, **_: _torchvision_resnet(_name, pretrained, cifar_stem=False))
