"""Extraction benchmark: naive per-synapse cutouts vs synhpc's shard reader vs the read-each-chunk-once limit.

Usage::

    frame = bench_extract(cfg, cfg.run_dir / "bench", n_cubes=400)
    print(frame.to_string())        # also <out_dir>/bench_extract.csv and bench_extract.json

Layouts (:data:`LAYOUTS`): "dense" (synapses clustered so cubes share chunks) and "sparse" (uniform, so they rarely
do) are local raw chunks of ``cfg.world.chunk_vx``, read through ``file://`` with a warm page cache. "http-jpeg" and
"http-jpeg-sharded" are the dense centres over JPEG chunks of minnie65's 128x128x16 voxels, unsharded or in
``neuroglancer_uint64_sharded_v1`` shard files, served from a separate process on loopback HTTP with
``latency_ms`` slept before every answer (:class:`synhpc.replicas.ServerProcess`). Each volume holds only the chunks
some cube touches. Then, on the same centres (Morton-sorted, in shards of ``cfg.cubes.shard_size`` as extraction
does) and the same cube shape:

- ``naive``: one ``CloudVolume.download_point`` per synapse, as the notebooks did (minus their unit bugs);
- ``synhpc``: :meth:`synhpc.imagery.CubeReader.cubes` per shard, one reader for all shards as an extraction task
  does (a fresh reader per turn, opened before the clock starts: cold index and chunk caches);
- ``limit``: every chunk any cube needs fetched and decoded exactly once (``read_s``). Local layouts then cut every
  cube from memory (``cut_s``; ``seconds = read_s + cut_s``). HTTP layouts stop at decoding (``cut_s = 0``): the
  chunks' byte locations are looked up beforehand (cloud-volume's shard reader, untimed) and fetched with as many
  requests in flight as synhpc uses (``fetch_threads``).

synhpc and the limit run in turns (A B A B ...) and keep their best time, so load from other processes falls on
both alike. Every method's cubes are compared with each other; ``identical`` says they matched byte for byte. A
second table (``kind == "compression"``) writes one shard of the dense cubes with each shard compression and reports
size ratio and per-cube decode time.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_text
from synhpc.config import Config
from synhpc.geometry import cube_bounds
from synhpc.imagery import CubeReader
from synhpc.manifest import morton_order
from synhpc.replicas import ServerProcess, image_info, write_chunks, write_info

RESOLUTION_NM = (8, 8, 40)
MINNIE_CHUNK_VX = (128, 128, 16)  # minnie65 EM chunks; the HTTP layouts use them
COMPRESSIONS = ("none", "lzf", "gzip", "zstd")
# layout -> (centre placement, chunk encoding, sharded, served over HTTP)
LAYOUTS: dict[str, tuple[str, str, bool, bool]] = {
    "dense": ("dense", "raw", False, False),
    "sparse": ("sparse", "raw", False, False),
    "http-jpeg": ("dense", "jpeg", False, True),
    "http-jpeg-sharded": ("dense", "jpeg", True, True),
}
COLUMNS = [
    "kind", "layout", "method", "encoding", "sharded", "latency_ms", "fetch_threads", "compression", "n_cubes",
    "chunks", "chunk_reads", "seconds", "read_s", "cut_s", "cubes_per_s", "vs_naive", "limit_over_synhpc",
    "within_1_3x_limit", "identical", "bytes", "size_ratio", "decode_ms_per_cube",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- volume


def em_texture(shape_xyz: Sequence[int], seed: int) -> np.ndarray:
    """EM-like uint8 texture (X, Y, Z): smooth membranes-and-cytoplasm field plus shot noise, periodic in x and y.

    Random uniform voxels would make every compression look useless; this has roughly the entropy of real EM.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape_xyz).astype(np.float32), sigma=(3, 3, 0.7), mode="wrap")
    field /= field.std() + 1e-6
    membranes = np.exp(-(field**2) / 0.05)  # thin dark sheets on the zero level set
    grey = 150 + 25 * np.tanh(field) - 90 * membranes + rng.normal(0, 9, shape_xyz)
    return np.clip(grey, 0, 255).astype(np.uint8)


