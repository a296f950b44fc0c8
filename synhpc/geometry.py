"""Units and cube geometry: the one place where table positions become imagery voxels.

MICrONS tables give positions in 4x4x40 nm units while EM mip 0 is 8x8x40 nm; the original project's 51 um cubes
came from converting in several places. Every conversion in synhpc goes through :func:`to_voxels`.

Usage::

    centers = to_voxels(positions, table_resolution_nm=(4, 4, 40), mip_resolution_nm=(8, 8, 40))
    lo, hi = cube_bounds(centers, shape_zyx=(16, 48, 48))  # half-open x, y, z boxes
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_voxels(
    positions: np.ndarray, table_resolution_nm: Sequence[float], mip_resolution_nm: Sequence[float]
) -> np.ndarray:
    """``floor(position * table_res / mip_res)`` per axis (x, y, z), as int64.

    The ratio is computed first in float64 and the product floored, which is exact for the integer-valued
    positions and power-of-two resolution ratios MICrONS uses.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n, 3), got {positions.shape}")
    scale = np.asarray(table_resolution_nm, dtype=np.float64) / np.asarray(mip_resolution_nm, dtype=np.float64)
    return np.floor(positions * scale).astype(np.int64)


def cube_bounds(centers_xyz: np.ndarray, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Half-open boxes ``[lo, hi)`` in x, y, z voxels so that ``cube[k, j, i] == EM[lo + (i, j, k)]``."""
    size_xyz = np.asarray(shape_zyx[::-1], dtype=np.int64)
    lo = np.asarray(centers_xyz, dtype=np.int64) - size_xyz // 2
    return lo, lo + size_xyz


def inside_fraction(lo: np.ndarray, hi: np.ndarray, vol_lo: Sequence[int], vol_hi: Sequence[int]) -> np.ndarray:
    """Fraction of each box's voxels that lie inside the volume ``[vol_lo, vol_hi)``; 1.0 means fully inside."""
    inter = np.clip(np.minimum(hi, vol_hi) - np.maximum(lo, vol_lo), 0, None)
    return inter.prod(axis=1) / (hi - lo).prod(axis=1)
