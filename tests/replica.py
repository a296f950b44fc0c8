"""Small replicas of the minnie65 EM volume for tests: real geometry and formats, a few missing chunks, over HTTP.

Usage::

    from replica import build_replica, synapse_positions, replicas, replica_server  # noqa: F401 (fixtures)

    rep = build_replica(tmp_path / "em-sharded", sharded=True)
    rep.url                                   # file:// URL of the layer
    rep.decoded[0]                            # mip-0 voxels (X, Y, Z) a correct reader returns: decoded JPEG,
                                              # 0 in missing chunks, indexed from the volume's voxel_offset
    pos = synapse_positions()                 # table positions (4x4x40 nm units) and where each cube lies

    def test_something(replicas, replica_server):      # session fixtures: both variants, one server
        url = replica_server.url + "/" + replicas["sharded"].root.name

Geometry (what minnie65's EM has): mip 0 at 8x8x40 nm, mip 1 at 16x16x40 nm, JPEG chunks of 128x128x16 voxels,
``voxel_offset`` [26385, 30308, 14850] at mip 0 (the minnie65 segmentation's, so not chunk-aligned), 512x512x64
voxels (4x4x4 chunks). The sharded variant uses ``neuroglancer_uint64_sharded_v1`` with an identity hash, 8 chunks
per minishard, 2 minishards per shard and 4 shard files at mip 0 (1 at mip 1), gzip-encoded minishard indices.
Voxels are a seeded EM-like texture (membranes, cytoplasm, shot noise), so JPEG behaves as on real EM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from synhpc.bench import em_texture
from synhpc.replicas import LoopbackServer, chunk_bounds, encode_chunk, grid_size, image_info, write_chunks, write_info

SIZE_VX = (512, 512, 64)
CHUNK_VX = (128, 128, 16)
RESOLUTION_NM = (8, 8, 40)
VOXEL_OFFSET = (26385, 30308, 14850)
TABLE_RESOLUTION_NM = (4, 4, 40)
# Grid points (x, y, z) of chunks left out, per mip: one deep inside (cubes around it read zeros there), one on a
# face, one in a corner.
MISSING = {0: ((1, 2, 1), (3, 1, 2), (0, 0, 3)), 1: ((1, 0, 2),)}


@dataclass
class Replica:
    root: Path
    url: str
    sharded: bool
    info: dict[str, Any]
    decoded: list[np.ndarray] = field(default_factory=list)  # per mip, X, Y, Z as a reader must return it
    missing: dict[int, tuple] = field(default_factory=dict)

    def scale(self, mip: int = 0) -> dict[str, Any]:
        return self.info["scales"][mip]

    def bounds(self, mip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        lo = np.asarray(self.scale(mip)["voxel_offset"], dtype=np.int64)
        return lo, lo + np.asarray(self.scale(mip)["size"], dtype=np.int64)

    def http_url(self, server: LoopbackServer) -> str:
        """This layer's URL on a server that serves the replica's parent folder."""
        return f"{server.url}/{self.root.name}"

    def expected_cubes(self, centers_xyz: np.ndarray, shape_zyx, mip: int = 0) -> np.ndarray:
        """The cube contract on the decoded voxels: cube[k, j, i] == EM[c - size//2 + (i, j, k)], 0 outside."""
        lo_vol, hi_vol = self.bounds(mip)
        data = self.decoded[mip]
        size = np.asarray(shape_zyx[::-1], dtype=np.int64)
        out = np.zeros((len(centers_xyz), *shape_zyx), dtype=np.uint8)
        for n, c in enumerate(np.asarray(centers_xyz, dtype=np.int64)):
            lo = c - size // 2
            a, b = np.maximum(lo, lo_vol), np.minimum(lo + size, hi_vol)
            if (b <= a).any():
                continue
            block = data[a[0] - lo_vol[0] : b[0] - lo_vol[0], a[1] - lo_vol[1] : b[1] - lo_vol[1], a[2] - lo_vol[2] : b[2] - lo_vol[2]]
            out[n, a[2] - lo[2] : b[2] - lo[2], a[1] - lo[1] : b[1] - lo[1], a[0] - lo[0] : b[0] - lo[0]] = block.transpose(2, 1, 0)
        return out


@functools.lru_cache(maxsize=2)
def _voxels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mip 0 and mip 1 (2x2 mean in x, y) before encoding; cached so both variants share the ~2 s texture."""
    mip0 = em_texture(SIZE_VX, seed)
    mip1 = mip0.reshape(SIZE_VX[0] // 2, 2, SIZE_VX[1] // 2, 2, SIZE_VX[2]).mean(axis=(1, 3)).round().astype(np.uint8)
    return mip0, mip1


def build_replica(root: Path, *, sharded: bool, seed: int = 0, missing: dict[int, tuple] = MISSING) -> Replica:
    """Write a two-mip JPEG replica under ``root`` (a folder that becomes the layer); seconds, deterministic."""
    from cloudvolume import chunks as codec

    root = Path(root)
    info = image_info(SIZE_VX, CHUNK_VX, RESOLUTION_NM, VOXEL_OFFSET, encoding="jpeg", mips=2, sharded=sharded, preshift_bits=3, minishard_bits=1)
    url = write_info(root, info)
    rep = Replica(root=root, url=url, sharded=sharded, info=info, missing={m: tuple(missing.get(m, ())) for m in range(2)})
    for mip, data in enumerate(_voxels(seed)):
        scale = info["scales"][mip]
        offset = np.asarray(scale["voxel_offset"])
        decoded = np.zeros_like(data)
        blocks = {}
        for gp in np.ndindex(*grid_size(scale)):
            lo, hi = chunk_bounds(scale, gp)
            a, b = lo - offset, hi - offset
            if gp in rep.missing[mip]:
                continue
            blocks[gp] = data[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        write_chunks(root, info, mip, blocks)
        for gp, block in blocks.items():
            # What any reader must return: the JPEG round trip of each written chunk (never the pre-encoding voxels).
            lo, hi = chunk_bounds(scale, gp)
            a, b = lo - offset, hi - offset
            dec = codec.decode(encode_chunk(block, scale), "jpeg", shape=(*block.shape, 1), dtype=np.uint8)[..., 0]
            decoded[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = dec
        rep.decoded.append(decoded)
    return rep


class Positions(NamedTuple):
    table_xyz: np.ndarray  # (n, 3) int64, 4x4x40 nm units (x, y doubled relative to mip-0 voxels)
    voxel_xyz: np.ndarray  # (n, 3) int64 mip-0 voxels: floor(table * (4, 4, 40) / (8, 8, 40))
    kind: np.ndarray  # "inside" (cube fully in the EM), "edge" (centre in, cube crosses a face), "outside"


def synapse_positions(n: int = 300, *, n_outside: int = 6, n_edge: int = 30, seed: int = 0, cube_zyx=(16, 64, 64)) -> Positions:
    """Synapse-like centres in the replica, in table units, with a known share whose cube is cut by the EM edge.

    ``outside``: the centre itself lies outside the EM bounds (a real table has such synapses; the pipeline drops
    them). ``edge``: the centre is inside but within half a cube of a face, so the cube is zero-filled there and
    flagged. The rest cluster loosely (an axon's boutons share chunks), some of them over a missing chunk.
    """
    rng = np.random.default_rng(seed)
    lo = np.asarray(VOXEL_OFFSET, dtype=np.int64)
    hi = lo + np.asarray(SIZE_VX, dtype=np.int64)
    size = np.asarray(cube_zyx[::-1], dtype=np.int64)
    inner_lo, inner_hi = lo + size // 2, hi - (size - size // 2)  # centre range (inclusive) whose cube fits
    n_inside = n - n_outside - n_edge
    hubs = rng.integers(inner_lo, inner_hi + 1, size=(max(1, n_inside // 30), 3))
    inside = hubs[rng.integers(len(hubs), size=n_inside)] + np.round(rng.normal(0, 1, (n_inside, 3)) * [60, 60, 6]).astype(np.int64)
    inside = np.clip(inside, inner_lo, inner_hi)
    edge = rng.integers(inner_lo, inner_hi + 1, size=(n_edge, 3))
    for i in range(n_edge):
        axis = i % 3
        near_low = bool(rng.integers(2))
        # Close enough to the face that the cube crosses it on either side (the high side has one voxel less room).
        depth = int(rng.integers(0, max(1, size[axis] // 2 - 1)))
        edge[i, axis] = lo[axis] + depth if near_low else hi[axis] - 1 - depth
    outside = rng.integers(lo, hi, size=(n_outside, 3))
    for i in range(n_outside):
        axis = i % 3
        gap = int(rng.integers(1, 40))
        outside[i, axis] = lo[axis] - gap if i % 2 else hi[axis] - 1 + gap
    voxels = np.concatenate([inside, edge, outside])
    kind = np.array(["inside"] * n_inside + ["edge"] * n_edge + ["outside"] * n_outside)
    order = rng.permutation(n)
    voxels, kind = voxels[order], kind[order]
    # Table units: x, y at 4 nm, so any of the two table values that floor to the voxel; z is the same unit.
    table = voxels * np.array([2, 2, 1]) + np.column_stack([rng.integers(0, 2, n), rng.integers(0, 2, n), np.zeros(n, dtype=np.int64)])
    return Positions(table_xyz=table.astype(np.int64), voxel_xyz=voxels.astype(np.int64), kind=kind)


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def replicas(tmp_path_factory) -> dict[str, Replica]:
    """Both variants, built once per session under one folder (the server below serves that folder)."""
    base = tmp_path_factory.mktemp("replicas")
    return {"unsharded": build_replica(base / "em-unsharded", sharded=False), "sharded": build_replica(base / "em-sharded", sharded=True)}


@pytest.fixture(scope="session")
def replica_server(replicas):
    """The replicas over loopback HTTP: 2 ms per request, and the first request of about one path in five is a 503."""
    root = replicas["sharded"].root.parent
    with LoopbackServer(root, latency_ms=2, fail_every=5) as server:
        yield server