def _centers(layout: str, n: int, shape_xyz: np.ndarray, chunk: np.ndarray, cube_xyz: np.ndarray, seed: int) -> np.ndarray:
    """Synapse centres (x, y, z voxels) whose cubes lie fully inside the volume."""
    rng = np.random.default_rng(seed)
    lo = cube_xyz // 2
    hi = shape_xyz - cube_xyz + cube_xyz // 2  # exclusive: centre + (cube - cube // 2) <= shape
    if layout == "sparse":
        return rng.integers(lo, hi, size=(n, 3))
    if layout != "dense":
        raise ValueError(f"unknown layout {layout!r} (dense or sparse)")
    # Clusters of ~64 synapses (an axon's boutons in a small neighbourhood) spread over about 3x3x2 chunks each.
    n_clusters = max(1, n // 64)
    hubs = rng.integers(lo + chunk, np.maximum(hi - chunk, lo + chunk + 1), size=(n_clusters, 3))
    offsets = rng.normal(0, 1, size=(n, 3)) * chunk * np.array([1.0, 1.0, 0.7])
    pts = hubs[rng.integers(n_clusters, size=n)] + np.round(offsets).astype(np.int64)
    return np.clip(pts, lo, hi - 1)


def _chunks_of(lo: np.ndarray, hi: np.ndarray, chunk: np.ndarray) -> set[tuple[int, int, int]]:
    found: set[tuple[int, int, int]] = set()
    first, last = lo // chunk, (hi - 1) // chunk
    for a, b in zip(first.tolist(), last.tolist()):
        for cx in range(a[0], b[0] + 1):
            for cy in range(a[1], b[1] + 1):
                for cz in range(a[2], b[2] + 1):
                    found.add((cx, cy, cz))
    return found


def _chunk_path(root: Path, key: str, c: tuple[int, int, int], chunk: np.ndarray, shape: np.ndarray) -> Path:
    a = np.asarray(c) * chunk
    b = np.minimum(a + chunk, shape)
    return root / key / f"{a[0]}-{b[0]}_{a[1]}-{b[1]}_{a[2]}-{b[2]}"


def build_bench_volume(
    root: Path,
    layout: str,
    n_cubes: int,
    chunk_xyz: Sequence[int],
    cube_zyx: Sequence[int],
    seed: int = 0,
    *,
    encoding: str = "raw",
    sharded: bool = False,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Write a sparse-on-disk precomputed volume holding every chunk that ``n_cubes`` cubes touch.

    ``layout`` places the centres ("dense" or "sparse"). Returns the ``file://`` URL, the centres (x, y, z) and the
    texture tile (voxel v holds ``tile[v % tile.shape]`` before encoding; raw chunks keep it exactly).

    Usage: ``url, centers, tile = build_bench_volume(Path("/tmp/b"), "dense", 400, (64, 64, 16), (16, 48, 48))``
    """
    chunk = np.asarray(chunk_xyz, dtype=np.int64)
    cube_xyz = np.asarray(cube_zyx[::-1], dtype=np.int64)
    per_axis = np.maximum(cube_xyz // chunk + 2, 1)  # chunks one cube can touch per axis
    if layout == "sparse":
        # Enough room that two random cubes rarely share a chunk: ~16 cube footprints per cube.
        grid = np.ceil(np.cbrt(16 * n_cubes * per_axis.prod()) * np.array([1.6, 1.6, 0.4])).astype(np.int64)
    else:
        grid = np.ceil(np.cbrt(n_cubes / 8 * per_axis.prod()) * np.array([1.4, 1.4, 0.5])).astype(np.int64)
    grid = np.maximum(grid, per_axis + 2)
    shape = grid * chunk
    centers = _centers(layout, n_cubes, shape, chunk, cube_xyz, seed)
    lo, hi = cube_bounds(centers, cube_zyx)
    tile_shape = chunk * np.maximum(1, np.array([256, 256, 32]) // chunk)
    tile = em_texture(tile_shape, seed)

    # Shards of 2**(3 + 6) chunks, 64 per minishard: small next to minnie65's, but several files and minishards.
    info = image_info(shape, chunk, RESOLUTION_NM, (0, 0, 0), encoding=encoding, sharded=sharded, preshift_bits=6, minishard_bits=3)
    url = write_info(Path(root), info)
    blocks = {}
    for c in _chunks_of(lo, hi, chunk):
        a = np.asarray(c) * chunk
        blocks[c] = _tile_block(tile, a, np.minimum(a + chunk, shape))
    write_chunks(Path(root), info, 0, blocks)
    return url, centers, tile


def _tile_block(tile: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    idx = [np.arange(a[i], b[i]) % tile.shape[i] for i in range(3)]
    return tile[np.ix_(*idx)]


# ---------------------------------------------------------------------------------------------------------- methods


def _naive(vol, centers: np.ndarray, cube_zyx: Sequence[int], mip: int) -> np.ndarray:
    """One ``download_point`` per synapse. Its box is ``pt - size//2 .. pt + size//2``, one voxel short for odd
    sizes, so odd axes ask for one more voxel around ``pt + 1`` and crop: the same box as :func:`cube_bounds`."""
    size = np.asarray(cube_zyx[::-1], dtype=np.int64)
    odd = size % 2
    out = np.zeros((len(centers), *cube_zyx), dtype=np.uint8)
    for n, c in enumerate(centers):
        cut = vol.download_point(tuple(int(v) for v in c + odd), size=tuple(int(v) for v in size + odd), mip=mip)
        xyz = np.asarray(cut)[: size[0], : size[1], : size[2], 0]
        out[n] = xyz.transpose(2, 1, 0)
    return out


def _synhpc(reader: CubeReader, shards: list[np.ndarray], cube_zyx: Sequence[int]) -> tuple[np.ndarray, int]:
    """Cubes of every shard through one reader, as an extraction task does; and how many chunks it fetched."""
    cubes = np.concatenate([reader.cubes(c, cube_zyx)[0] for c in shards])
    return cubes, reader.chunks_read


def _limit_requests(vol, chunks: list[tuple[int, int, int]]) -> list[tuple[str, int | None, int | None, tuple[int, int, int]]]:
    """(path under the layer, byte range or None, chunk dims) per chunk; shard locations come from cloud-volume."""
    from cloudvolume.datasource.precomputed.common import compressed_morton_code

    key, chunk = vol.meta.key(0), np.asarray(vol.chunk_size, dtype=np.int64)
    lo, hi = np.asarray(vol.bounds.minpt, dtype=np.int64), np.asarray(vol.bounds.maxpt, dtype=np.int64)
    dims, names = [], []
    for c in chunks:
        a = lo + np.asarray(c) * chunk
        b = np.minimum(a + chunk, hi)
        dims.append(tuple(int(v) for v in b - a))
        names.append(f"{key}/{a[0]}-{b[0]}_{a[1]}-{b[1]}_{a[2]}-{b[2]}")
    if not vol.image.is_sharded(0):
        return [(name, None, None, d) for name, d in zip(names, dims)]
    grid = -(-(hi - lo) // chunk)
    codes = [int(v) for v in compressed_morton_code(chunks, grid)]
    where = vol.image.shard_reader(mip=0).exists(codes, path=key, return_byte_range=True)
    return [(where[code][0], where[code][1], where[code][1] + where[code][2], d) for code, d in zip(codes, dims)]


def _limit_fetch(http, pool, base: str, requests: list, encoding: str) -> list[np.ndarray]:
    """Fetch and decode every chunk once, ``pool``'s workers in flight: the floor for any remote reader."""
    from cloudvolume import chunks as codec

    def one(req):
        path, start, stop, dims = req
        headers = {"Range": f"bytes={start}-{stop - 1}"} if start is not None else None
        data = http.request("GET", f"{base}/{path}", headers=headers).data
        return codec.decode(data, encoding, shape=(*dims, 1), dtype=np.uint8)[..., 0]

    return list(pool.map(one, requests))


def _limit_read(root: Path, key: str, chunks: list[tuple[int, int, int]], chunk: np.ndarray, shape: np.ndarray) -> dict:
    """Every needed chunk: one open, one read, one zero-copy reshape (raw encoding has nothing else to decode)."""
    out = {}
    for c in chunks:
        a = np.asarray(c) * chunk
        dims = tuple(int(v) for v in np.minimum(a + chunk, shape) - a)
        raw = _chunk_path(root, key, c, chunk, shape).read_bytes()
        out[c] = np.frombuffer(raw, dtype=np.uint8).reshape(dims, order="F")
    return out


def _limit_cut(chunks: dict, lo: np.ndarray, hi: np.ndarray, chunk: np.ndarray, cube_zyx: Sequence[int]) -> np.ndarray:
    """Cut cubes (Z, Y, X) out of in-memory X, Y, Z chunks; the cheapest copy loop we know in numpy."""
    out = np.empty((len(lo), *cube_zyx), dtype=np.uint8)
    for n in range(len(lo)):
        a, b = lo[n], hi[n]
        f, g = a // chunk, (b - 1) // chunk
        view = out[n]
        for cx in range(f[0], g[0] + 1):
            x0 = max(a[0], cx * chunk[0])
            x1 = min(b[0], (cx + 1) * chunk[0])
            for cy in range(f[1], g[1] + 1):
                y0 = max(a[1], cy * chunk[1])
                y1 = min(b[1], (cy + 1) * chunk[1])
                for cz in range(f[2], g[2] + 1):
                    z0 = max(a[2], cz * chunk[2])
                    z1 = min(b[2], (cz + 1) * chunk[2])
                    c0 = (cx * chunk[0], cy * chunk[1], cz * chunk[2])
                    src = chunks[(cx, cy, cz)][x0 - c0[0] : x1 - c0[0], y0 - c0[1] : y1 - c0[1], z0 - c0[2] : z1 - c0[2]]
                    view[z0 - a[2] : z1 - a[2], y0 - a[1] : y1 - a[1], x0 - a[0] : x1 - a[0]] = src.T
    return out


def _timed(fn, *args, repeats: int = 1):
    """Result and best wall time of ``repeats`` calls (the best is the least disturbed by other load)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
    return value, best


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Results and best wall times of several methods run in turns (A B C A B C ...), so that load from other
    processes, which comes and goes, falls on all of them alike rather than on whichever ran during a burst."""
    values: dict[str, Any] = {}
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(max(1, repeats)):
        for name, call in calls.items():
            start = time.perf_counter()
            values[name] = call()
            best[name] = min(best[name], time.perf_counter() - start)
    return values, best


def _bench_layout(
    cfg: Config, out_dir: Path, layout: str, n_cubes: int, seed: int, repeats: int, latency_ms: float, http_chunk_vx: Sequence[int]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    from cloudvolume import CloudVolume

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    placement, encoding, sharded, http = LAYOUTS[layout]
    cube_zyx = [int(v) for v in cfg.cubes.shape_zyx]
    chunk = np.asarray(http_chunk_vx if http else cfg.world.chunk_vx, dtype=np.int64)
    root = out_dir / f"em-{layout}"
    url, centers, _ = build_bench_volume(root, placement, n_cubes, chunk, cube_zyx, seed, encoding=encoding, sharded=sharded)
    order = morton_order(centers // chunk)
    centers = centers[order]
    shards = [centers[i : i + cfg.cubes.shard_size] for i in range(0, len(centers), cfg.cubes.shard_size)]
    lo, hi = cube_bounds(centers, cube_zyx)
    union = sorted(_chunks_of(lo, hi, chunk), key=lambda c: (c[2], c[1], c[0]))
    naive_reads = sum(len(_chunks_of(lo[i : i + 1], hi[i : i + 1], chunk)) for i in range(len(lo)))
    for path in root.rglob("*"):  # warm the page cache for everyone (the HTTP server reads the same files)
        if path.is_file():
            path.read_bytes()

    server = ServerProcess(out_dir, latency_ms=latency_ms) if http else None
    try:
        if server is not None:
            server.__enter__()
            url = f"{server.url}/{root.name}"
        vol = CloudVolume(url, mip=0, bounded=False, fill_missing=True, progress=False, parallel=1)

        def new_reader() -> CubeReader:
            return CubeReader(url, 0, fill_missing=True, threads=cfg.imagery.threads, retries=0)

        fetch_threads = new_reader().fetch_threads
        # The naive method pays the latency once per cube; one pass is as good as three there. cloud-volume runs
        # more download threads than its HTTP pool keeps connections, and urllib3 warns about each one it drops.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        naive, t_naive = _timed(_naive, vol, centers, cube_zyx, 0, repeats=1 if http else repeats)
        # Local runs take tens of milliseconds, where one preemption by another process shows: take more turns.
        turns = max(1, repeats if http else 3 * repeats)
        # A fresh reader per turn (cold index and chunk caches), opened before the clock starts.
        readers = [new_reader() for _ in range(turns)]

        def run_synhpc():
            return _synhpc(readers.pop(), shards, cube_zyx)

        if http:
            from concurrent.futures import ThreadPoolExecutor

            import urllib3

            requests = _limit_requests(vol, union)
            client = urllib3.PoolManager(maxsize=fetch_threads)
            with ThreadPoolExecutor(fetch_threads) as pool:
                calls = {"synhpc": run_synhpc, "read": lambda: _limit_fetch(client, pool, url, requests, encoding)}
                values, best = _interleaved(calls, turns)
            chunks, t_cut = dict(zip(union, values["read"])), 0.0
            limit = _limit_cut(chunks, lo, hi, chunk, cube_zyx)  # for the comparison only: the HTTP limit stops at decoding
        else:
            key, shape = vol.meta.key(0), np.asarray(vol.bounds.maxpt, dtype=np.int64)
            in_memory = _limit_read(root, key, union, chunk, shape)
            calls = {
                "synhpc": run_synhpc,
                "read": lambda: _limit_read(root, key, union, chunk, shape),
                "cut": lambda: _limit_cut(in_memory, lo, hi, chunk, cube_zyx),
            }
            values, best = _interleaved(calls, turns)
            limit, t_cut = values["cut"], best["cut"]
        (mine, shard_reads), t_mine, t_read = values["synhpc"], best["synhpc"], best["read"]
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    identical = bool(np.array_equal(naive, mine) and np.array_equal(mine, limit))
    t_limit = t_read + t_cut
    base = {"kind": "extract", "layout": layout, "encoding": encoding, "sharded": sharded, "latency_ms": latency_ms if http else 0.0,
            "fetch_threads": fetch_threads, "n_cubes": len(centers), "chunks": len(union), "identical": identical}  # fmt: skip
    rows = [
        base | {"method": "naive", "chunk_reads": naive_reads, "seconds": t_naive},
        base | {"method": "synhpc", "chunk_reads": shard_reads, "seconds": t_mine,
                "limit_over_synhpc": t_limit / t_mine, "within_1_3x_limit": bool(t_mine <= 1.3 * t_limit)},
        base | {"method": "limit", "chunk_reads": len(union), "seconds": t_limit, "read_s": t_read, "cut_s": t_cut},
    ]  # fmt: skip
    for row in rows:
        row["cubes_per_s"] = len(centers) / row["seconds"]
        row["vs_naive"] = t_naive / row["seconds"]
    return rows, mine


def _bench_compression(cubes: np.ndarray, out_dir: Path, repeats: int = 3) -> list[dict[str, Any]]:
    """One shard per compression, written with :func:`synhpc.shards.write_shard`'s layout; per-cube reads timed."""
    import h5py

    from synhpc.shards import compression_options

    rows = []
    sizes = {}
    for name in COMPRESSIONS:
        path = out_dir / f"shard-{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("cube", data=cubes, chunks=(1, *cubes.shape[1:]), **compression_options(name))
        sizes[name] = path.stat().st_size
        best = float("inf")
        with h5py.File(path, "r") as f:
            ds = f["cube"]
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(len(cubes)):
                    ds[i]
                best = min(best, time.perf_counter() - start)
        rows.append({"kind": "compression", "method": "h5py", "compression": name, "n_cubes": len(cubes), "bytes": sizes[name],
                     "decode_ms_per_cube": 1000 * best / len(cubes)})  # fmt: skip
    for row in rows:
        row["size_ratio"] = row["bytes"] / sizes["none"]
    return rows


def machine_info() -> dict[str, Any]:
    import cloudvolume
    import h5py

    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cloud_volume": cloudvolume.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def bench_extract(
    cfg: Config,
    out_dir: Path,
    *,
    n_cubes: int = 400,
    layouts: Sequence[str] = tuple(LAYOUTS),
    seed: int = 0,
    repeats: int = 3,
    latency_ms: float = 20.0,
    http_chunk_vx: Sequence[int] = MINNIE_CHUNK_VX,
) -> pd.DataFrame:
    """Time naive, synhpc and limit cube extraction per layout, plus shard compression; write csv + json.

    Usage: ``print(bench_extract(cfg, cfg.run_dir / "bench").to_string())``
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    first_cubes = None
    for layout in layouts:
        layout_rows, cubes = _bench_layout(cfg, out_dir, layout, n_cubes, seed, repeats, latency_ms, http_chunk_vx)
        rows.extend(layout_rows)
        if first_cubes is None:
            first_cubes = cubes[: cfg.cubes.shard_size]
    if first_cubes is not None:
        rows.extend(_bench_compression(first_cubes, out_dir))
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    frame.to_csv(out_dir / "bench_extract.csv", index=False)
    summary = {
        "machine": machine_info(),
        "cube_shape_zyx": list(cfg.cubes.shape_zyx),
        "chunk_vx": list(cfg.world.chunk_vx),
        "http_chunk_vx": list(http_chunk_vx),
        "latency_ms": latency_ms,
        "shard_size": cfg.cubes.shard_size,
        "threads": cfg.imagery.threads,
        "repeats": repeats,
        "timing": "best wall time per method; synhpc and limit run in turns, `repeats` turns over HTTP and 3 x `repeats` "
        "locally; naive: `repeats` passes locally, one over HTTP; warm page cache; HTTP from a loopback server in a "
        "second process",
        "goals": {"vs_naive_dense": 5.0, "vs_naive_http": 5.0, "within_limit": 1.3},
        "rows": json.loads(frame.to_json(orient="records")),
    }
    write_text(out_dir / "bench_extract.json", json.dumps(summary, indent=1))
    return frame
