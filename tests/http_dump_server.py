"""A loopback HTTP file server for download tests: Range and If-Range like a cloud bucket, plus scripted faults.

Usage::

    with DumpServer({"/v1300/x.csv.gz": data}) as server:
        server.faults = [("cut", 1000), ("status", 503)]   # consumed one per GET, in order
        url = server.url + "/v1300/x.csv.gz"
        ...
        server.requests   # [(method, path, Range header or None), ...]
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DumpServer:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.faults: list[tuple[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.ranges = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                path = self.path.split("?")[0]
                server.requests.append((self.command, path, self.headers.get("Range")))
                fault = server.faults.pop(0) if server.faults and not head else None
                if fault is not None and fault[0] == "status":
                    self._plain(int(fault[1]))
                    return
                data = server.files.get(path)
                if data is None:
                    self._plain(404)
                    return
                etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
                start, status = 0, 200
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and server.ranges and (if_range is None or if_range == etag):
                    start = int(wanted.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                if fault is not None and fault[0] == "cut":  # promise everything, send part, hang up
                    self.wfile.write(body[: int(fault[1])])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _plain(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> DumpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
