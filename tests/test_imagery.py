"""CubeReader on minnie65-like replicas: exact voxels over file:// and http://, sharded and unsharded, JPEG and raw;
missing chunks read as zeros and counted (or named in a one-line error); transient HTTP failures retried."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_volume
from replica import CHUNK_VX, VOXEL_OFFSET, replica_server, replicas, synapse_positions  # noqa: F401  (fixtures)

from synhpc.errors import DataError
from synhpc.geometry import cube_bounds, to_voxels
from synhpc.imagery import CubeReader
from synhpc.replicas import LoopbackServer, chunk_bounds, chunk_name, image_info, write_chunks, write_info

SHAPE = (16, 64, 64)  # configs/microns.yaml's cube


def reader_for(rep, transport, server=None, **kw):
    url = rep.url if transport == "file" else rep.http_url(server)
    kw.setdefault("backoff_s", 0.001)
    return CubeReader(url, kw.pop("mip", 0), threads=2, **kw)


def expected_missing(rep, centers, shape, mip=0):
    """Per cube, how many of the replica's missing chunks its box overlaps."""
    lo, hi = cube_bounds(np.asarray(centers), shape)
    counts = np.zeros(len(lo), dtype=np.int64)
    for gp in rep.missing[mip]:
        a, b = chunk_bounds(rep.scale(mip), gp)
        counts += ((lo < b) & (hi > a)).all(axis=1)
    return counts


def cloudvolume_cubes(url, centers, shape, mip=0):
    """Independent reference: cloud-volume's own cutout of each cube (it zero-fills missing chunks and the outside)."""
    from cloudvolume import CloudVolume

    vol = CloudVolume(url, mip=mip, bounded=False, fill_missing=True, progress=False)
    lo, hi = cube_bounds(np.asarray(centers), shape)
    return np.stack([np.asarray(vol[a[0] : b[0], a[1] : b[1], a[2] : b[2]])[..., 0].transpose(2, 1, 0) for a, b in zip(lo, hi)])


@pytest.mark.parametrize("transport", ["file", "http"])
@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_cubes_are_the_decoded_chunks_exactly(replicas, replica_server, variant, transport):
    rep = replicas[variant]
    pos = synapse_positions()
    centers = to_voxels(pos.table_xyz, (4, 4, 40), (8, 8, 40))
    assert (centers == pos.voxel_xyz).all()
    reader = reader_for(rep, transport, replica_server)
    cubes, edge, missing = reader.cubes(centers, SHAPE)
    np.testing.assert_array_equal(cubes, rep.expected_cubes(centers, SHAPE))
    assert edge.tolist() == (pos.kind != "inside").tolist()
    np.testing.assert_array_equal(missing, expected_missing(rep, centers, SHAPE))
    assert missing.max() >= 1 and (missing == 0).sum() > len(missing) // 2, "the positions should cross a missing chunk sometimes"
    assert reader.missing_chunks == sum(1 for gp in rep.missing[0] if gp in {tuple(c) for c in reader.needed_chunks(*cube_bounds(centers, SHAPE)).tolist()})
    # cloud-volume's own reader agrees on a sample, edges and missing chunks included.
    pick = np.concatenate([np.flatnonzero(missing > 0)[:2], np.flatnonzero(edge)[:2], np.flatnonzero(~edge & (missing == 0))[:2]])
    np.testing.assert_array_equal(cubes[pick], cloudvolume_cubes(rep.url, centers[pick], SHAPE))


def test_replica_positions_cover_inside_edge_and_outside(replicas):
    """The positions the end-to-end tests use: deterministic, table units, and each kind where it says it is."""
    pos = synapse_positions()
    again = synapse_positions()
    assert np.array_equal(pos.table_xyz, again.table_xyz) and pos.table_xyz.dtype == np.int64
    lo, hi = replicas["sharded"].bounds(0)
    inside_em = ((pos.voxel_xyz >= lo) & (pos.voxel_xyz < hi)).all(axis=1)
    assert {k: int((pos.kind == k).sum()) for k in ("inside", "edge", "outside")} == {"inside": 264, "edge": 30, "outside": 6}
    assert inside_em.tolist() == (pos.kind != "outside").tolist()
    clo, chi = cube_bounds(pos.voxel_xyz, SHAPE)
    crosses = ((clo < lo) | (chi > hi)).any(axis=1)
    assert crosses.tolist() == (pos.kind != "inside").tolist()


