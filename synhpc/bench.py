"""Extraction benchmark: naive per-synapse cutouts vs synhpc's shard reader vs the read-each-chunk-once limit.

Usage::

    frame = bench_extract(cfg, cfg.run_dir / "bench", n_cubes=400)
    print(frame.to_string())        # also <out_dir>/bench_extract.csv and bench_extract.json

For each layout ("dense": synapses clustered so cubes share chunks; "sparse": uniform, so they rarely do) a synthetic
uint8 precomputed volume is written under ``out_dir`` (only the chunks some cube touches, uncompressed like
:mod:`synhpc.world`; the rest reads as missing -> zeros and is never touched). Then, in one process, on the same
centres (Morton-sorted, in shards of ``cfg.cubes.shard_size`` as extraction does) and the same cube shape:

- ``naive``: one ``CloudVolume.download_point`` per synapse, as the notebooks did (minus their unit bugs);
- ``synhpc``: :meth:`synhpc.imagery.CubeReader.cubes` per shard;
- ``limit``: every chunk any cube needs read from its file and decoded exactly once (``read_s``), then every cube cut
  from memory (``cut_s``); ``seconds = read_s + cut_s``.

All chunk files are read once before timing, so every method sees a warm page cache. Every method's cubes are
compared with each other; ``identical`` says they matched byte for byte. A second table (``kind == "compression"``)
writes one shard of the dense cubes with each shard compression and reports size ratio and per-cube decode time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_text
from synhpc.config import Config
from synhpc.geometry import cube_bounds
from synhpc.imagery import CubeReader
from synhpc.manifest import morton_order

RESOLUTION_NM = (8, 8, 40)
COMPRESSIONS = ("none", "lzf", "gzip", "zstd")
COLUMNS = [
    "kind", "layout", "method", "compression", "n_cubes", "chunks", "chunk_reads", "seconds", "read_s", "cut_s",
    "cubes_per_s", "vs_naive", "limit_over_synhpc", "within_1_3x_limit", "identical", "bytes", "size_ratio",
    "decode_ms_per_cube",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- volume


def _texture(shape_xyz: Sequence[int], seed: int) -> np.ndarray:
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
    root: Path, layout: str, n_cubes: int, chunk_xyz: Sequence[int], cube_zyx: Sequence[int], seed: int = 0
) -> tuple[str, np.ndarray, np.ndarray]:
    """Write a sparse-on-disk precomputed volume holding every chunk that ``n_cubes`` cubes touch.

    Returns the ``file://`` URL, the centres (x, y, z) and the texture tile (voxel v holds ``tile[v % tile.shape]``).

    Usage: ``url, centers, tile = build_bench_volume(Path("/tmp/b"), "dense", 400, (64, 64, 16), (16, 48, 48))``
    """
    from cloudvolume import CloudVolume

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
    tile = _texture(tile_shape, seed)

    url = "file://" + str(Path(root).resolve())
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw", resolution=list(RESOLUTION_NM),
        voxel_offset=[0, 0, 0], chunk_size=chunk.tolist(), volume_size=shape.tolist(),
    )  # fmt: skip
    vol = CloudVolume(url, info=info, compress=False, progress=False)
    vol.commit_info()
    key = vol.meta.key(0)
    (Path(root) / key).mkdir(parents=True, exist_ok=True)
    for c in _chunks_of(lo, hi, chunk):
        a = np.asarray(c) * chunk
        b = np.minimum(a + chunk, shape)
        block = _tile_block(tile, a, b)
        # Uncompressed raw chunk: Fortran-ordered X, Y, Z, C bytes, exactly what cloud-volume writes with compress=False.
        _chunk_path(Path(root), key, c, chunk, shape).write_bytes(np.asfortranarray(block).tobytes(order="F"))
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


def _synhpc(reader: CubeReader, shards: list[np.ndarray], cube_zyx: Sequence[int]) -> np.ndarray:
    return np.concatenate([reader.cubes(c, cube_zyx)[0] for c in shards])


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
        l, h = lo[n], hi[n]
        f, g = l // chunk, (h - 1) // chunk
        view = out[n]
        for cx in range(f[0], g[0] + 1):
            x0 = max(l[0], cx * chunk[0])
            x1 = min(h[0], (cx + 1) * chunk[0])
            for cy in range(f[1], g[1] + 1):
                y0 = max(l[1], cy * chunk[1])
                y1 = min(h[1], (cy + 1) * chunk[1])
                for cz in range(f[2], g[2] + 1):
                    z0 = max(l[2], cz * chunk[2])
                    z1 = min(h[2], (cz + 1) * chunk[2])
                    c0 = (cx * chunk[0], cy * chunk[1], cz * chunk[2])
                    src = chunks[(cx, cy, cz)][x0 - c0[0] : x1 - c0[0], y0 - c0[1] : y1 - c0[1], z0 - c0[2] : z1 - c0[2]]
                    view[z0 - l[2] : z1 - l[2], y0 - l[1] : y1 - l[1], x0 - l[0] : x1 - l[0]] = src.T
    return out


def _timed(fn, *args, repeats: int = 1):
    """Result and best wall time of ``repeats`` calls (the best is the least disturbed by other load)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
    return value, best


