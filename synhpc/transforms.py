"""Batched, seeded augmentation of (B, 1, Z, Y, X) cubes.

Randomness comes from a generator seeded by (seed, step), never from global state, so a resumed run draws the
same augmentations as an uninterrupted one.

Usage::

    batch = augment(batch, torch.Generator().manual_seed(step_seed(seed, step)))
"""

from __future__ import annotations

import torch


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random x/y flips and in-plane quarter turns per sample (the label does not depend on orientation)."""
    n = batch.shape[0]
    flips = torch.rand((n, 2), generator=gen) < 0.5
    turns = torch.randint(0, 4, (n,), generator=gen)
    square = batch.shape[-1] == batch.shape[-2]
    out = []
    for i in range(n):
        cube = batch[i]
        if flips[i, 0]:
            cube = cube.flip(-1)
        if flips[i, 1]:
            cube = cube.flip(-2)
        if square and turns[i]:
            cube = torch.rot90(cube, int(turns[i]), dims=(-2, -1))
        out.append(cube)
    return torch.stack(out)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 EM intensities to roughly zero-mean unit-range floats."""
    return (batch.float() - 128.0) / 64.0
