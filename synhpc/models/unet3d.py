"""The encoder half of a 3D U-Net as a synapse classifier.

Four levels of double 3x3x3 convolutions; the first pooling is in-plane only, (1, 2, 2), because sections are 40 nm
and x/y voxels 8 nm: after it the voxels are 16x16x40 nm, and later (2, 2, 2) poolings keep that ratio. It is the
encoder a segmentation network would use, so its weights can later seed a U-Net (or come from one).

Usage::

    net = UNet3DEncoder(width=16, norm="group")
    logits = net(cubes.float())           # (B, 1, Z, Y, X) -> (B,)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from synhpc.models.video import group_count

POOLS: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    """(conv 3x3x3, norm, ReLU) twice; no bias because the norm's shift replaces it."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.ReLU(inplace=True),
    )


class UNet3DEncoder(nn.Module):
    """Input (B, 1, Z, Y, X) float; output one logit per sample. Needs Z >= 4 and Y, X >= 8 (three poolings)."""

    def __init__(self, width: int = 16, norm: Literal["batch", "group"] = "batch", dropout: float = 0.0, in_channels: int = 1):
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        self.levels = nn.ModuleList(double_conv(cin, cout, norm) for cin, cout in zip([in_channels, *widths[:-1]], widths))
        self.pools = nn.ModuleList(nn.MaxPool3d(p) for p in POOLS)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(widths[-1], 1), nn.Flatten(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encode(self.levels, self.pools, x))


def encode(levels: nn.ModuleList, pools: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The encoder's levels with a pooling between each two: the classifier's and its pretrained backbone's path."""
    for i, level in enumerate(levels):
        if i:
            x = pools[i - 1](x)
        x = level(x)
    return x
