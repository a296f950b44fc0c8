"""A small anisotropic 3D CNN that trains in minutes on a laptop CPU.

z sections are 40 nm and x/y voxels 8 nm, so the first stages convolve and pool in-plane only until the voxels are
closer to isotropic; then full 3D stages follow.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    padding = tuple(k // 2 for k in kernel)
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Small3D(nn.Module):
    """Input uint8 or float (B, 1, Z, Y, X); output one logit per sample (1 = excitatory)."""

    def __init__(self, width: int = 16, dropout: float = 0.1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(1, w, (1, 5, 5), (1, 2, 2)),  # 8 nm -> 16 nm in-plane
            _block(w, w, (3, 3, 3), (1, 1, 1)),
            nn.MaxPool3d((1, 2, 2)),  # 32 nm in-plane vs 40 nm sections: about isotropic
            _block(w, 2 * w, (3, 3, 3), (1, 1, 1)),
            nn.MaxPool3d(2),
            _block(2 * w, 4 * w, (3, 3, 3), (1, 1, 1)),
            nn.AdaptiveAvgPool3d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)