@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_mip1_table_positions_and_offset(replicas, variant):
    """4x4x40 table units -> 16x16x40 voxels at mip 1, whose voxel_offset is half of mip 0's in x and y."""
    rep = replicas[variant]
    reader = CubeReader(rep.url, mip=1, threads=2)
    assert reader.vol_lo.tolist() == [VOXEL_OFFSET[0] // 2, VOXEL_OFFSET[1] // 2, VOXEL_OFFSET[2]]
    assert reader.resolution_nm.tolist() == [16, 16, 40]
    pos = synapse_positions(60, n_edge=6, n_outside=2, seed=4)
    centers = to_voxels(pos.table_xyz, (4, 4, 40), (16, 16, 40))
    assert (centers == np.floor(pos.table_xyz / [4, 4, 1]).astype(np.int64)).all()
    cubes, _, missing = reader.cubes(centers, (8, 32, 32))
    np.testing.assert_array_equal(cubes, rep.expected_cubes(centers, (8, 32, 32), mip=1))
    np.testing.assert_array_equal(missing, expected_missing(rep, centers, (8, 32, 32), mip=1))


def test_nonzero_offset_geometry(replicas):
    """Chunks start at voxel_offset (not at multiples of the chunk size); voxel v of the EM is decoded[v - offset]."""
    rep = replicas["unsharded"]
    reader = CubeReader(rep.url, threads=1)
    off = np.asarray(VOXEL_OFFSET)
    assert reader.vol_lo.tolist() == list(VOXEL_OFFSET) and reader.chunk.tolist() == list(CHUNK_VX)
    first = f"{off[0]}-{off[0] + 128}_{off[1]}-{off[1] + 128}_{off[2]}-{off[2] + 16}"
    assert (rep.root / "8_8_40" / first).is_file() and first == chunk_name(rep.scale(0), (0, 0, 0))
    # The volume's first voxel at the centre of a (2, 4, 4) cube: the low half is outside and reads 0. Then a cube
    # inside, one with only the first voxel in its far corner, and one just past the far x face.
    cubes, edge, missing = reader.cubes(np.array([off, off + [300, 200, 30], off - [1, 1, 0], off + [514, 0, 0]]), (2, 4, 4))
    assert edge.tolist() == [True, False, True, True] and missing.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(cubes[0, 1:, 2:, 2:], rep.decoded[0][:2, :2, :1].transpose(2, 1, 0))
    assert not cubes[0, :1].any() and not cubes[0, :, :2].any() and not cubes[0, :, :, :2].any()
    np.testing.assert_array_equal(cubes[1], rep.decoded[0][298:302, 198:202, 29:31].transpose(2, 1, 0))
    assert cubes[2, 1, 3, 3] == rep.decoded[0][0, 0, 0] and cubes[2].sum() == rep.decoded[0][0, 0, 0]
    assert not cubes[3].any()  # just past the far x face: nothing inside, nothing read


@pytest.mark.parametrize("transport", ["file", "http"])
@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_missing_chunk_reads_zeros_and_is_counted(replicas, replica_server, variant, transport):
    rep = replicas[variant]
    lo, hi = chunk_bounds(rep.scale(0), (1, 2, 1))  # missing, deep inside
    middle = (lo + hi) // 2
    straddle = np.array([lo[0], middle[1], middle[2]])  # half in the missing chunk, half in its present neighbour
    reader = reader_for(rep, transport, replica_server)
    cubes, edge, missing = reader.cubes(np.array([middle, straddle]), (8, 32, 32))
    assert not cubes[0].any() and missing.tolist() == [1, 1] and not edge.any()
    assert not cubes[1][:, :, 16:].any() and cubes[1][:, :, :16].any()
    np.testing.assert_array_equal(cubes, rep.expected_cubes(np.array([middle, straddle]), (8, 32, 32)))
    assert reader.missing_chunks == 1 and reader.cubes_with_missing == 2
    reader.cubes(np.array([middle]), (8, 32, 32))
    assert reader.missing_chunks == 2  # a running total over calls


@pytest.mark.parametrize("transport", ["file", "http"])
@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_fill_missing_false_names_the_chunk(replicas, replica_server, variant, transport):
    rep = replicas[variant]
    reader = reader_for(rep, transport, replica_server, fill_missing=False)
    lo, hi = chunk_bounds(rep.scale(0), (1, 2, 1))
    present = chunk_bounds(rep.scale(0), (2, 2, 1))
    cubes, _, missing = reader.cubes(np.array([(present[0] + present[1]) // 2]), (8, 32, 32))  # untouched: reads fine
    assert missing.tolist() == [0] and cubes.any()
    with pytest.raises(DataError) as err:
        reader.cubes(np.array([(lo + hi) // 2]), (8, 32, 32))
    message = str(err.value)
    assert "\n" not in message and chunk_name(rep.scale(0), (1, 2, 1)) in message and "missing" in message
    assert reader.url in message and "fill_missing" in message
    if variant == "sharded":
        assert ".shard" in message


def test_missing_shard_file_reads_zeros(replicas, tmp_path):
    """A shard file that does not exist at all: every chunk it would hold is missing."""
    rep = replicas["sharded"]
    copy = tmp_path / "em"
    shutil.copytree(rep.root, copy)
    (copy / "8_8_40" / "1.shard").unlink()
    reader = CubeReader("file://" + str(copy), threads=2)
    centers = synapse_positions().voxel_xyz
    full = reader_for(rep, "file").cubes(centers, SHAPE)
    cubes, _, missing = reader.cubes(centers, SHAPE)
    assert (missing >= full[2]).all() and (missing > full[2]).any()
    gone = missing > full[2]
    assert not np.array_equal(cubes[gone], full[0][gone]) and np.array_equal(cubes[~gone], full[0][~gone])
    with pytest.raises(DataError, match=r"1\.shard"):
        CubeReader("file://" + str(copy), fill_missing=False).cubes(centers[gone][:1], SHAPE)


@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_transient_failures_are_retried(replicas, variant):
    """503s and dropped connections on the first request of many paths: retried, and every voxel still arrives."""
    rep = replicas[variant]
    centers = synapse_positions(80, seed=2).voxel_xyz
    folder = f"/{rep.root.name}/8_8_40"
    named = {f"{folder}/0.shard": "fail", f"{folder}/1.shard": "reset"} if variant == "sharded" else {}
    with LoopbackServer(rep.root.parent, latency_ms=1, fail_every=2, reset_every=3, faults=named) as server:
        reader = CubeReader(rep.http_url(server), threads=2, retries=3, backoff_s=0.001)
        cubes, _, missing = reader.cubes(centers, SHAPE)
        stats = server.stats()
    np.testing.assert_array_equal(cubes, rep.expected_cubes(centers, SHAPE))
    np.testing.assert_array_equal(missing, expected_missing(rep, centers, SHAPE))
    assert stats["fail"] >= 1 and stats["reset"] >= 1


def test_exhausted_retries_and_404s(replicas):
    """A path that keeps failing ends in one line naming it; a 404 (missing chunk) is asked for once, not retried."""
    rep = replicas["unsharded"]
    lo, hi = chunk_bounds(rep.scale(0), (1, 2, 1))
    with LoopbackServer(rep.root.parent) as server:
        reader = CubeReader(rep.http_url(server), threads=2, retries=2, backoff_s=0.001)
        _, _, missing = reader.cubes(np.array([(lo + hi) // 2]), (8, 32, 32))
        assert missing.tolist() == [1]
        assert server.hits(f"/{rep.root.name}/8_8_40/{chunk_name(rep.scale(0), (1, 2, 1))}") == 1
        server.fail_every, server.fail_count = 1, 100  # from now on every request fails
        present = chunk_bounds(rep.scale(0), (2, 1, 1))
        with pytest.raises(DataError) as err:
            reader.cubes(np.array([(present[0] + present[1]) // 2]), (8, 32, 32))
        name = chunk_name(rep.scale(0), (2, 1, 1))
        assert server.hits(f"/{rep.root.name}/8_8_40/{name}") == 3  # 1 try + 2 retries
    message = str(err.value)
    assert "\n" not in message and name in message and "3 tries" in message and "HTTP 503" in message


def test_sharded_indices_are_read_once_per_reader(replicas):
    """Chunks (0,0,0) and (1,0,0) share a minishard: once its index is known, a chunk costs one range request."""
    rep = replicas["sharded"]
    a, b = (np.add(*chunk_bounds(rep.scale(0), gp)) // 2 for gp in ((0, 0, 0), (1, 0, 0)))
    with LoopbackServer(rep.root.parent) as server:
        warm = CubeReader(rep.http_url(server), threads=2)
        warm.cubes(np.array([a]), (4, 16, 16))
        before = server.stats()["requests"]
        warm.cubes(np.array([b]), (4, 16, 16))
        warm_cost = server.stats()["requests"] - before
        fresh = CubeReader(rep.http_url(server), threads=2)
        before = server.stats()["requests"]
        fresh.cubes(np.array([b]), (4, 16, 16))
        fresh_cost = server.stats()["requests"] - before
    assert (warm_cost, fresh_cost) == (1, 3)  # data only; vs shard index + minishard index + data


def test_previous_calls_chunks_are_not_read_again(replicas):
    """Consecutive shards share border chunks: the last call's chunks are reused, older ones are read again."""
    rep = replicas["unsharded"]
    inner, other = (np.add(*chunk_bounds(rep.scale(0), gp)) // 2 for gp in ((2, 2, 2), (2, 1, 2)))
    path = f"/{rep.root.name}/8_8_40/{chunk_name(rep.scale(0), (2, 2, 2))}"
    with LoopbackServer(rep.root.parent) as server:
        reader = CubeReader(rep.http_url(server), threads=2)
        first = reader.cubes(np.array([inner]), (4, 16, 16))[0]
        again = reader.cubes(np.array([inner + 1]), (4, 16, 16))[0]
        assert server.hits(path) == 1
        reader.cubes(np.array([other]), (4, 16, 16))
        last = reader.cubes(np.array([inner]), (4, 16, 16))[0]
        assert server.hits(path) == 2
    np.testing.assert_array_equal(first, last)
    np.testing.assert_array_equal(again, rep.expected_cubes(np.array([inner + 1]), (4, 16, 16)))


def test_corrupt_chunk_is_a_one_line_error(replicas, tmp_path):
    rep = replicas["unsharded"]
    copy = tmp_path / "em"
    shutil.copytree(rep.root, copy)
    name = chunk_name(rep.scale(0), (2, 2, 2))
    (copy / "8_8_40" / name).write_bytes(b"not a jpeg")
    lo, hi = chunk_bounds(rep.scale(0), (2, 2, 2))
    with pytest.raises(DataError) as err:
        CubeReader("file://" + str(copy)).cubes(np.array([(lo + hi) // 2]), (4, 8, 8))
    assert "\n" not in str(err.value) and name in str(err.value) and "jpeg" in str(err.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_raw_encoding_with_missing_chunks(tmp_path, sharded):
    """Raw chunks (the local fast path when unsharded) with a missing chunk: zeros and a count, over file and http."""
    data = np.random.default_rng(11).integers(1, 256, size=(40, 36, 12), dtype=np.uint8)
    info = image_info(data.shape, (16, 16, 4), (8, 8, 40), (1000, 2000, 300), encoding="raw", sharded=sharded, preshift_bits=2, minishard_bits=1)
    url = write_info(tmp_path / "raw", info)
    scale = info["scales"][0]
    blocks = {}
    for gp in np.ndindex(3, 3, 3):
        if gp != (1, 1, 1):
            a, b = (x - np.array([1000, 2000, 300]) for x in chunk_bounds(scale, gp))
            blocks[gp] = data[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
    write_chunks(tmp_path / "raw", info, 0, blocks)
    truth = data.copy()
    truth[16:32, 16:32, 4:8] = 0
    centers = np.array([[1024, 2024, 306], [1005, 2030, 301], [1039, 2035, 311]])
    padded = np.pad(truth, 8)
    expected = np.stack([padded[c[0] - 1000 : c[0] - 1000 + 16, c[1] - 2000 : c[1] - 2000 + 16, c[2] - 300 + 6 : c[2] - 300 + 10].transpose(2, 1, 0) for c in centers])
    with LoopbackServer(tmp_path) as server:
        for u in (url, f"{server.url}/raw"):
            cubes, edge, missing = CubeReader(u, threads=2).cubes(centers, (4, 16, 16))
            np.testing.assert_array_equal(cubes, expected, err_msg=u)
            assert missing.tolist() == [1, 0, 0] and edge.tolist() == [False, True, True]


def test_missing_chunk_in_gzip_raw_volume_reads_zeros(tmp_path):
    """The regression: a chunk file deleted from an unsharded volume crashed the chunk reader under fill_missing."""
    data = np.random.default_rng(3).integers(1, 256, size=(64, 64, 16), dtype=np.uint8)
    url = make_volume(tmp_path / "em", data, chunk=(32, 32, 8))
    files = sorted((tmp_path / "em" / "8_8_40").iterdir())
    victim = next(f for f in files if f.name.startswith("32-64_0-32_0-8"))
    victim.unlink()
    cubes, _, missing = CubeReader(url).cubes(np.array([[40, 10, 4], [10, 10, 4]]), (4, 8, 8))
    assert not cubes[0].any() and cubes[1].all() and missing.tolist() == [1, 0]
    with pytest.raises(DataError, match="32-64_0-32_0-8"):
        CubeReader(url, fill_missing=False).cubes(np.array([[40, 10, 4]]), (4, 8, 8))


def test_timeouts_are_retried(replicas):
    """A server that stalls past the client's read timeout on the first request for a chunk: asked again, read."""
    rep = replicas["unsharded"]
    lo, hi = chunk_bounds(rep.scale(0), (2, 2, 2))
    path = f"/{rep.root.name}/8_8_40/{chunk_name(rep.scale(0), (2, 2, 2))}"
    with LoopbackServer(rep.root.parent, faults={path: "stall"}, stall_s=1.0) as server:
        reader = CubeReader(rep.http_url(server), threads=2, retries=2, backoff_s=0.001, timeout_s=0.2)
        cubes, _, missing = reader.cubes(np.array([(lo + hi) // 2]), (4, 16, 16))
        assert server.hits(path) == 2 and server.stats()["stall"] == 1
    np.testing.assert_array_equal(cubes, rep.expected_cubes(np.array([(lo + hi) // 2]), (4, 16, 16)))
    assert missing.tolist() == [0]


def test_gzip_chunk_files_over_http(random_volume):
    """cloud-volume's local layout keeps raw chunks as name.gz; served as the plain name with Content-Encoding: gzip."""
    from pathlib import Path

    url, _ = random_volume
    folder = Path(url[len("file://") :])
    assert any(p.suffix == ".gz" for p in (folder / "8_8_40").iterdir())
    centers = np.array([[50, 45, 15], [3, 3, 2], [99, 89, 29]])
    with LoopbackServer(folder.parent) as server:
        cubes, edge, missing = CubeReader(f"{server.url}/{folder.name}", threads=2).cubes(centers, (8, 12, 12))
    np.testing.assert_array_equal(cubes, CubeReader(url).cubes(centers, (8, 12, 12))[0])
    assert edge.tolist() == [False, True, True] and not missing.any()


@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_other_schemes_go_through_cloudfiles(replicas, variant):
    """gs://, s3:// and the like are read with CloudFiles; mem:// stands in for them here."""
    from cloudfiles import CloudFiles

    rep = replicas[variant]
    bucket = CloudFiles(f"mem://synhpc-test/{variant}")
    for path in rep.root.rglob("*"):
        if path.is_file():
            bucket.put(str(path.relative_to(rep.root)), path.read_bytes(), compress=None, raw=True)
    centers = synapse_positions(40, seed=6).voxel_xyz
    cubes, _, missing = CubeReader(f"mem://synhpc-test/{variant}", threads=2).cubes(centers, SHAPE)
    np.testing.assert_array_equal(cubes, rep.expected_cubes(centers, SHAPE))
    np.testing.assert_array_equal(missing, expected_missing(rep, centers, SHAPE))
