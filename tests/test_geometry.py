import numpy as np
import pytest
from conftest import make_volume

from synhpc.geometry import cube_bounds, to_voxels
from synhpc.imagery import CubeReader


def expected_cube(data_xyz: np.ndarray, center, shape_zyx, offset=(0, 0, 0)) -> np.ndarray:
    """The contract, written out voxel by voxel: cube[k, j, i] == EM[c - size//2 + (i, j, k)], 0 outside."""
    Z, Y, X = shape_zyx
    out = np.zeros(shape_zyx, dtype=np.uint8)
    for k in range(Z):
        for j in range(Y):
            for i in range(X):
                x = center[0] - X // 2 + i - offset[0]
                y = center[1] - Y // 2 + j - offset[1]
                z = center[2] - Z // 2 + k - offset[2]
                if 0 <= x < data_xyz.shape[0] and 0 <= y < data_xyz.shape[1] and 0 <= z < data_xyz.shape[2]:
                    out[k, j, i] = data_xyz[x, y, z]
    return out


def test_to_voxels_microns_units():
    # 4x4x40 nm table units to 8x8x40 nm mip 0: x, y halve (floored), z unchanged.
    pos = np.array([[1001, 2003, 17], [0, 1, 0]])
    assert to_voxels(pos, (4, 4, 40), (8, 8, 40)).tolist() == [[500, 1001, 17], [0, 0, 0]]
    # mip 1 is 16x16x40: x, y quarter.
    assert to_voxels(pos, (4, 4, 40), (16, 16, 40)).tolist() == [[250, 500, 17], [0, 0, 0]]
    # A table already in nm.
    assert to_voxels(np.array([[800, 800, 400]]), (1, 1, 1), (8, 8, 40)).tolist() == [[100, 100, 10]]


def test_cube_bounds_even_and_odd_shapes():
    lo, hi = cube_bounds(np.array([[10, 20, 30]]), (5, 4, 3))
    assert lo.tolist() == [[9, 18, 28]] and hi.tolist() == [[12, 22, 33]]


