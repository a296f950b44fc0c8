"""Replicas of remote precomputed EM for tests and benchmarks: a chunk writer and a loopback HTTP server.

Usage::

    info = image_info(size_xyz=[512, 512, 64], chunk_xyz=[128, 128, 16], resolution_nm=[8, 8, 40],
                      voxel_offset=[26385, 30308, 14850], encoding="jpeg", sharded=True)
    write_info(root, info)
    write_chunks(root, info, mip=0, blocks={(0, 0, 0): block_xyz, ...})   # missing grid points stay missing

    with LoopbackServer(root, latency_ms=20, fail_every=7) as server:
        CubeReader(server.url).cubes(centers, (16, 64, 64))
        server.stats()                                                     # requests, 503s, resets, 404s

The writer produces what cloud-volume reads: unsharded chunk files named ``x0-x1_y0-y1_z0-z1`` or
``neuroglancer_uint64_sharded_v1`` shard files keyed by each chunk's compressed Morton code. The server answers GET
and HEAD with HTTP/1.1 keep-alive, byte ranges (sharded reads need them), 404 for absent files, a fixed latency per
request, and deterministic faults: the first request for a path whose CRC-32 falls in the chosen residue class is
answered 503 (``fail_every``) or has its connection dropped without an answer (``reset_every``); later requests for
that path succeed, so a client that retries sees every byte.

``python -m synhpc.replicas ROOT --latency-ms 20`` serves a folder from a separate process (the benchmark does this,
so that serving does not compete with the client for the GIL); it prints the URL on its first line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

# ------------------------------------------------------------------------------------------------------------ writer


def shard_spec(grid_size: Sequence[int], preshift_bits: int, minishard_bits: int, minishard_index_encoding: str = "gzip") -> dict[str, Any]:
    """A ``neuroglancer_uint64_sharded_v1`` spec (identity hash) that uses every bit of the grid's Morton codes.

    ``preshift_bits`` chunks share a minishard (2**preshift_bits of them, a Morton-contiguous block); the rest of the
    bits beyond ``minishard_bits`` pick the shard file.
    """
    total = sum(math.ceil(math.log2(max(1, int(g)))) for g in grid_size)
    shard_bits = max(0, total - preshift_bits - minishard_bits)
    return {
        "@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": int(preshift_bits), "hash": "identity",
        "minishard_bits": int(minishard_bits), "shard_bits": int(shard_bits),
        "minishard_index_encoding": minishard_index_encoding, "data_encoding": "raw",
    }  # fmt: skip


def image_info(
    size_xyz: Sequence[int],
    chunk_xyz: Sequence[int],
    resolution_nm: Sequence[float],
    voxel_offset: Sequence[int] = (0, 0, 0),
    *,
    encoding: str = "jpeg",
    mips: int = 1,
    sharded: bool = False,
    preshift_bits: int = 3,
    minishard_bits: int = 1,
    jpeg_quality: int = 85,
) -> dict[str, Any]:
    """A precomputed ``info`` for a uint8 single-channel image with ``mips`` scales (x, y halve at each mip)."""
    scales = []
    size, offset, res = np.asarray(size_xyz), np.asarray(voxel_offset), np.asarray(resolution_nm, dtype=float)
    for mip in range(mips):
        factor = np.array([2**mip, 2**mip, 1])
        s_size = -(-size // factor)
        scale: dict[str, Any] = {
            "key": "_".join(str(int(v) if float(v).is_integer() else v) for v in res * factor),
            "size": [int(v) for v in s_size], "voxel_offset": [int(v) for v in offset // factor],
            "resolution": [float(v) for v in res * factor], "chunk_sizes": [[int(v) for v in chunk_xyz]],
            "encoding": encoding,
        }  # fmt: skip
        if encoding == "jpeg":
            scale["jpeg_quality"] = int(jpeg_quality)
        if sharded:
            grid = -(-s_size // np.asarray(chunk_xyz))
            total = sum(math.ceil(math.log2(max(1, int(g)))) for g in grid)
            pre = min(preshift_bits, total)
            scale["sharding"] = shard_spec(grid, pre, min(minishard_bits, total - pre))
        scales.append(scale)
    return {"@type": "neuroglancer_multiscale_volume", "type": "image", "data_type": "uint8", "num_channels": 1, "scales": scales}


def write_info(root: Path, info: Mapping[str, Any]) -> str:
    """Write ``root/info``; return the layer's ``file://`` URL."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "info").write_text(json.dumps(info, indent=1))
    return "file://" + str(root.resolve())


