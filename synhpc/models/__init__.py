"""Model registry: every classifier is built by name from :class:`synhpc.config.ModelConfig`, one
:class:`~synhpc.models.spec.ModelSpec` (builder and minimum cube) per name.

Usage::

    model = build_model(cfg.model, cube_shape_zyx=(16, 48, 48))   # logits of shape (batch,)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from synhpc.config import ModelConfig
from synhpc.errors import ConfigError
from synhpc.models.small3d import Small3D
from synhpc.models.spec import ModelSpec
from synhpc.models.zoo import ZOO

REGISTRY: dict[str, ModelSpec] = {
    "small3d": ModelSpec(lambda cfg, shape: Small3D(width=cfg.width, dropout=cfg.dropout), (4, 16, 16)),
    **ZOO,
}


def check_model(cfg: ModelConfig, cube_shape_zyx: Sequence[int]) -> None:
    """Raise a one-line ConfigError for an unknown model or a cube it cannot take, before any work starts."""
    if cfg.name not in REGISTRY:
        raise ConfigError(f"model.name: unknown model '{cfg.name}' (known: {', '.join(sorted(REGISTRY))})")
    need = REGISTRY[cfg.name].min_shape
    if any(s < m for s, m in zip(cube_shape_zyx, need)):
        raise ConfigError(f"cubes.shape_zyx {list(cube_shape_zyx)} is too small for model {cfg.name} (needs at least {list(need)})")


def build_model(cfg: ModelConfig, cube_shape_zyx: Sequence[int]) -> nn.Module:
    check_model(cfg, cube_shape_zyx)
    return REGISTRY[cfg.name].build(cfg, cube_shape_zyx)
