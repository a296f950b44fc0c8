"""Read EM cubes from Neuroglancer precomputed volumes with cloud-volume, touching every needed chunk once.

Usage::

    reader = CubeReader("file:///data/em", mip=0)
    cubes, edge = reader.cubes(centers_xyz, shape_zyx=(16, 48, 48))  # (n, Z, Y, X) uint8, (n,) bool

Per-cube cutouts re-decode each chunk for every cube that touches it; grouping the cubes of a spatially coherent
shard into runs of needed chunks reads each chunk once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from synhpc.errors import DataError
from synhpc.geometry import cube_bounds


def resolve_url(url: str) -> str:
    """Make ``file://relative/path`` absolute (cloud-volume needs absolute file paths); add a precomputed scheme."""
    if url.startswith("precomputed://"):
        url = url[len("precomputed://") :]
    if url.startswith("file://"):
        path = url[len("file://") :]
        return "file://" + str(Path(path).resolve())
    return url


def open_volume(url: str, mip: int, fill_missing: bool = True):
    """A CloudVolume at ``mip`` that zero-fills outside the volume; one-line DataError when unreachable."""
    from cloudvolume import CloudVolume  # cloud-volume is slow to import; only readers pay for it

    resolved = resolve_url(url)
    if resolved.startswith("file://") and not Path(resolved[len("file://") :], "info").is_file():
        raise DataError(f"imagery {url}: no precomputed volume there (missing info file)")
    try:
        vol = CloudVolume(resolved, mip=mip, bounded=False, fill_missing=fill_missing, progress=False, parallel=1)
    except Exception as exc:  # cloud-volume raises many types for network/permission trouble
        raise DataError(f"imagery {url}: cannot open ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if mip >= len(vol.scales):
        raise DataError(f"imagery {url}: mip {mip} does not exist (volume has {len(vol.scales)} mips)")
    return vol


class CubeReader:
    """Cuts cubes out of one precomputed volume at one mip."""

    def __init__(self, url: str, mip: int = 0, *, fill_missing: bool = True, threads: int = 4, retries: int = 4):
        self.url, self.mip, self.fill_missing = url, mip, fill_missing
        self.threads, self.retries = max(1, threads), retries
        vol = open_volume(url, mip, fill_missing)
        self.resolution_nm = np.asarray(vol.resolution, dtype=np.float64)
        self.chunk = np.asarray(vol.chunk_size, dtype=np.int64)
        self.vol_lo = np.asarray(vol.bounds.minpt, dtype=np.int64)
        self.vol_hi = np.asarray(vol.bounds.maxpt, dtype=np.int64)
        self.dtype = np.dtype(vol.dtype)
        self._local = threading.local()
        self._local.vol = vol

    def _volume(self):
        vol = getattr(self._local, "vol", None)
        if vol is None:
            vol = self._local.vol = open_volume(self.url, self.mip, self.fill_missing)
        return vol

    def _download(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """One cutout as X, Y, Z, retried with exponential backoff on I/O errors."""
        for attempt in range(self.retries + 1):
            try:
                data = self._volume().download((slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])), mip=self.mip)
                return np.asarray(data)[..., 0]
            except Exception as exc:
                if attempt == self.retries or not _transient(exc):
                    raise DataError(f"imagery {self.url}: reading {lo.tolist()}-{hi.tolist()} failed: {exc.__class__.__name__}: {exc}") from None
                time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def read_chunks(self, chunks: np.ndarray) -> dict[tuple[int, int, int], np.ndarray]:
        """Every listed chunk, read once, as X, Y, Z arrays keyed by chunk index.

        Chunk files are fetched by name and decoded with cloud-volume's own decoder: a ``CloudVolume.download`` per
        run costs ~3 ms of planning and painting, more than reading the chunk. Local volumes use plain ``open``
        (CloudFiles' batched get polls with sleeps); remote ones fetch every name in one threaded batch, which
        hides latency. Sharded volumes keep the run-based path.
        """
        from cloudfiles import CloudFiles
        from cloudvolume.datasource.precomputed.image import rx
        from cloudvolume.lib import Bbox

        vol = self._volume()
        if len(chunks) == 0 or vol.image.is_sharded(self.mip):
            return self._read_runs(chunks)
        key = vol.meta.key(self.mip)
        starts = (self.vol_lo + np.asarray(chunks) * self.chunk).tolist()
        stops = np.minimum(np.asarray(starts) + self.chunk, self.vol_hi).tolist()
        # The precomputed chunk file name, "x0-x1_y0-y1_z0-z1", built from ints (a Bbox per chunk costs more).
        names = [f"{key}/{a[0]}-{b[0]}_{a[1]}-{b[1]}_{a[2]}-{b[2]}" for a, b in zip(starts, stops)]
        cloudpath = vol.meta.cloudpath
        for attempt in range(self.retries + 1):
            try:
                if cloudpath.startswith("file://"):
                    base = cloudpath[len("file://") :].rstrip("/")
                    contents = [_read_local(f"{base}/{name}") for name in names]
                else:
                    cf = getattr(self._local, "cf", None)
                    if cf is None:
                        cf = self._local.cf = CloudFiles(cloudpath, num_threads=max(8, 4 * self.threads))
                    got = {f["path"]: f["content"] for f in cf.get(names)}
                    contents = [got[name] for name in names]
                break
            except Exception as exc:
                if attempt == self.retries or not _transient(exc):
                    raise DataError(f"imagery {self.url}: reading {len(names)} chunk(s) failed: {exc.__class__.__name__}: {exc}") from None
                time.sleep(min(30.0, 0.5 * 2**attempt))
        raw = vol.meta.encoding(self.mip) == "raw" and vol.meta.num_channels == 1
        out = {}
        for c, a, b, content in zip(chunks.tolist(), starts, stops, contents):
            dims = (b[0] - a[0], b[1] - a[1], b[2] - a[2])
            if raw and content is not None and len(content) == self.dtype.itemsize * dims[0] * dims[1] * dims[2]:
                # Raw chunks are Fortran-ordered X, Y, Z: a zero-copy view instead of rx.decode's copy.
                out[tuple(c)] = np.frombuffer(content, dtype=self.dtype).reshape(dims, order="F")
            else:
                # rx.decode handles every other encoding and turns a missing chunk into zeros (or an error).
                out[tuple(c)] = np.asarray(rx.decode(vol.meta, Bbox(a, b), content, self.fill_missing, self.mip))[..., 0]
        return out

    def needed_chunks(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Unique chunk grid indices (x, y, z) that the boxes touch inside the volume."""
        clo = np.maximum(lo, self.vol_lo)
        chi = np.minimum(hi, self.vol_hi)
        inside = (chi > clo).all(axis=1)
        first = (clo[inside] - self.vol_lo) // self.chunk
        last = (chi[inside] - 1 - self.vol_lo) // self.chunk
        found: set[tuple[int, int, int]] = set()
        for a, b in zip(first.tolist(), last.tolist()):
            for cx in range(a[0], b[0] + 1):
                for cy in range(a[1], b[1] + 1):
                    for cz in range(a[2], b[2] + 1):
                        found.add((cx, cy, cz))
        return np.array(sorted(found, key=lambda c: (c[2], c[1], c[0])), dtype=np.int64).reshape(-1, 3)

    def _runs(self, chunks: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Group needed chunks into maximal runs along x, so one download covers several chunks."""
        start = prev = None
        for c in chunks:
            if prev is not None and c[1] == prev[1] and c[2] == prev[2] and c[0] == prev[0] + 1:
                prev = c
                continue
            if start is not None:
                yield start, prev
            start = prev = c
        if start is not None:
            yield start, prev

    def _read_runs(self, chunks: np.ndarray) -> dict[tuple[int, int, int], np.ndarray]:
        """Every listed chunk through ``CloudVolume.download``, one call per run along x (sharded volumes)."""
        runs = list(self._runs(chunks))

        def fetch(run: tuple[np.ndarray, np.ndarray]) -> list[tuple[tuple[int, int, int], np.ndarray]]:
            first, last = run
            lo = self.vol_lo + first * self.chunk
            hi = np.minimum(self.vol_lo + (last + 1) * self.chunk, self.vol_hi)
            block = self._download(lo, hi)
            out = []
            for cx in range(int(first[0]), int(last[0]) + 1):
                x0 = (cx - first[0]) * self.chunk[0]
                out.append(((cx, int(first[1]), int(first[2])), block[x0 : x0 + self.chunk[0]]))
            return out

        result: dict[tuple[int, int, int], np.ndarray] = {}
        if self.threads == 1 or len(runs) < 2:
            for part in map(fetch, runs):
                result.update(part)
            return result
        with ThreadPoolExecutor(self.threads) as pool:
            for part in pool.map(fetch, runs):
                result.update(part)
        return result

    def cubes(self, centers_xyz: np.ndarray, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Cubes (n, Z, Y, X) around ``centers_xyz`` (voxels at this mip); outside voxels are 0 and flagged."""
        lo, hi = cube_bounds(np.asarray(centers_xyz, dtype=np.int64).reshape(-1, 3), shape_zyx)
        edge = ((lo < self.vol_lo) | (hi > self.vol_hi)).any(axis=1)
        chunks = self.read_chunks(self.needed_chunks(lo, hi))
        out = np.zeros((len(lo), *shape_zyx), dtype=self.dtype)
        for n in range(len(lo)):
            self._fill(out[n], lo[n], hi[n], chunks)
        return out, edge

    def _fill(self, cube: np.ndarray, lo: np.ndarray, hi: np.ndarray, chunks: dict) -> None:
        # Plain ints: this runs for every cube x chunk pair, and numpy scalar arithmetic costs more than the copy.
        lo_, hi_ = lo.tolist(), hi.tolist()
        vlo, vhi, size = self.vol_lo.tolist(), self.vol_hi.tolist(), self.chunk.tolist()
        clo = [max(lo_[i], vlo[i]) for i in range(3)]
        chi = [min(hi_[i], vhi[i]) for i in range(3)]
        if any(chi[i] <= clo[i] for i in range(3)):
            return
        first = [(clo[i] - vlo[i]) // size[i] for i in range(3)]
        last = [(chi[i] - 1 - vlo[i]) // size[i] for i in range(3)]
        for cx in range(first[0], last[0] + 1):
            x0 = vlo[0] + cx * size[0]
            xa, xb = max(clo[0], x0), min(chi[0], x0 + size[0])
            for cy in range(first[1], last[1] + 1):
                y0 = vlo[1] + cy * size[1]
                ya, yb = max(clo[1], y0), min(chi[1], y0 + size[1])
                for cz in range(first[2], last[2] + 1):
                    z0 = vlo[2] + cz * size[2]
                    za, zb = max(clo[2], z0), min(chi[2], z0 + size[2])
                    src = chunks[(cx, cy, cz)][xa - x0 : xb - x0, ya - y0 : yb - y0, za - z0 : zb - z0]
                    # Chunks are X, Y, Z; cubes are Z, Y, X.
                    cube[za - lo_[2] : zb - lo_[2], ya - lo_[1] : yb - lo_[1], xa - lo_[0] : xb - lo_[0]] = src.T


# Suffixes cloud-volume/cloudfiles give compressed chunk files, in the order cloudfiles tries them.
_SUFFIXES = (("", None), (".gz", "gzip"), (".br", "br"), (".zstd", "zstd"), (".xz", "xz"), (".bz2", "bzip2"))


def _read_local(path: str) -> bytes | None:
    """A local chunk file's decompressed bytes, or None when no variant exists (a missing chunk)."""
    from cloudfiles import compression

    for suffix, method in _SUFFIXES:
        try:
            with open(path + suffix, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        return compression.decompress(data, method) if method else data
    return None


def _transient(exc: Exception) -> bool:
    """Network hiccups are retried; missing data and programming errors are not."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, (FileNotFoundError, PermissionError))
    return exc.__class__.__name__ in {"HTTPError", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError", "SSLError"}
