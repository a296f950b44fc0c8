"""Builders for the larger model families, keyed by the names ``model.name`` accepts.

Each builder takes ``(ModelConfig, cube_shape_zyx)`` like the registry's. ``width`` applies to ``unet3d`` and the
``cnn2d`` variants only (torchvision backbones keep their widths so pretrained weights fit); ``dropout`` is before the
1-logit head; ``pretrained`` is a local state-dict path ("" for none). ``_gn`` names use GroupNorm in place of every
BatchNorm; ``_2d`` names read the centre section, ``_25d`` names the three centre sections.

Usage::

    from synhpc.models.zoo import ZOO
    model = ZOO["r2plus1d_18_gn"].build(cfg.model, cfg.cubes.shape_zyx)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from synhpc.config import ModelConfig
from synhpc.models.planar import planar
from synhpc.models.spec import Builder, ModelSpec
from synhpc.models.unet3d import UNet3DEncoder
from synhpc.models.video import VIDEO_ARCHS, video_resnet


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


def _specs() -> dict[str, ModelSpec]:
    """Every zoo model with its builder and the smallest cube (z, y, x) for which a forward pass runs, found by trying
    shapes (tests/test_models_zoo.py re-checks it and that one voxel less in each axis fails where it can). Padded
    strided convs never shrink a map below one voxel, so the video ResNets and the 2D ResNets run on a single voxel;
    that is a lower bound, not a useful size."""
    specs: dict[str, ModelSpec] = {}
    for arch in VIDEO_ARCHS:
        specs[arch] = ModelSpec(_video(arch, "batch"), (1, 1, 1))
        specs[f"{arch}_gn"] = ModelSpec(_video(arch, "group"), (1, 1, 1))
    specs["unet3d"] = ModelSpec(_unet("batch"), (4, 8, 8))
    specs["unet3d_gn"] = ModelSpec(_unet("group"), (4, 8, 8))
    for backbone in ("resnet18", "resnet50", "cnn2d"):
        specs[backbone if backbone == "cnn2d" else f"{backbone}_2d"] = ModelSpec(_planar(backbone, "center"), (1, 1, 1))
        specs[f"{backbone}_25d"] = ModelSpec(_planar(backbone, "2.5d"), (3, 1, 1))
    return specs


ZOO: dict[str, ModelSpec] = _specs()