def grid_size(scale: Mapping[str, Any]) -> np.ndarray:
    return -(-np.asarray(scale["size"], dtype=np.int64) // np.asarray(scale["chunk_sizes"][0], dtype=np.int64))


def chunk_bounds(scale: Mapping[str, Any], gridpoint: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Absolute voxel bounds [lo, hi) of one chunk (edge chunks are cut at the volume's end)."""
    chunk = np.asarray(scale["chunk_sizes"][0], dtype=np.int64)
    offset, size = np.asarray(scale["voxel_offset"], dtype=np.int64), np.asarray(scale["size"], dtype=np.int64)
    lo = offset + np.asarray(gridpoint, dtype=np.int64) * chunk
    return lo, np.minimum(lo + chunk, offset + size)


def chunk_name(scale: Mapping[str, Any], gridpoint: Sequence[int]) -> str:
    lo, hi = chunk_bounds(scale, gridpoint)
    return f"{lo[0]}-{hi[0]}_{lo[1]}-{hi[1]}_{lo[2]}-{hi[2]}"


def encode_chunk(block_xyz: np.ndarray, scale: Mapping[str, Any]) -> bytes:
    """One chunk's bytes in the scale's encoding (X, Y, Z uint8 in)."""
    from cloudvolume import chunks

    block = np.asarray(block_xyz, dtype=np.uint8)[..., None]
    if scale["encoding"] == "raw":
        return np.asfortranarray(block).tobytes(order="F")
    params = {"quality": scale["jpeg_quality"]} if scale["encoding"] == "jpeg" and "jpeg_quality" in scale else None
    return chunks.encode(block, scale["encoding"], compression_params=params)


def write_chunks(root: Path, info: Mapping[str, Any], mip: int, blocks: Mapping[tuple[int, int, int], np.ndarray]) -> list[str]:
    """Encode and write ``blocks`` (grid point -> X, Y, Z array of that chunk's shape) at ``mip``; return the files.

    Grid points absent from ``blocks`` are missing chunks. A sharded scale is written whole: every shard file that
    holds at least one block (call once per mip with all of its blocks).
    """
    from cloudvolume.datasource.precomputed.common import compressed_morton_code
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_files

    scale = info["scales"][mip]
    folder = Path(root) / scale["key"]
    folder.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for gp, block in blocks.items():
        lo, hi = chunk_bounds(scale, gp)
        if tuple(block.shape) != tuple(int(v) for v in hi - lo):
            raise ValueError(f"block {gp} has shape {block.shape}, the chunk is {tuple((hi - lo).tolist())}")
        encoded[tuple(int(v) for v in gp)] = encode_chunk(block, scale)
    if "sharding" not in scale:
        for gp, content in encoded.items():
            (folder / chunk_name(scale, gp)).write_bytes(content)
        return sorted(chunk_name(scale, gp) for gp in encoded)
    spec = ShardingSpecification.from_dict(scale["sharding"])
    gpts = list(encoded)
    codes = compressed_morton_code(gpts, grid_size(scale)) if gpts else []
    files = synthesize_shard_files(spec, {int(code): encoded[gp] for gp, code in zip(gpts, codes)})
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return sorted(files)


# ------------------------------------------------------------------------------------------------------------ server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as they do with S3/GCS
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stats instead
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        if owner.latency_s > 0:
            time.sleep(owner.latency_s)
        fault = owner._fault(path)
        if fault == "reset":
            # Drop the connection without a status line: the client sees a reset / remote disconnect.
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        if fault == "fail":
            self._send(503, b"injected transient failure\n", head)
            return
        if fault == "stall":
            time.sleep(owner.stall_s)  # longer than the client waits: it times out and asks again
        target, encoding = owner._resolve(path)
        if target is None:
            owner._count("404")
            self._send(404, b"not found\n", head)
            return
        headers = {"Content-Encoding": encoding} if encoding else {}
        wanted = self.headers.get("Range")
        with open(target, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if not wanted:
                owner._count("200")
                self._send(200, fh.read(), head, headers)
                return
            span = _parse_range(wanted, size)
            if span is None:
                self._send(416, b"", head, {"Content-Range": f"bytes */{size}"})
                return
            # Only the asked-for bytes: shard files are large and a reader asks for many small ranges of each.
            fh.seek(span[0])
            body = fh.read(span[1] - span[0])
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
        owner._count("206")
        self._send(206, body, head, headers)

    def _send(self, status: int, body: bytes, head: bool, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` as a half-open [start, stop); None when unsatisfiable."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes=") :].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        a = int(first)
        b = int(last) + 1 if last else size
    except ValueError:
        return None
    b = min(b, size)
    return (a, b) if a < b else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default backlog of 5 drops the SYNs of a client opening dozens of connections at once (1 s retransmit).
    request_queue_size = 256
    owner: LoopbackServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer (our own injected resets included) are routine, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """A folder served over HTTP on 127.0.0.1 (ephemeral port) from a background thread; a context manager.

    ``latency_ms`` is slept before every answer (each connection has its own thread, so concurrent requests wait
    concurrently, like a remote store). ``fail_every=k`` answers 503 to the first request of every path whose
    ``crc32(path) % k == 0``; ``reset_every=k`` drops the first connection for paths with ``crc32(path) % k == 1``;
    ``fail_count`` makes the first that many requests of such a path fail instead of one. ``faults`` names paths
    outright (``{"/em/8_8_40/0.shard": "reset"}``; "fail", "reset", or "stall": answer only after ``stall_s``
    seconds, to trip a client's read timeout), on top of the residue rule.
    """

    def __init__(
        self, root: Path, *, latency_ms: float = 0.0, fail_every: int = 0, reset_every: int = 0, fail_count: int = 1,
        faults: Mapping[str, str] | None = None, stall_s: float = 2.0, port: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.latency_s = float(latency_ms) / 1000.0
        self.fail_every, self.reset_every, self.fail_count, self.port = int(fail_every), int(reset_every), int(fail_count), int(port)
        self.faults, self.stall_s = dict(faults or {}), float(stall_s)
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> LoopbackServer:
        self._httpd = _Server(("127.0.0.1", self.port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def faulty(self, path: str) -> str | None:
        """The fault the first request for ``path`` (as the server sees it, e.g. ``/em/8_8_40/0.shard``) gets."""
        if path in self.faults:
            return self.faults[path]
        h = zlib.crc32(path.encode())
        if self.fail_every > 0 and h % self.fail_every == 0:
            return "fail"
        if self.reset_every > 1 and h % self.reset_every == 1:
            return "reset"
        return None

    def _fault(self, path: str) -> str | None:
        with self._lock:
            self._counts["requests"] += 1
            early = self._seen[path] < self.fail_count
            self._seen[path] += 1
            fault = self.faulty(path) if early else None
            if fault:
                self._counts[fault] += 1
            return fault

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _resolve(self, path: str) -> tuple[Path | None, str | None]:
        target = (self.root / path.lstrip("/")).resolve()
        if target != self.root and self.root not in target.parents:
            return None, None
        if target.is_file():
            return target, None
        # cloud-volume stores compressed chunks as name.gz locally; a bucket serves them under the plain name.
        if Path(str(target) + ".gz").is_file():
            return Path(str(target) + ".gz"), "gzip"
        return None, None

    def stats(self) -> dict[str, int]:
        """Counts so far: requests, fail (503s), reset, 404, 200, 206, and per-path hits under ``paths``."""
        with self._lock:
            out = dict(self._counts)
            out["paths"] = len(self._seen)
            return out

    def hits(self, path: str) -> int:
        with self._lock:
            return self._seen[path]


class ServerProcess:
    """:class:`LoopbackServer` in a child process (``python -m synhpc.replicas``); a context manager with ``url``."""

    def __init__(self, root: Path, *, latency_ms: float = 0.0, fail_every: int = 0, reset_every: int = 0) -> None:
        self.args = [str(root), "--latency-ms", str(latency_ms), "--fail-every", str(fail_every), "--reset-every", str(reset_every)]
        self.proc = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "synhpc.replicas", *self.args], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"loopback server did not start (said {line!r})")
        self.url = line
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # the child exits when its stdin closes
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synhpc.replicas", description="serve a folder on 127.0.0.1 with latency and faults")
    parser.add_argument("root")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--reset-every", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    with LoopbackServer(Path(args.root), latency_ms=args.latency_ms, fail_every=args.fail_every, reset_every=args.reset_every, port=args.port) as server:
        print(server.url, flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    os._exit(0)


if __name__ == "__main__":
    main()
