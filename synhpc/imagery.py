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

    def read_chunks(self, chunks: np.ndarray) -> dict[tuple[int, int, int], np.ndarray]:
        """Every listed chunk, read once, as X, Y, Z arrays keyed by chunk index."""
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
        clo = np.maximum(lo, self.vol_lo)
        chi = np.minimum(hi, self.vol_hi)
        if (chi <= clo).any():
            return
        first = (clo - self.vol_lo) // self.chunk
        last = (chi - 1 - self.vol_lo) // self.chunk
        for cx in range(first[0], last[0] + 1):
            for cy in range(first[1], last[1] + 1):
                for cz in range(first[2], last[2] + 1):
                    key = (cx, cy, cz)
                    c0 = self.vol_lo + np.array(key) * self.chunk
                    a = np.maximum(clo, c0)
                    b = np.minimum(chi, c0 + self.chunk)
                    src = chunks[key][a[0] - c0[0] : b[0] - c0[0], a[1] - c0[1] : b[1] - c0[1], a[2] - c0[2] : b[2] - c0[2]]
                    # Chunks are X, Y, Z; cubes are Z, Y, X.
                    cube[a[2] - lo[2] : b[2] - lo[2], a[1] - lo[1] : b[1] - lo[1], a[0] - lo[0] : b[0] - lo[0]] = src.transpose(2, 1, 0)


def _transient(exc: Exception) -> bool:
    """Network hiccups are retried; missing data and programming errors are not."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, (FileNotFoundError, PermissionError))
    return exc.__class__.__name__ in {"HTTPError", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError", "SSLError"}