def _bench_layout(cfg: Config, out_dir: Path, layout: str, n_cubes: int, seed: int, repeats: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    from cloudvolume import CloudVolume

    cube_zyx = [int(v) for v in cfg.cubes.shape_zyx]
    chunk = np.asarray(cfg.world.chunk_vx, dtype=np.int64)
    root = out_dir / f"em-{layout}"
    url, centers, _ = build_bench_volume(root, layout, n_cubes, chunk, cube_zyx, seed)
    order = morton_order(centers // chunk)
    centers = centers[order]
    shards = [centers[i : i + cfg.cubes.shard_size] for i in range(0, len(centers), cfg.cubes.shard_size)]
    lo, hi = cube_bounds(centers, cube_zyx)
    union = sorted(_chunks_of(lo, hi, chunk), key=lambda c: (c[2], c[1], c[0]))
    naive_reads = sum(len(_chunks_of(lo[i : i + 1], hi[i : i + 1], chunk)) for i in range(len(lo)))
    shard_reads = sum(len(_chunks_of(*cube_bounds(s, cube_zyx), chunk)) for s in shards)

    vol = CloudVolume(url, mip=0, bounded=False, fill_missing=True, progress=False, parallel=1)
    key = vol.meta.key(0)
    shape = np.asarray(vol.bounds.maxpt, dtype=np.int64)
    for path in (root / key).iterdir():  # warm the page cache for everyone
        path.read_bytes()
    reader = CubeReader(url, 0, fill_missing=True, threads=cfg.imagery.threads, retries=0)

    naive, t_naive = _timed(_naive, vol, centers, cube_zyx, 0, repeats=repeats)
    mine, t_mine = _timed(_synhpc, reader, shards, cube_zyx, repeats=repeats)
    chunks, t_read = _timed(_limit_read, root, key, union, chunk, shape, repeats=repeats)
    limit, t_cut = _timed(_limit_cut, chunks, lo, hi, chunk, cube_zyx, repeats=repeats)
    identical = bool(np.array_equal(naive, mine) and np.array_equal(mine, limit))
    t_limit = t_read + t_cut
    base = {"kind": "extract", "layout": layout, "n_cubes": len(centers), "chunks": len(union), "identical": identical}
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
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def bench_extract(cfg: Config, out_dir: Path, *, n_cubes: int = 400, layouts: Sequence[str] = ("dense", "sparse"), seed: int = 0, repeats: int = 3) -> pd.DataFrame:
    """Time naive, synhpc and limit cube extraction per layout, plus shard compression; write csv + json.

    Usage: ``print(bench_extract(cfg, cfg.run_dir / "bench").to_string())``
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    first_cubes = None
    for layout in layouts:
        layout_rows, cubes = _bench_layout(cfg, out_dir, layout, n_cubes, seed, repeats)
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
        "shard_size": cfg.cubes.shard_size,
        "threads": cfg.imagery.threads,
        "repeats": repeats,
        "timing": "best of `repeats` wall times per method, warm page cache, one process",
        "goals": {"vs_naive_dense": 5.0, "within_limit": 1.3},
        "rows": json.loads(frame.to_json(orient="records")),
    }
    write_text(out_dir / "bench_extract.json", json.dumps(summary, indent=1))
    return frame