@pytest.mark.parametrize("shape_zyx", [(8, 16, 16), (5, 7, 9)])
def test_cubes_match_volume_exactly_including_edges(random_volume, shape_zyx):
    url, data = random_volume
    centers = np.array(
        [[50, 45, 15], [0, 0, 0], [99, 89, 29], [3, 80, 2], [70, 2, 28], [31, 31, 7], [32, 32, 8], [120, 45, 15]]
    )
    reader = CubeReader(url, mip=0, threads=2)
    cubes, edge, missing = reader.cubes(centers, shape_zyx)
    for n, c in enumerate(centers):
        np.testing.assert_array_equal(cubes[n], expected_cube(data, c, shape_zyx), err_msg=f"center {c.tolist()}")
    Z, Y, X = shape_zyx
    size, extent = (X, Y, Z), (100, 90, 30)
    inside = [all(c[a] - size[a] // 2 >= 0 and c[a] - size[a] // 2 + size[a] <= extent[a] for a in range(3)) for c in centers]
    assert edge.tolist() == [not v for v in inside]
    assert not missing.any()  # voxels outside the volume are not missing chunks


def test_table_positions_at_mip0_and_mip1(tmp_path):
    """A 4x4x40 table against an 8x8x40 and a 16x16x40 copy of the same tissue: same physical cube centre."""
    rng = np.random.default_rng(3)
    fine = rng.integers(0, 256, size=(64, 64, 12), dtype=np.uint8)
    coarse = fine.reshape(32, 2, 32, 2, 12).mean(axis=(1, 3)).astype(np.uint8)
    url0 = make_volume(tmp_path / "mip0", fine, resolution=(8, 8, 40), chunk=(16, 16, 4))
    url1 = make_volume(tmp_path / "mip1", coarse, resolution=(16, 16, 40), chunk=(16, 16, 4))
    table = np.array([[60, 70, 6], [4, 124, 0], [127, 3, 11]])
    for url, res, data in ((url0, (8, 8, 40), fine), (url1, (16, 16, 40), coarse)):
        centers = to_voxels(table, (4, 4, 40), res)
        cubes, _, _ = CubeReader(url, mip=0).cubes(centers, (4, 8, 8))
        for n, c in enumerate(centers):
            np.testing.assert_array_equal(cubes[n], expected_cube(data, c, (4, 8, 8)))


def test_nonzero_voxel_offset(tmp_path):
    data = np.random.default_rng(5).integers(1, 256, size=(40, 40, 10), dtype=np.uint8)
    url = make_volume(tmp_path / "off", data, chunk=(16, 16, 4), offset=(100, 200, 5))
    centers = np.array([[120, 220, 10], [100, 200, 5], [139, 239, 14]])
    cubes, edge, missing = CubeReader(url).cubes(centers, (4, 8, 8))
    for n, c in enumerate(centers):
        np.testing.assert_array_equal(cubes[n], expected_cube(data, c, (4, 8, 8), offset=(100, 200, 5)))
    assert edge.tolist() == [False, True, True] and missing.tolist() == [0, 0, 0]


def test_each_chunk_read_once(random_volume, monkeypatch):
    import synhpc.imagery as imagery

    url, _ = random_volume
    reader = CubeReader(url, threads=1)
    reads = []
    original = imagery._read_local
    monkeypatch.setattr(imagery, "_read_local", lambda path: reads.append(path.rsplit("/", 1)[1]) or original(path))
    centers = np.array([[40, 40, 12], [42, 41, 13], [44, 40, 11], [45, 45, 12]])  # heavily overlapping cubes
    lo, hi = cube_bounds(centers, (8, 16, 16))
    reader.cubes(centers, (8, 16, 16))
    assert len(reads) == len(set(reads))
    expected = {f"{32 * x}-{min(32 * x + 32, 100)}_{32 * y}-{min(32 * y + 32, 90)}_{8 * z}-{min(8 * z + 8, 30)}" for x, y, z in reader.needed_chunks(lo, hi).tolist()}
    assert set(reads) == expected and len(expected) == 3


@pytest.mark.parametrize("mip", [0, 1])
def test_cubes_match_the_synthetic_world_exactly(tmp_path, mip):
    """Table positions (4x4x40 nm) -> voxels of the world's mip 0 (8x8x40) and mip 1 (16x16x40): cubes equal the
    volume's voxels, and cubes crossing the volume edge are zero-filled and flagged."""
    import pandas as pd
    from cloudvolume import CloudVolume

    from synhpc.config import WorldConfig
    from synhpc.world import build_world

    root = build_world(WorldConfig(path=str(tmp_path / "w"), shape_vx=[96, 96, 24], chunk_vx=[32, 32, 8], n_neurons=6, n_synapses=30, unlabeled_fraction=0.0), progress=False)
    vol = CloudVolume("file://" + str(root / "em"), mip=mip, progress=False)
    data = np.asarray(vol[:, :, :])[..., 0]
    table = pd.read_csv(root / "synapses_pni_2.csv.gz")
    positions = table[["ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"]].to_numpy()
    centers = to_voxels(positions, (4, 4, 40), vol.resolution)
    shape = (16, 24, 24)
    cubes, edge, missing = CubeReader("file://" + str(root / "em"), mip=mip).cubes(centers, shape)
    for n, c in enumerate(centers):
        np.testing.assert_array_equal(cubes[n], expected_cube(data, c, shape), err_msg=f"synapse {table['id'][n]}")
    assert edge.any(), "the world should place some synapses within half a cube of its edge"
    lo, hi = cube_bounds(centers, shape)
    assert edge.tolist() == ((lo < 0) | (hi > np.asarray(data.shape))).any(axis=1).tolist()
    assert not missing.any()
