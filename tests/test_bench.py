"""Extraction benchmark: a tiny run writes its tables, and every method cuts the same cubes (correctness, not speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synhpc.bench import COLUMNS, LAYOUTS, _limit_cut, _limit_read, _naive, _tile_block, bench_extract, build_bench_volume
from synhpc.config import load_config
from synhpc.geometry import cube_bounds
from synhpc.imagery import CubeReader

SMALL = ["cubes.shape_zyx=[6, 20, 18]", "cubes.shard_size=8", "world.chunk_vx=[16, 16, 4]", "imagery.threads=2"]


def test_tiny_bench_writes_tables(tmp_path):
    cfg = load_config("configs/demo.yaml", SMALL)
    frame = bench_extract(cfg, tmp_path, n_cubes=10, repeats=1, latency_ms=1, http_chunk_vx=(32, 32, 8))
    assert list(frame.columns) == COLUMNS
    extract = frame[frame["kind"] == "extract"]
    assert set(extract["layout"]) == set(LAYOUTS) == {"dense", "sparse", "http-jpeg", "http-jpeg-sharded"}
    http = extract[extract["layout"].str.startswith("http")]
    assert (http["encoding"] == "jpeg").all() and (http["latency_ms"] == 1).all() and (http["fetch_threads"] == 8).all()
    assert http.groupby("layout")["sharded"].first().to_dict() == {"http-jpeg": False, "http-jpeg-sharded": True}
    assert (http[http["method"] == "limit"]["cut_s"] == 0).all()  # the HTTP limit fetches and decodes, no cutting
    assert set(extract["method"]) == {"naive", "synhpc", "limit"}
    assert extract["identical"].all()
    assert (extract["n_cubes"] == 10).all() and (extract["cubes_per_s"] > 0).all()
    for _, rows in extract.groupby("layout"):
        rows = rows.set_index("method")
        assert rows.loc["limit", "chunk_reads"] == rows.loc["limit", "chunks"] <= rows.loc["synhpc", "chunk_reads"] <= rows.loc["naive", "chunk_reads"]
        assert rows.loc["limit", "seconds"] == pytest.approx(rows.loc["limit", "read_s"] + rows.loc["limit", "cut_s"])
        assert rows.loc["synhpc", "limit_over_synhpc"] == pytest.approx(rows.loc["limit", "seconds"] / rows.loc["synhpc", "seconds"])
    compression = frame[frame["kind"] == "compression"].set_index("compression")
    assert list(compression.index) == ["none", "lzf", "gzip", "zstd"]
    assert compression.loc["none", "size_ratio"] == 1.0 and (compression["decode_ms_per_cube"] > 0).all()
    assert compression.loc["gzip", "size_ratio"] < 1.0  # the texture is EM-like, not incompressible noise
    saved = json.loads((tmp_path / "bench_extract.json").read_text())
    assert {"cpu_count", "python", "cloud_volume", "date"} <= set(saved["machine"])
    assert len(saved["rows"]) == len(frame) and (tmp_path / "bench_extract.csv").is_file()


@pytest.mark.parametrize("shape_zyx", [(6, 20, 18), (5, 17, 19)])  # odd sizes: download_point's box is one short
def test_all_methods_cut_identical_cubes(tmp_path, shape_zyx):
    from cloudvolume import CloudVolume

    chunk = np.array([16, 16, 4])
    url, centers, tile = build_bench_volume(tmp_path / "em", "dense", 25, chunk, shape_zyx, seed=3)
    vol = CloudVolume(url, mip=0, bounded=False, fill_missing=True, progress=False)
    lo, hi = cube_bounds(centers, shape_zyx)
    # Ground truth straight from the texture the volume was written from.
    truth = np.stack([_tile_block(tile, lo[i], hi[i]).transpose(2, 1, 0) for i in range(len(lo))])
    naive = _naive(vol, centers, shape_zyx, 0)
    mine = CubeReader(url, 0, threads=2).cubes(centers, shape_zyx)[0]
    shape = np.asarray(vol.bounds.maxpt, dtype=np.int64)
    chunks = sorted({tuple(int(v) for v in c) for c in CubeReader(url, 0).needed_chunks(lo, hi)})
    limit = _limit_cut(_limit_read(tmp_path / "em", vol.meta.key(0), chunks, chunk, shape), lo, hi, chunk, shape_zyx)
    for name, cubes in (("naive", naive), ("synhpc", mine), ("limit", limit)):
        np.testing.assert_array_equal(cubes, truth, err_msg=name)


def test_chunk_reads_match_cloudvolume(random_volume):
    """conftest's volume has gzip-compressed chunk files; the reader decodes them to cloud-volume's voxels."""
    from cloudvolume import CloudVolume

    url, data = random_volume
    reader = CubeReader(url, 0)
    lo, hi = cube_bounds(np.array([[50, 45, 15], [3, 3, 2], [99, 89, 29]]), (8, 12, 12))
    chunks = reader.needed_chunks(lo, hi)
    got = reader.read_chunks(chunks)
    vol = CloudVolume(url, progress=False)
    assert set(got) == {tuple(c) for c in chunks.tolist()}
    for (cx, cy, cz), block in got.items():
        a = np.array([cx, cy, cz]) * reader.chunk
        b = np.minimum(a + reader.chunk, reader.vol_hi)
        np.testing.assert_array_equal(block, np.asarray(vol[a[0] : b[0], a[1] : b[1], a[2] : b[2]])[..., 0], err_msg=str((cx, cy, cz)))
        np.testing.assert_array_equal(block, data[a[0] : b[0], a[1] : b[1], a[2] : b[2]])


@pytest.mark.parametrize("sharded", [False, True])
def test_jpeg_bench_volume_cubes_agree(tmp_path, sharded):
    """JPEG (lossy) volumes: naive cloud-volume cutouts and the reader decode the same bytes to the same cubes."""
    from cloudvolume import CloudVolume

    url, centers, _ = build_bench_volume(tmp_path / "em", "dense", 6, (32, 32, 8), (6, 20, 18), seed=1, encoding="jpeg", sharded=sharded)
    vol = CloudVolume(url, mip=0, bounded=False, fill_missing=True, progress=False)
    assert vol.meta.encoding(0) == "jpeg" and vol.image.is_sharded(0) == sharded
    cubes, edge, missing = CubeReader(url, 0, threads=2).cubes(centers, (6, 20, 18))
    np.testing.assert_array_equal(cubes, _naive(vol, centers, (6, 20, 18), 0))
    assert not edge.any() and not missing.any()
