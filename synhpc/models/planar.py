"""The original project's 2D path, on 2D patches cut from the same cubes so 2D and 3D models see the same synapses.

``mode="center"`` feeds the centre section as one channel (the notebooks' single-section patches); ``mode="2.5d"``
feeds the three centre sections as three channels (their 2.5D ResNet-50). Backbones: torchvision ``resnet18`` and
``resnet50`` (first conv adapted to the channel count) and ``cnn2d``, a small CNN like their custom one.

Usage::

    net = PlanarClassifier(resnet2d("resnet18", in_channels=3), mode="2.5d")
    logits = net(cubes.float())           # (B, 1, Z, Y, X) -> (B,)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from synhpc.models.tv_compat import import_torchvision
from synhpc.models.video import group_count, load_pretrained, replace_first_conv, to_group_norm

PlanarMode = Literal["center", "2.5d"]
RESNETS_2D = ("resnet18", "resnet50")


def sections(x: torch.Tensor, mode: PlanarMode) -> torch.Tensor:
    """(B, 1, Z, Y, X) -> (B, 1, Y, X) centre section, or (B, 3, Y, X) sections c-1, c, c+1 with c = Z // 2."""
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"expected (B, 1, Z, Y, X), got {tuple(x.shape)}")
    c = x.shape[2] // 2
    if mode == "center":
        return x[:, :, c]
    if mode == "2.5d":
        if x.shape[2] < 3:
            raise ValueError(f"2.5d needs at least 3 sections, got Z = {x.shape[2]}")
        return x[:, 0, c - 1 : c + 2]
    raise ValueError(f"mode must be 'center' or '2.5d', got {mode!r}")


class PlanarClassifier(nn.Module):
    """Wraps a 2D backbone that maps (B, C, Y, X) to (B,) logits so it takes cubes."""

    def __init__(self, backbone: nn.Module, mode: PlanarMode = "center"):
        super().__init__()
        sections(torch.zeros(1, 1, 3, 1, 1), mode)  # fail at build time, not at the first batch
        self.mode = mode
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous(): the slice is strided, and cuDNN/oneDNN 2D convs are faster on a dense input.
        return self.backbone(sections(x, self.mode).contiguous())


def resnet2d(arch: str, *, in_channels: int = 1, norm: Literal["batch", "group"] = "batch", dropout: float = 0.0, pretrained: str = "") -> nn.Module:
    """torchvision ``resnet18``/``resnet50`` (weights=None) with ``in_channels`` inputs and a 1-logit head.

    ``pretrained``: a local torchvision-format state dict (ImageNet weights); RGB first-conv kernels are summed when
    ``in_channels == 1`` and used as they are for 2.5D (three sections in place of three colours).
    """
    if arch not in RESNETS_2D:
        raise ValueError(f"unknown 2D architecture {arch!r} (known: {', '.join(RESNETS_2D)})")
    tv = import_torchvision()
    net = getattr(tv.models, arch)(weights=None)
    if in_channels != 3:
        replace_first_conv(net, in_channels)
    if pretrained:
        load_pretrained(net, pretrained)
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, 1), nn.Flatten(0))
    nn.init.normal_(net.fc[1].weight, std=0.01)
    nn.init.zeros_(net.fc[1].bias)
    if norm == "group":
        to_group_norm(net)
    return net


class CNN2D(nn.Module):
    """Four (conv 3x3, norm, ReLU, max-pool 2) blocks of width w, 2w, 4w, 8w, global average pool, 1 logit."""

    def __init__(self, in_channels: int = 1, width: int = 16, dropout: float = 0.0, norm: Literal["batch", "group"] = "batch"):
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        blocks: list[nn.Module] = []
        for cin, cout in zip([in_channels, *widths[:-1]], widths):
            blocks += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(group_count(cout), cout),
                nn.ReLU(inplace=True),
                # ceil_mode keeps 1-voxel maps alive, so tiny patches still run.
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(widths[-1], 1), nn.Flatten(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def planar(backbone: str, mode: PlanarMode = "center", *, width: int = 16, dropout: float = 0.0, pretrained: str = "") -> PlanarClassifier:
    """A cube classifier from a 2D ``backbone`` (``resnet18``, ``resnet50`` or ``cnn2d``) reading ``mode`` sections."""
    channels = 1 if mode == "center" else 3
    if backbone == "cnn2d":
        net: nn.Module = CNN2D(channels, width=width, dropout=dropout)
        if pretrained:
            load_pretrained(net, pretrained, head_prefixes=("head.",))
    else:
        net = resnet2d(backbone, in_channels=channels, dropout=dropout, pretrained=pretrained)
    return PlanarClassifier(net, mode)
