"""A loopback CAVE server that speaks just enough of the info and materialization APIs for real caveclient 8.2.

Usage::

    with CaveServer({943: {"synapses_pni_2": syn_df, "aibs_metamodel_celltypes_v661": cells_df}}, token="t0k") as srv:
        client = CAVEclient("minnie65_public", server_address=srv.url, auth_token="t0k", write_server_cache=False)
        srv.requests  # every request seen: Request(method, path, query, body)

Tables are pandas frames per (version, table). Position columns may be given packed (one ``[x, y, z]`` per row) or
split (``<name>_x/_y/_z``); they are stored split, which is what caveclient 8.2 always asks for. Queries honour the
filter dicts caveclient sends, ``select_columns`` and ``limit`` (capped by ``max_rows``, like the real server's
query limit).
"""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa

# Endpoints real servers answer without a token: caveclient probes them before it sends anything else.
PUBLIC_PATHS = {"/info/version", "/materialize/version", "/materialize/api/versions"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


def _split_positions(df: pd.DataFrame) -> pd.DataFrame:
    """Split packed ``*_position`` columns into ``_x/_y/_z`` columns, in place of the packed one."""
    out = {}
    for col in df.columns:
        values = df[col]
        if col.endswith("position") and len(values) and np.ndim(values.iloc[0]) == 1:
            xyz = np.stack(values.to_numpy())
            for i, axis in enumerate("xyz"):
                out[f"{col}_{axis}"] = xyz[:, i]
        else:
            out[col] = values.to_numpy()
    return pd.DataFrame(out)


def _arrow_stream(df: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


class CaveServer:
    """Context manager running the fake server on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(
        self,
        tables: dict[int, dict[str, pd.DataFrame]],
        *,
        datastack: str = "minnie65_public",
        token: str | None = None,
        voxel_resolution: tuple[float, float, float] = (4.0, 4.0, 40.0),
        max_rows: int = 200_000,
        synapse_table: str = "synapses_pni_2",
    ) -> None:
        self.tables = {int(v): {name: _split_positions(df) for name, df in ts.items()} for v, ts in tables.items()}
        self.datastack = datastack
        self.token = token
        self.voxel_resolution = {}  # per-table overrides; default applies otherwise
        self.default_resolution = tuple(voxel_resolution)
        self.max_rows = max_rows
        self.synapse_table = synapse_table
        self.requests: list[Request] = []
        self._fail: list[int] = []  # statuses to answer the next requests with, in order
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` (503 is one caveclient retries)."""
        with self._lock:
            self._fail.extend([status] * n)

    def queries(self, table: str | None = None) -> list[Request]:
        """The table-query POSTs seen so far, optionally only those for ``table``."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/query")
                and (table is None or f"/table/{table}/" in r.path)]

    def __enter__(self) -> CaveServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- routing -----------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: Any, auth: str | None) -> tuple[int, Any]:
        """Return (status, payload); payload is JSON-able, or a DataFrame sent as an Arrow stream."""
        with self._lock:
            self.requests.append(Request(method, path, query, body))
            if self._fail:
                return self._fail.pop(0), {"message": "injected failure"}
        if self.token is not None and path not in PUBLIC_PATHS and auth != f"Bearer {self.token}":
            return 401, {"error": "invalid_token", "message": "Unauthorized"}
        ds = re.escape(self.datastack)
        mat = rf"/materialize/api/v[23]/datastack/{ds}"
        routes = [
            ("GET", r"/info/version", lambda: "4.3.1"),
            ("GET", rf"/info/api/v2/datastack/full/{ds}", self._datastack_info),
            ("GET", r"/materialize/api/versions", lambda: [2, 3]),
            ("GET", r"/materialize/version", lambda: "5.13.0"),
            ("GET", rf"{mat}/versions", lambda: sorted(self.tables)),
            ("GET", rf"{mat}/version/(\d+)/tables", lambda v: sorted(self._version(v))),
            ("GET", rf"{mat}/version/(\d+)/table/([^/]+)/metadata", self._metadata),
            ("POST", rf"{mat}/version/(\d+)/table/([^/]+)/query", lambda v, t: self._query(v, t, body)),
        ]
        for verb, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                try:
                    return 200, fn(*m.groups())
                except LookupError as e:
                    return 404, {"message": str(e)}
                except ValueError as e:
                    return 400, {"message": str(e)}
        return 404, {"message": f"unknown endpoint {method} {path}"}

    def _datastack_info(self) -> dict:
        return {
            "name": self.datastack,
            "local_server": self.url,
            "synapse_table": self.synapse_table,
            "soma_table": None,
            "viewer_resolution_x": 4.0, "viewer_resolution_y": 4.0, "viewer_resolution_z": 40.0,
            "segmentation_source": "graphene://https://example.invalid/segmentation/table/minnie3_v1",
            "aligned_volume": {"name": "minnie65_phase3", "id": 1, "image_source": "precomputed://file://em",
                               "description": "loopback"},
        }

    def _version(self, v: str) -> dict[str, pd.DataFrame]:
        if int(v) not in self.tables:
            raise LookupError(f"version {v} not found")
        return self.tables[int(v)]

    def _table(self, v: str, t: str) -> pd.DataFrame:
        tables = self._version(v)
        if t not in tables:
            raise LookupError(f"table {t} not found in version {v}")
        return tables[t]

    def _metadata(self, v: str, t: str) -> dict:
        self._table(v, t)
        res = self.voxel_resolution.get(t, self.default_resolution)
        return {
            "table_name": t, "schema": "synapse" if t == self.synapse_table else "cell_type_local",
            "schema_type": "synapse" if t == self.synapse_table else "cell_type_local",
            "reference_table": None, "valid": True, "description": "loopback table", "notice_text": None,
            "aligned_volume": "minnie65_phase3", "voxel_resolution_x": res[0], "voxel_resolution_y": res[1],
            "voxel_resolution_z": res[2], "read_permission": "PUBLIC", "write_permission": "PRIVATE",
        }

    def _query(self, v: str, t: str, body: dict) -> pd.DataFrame:
        df = self._table(v, t)
        keep = np.ones(len(df), dtype=bool)
        ops = {
            "filter_in_dict": lambda c, x: c.isin(x), "filter_notin_dict": lambda c, x: ~c.isin(x),
            "filter_equal_dict": lambda c, x: c == x, "filter_greater_dict": lambda c, x: c > x,
            "filter_less_dict": lambda c, x: c < x, "filter_greater_equal_dict": lambda c, x: c >= x,
            "filter_less_equal_dict": lambda c, x: c <= x,
        }
        for key, op in ops.items():
            # caveclient nests filters by table: {"filter_in_dict": {table: {column: values}}}.
            for column, value in (body.get(key) or {}).get(t, {}).items():
                if column not in df.columns:
                    raise ValueError(f"column {column} not in table {t}")
                keep &= op(df[column], value).to_numpy()
        out = df[keep]
        select = body.get("select_columns") or (body.get("select_column_map") or {}).get(t)
        if select:
            cols = []
            for name in select:
                split = [f"{name}_{a}" for a in "xyz"]
                if name in out.columns:
                    cols.append(name)
                elif all(s in out.columns for s in split):
                    cols.extend(split)
                else:
                    raise ValueError(f"column {name} not in table {t}")
            out = out[cols]
        limit = min(int(body.get("limit") or self.max_rows), self.max_rows)
        return out.iloc[:limit]


def _make_handler(server: CaveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, payload = server.handle(method, url.path, query, body or {}, self.headers.get("Authorization"))
            if isinstance(payload, pd.DataFrame):
                data, ctype = _arrow_stream(payload), "data.arrow"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # tests read server.requests; stderr chatter would only hide failures

    return Handler
