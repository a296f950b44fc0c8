"""Shared fixtures: small precomputed volumes with known voxels, and table writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def make_volume(path: Path, data_xyz: np.ndarray, resolution=(8, 8, 40), chunk=(32, 32, 8), offset=(0, 0, 0)) -> str:
    """Write ``data_xyz`` (uint8, X, Y, Z) as a precomputed image layer; return its file:// URL."""
    from cloudvolume import CloudVolume

    url = "file://" + str(path.resolve())
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="image",
        data_type="uint8",
        encoding="raw",
        resolution=list(resolution),
        voxel_offset=list(offset),
        chunk_size=list(chunk),
        volume_size=list(data_xyz.shape),
    )
    vol = CloudVolume(url, info=info, progress=False)
    vol.commit_info()
    x0, y0, z0 = offset
    vol[x0 : x0 + data_xyz.shape[0], y0 : y0 + data_xyz.shape[1], z0 : z0 + data_xyz.shape[2]] = data_xyz[..., None]
    return url


@pytest.fixture(scope="session")
def random_volume(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 100 x 90 x 30 volume of random voxels; its size is no multiple of the chunk size, so edge chunks are partial."""
    data = np.random.default_rng(7).integers(1, 256, size=(100, 90, 30), dtype=np.uint8)
    url = make_volume(tmp_path_factory.mktemp("vol") / "em", data)
    return url, data
