"""Builders for the larger model families, keyed by the names ``model.name`` accepts.

Each builder takes ``(ModelConfig, cube_shape_zyx)`` like the registry's. ``width`` applies to ``unet3d`` and the
``cnn2d`` variants only (torchvision backbones keep their widths so pretrained weights fit); ``dropout`` is before the
1-logit head; ``pretrained`` is a local state-dict path ("" for none). ``_gn`` names use GroupNorm in place of every
BatchNorm; ``_2d`` names read the centre section, ``_25d`` names the three centre sections.

Usage::

    from synhpc.models.zoo import ZOO, MIN_SHAPE
    model = ZOO["r2plus1d_18_gn"](cfg.model, cfg.cubes.shape_zyx)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from synhpc.config import ModelConfig
from synhpc.models.planar import planar
from synhpc.models.unet3d import UNet3DEncoder
from synhpc.models.video import VIDEO_ARCHS, video_resnet

Builder = Callable[[ModelConfig, Sequence[int]], nn.Module]


def _video(arch: str, norm: str) -> Builder:
    return lambda cfg, shape: video_resnet(arch, norm=norm, dropout=cfg.dropout, pretrained=cfg.pretrained)  # type: ignore[arg-type]


def _unet(norm: str) -> Builder:
    def build(cfg: ModelConfig, shape: Sequence[int]) -> nn.Module:
        net = UNet3DEncoder(width=cfg.width, norm=norm, dropout=cfg.dropout)  # type: ignore[arg-type]
        if cfg.pretrained:
            from synhpc.models.video import load_pretrained

            load_pretrained(net, cfg.pretrained, head_prefixes=("head.",))
        return net

    return build


def _planar(backbone: str, mode: str) -> Builder:
    return lambda cfg, shape: planar(backbone, mode, width=cfg.width, dropout=cfg.dropout, pretrained=cfg.pretrained)  # type: ignore[arg-type]


ZOO: dict[str, Builder] = {}
for _arch in VIDEO_ARCHS:
    ZOO[_arch] = _video(_arch, "batch")
    ZOO[f"{_arch}_gn"] = _video(_arch, "group")
ZOO["unet3d"] = _unet("batch")
ZOO["unet3d_gn"] = _unet("group")
for _bb in ("resnet18", "resnet50", "cnn2d"):
    ZOO[_bb if _bb == "cnn2d" else f"{_bb}_2d"] = _planar(_bb, "center")
    ZOO[f"{_bb}_25d"] = _planar(_bb, "2.5d")

# Smallest cube (z, y, x) for which a forward pass runs, found by trying shapes (tests/test_models_zoo.py re-checks
# it and that one voxel less in each axis fails where it can). Padded strided convs never shrink a map below one
# voxel, so the video ResNets and the 2D ResNets run on a single voxel; that is a lower bound, not a useful size.
MIN_SHAPE: dict[str, tuple[int, int, int]] = {
    **{name: (1, 1, 1) for name in ZOO if name.startswith(VIDEO_ARCHS)},
    "unet3d": (4, 8, 8),
    "unet3d_gn": (4, 8, 8),
    "resnet18_2d": (1, 1, 1),
    "resnet50_2d": (1, 1, 1),
    "cnn2d": (1, 1, 1),
    "resnet18_25d": (3, 1, 1),
    "resnet50_25d": (3, 1, 1),
    "cnn2d_25d": (3, 1, 1),
}
