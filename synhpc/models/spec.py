"""One entry of the model registry: how to build a model and the smallest cube it accepts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from synhpc.config import ModelConfig

Builder = Callable[[ModelConfig, Sequence[int]], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """``build(model_config, cube_shape_zyx)`` makes the network (one logit per cube); ``min_shape`` is the smallest
    (z, y, x) cube for which its downsampling leaves at least one voxel."""

    build: Builder
    min_shape: tuple[int, int, int]
