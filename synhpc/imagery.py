"""Read EM cubes from Neuroglancer precomputed volumes, touching every needed chunk once.

Usage::

    reader = CubeReader("precomputed://https://bossdb-open-data.s3.amazonaws.com/iarpa_microns/minnie/minnie65/em")
    cubes, edge, missing = reader.cubes(centers_xyz, shape_zyx=(16, 64, 64))
    # cubes (n, Z, Y, X) uint8; edge (n,) bool: the cube crosses the volume boundary (outside voxels are 0);
    # missing (n,) int: chunks of this cube that do not exist (read as 0 under fill_missing; 0 = fully read)
    reader.missing_chunks                          # running total of missing chunks met by this reader

Per-cube cutouts re-decode each chunk for every cube that touches it; grouping the cubes of a spatially coherent
shard and reading the union of their chunks once is what makes extraction fast. Chunks are fetched and decoded here
rather than through ``CloudVolume.download``: its per-call planning costs more than a local chunk read, and it cannot
say which chunks were missing. cloud-volume still parses the ``info`` and decodes the chunk encodings.

Storage: ``file://`` reads files directly (and the ``.gz``/``.br``/... variants cloud-volume writes); ``http(s)://``
uses one pooled urllib3 client (byte ranges for shard files; 404 and 403 mean "missing"; 5xx, 408, 429, resets and
timeouts are retried with exponential backoff, ``retries`` times); other schemes (``gs://``, ``s3://``) go through
CloudFiles. Sharded scales (``neuroglancer_uint64_sharded_v1``) read each shard's fixed index and the needed
minishard indices once per reader (cached), then fetch chunk byte ranges, merging ranges that touch.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from synhpc.errors import DataError
from synhpc.geometry import cube_bounds

# Merged shard byte ranges stay below this, so one slow response cannot serialize a whole batch.
MAX_BUNDLE_BYTES = 4 << 20
# Shard/minishard index caches are dropped wholesale past this many entries (a reader rarely touches more).
MAX_INDEX_CACHE = 8192


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
        raise DataError(f"imagery {url}: cannot open ({exc.__class__.__name__}: {_first_line(exc)})") from None
    if mip >= len(vol.scales):
        raise DataError(f"imagery {url}: mip {mip} does not exist (volume has {len(vol.scales)} mips)")
    return vol


class _Transient(Exception):
    """A failure worth retrying (5xx, reset, timeout, I/O hiccup)."""


class _Fatal(Exception):
    """A failure retrying cannot fix (4xx other than 404/403, corrupt bytes)."""


class CubeReader:
    """Cuts cubes out of one precomputed volume at one mip (sharded or not, any encoding cloud-volume decodes).

    ``threads`` decode (and, for remote volumes, fetch: ``max(8, 4 * threads)`` requests in flight) in parallel;
    ``retries`` transient failures per request are retried after ``backoff_s * 2**attempt`` seconds (jittered,
    capped at 30 s). ``fill_missing=False`` turns a missing chunk into a DataError naming it. The previous call's
    chunks stay in memory (at most ``keep_mb``) for the next call.
    """

    def __init__(
        self,
        url: str,
        mip: int = 0,
        *,
        fill_missing: bool = True,
        threads: int = 4,
        retries: int = 4,
        backoff_s: float = 0.25,
        timeout_s: float = 60.0,
        keep_mb: float = 512.0,
    ):
        self.url, self.mip, self.fill_missing = url, mip, fill_missing
        self.threads, self.retries, self.backoff_s, self.timeout_s = max(1, threads), max(0, retries), backoff_s, timeout_s
        self.keep_mb = keep_mb
        vol = open_volume(url, mip, fill_missing)
        meta = vol.meta
        self.resolution_nm = np.asarray(vol.resolution, dtype=np.float64)
        self.chunk = np.asarray(vol.chunk_size, dtype=np.int64)
        self.vol_lo = np.asarray(vol.bounds.minpt, dtype=np.int64)
        self.vol_hi = np.asarray(vol.bounds.maxpt, dtype=np.int64)
        self.grid = -(-(self.vol_hi - self.vol_lo) // self.chunk)
        self.dtype = np.dtype(vol.dtype)
        self.encoding = meta.encoding(mip)
        self.channels = int(meta.num_channels)
        self.block_size = meta.compressed_segmentation_block_size(mip) or (8, 8, 8)
        self.key = meta.key(mip)
        self.cloudpath = meta.cloudpath
        self.sharding = None
        if vol.image.is_sharded(mip):
            from cloudvolume.datasource.precomputed.sharding import ShardingSpecification

            self.sharding = ShardingSpecification.from_dict(vol.scale["sharding"])
        self.local = self.cloudpath.startswith("file://")
        self.fetch_threads = self.threads if self.local else max(8, 4 * self.threads)
        self.missing_chunks = 0  # chunks found missing by this reader, over all calls
        self.chunks_read = 0  # chunks fetched (the previous call's chunks are reused, not fetched)
        self.cubes_with_missing = 0
        self._shard_index: dict[str, np.ndarray | None] = {}
        self._minishard: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
        self._recent: dict[tuple[int, int, int], np.ndarray | None] = {}
        self._pid = -1
        self._pool: ThreadPoolExecutor | None = None
        self._store: _Store | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------- plumbing

    def _ensure(self) -> None:
        """Thread pool and storage client, created on first use and again in a forked child."""
        if self._pid == os.getpid() and self._store is not None:
            return
        self._pid = os.getpid()
        self._store = _make_store(self.cloudpath, self.key, self.fetch_threads, self.timeout_s)
        self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="synhpc-imagery")
        weakref.finalize(self, self._pool.shutdown, wait=False)

    def _map(self, fn: Callable, items: list) -> list:
        if len(items) <= 1 or self.fetch_threads == 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def _get(self, name: str, what: str | None, start: int | None = None, stop: int | None = None) -> bytes | None:
        """One object (or byte range of it) under the scale's folder; None when it does not exist.

        ``what`` names it in errors (default: ``chunk <name>``).
        """
        for attempt in range(self.retries + 1):
            try:
                return self._store.get(name, start, stop)
            except (_Transient, _Fatal) as exc:
                what = what or f"chunk {name}"
                if isinstance(exc, _Fatal):
                    raise DataError(f"imagery {self.url}: {what}: {exc}") from None
                if attempt >= self.retries:
                    raise DataError(f"imagery {self.url}: {what}: still failing after {attempt + 1} tries ({exc})") from None
                delay = min(30.0, self.backoff_s * 2**attempt)
                time.sleep(delay * (0.5 + random.random() / 2))  # jitter: retries of one batch do not arrive together
        raise AssertionError("unreachable")

    def _name(self, c: Sequence[int]) -> str:
        a = [int(self.vol_lo[i] + c[i] * self.chunk[i]) for i in range(3)]
        b = [min(a[i] + int(self.chunk[i]), int(self.vol_hi[i])) for i in range(3)]
        return f"{a[0]}-{b[0]}_{a[1]}-{b[1]}_{a[2]}-{b[2]}"

    def _dims(self, c: Sequence[int]) -> tuple[int, int, int]:
        a = [int(self.vol_lo[i] + c[i] * self.chunk[i]) for i in range(3)]
        return tuple(min(a[i] + int(self.chunk[i]), int(self.vol_hi[i])) - a[i] for i in range(3))

    def _decode(self, content: bytes | None, dims: tuple[int, int, int], what: str) -> np.ndarray | None:
        """X, Y, Z array of one chunk; None when the chunk is missing."""
        if not content:
            return None
        if self.encoding == "raw":
            expect = self.dtype.itemsize * dims[0] * dims[1] * dims[2] * self.channels
            if len(content) != expect:
                raise DataError(f"imagery {self.url}: {what}: {len(content)} bytes, expected {expect} for a raw {dims} chunk")
            if self.channels == 1:
                # Raw chunks are Fortran-ordered X, Y, Z: a zero-copy view.
                return np.frombuffer(content, dtype=self.dtype).reshape(dims, order="F")
        from cloudvolume import chunks

        try:
            arr = chunks.decode(content, self.encoding, shape=(*dims, self.channels), dtype=self.dtype, block_size=self.block_size)
        except Exception as exc:
            raise DataError(f"imagery {self.url}: {what}: cannot decode {self.encoding} ({exc.__class__.__name__}: {_first_line(exc)})") from None
        arr = np.asarray(arr)
        if arr.shape[:3] != dims:
            raise DataError(f"imagery {self.url}: {what}: decoded shape {arr.shape[:3]}, expected {dims}")
        return arr[..., 0] if arr.ndim == 4 else arr

    # ---------------------------------------------------------------------------------------------- chunk reads

    def read_chunks(self, chunks: np.ndarray) -> dict[tuple[int, int, int], np.ndarray | None]:
        """Every listed chunk (grid indices x, y, z), read once, as X, Y, Z arrays; None for a missing chunk.

        With ``fill_missing=False`` a missing chunk raises a one-line DataError naming it instead. Chunks of the
        previous call are kept (up to ``keep_mb``) and not read again: consecutive Morton-ordered shards share the
        chunks along their common border.
        """
        chunks = np.asarray(chunks, dtype=np.int64).reshape(-1, 3)
        if len(chunks) == 0:
            return {}
        self._ensure()
        keys = [tuple(c) for c in chunks.tolist()]
        recent = self._recent
        todo = [k for k in keys if k not in recent]
        fetched = (self._read_sharded(todo) if self.sharding is not None else self._read_unsharded(todo)) if todo else {}
        self.chunks_read += len(todo)
        out = {k: fetched[k] if k in fetched else recent[k] for k in keys}
        lost = [k for k in keys if out[k] is None]
        if lost:
            if not self.fill_missing:
                more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
                raise DataError(
                    f"imagery {self.url}: chunk {self._where(lost[0])} is missing{more} at mip {self.mip}; "
                    "set imagery.fill_missing: true to read missing chunks as zeros"
                )
            with self._lock:
                self.missing_chunks += len(lost)
        kept = sum(a.nbytes for a in out.values() if a is not None)
        self._recent = out if kept <= self.keep_mb * 2**20 else {}
        return out

    def _where(self, k: tuple[int, int, int]) -> str:
        """A chunk as a user finds it: its file name, or its bounds, Morton code and shard file."""
        if self.sharding is None:
            return f"{self.key}/{self._name(k)}"
        codes, files, _ = self._locations([k])
        return f"{self._name(k)} (Morton code {int(codes[0])} in {self.key}/{files[0]})"

    def _read_unsharded(self, keys: list[tuple[int, int, int]]):
        starts = self.vol_lo + np.asarray(keys, dtype=np.int64) * self.chunk
        stops = np.minimum(starts + self.chunk, self.vol_hi)
        dims = [tuple(d) for d in (stops - starts).tolist()]
        # The precomputed chunk file name, "x0-x1_y0-y1_z0-z1", built from plain ints: this runs for every chunk.
        names = [f"{a[0]}-{b[0]}_{a[1]}-{b[1]}_{a[2]}-{b[2]}" for a, b in zip(starts.tolist(), stops.tolist())]
        if self.local and self.encoding == "raw" and self.channels == 1:
            # Page-cache reads are cheaper than handing work to threads, and a raw chunk needs no decoding: a
            # zero-copy Fortran-ordered view of its bytes (anything unexpected goes through _decode's checks).
            out = {}
            itemsize = self.dtype.itemsize
            for k, name, d in zip(keys, names, dims):
                content = self._get(name, None)
                if content and len(content) == itemsize * d[0] * d[1] * d[2]:
                    out[k] = np.frombuffer(content, dtype=self.dtype).reshape(d, order="F")
                else:
                    out[k] = self._decode(content, d, f"chunk {name}")
            return out

        def one(i: int) -> np.ndarray | None:
            return self._decode(self._get(names[i], None), dims[i], f"chunk {names[i]}")

        arrays = self._map(one, list(range(len(keys))))
        return dict(zip(keys, arrays))

    def _locations(self, keys: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[str], list[int]]:
        """Compressed Morton code, shard file name and minishard number of each chunk."""
        from cloudvolume.datasource.precomputed.common import compressed_morton_code

        spec = self.sharding
        codes = np.asarray(compressed_morton_code(np.asarray(keys), self.grid), dtype=np.uint64).reshape(-1)
        if spec.hash == "identity":
            ids = codes >> np.uint64(spec.preshift_bits)
            mini = (ids & np.uint64(spec.minishard_mask)).astype(np.int64).tolist()
            shard = ((ids & np.uint64(spec.shard_mask)) >> np.uint64(spec.minishard_bits)).tolist()
            width = math.ceil(int(spec.shard_bits) / 4)
            files = [format(int(s), "x").zfill(width) + ".shard" for s in shard]
        else:
            locs = [spec.compute_shard_location(int(c)) for c in codes.tolist()]
            files = [f"{loc.shard_number}.shard" for loc in locs]
            mini = [int(loc.minishard_number) for loc in locs]
        return codes, files, mini

    def _read_sharded(self, keys: list[tuple[int, int, int]]):
        spec = self.sharding
        codes, files, mini = self._locations(keys)
        index_len = spec.index_length()

        # 1. fixed shard indices (one small range per shard file, cached)
        todo = sorted({f for f in files if f not in self._shard_index})
        for f, content in zip(todo, self._map(lambda f: self._get(f, f"shard index of {self.key}/{f}", 0, index_len), todo)):
            if content is not None and len(content) != index_len:
                raise DataError(f"imagery {self.url}: shard index of {self.key}/{f}: {len(content)} bytes, expected {index_len}")
            # Offsets in the fixed index count from the end of the index itself.
            self._shard_index[f] = None if not content else np.frombuffer(content, dtype="<u8").reshape(-1, 2).astype(np.int64) + index_len

        # 2. minishard indices (cached)
        todo_ms = sorted({(f, m) for f, m in zip(files, mini) if (f, m) not in self._minishard})
        ranges = []
        for f, m in todo_ms:
            index = self._shard_index[f]
            if index is None or index[m, 0] == index[m, 1]:
                self._minishard[(f, m)] = {}
            else:
                ranges.append((f, m, int(index[m, 0]), int(index[m, 1])))

        def fetch_minishard(r):
            f, m, a, b = r
            what = f"minishard {m} index of {self.key}/{f}"
            return self._decode_minishard(self._get(f, what, a, b), what)

        for (f, m, _, _), table in zip(ranges, self._map(fetch_minishard, ranges)):
            self._minishard[(f, m)] = table
        if len(self._shard_index) > MAX_INDEX_CACHE or len(self._minishard) > MAX_INDEX_CACHE:
            keep_s, keep_m = {f: self._shard_index[f] for f in set(files)}, {(f, m): self._minishard[(f, m)] for f, m in zip(files, mini)}
            self._shard_index, self._minishard = keep_s, keep_m

        # 3. chunk data: byte ranges, merged where they touch (Morton order keeps neighbours adjacent)
        out: dict[tuple[int, int, int], np.ndarray | None] = {}
        wanted = []
        for k, code, f, m in zip(keys, codes.tolist(), files, mini):
            span = self._minishard[(f, m)].get(int(code))
            if span is None:
                out[k] = None
            else:
                wanted.append((f, span[0], span[1], k))
        wanted.sort()
        # Merged ranges save requests, but each bundle is decoded by one worker: keep at least as many bundles as
        # workers so decoding still runs in parallel.
        per_bundle = max(1, -(-len(wanted) // self.fetch_threads))
        bundles: list[list[tuple[str, int, int, tuple[int, int, int]]]] = []
        for item in wanted:
            last = bundles[-1] if bundles else None
            if (
                last
                and len(last) < per_bundle
                and last[-1][0] == item[0]
                and last[-1][2] == item[1]
                and item[2] - last[0][1] <= MAX_BUNDLE_BYTES
            ):
                last.append(item)
            else:
                bundles.append([item])

        def fetch_bundle(bundle):
            f, a, b = bundle[0][0], bundle[0][1], bundle[-1][2]
            what = f"chunk {self._name(bundle[0][3])} in {self.key}/{f}"
            content = self._get(f, what, a, b)
            if content is None:
                raise DataError(f"imagery {self.url}: {what}: the shard file vanished while reading it")
            decoded = []
            for _, s, e, k in bundle:
                part = content[s - a : e - a]
                what_k = f"chunk {self._name(k)} in {self.key}/{f}"
                if spec.data_encoding != "raw":
                    part = _decompress(part, spec.data_encoding, what_k, self.url)
                decoded.append((k, self._decode(part, self._dims(k), what_k)))
            return decoded

        for part in self._map(fetch_bundle, bundles):
            out.update(part)
        return out

    def _decode_minishard(self, content: bytes | None, what: str) -> dict[int, tuple[int, int]]:
        """Minishard index -> {chunk id: (start, stop)} in shard-file bytes."""
        if not content:
            return {}
        enc = self.sharding.minishard_index_encoding
        if enc != "raw":
            content = _decompress(content, enc, what, self.url)
        raw = np.frombuffer(content, dtype="<u8")
        if raw.size % 3:
            raise DataError(f"imagery {self.url}: {what}: {len(content)} bytes is not a whole number of entries")
        table = raw.reshape(3, -1).astype(np.int64)
        # Ids and offsets are delta-coded; each offset counts from the end of the previous chunk.
        ids = np.cumsum(table[0].astype(np.uint64))
        sizes = table[2]
        starts = np.cumsum(table[1] + np.concatenate([[0], sizes[:-1]])) + self.sharding.index_length()
        return {int(i): (int(s), int(s + n)) for i, s, n in zip(ids.tolist(), starts.tolist(), sizes.tolist())}

    # --------------------------------------------------------------------------------------------------- cubes

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

    def cubes(self, centers_xyz: np.ndarray, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cubes (n, Z, Y, X) around ``centers_xyz`` (voxels at this mip), the edge flags and missing-chunk counts.

        Voxels outside the volume and voxels of missing chunks are 0. ``edge[i]`` is True when cube i crosses the
        volume boundary; ``missing[i]`` counts the chunks cube i overlaps that do not exist (0 = fully read).
        """
        lo, hi = cube_bounds(np.asarray(centers_xyz, dtype=np.int64).reshape(-1, 3), shape_zyx)
        edge = ((lo < self.vol_lo) | (hi > self.vol_hi)).any(axis=1)
        chunks = self.read_chunks(self.needed_chunks(lo, hi))
        out = np.zeros((len(lo), *shape_zyx), dtype=self.dtype)
        missing = np.zeros(len(lo), dtype=np.int64)
        for n in range(len(lo)):
            missing[n] = self._fill(out[n], lo[n], hi[n], chunks)
        with self._lock:
            self.cubes_with_missing += int((missing > 0).sum())
        return out, edge, missing

    def _fill(self, cube: np.ndarray, lo: np.ndarray, hi: np.ndarray, chunks: dict) -> int:
        """Copy every chunk's share into ``cube``; return how many of its chunks were missing (left 0)."""
        # Plain ints: this runs for every cube x chunk pair, and numpy scalar arithmetic costs more than the copy.
        lo_, hi_ = lo.tolist(), hi.tolist()
        vlo, vhi, size = self.vol_lo.tolist(), self.vol_hi.tolist(), self.chunk.tolist()
        clo = [max(lo_[i], vlo[i]) for i in range(3)]
        chi = [min(hi_[i], vhi[i]) for i in range(3)]
        if any(chi[i] <= clo[i] for i in range(3)):
            return 0
        first = [(clo[i] - vlo[i]) // size[i] for i in range(3)]
        last = [(chi[i] - 1 - vlo[i]) // size[i] for i in range(3)]
        lost = 0
        for cx in range(first[0], last[0] + 1):
            x0 = vlo[0] + cx * size[0]
            xa, xb = max(clo[0], x0), min(chi[0], x0 + size[0])
            for cy in range(first[1], last[1] + 1):
                y0 = vlo[1] + cy * size[1]
                ya, yb = max(clo[1], y0), min(chi[1], y0 + size[1])
                for cz in range(first[2], last[2] + 1):
                    block = chunks[(cx, cy, cz)]
                    if block is None:
                        lost += 1
                        continue
                    z0 = vlo[2] + cz * size[2]
                    za, zb = max(clo[2], z0), min(chi[2], z0 + size[2])
                    src = block[xa - x0 : xb - x0, ya - y0 : yb - y0, za - z0 : zb - z0]
                    # Chunks are X, Y, Z; cubes are Z, Y, X.
                    cube[za - lo_[2] : zb - lo_[2], ya - lo_[1] : yb - lo_[1], xa - lo_[0] : xb - lo_[0]] = src.T
        return lost


# -------------------------------------------------------------------------------------------------------- storage


class _Store:
    """Fetches objects under one scale folder: ``get(name, start, stop)`` -> bytes, or None when absent."""

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> bytes | None:
        raise NotImplementedError


class _LocalStore(_Store):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def get(self, name, start=None, stop=None):
        path = f"{self.folder}/{name}"
        try:
            if start is None:
                return _read_local(path)
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(stop - start)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except PermissionError as exc:
            raise _Fatal(exc.strerror or str(exc)) from None
        except OSError as exc:  # EIO and friends on network file systems come and go
            raise _Transient(f"{exc.__class__.__name__}: {exc}") from None
        except Exception as exc:  # a compressed variant that does not decompress
            raise _Fatal(f"unreadable ({exc.__class__.__name__}: {_first_line(exc)})") from None
        if len(data) != stop - start:
            raise _Fatal(f"file ends at byte {start + len(data)}, wanted bytes {start}-{stop} (truncated shard?)")
        return data


class _HttpStore(_Store):
    def __init__(self, folder: str, connections: int, timeout_s: float) -> None:
        import urllib3

        self.folder = folder
        self.http = urllib3.PoolManager(num_pools=4, maxsize=connections, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=min(10.0, timeout_s), read=timeout_s))  # fmt: skip
        self.errors = urllib3.exceptions.HTTPError

    def get(self, name, start=None, stop=None):
        headers = {"Range": f"bytes={start}-{stop - 1}"} if start is not None else {"Accept-Encoding": "gzip"}
        try:
            resp = self.http.request("GET", f"{self.folder}/{name}", headers=headers)
            data = resp.data
        except self.errors as exc:  # resets, timeouts, refused connections, truncated bodies
            raise _Transient(f"{exc.__class__.__name__}: {_first_line(exc)}") from None
        status = resp.status
        if status in (404, 403):
            # S3 answers 403 for an absent key when the bucket cannot be listed: missing, like cloudfiles says.
            return None
        if status >= 500 or status in (408, 429):
            raise _Transient(f"HTTP {status}")
        if status not in (200, 206):
            raise _Fatal(f"HTTP {status}")
        if start is not None:
            if status == 200:  # a server that ignores Range sends the whole object
                data = data[start:stop]
            if len(data) != stop - start:
                raise _Transient(f"got {len(data)} bytes of range {start}-{stop}")
        return data


class _CloudFilesStore(_Store):
    def __init__(self, folder: str) -> None:
        from cloudfiles import CloudFiles

        self.cf = CloudFiles(folder)

    def get(self, name, start=None, stop=None):
        request = {"path": name} if start is None else {"path": name, "start": start, "end": stop}
        try:
            (result,) = self.cf.get([request])
        except Exception as exc:
            raise _Transient(f"{exc.__class__.__name__}: {_first_line(exc)}") from None
        if result.get("error") is not None:
            raise _Transient(f"{result['error'].__class__.__name__}: {_first_line(result['error'])}")
        return result.get("content")


def _make_store(cloudpath: str, key: str, connections: int, timeout_s: float) -> _Store:
    folder = cloudpath.rstrip("/") + "/" + key
    if folder.startswith("file://"):
        return _LocalStore(folder[len("file://") :])
    if folder.startswith(("http://", "https://")):
        return _HttpStore(folder, connections, timeout_s)
    return _CloudFilesStore(folder)


# Suffixes cloud-volume/cloudfiles give compressed chunk files, in the order cloudfiles tries them.
_SUFFIXES = (("", None), (".gz", "gzip"), (".br", "br"), (".zstd", "zstd"), (".xz", "xz"), (".bz2", "bzip2"))


def _read_local(path: str) -> bytes | None:
    """A local chunk file's decompressed bytes, or None when no variant exists (a missing chunk)."""
    for suffix, method in _SUFFIXES:
        try:
            with open(path + suffix, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        if method is None:
            return data
        from cloudfiles import compression

        return compression.decompress(data, method)
    return None


def _decompress(data: bytes, method: str, what: str, url: str) -> bytes:
    from cloudfiles import compression

    try:
        return compression.decompress(data, method)
    except Exception as exc:
        raise DataError(f"imagery {url}: {what}: cannot {method}-decompress ({exc.__class__.__name__})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
