"""Static table dumps as MICrONS publishes them, read in bounded memory: formats, header sidecars, downloads.

Usage::

    dump = open_dump("https://.../v1300/synapses_pni_2_v1_filtered_view.csv.gz", cache_dir="logs/cache/tables")
    for first_row, batch in iter_batches(dump, {"id": pa.int64(), "pre_pt_root_id": pa.int64()}):
        ...                                   # pyarrow RecordBatches of the selected columns, in file order
    cells = read_dump(open_dump("cells.csv"), {"pt_root_id": pa.int64(), "cell_type": pa.string()})
    write_dump(frame, Path("syn.csv.gz"))     # headerless csv.gz + syn_header.csv, the public dumps' layout

Layouts read (by content, not trusted extensions):

- **headerless CSV with a sidecar**, the public static dumps: ``X.csv.gz`` holds rows only, ``X_header.csv`` holds
  one ``column_name,data_type`` row per column (itself without a header row; its order is the data's order). The
  sidecar is found beside the data file by name, or named explicitly (``tables.synapses_header``);
- **CSV with a header row** (what pandas and the synthetic world write); a sidecar is then not needed;
- **parquet** and **feather/arrow IPC**.

Compression is recognised by its magic bytes (gzip, including multi-member files, bz2, zstd), so a ``.csv.gz``
that a server decompressed on the way still reads. Postgres ``t``/``f`` booleans read as booleans.

Remote tables (``http(s)://``, ``gs://bucket/key``) are downloaded once into ``<cache_dir>/downloads/<host>/<path>``
and read from there: the download goes to a ``.part`` file, resumes with an HTTP ``Range`` request after a dropped
connection (``If-Range`` on the ETag, so a file that changed on the server restarts from zero), is checked against
the advertised size and renamed into place only when complete. A completed download is never fetched again: the
public dumps at a pinned materialization version do not change.

Why pyarrow's streaming CSV reader and not DuckDB (``synhpc.bench_tables``, generated dumps in the real headerless
layout, 15 columns, ~65 bytes/row gzip, 2,000 labelled roots owning 1 % of the rows; 2 threads on a 2-core machine,
best of 2): this module's scan -- parse, check, filter, label, count every drop, write the subset to parquet --
ran at 1.30 M rows/s on 10 M rows and 1.31 M on 30 M, with a peak RSS of 322 and 385 MB. DuckDB's best case,
``COPY (SELECT ... JOIN labels ...) TO parquet`` with no drop counts (counting them needs a second scan or streaming
every row back to Python: 0.97 M rows/s in a trial), ran at 1.04 and 1.05 M rows/s while its peak RSS grew with the
table: 0.37 GB at 1 M rows, 1.26 GB at 10 M, 2.79 GB at 30 M. Both are bound by single-threaded gzip inflation
(inflating the 10 M-row dump alone takes 7.3 of the scan's 7.7 s, ~190 MB/s of text; more cores do not help).
pyarrow is faster, flat in memory, already a dependency, and yields batches in file order, which gives exact row
numbers for error messages.
"""

from __future__ import annotations

import csv
import fcntl
import http.client
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from synhpc.errors import ConfigError, DataError

TRUE_VALUES = ["t", "true", "True", "TRUE", "1"]
FALSE_VALUES = ["f", "false", "False", "FALSE", "0"]
# Postgres and Cloud SQL write NULL as an empty field (or \N); pandas writes NaN as an empty field.
NULL_VALUES = ["", "NULL", "null", "\\N"]
# 16 MiB blocks measured fastest for the synapse dump (1 MiB: 0.6 M rows/s, 16 MiB: 1.3 M, 64 MiB: 0.9 M and 0.7 GB).
BLOCK_SIZE = 16 << 20
COLUMNAR_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".feather": "feather", ".arrow": "feather"}
RETRY_BACKOFF_S = 0.5  # first wait before a retry; doubles per attempt, at most 10 s
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
# Postgres information_schema data_type names -> arrow types, for reading every column of a headerless dump.
PG_TYPES = {
    "bigint": pa.int64(), "integer": pa.int64(), "smallint": pa.int64(), "int8": pa.int64(), "int4": pa.int64(),
    "int2": pa.int64(), "boolean": pa.bool_(), "bool": pa.bool_(), "double precision": pa.float64(),
    "real": pa.float64(), "numeric": pa.float64(), "float": pa.float64(), "float8": pa.float64(),
    "float4": pa.float64(),
}
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


# ---------------------------------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class LocalFile:
    """A table file on local disk: where it was configured, where it lies, and what identifies its content."""

    location: str
    path: Path
    identity: dict[str, Any]


def is_remote(location: str) -> bool:
    return re.match(r"^(https?|gs)://", location, flags=re.IGNORECASE) is not None


def http_url(location: str) -> str:
    """``gs://bucket/key`` -> its public https URL; other URLs unchanged."""
    if location.lower().startswith("gs://"):
        return "https://storage.googleapis.com/" + location[5:]
    return location


def localize(location: str, cache_dir: str | os.PathLike[str], *, what: str = "table") -> LocalFile:
    """A local file for ``location``: the path itself, or the cached download of a URL (fetched when missing).

    Usage: ``local = localize(cfg.synapses, cfg.cache_dir); local.path``
    """
    if not location:
        raise DataError(f"{what}: no file configured")
    if is_remote(location):
        if not str(cache_dir):
            raise ConfigError(f"{what}: {location} is remote and tables.cache_dir is empty (downloads go there)")
        url = http_url(location)
        dest = download_path(url, cache_dir)
        meta = download(url, dest)
        return LocalFile(location, dest, {"url": url, "size": meta["size"], "etag": meta.get("etag"),
                                          "last_modified": meta.get("last_modified")})
    path = Path(unquote(urlparse(location).path)) if location.lower().startswith("file://") else Path(location)
    if not path.is_file():
        raise DataError(f"{what} file not found: {location}")
    stat = path.stat()
    return LocalFile(location, path, {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def download_path(url: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Where a URL's download lives: ``<cache_dir>/downloads/<host>/<path>`` (readable, and a dump's sidecar
    lands beside it under the name the reader looks for)."""
    parsed = urlparse(url)
    parts = [p for p in unquote(parsed.path).split("/") if p not in ("", ".", "..")]
    if not parts:
        raise DataError(f"{url}: the URL names no file")
    safe = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in [parsed.netloc or "host", *parts]]
    if parsed.query:  # signed or versioned URLs: keep their downloads apart
        safe[-1] += "-" + zlib.crc32(parsed.query.encode()).to_bytes(4, "big").hex()
    return Path(cache_dir, "downloads", *safe)


class _Retry(Exception):
    """A transient failure: try again, resuming what is already on disk."""


def download(url: str, dest: Path, *, retries: int = 6, timeout: float = 60.0, chunk: int = 1 << 20,
             progress: bool | None = None) -> dict[str, Any]:
    """Download ``url`` to ``dest`` once, resumably; return its metadata (url, size, etag, last_modified).

    Usage: ``meta = download("https://host/x.csv.gz", Path("cache/x.csv.gz"))``

    ``dest`` appears only when complete and of the advertised size; ``dest.json`` holds the metadata. A dropped
    connection, a timeout or an HTTP 5xx is retried (``retries`` times, with backoff) from where the ``.part`` file
    ends. HTTP 4xx, or still failing after the retries, is a one-line :class:`DataError`.
    """
    dest = Path(dest)
    meta_path = dest.with_name(dest.name + ".json")
    if dest.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part_meta = dest.with_name(dest.name + ".part.json")
    # One downloader per file: two processes appending to one .part would interleave bytes.
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file() and meta_path.is_file():
            return json.loads(meta_path.read_text())
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 10.0))
            try:
                meta = _fetch_once(url, part, part_meta, timeout, chunk, progress)
            except _Retry as exc:
                last = str(exc)
                continue
            _write_json(meta_path, meta)
            os.replace(part, dest)
            part_meta.unlink(missing_ok=True)
            return meta
    have = part.stat().st_size if part.exists() else 0
    resume = f"; rerun to resume from byte {have}" if have else ""
    raise DataError(f"{url}: download failed after {retries + 1} attempts ({last}){resume}")


def _fetch_once(url: str, part: Path, part_meta: Path, timeout: float, chunk: int,
                progress: bool | None) -> dict[str, Any]:
    """One request: resume ``part`` when it holds bytes of the same version, else start over."""
    have = part.stat().st_size if part.exists() else 0
    known = json.loads(part_meta.read_text()) if have and part_meta.is_file() else {}
    headers = {"User-Agent": "synhpc",
               # gzip objects are asked for as stored: a server that transcodes would ignore Range.
               "Accept-Encoding": "gzip" if url.split("?")[0].endswith(".gz") else "identity"}
    if have and known:
        headers["Range"] = f"bytes={have}-"
        if known.get("etag"):
            headers["If-Range"] = known["etag"]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and known.get("size") == have:
            return known  # the previous attempt had everything but the rename
        if exc.code == 416:
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416 on resume") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Retry(f"HTTP {exc.code}") from None
        raise DataError(f"{url}: HTTP {exc.code} ({exc.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retry(f"{type(exc).__name__}: {reason}") from None
    with response:
        status = response.status
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # 200: a server without ranges, or a file that changed since the .part began
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        meta = {"url": url, "size": total, "etag": response.headers.get("ETag"),
                "last_modified": response.headers.get("Last-Modified")}
        if mode == "wb" or not known:
            _write_json(part_meta, meta)
        else:
            meta = known | {"size": total if total is not None else known.get("size")}
        bar = _progress_bar(meta["size"], have, part.name, progress)
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = response.read(chunk)
                    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                        raise _Retry(f"connection lost after {out.tell()} bytes ({type(exc).__name__})") from None
                    if not block:
                        break
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    size = part.stat().st_size
    if meta["size"] is not None and size != meta["size"]:
        raise _Retry(f"got {size} of {meta['size']} bytes")
    meta["size"] = size
    return meta


def _content_range(value: str) -> tuple[int, int | None]:
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", value.strip())
    if not match:
        raise _Retry(f"unreadable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool | None) -> Any:
    # Only worth a bar for big files on a terminal; batch logs stay clean.
    if enabled is None:
        enabled = sys.stderr.isatty() and (total or 0) > 256 << 20
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name, file=sys.stderr)


# ------------------------------------------------------------------------------------------------------- layout


def sidecar_location(location: str) -> str:
    """``.../X.csv.gz`` -> ``.../X_header.csv`` (the public dumps' sidecar naming), for paths and URLs alike."""
    base, sep, query = location.partition("?")
    base = re.sub(r"(\.(csv|tsv|txt))?(\.(gz|bz2|zst))?$", "", base, flags=re.IGNORECASE)
    return base + "_header.csv" + (sep + query if sep else "")


@dataclass(frozen=True)
class Dump:
    """A table file and how to read it."""

    location: str  # as configured: every message names it
    file: LocalFile
    format: str  # csv | parquet | feather
    columns: tuple[str, ...]  # in file order
    declared: dict[str, str]  # column -> type as the file or its sidecar declares it
    header_lines: int = 0  # csv: 1 when the first line holds the column names
    delimiter: str = ","
    compression: str | None = None
    sidecar: LocalFile | None = None

    def where(self, row: int) -> str:
        """``row 12`` for columnar files; ``row 12 (line 14)`` for text, so ``zcat | sed -n 14p`` shows it."""
        if self.format == "csv":
            return f"row {row} (line {row + self.header_lines + 1})"
        return f"row {row}"

    def provenance(self) -> dict[str, Any]:
        info: dict[str, Any] = {"location": self.location, "local": str(self.file.path), "format": self.format,
                                "compression": self.compression, **self.file.identity}
        if self.format == "csv":
            info["header_row"] = bool(self.header_lines)
        if self.sidecar is not None:
            info["sidecar"] = {"location": self.sidecar.location, **self.sidecar.identity}
        return info


def open_dump(location: str, *, header: str = "", cache_dir: str | os.PathLike[str] = "logs/cache/tables",
              what: str = "table", header_key: str = "the header sidecar") -> Dump:
    """Recognise the layout of the table at ``location`` (downloading it first when remote).

    Usage: ``dump = open_dump(cfg.synapses, header=cfg.synapses_header, cache_dir=cfg.cache_dir)``

    ``header`` names a ``column_name,data_type`` sidecar; "" looks for ``<name>_header.csv`` beside the file.
    ``what`` and ``header_key`` name the config keys in messages.
    """
    local = localize(location, cache_dir, what=what)
    name = location.split("?")[0].lower()
    suffix = next((fmt for ext, fmt in COLUMNAR_SUFFIXES.items() if name.endswith(ext)), None)
    try:
        if suffix == "parquet":
            schema = pq.read_schema(local.path)
            return Dump(location, local, "parquet", tuple(schema.names), {f.name: str(f.type) for f in schema})
        if suffix == "feather":
            schema = pa.ipc.open_file(pa.memory_map(str(local.path))).schema
            return Dump(location, local, "feather", tuple(schema.names), {f.name: str(f.type) for f in schema})
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{location}: cannot read {suffix} file ({_first_line(exc)})") from None
    return _open_csv_dump(location, local, header, cache_dir, header_key)


def _open_csv_dump(location: str, local: LocalFile, header: str, cache_dir: str | os.PathLike[str],
                   header_key: str) -> Dump:
    compression = _sniff_compression(local.path)
    delimiter = "\t" if ".tsv" in location.split("?")[0].lower() else ","
    first = _first_record(local.path, compression, delimiter, location)
    sidecar = _find_sidecar(location, header, cache_dir, header_key)
    if sidecar is None:
        if not _looks_like_header(first):
            expected = header or sidecar_location(location)
            raise DataError(f"{location}: has no header row (its first row is data: {_clip(delimiter.join(first))}) "
                            f"and its header sidecar {expected} is missing; set {header_key} to the "
                            "column_name,data_type file")
        _check_names(first, location)
        return Dump(location, local, "csv", tuple(first), {c: "" for c in first}, header_lines=1,
                    delimiter=delimiter, compression=compression)
    pairs = read_sidecar(sidecar)
    names = [n for n, _ in pairs]
    if len(first) != len(names):
        raise DataError(f"{location}: row 0 (line 1) has {len(first)} columns but the header sidecar "
                        f"{sidecar.location} names {len(names)}")
    header_lines = 1 if first == names else 0  # a header-row file that also has a sidecar
    return Dump(location, local, "csv", tuple(names), dict(pairs), header_lines=header_lines,
                delimiter=delimiter, compression=compression, sidecar=sidecar)


def _find_sidecar(location: str, header: str, cache_dir: str | os.PathLike[str], header_key: str) -> LocalFile | None:
    if header:
        try:
            return localize(header, cache_dir, what=header_key)
        except DataError as exc:
            raise DataError(f"{location}: {exc}") from None
    guess = sidecar_location(location)
    if is_remote(guess):
        try:
            return localize(guess, cache_dir)
        except DataError as exc:
            if "HTTP 404" in str(exc) or "HTTP 403" in str(exc):  # absent: the file may carry its own header
                return None
            raise
    path = Path(unquote(urlparse(guess).path)) if guess.lower().startswith("file://") else Path(guess)
    return localize(guess, cache_dir) if path.is_file() else None


def read_sidecar(sidecar: LocalFile) -> list[tuple[str, str]]:
    """``[(column_name, data_type), ...]`` from a header sidecar, in the data's column order."""
    try:
        raw = _read_prefix(sidecar.path, _sniff_compression(sidecar.path), 1 << 20)
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise DataError(f"{sidecar.location}: cannot read header sidecar ({_first_line(exc)})") from None
    rows = [r for r in rows if any(v.strip() for v in r)]
    if rows and [v.strip().lower() for v in rows[0][:2]] == ["column_name", "data_type"]:
        rows = rows[1:]  # tolerated: an export made with a header row
    if not rows:
        raise DataError(f"{sidecar.location}: header sidecar is empty")
    pairs = []
    for i, row in enumerate(rows):
        name = row[0].strip()
        if not name:
            raise DataError(f"{sidecar.location}: line {i + 1}: empty column name")
        pairs.append((name, ",".join(row[1:]).strip().lower()))
    _check_names([n for n, _ in pairs], sidecar.location)
    return pairs


def _check_names(names: list[str], location: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{location}: column '{name}' appears twice")
        seen.add(name)


def _looks_like_header(fields: list[str]) -> bool:
    # Every table here carries numeric ids in each row, and column names are never numbers.
    return bool(fields) and all(f.strip() and not _NUMBER.match(f) for f in fields)


def _sniff_compression(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return next((codec for magic, codec in MAGIC.items() if head.startswith(magic)), None)


def _read_prefix(path: Path, compression: str | None, limit: int, *, stop: bytes | None = None) -> bytes:
    """Up to ``limit`` decompressed bytes, or fewer up to the first ``stop`` (a damaged tail stays unread)."""
    with pa.input_stream(str(path), compression=compression) as stream:
        data = b""
        while len(data) < limit:
            block = stream.read(min(1 << 16, limit - len(data)))
            if not block:
                break
            data += block
            if stop is not None and stop in block:
                break
        return data


def _first_record(path: Path, compression: str | None, delimiter: str, location: str) -> list[str]:
    try:
        raw = _read_prefix(path, compression, 1 << 20, stop=b"\n")
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{location}: cannot read ({_first_line(exc)}; truncated or corrupt "
                        f"{compression or 'file'}?)") from None
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if not line.strip():
        raise DataError(f"{location}: file is empty")
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{location}: row 0 is not UTF-8 text (not a CSV table?)") from None
    return next(csv.reader([text], delimiter=delimiter))


# --------------------------------------------------------------------------------------------------------- read


def iter_batches(dump: Dump, types: Mapping[str, pa.DataType], *, block_size: int = BLOCK_SIZE,
                 use_threads: bool = True, progress: bool | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(first_row, batch)`` pairs in file order holding only ``types``' columns, converted to those types.

    Usage: ``for first, batch in iter_batches(dump, {"id": pa.int64()}): ...``

    Memory stays at a few blocks whatever the file's length. Nulls are passed through (the caller decides which
    columns may hold them); a value that cannot be converted, a row with the wrong number of fields, or a truncated
    or corrupt compressed stream raises a one-line :class:`DataError` naming the file, the row and the column.
    """
    missing = [c for c in types if c not in dump.columns]
    if missing:
        raise DataError(f"{dump.location}: missing column '{missing[0]}'")
    if dump.format == "csv":
        yield from _csv_batches(dump, types, block_size, use_threads, progress)
        return
    try:
        if dump.format == "parquet":
            source = pq.ParquetFile(dump.file.path).iter_batches(batch_size=1 << 20, columns=list(types))
        else:
            reader = pa.ipc.open_file(pa.memory_map(str(dump.file.path)))
            source = (reader.get_batch(i).select(list(types)) for i in range(reader.num_record_batches))
        first = 0
        for batch in source:
            columns = [cast_column(batch.column(c), t, dump, c, first) for c, t in types.items()]
            yield first, pa.RecordBatch.from_arrays(columns, names=list(types))
            first += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{dump.location}: cannot read {dump.format} file ({_first_line(exc)})") from None


def read_dump(dump: Dump, types: Mapping[str, pa.DataType] | None = None) -> pd.DataFrame:
    """A whole (small) table as a DataFrame; ``types`` selects and converts columns (None: all, as declared)."""
    types = dict(types) if types is not None else declared_types(dump)
    tables = [pa.Table.from_batches([b]) for _, b in iter_batches(dump, types)]
    table = pa.concat_tables(tables) if tables else pa.schema([(c, t or pa.string()) for c, t in types.items()]).empty_table()
    return table.to_pandas()


def declared_types(dump: Dump) -> dict[str, pa.DataType]:
    """Every column's arrow type: the file's own for columnar files, the sidecar's (Postgres names) for headerless
    CSV, and pyarrow's inference (None) for header-row CSV."""
    if dump.format != "csv":
        schema = pq.read_schema(dump.file.path) if dump.format == "parquet" else \
            pa.ipc.open_file(pa.memory_map(str(dump.file.path))).schema
        return {f.name: f.type for f in schema}
    return {c: PG_TYPES.get(t, pa.string() if dump.sidecar is not None else None) for c, t in dump.declared.items()}


def _csv_batches(dump: Dump, types: Mapping[str, pa.DataType | None], block_size: int, use_threads: bool,
                 progress: bool | None) -> Iterator[tuple[int, pa.RecordBatch]]:
    names = list(types)
    raw = pa.OSFile(str(dump.file.path))
    stream = pa.CompressedInputStream(raw, dump.compression) if dump.compression else raw
    bar = _progress_bar(dump.file.identity.get("size"), 0, Path(dump.location).name, progress)
    first = 0
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(column_names=list(dump.columns), skip_rows=dump.header_lines,
                                          block_size=block_size, use_threads=use_threads),
            parse_options=pcsv.ParseOptions(delimiter=dump.delimiter),
            convert_options=_convert_options(types),
        )
        for batch in reader:
            yield first, batch.select(names)
            first += batch.num_rows
            if bar is not None:
                bar.update(raw.tell() - bar.n)
    except pa.ArrowInvalid as exc:
        raise _locate_csv_error(dump, types, exc, first) from None
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{dump.location}: unreadable after {dump.where(first)}: {_first_line(exc)} "
                        f"(truncated or corrupt {dump.compression or 'file'}?)") from None
    finally:
        if bar is not None:
            bar.close()
        stream.close()


def _convert_options(types: Mapping[str, pa.DataType | None]) -> pcsv.ConvertOptions:
    return pcsv.ConvertOptions(
        include_columns=list(types),
        column_types={c: t for c, t in types.items() if t is not None},
        true_values=TRUE_VALUES,
        false_values=FALSE_VALUES,
        null_values=NULL_VALUES,
        strings_can_be_null=False,
    )


def _locate_csv_error(dump: Dump, types: Mapping[str, pa.DataType | None], exc: pa.ArrowInvalid,
                      rows_done: int) -> DataError:
    """Turn pyarrow's block-level error into one naming the row and column, by reading again serially.

    Only the failing part is read with care: rows before ``rows_done`` were already converted once.
    """
    message = _first_line(exc)
    conversion = re.search(r"In CSV column #(\d+): CSV conversion error to (\w+)", message)
    try:
        if conversion:
            column = _column_by_index(dump, types, int(conversion.group(1)))
            if column is not None:
                return _locate_bad_value(dump, column, types[column], rows_done)
        if "Expected" in message and "columns" in message:
            return _locate_bad_row(dump, message)
    except DataError as located:
        return located
    return DataError(f"{dump.location}: unreadable after {dump.where(rows_done)}: {message}")


def _column_by_index(dump: Dump, types: Mapping[str, Any], index: int) -> str | None:
    # pyarrow numbers the file's columns (include_columns does not renumber them).
    if index < len(dump.columns) and dump.columns[index] in types:
        return dump.columns[index]
    return None


def _locate_bad_value(dump: Dump, column: str, target: pa.DataType | None, rows_done: int) -> DataError:
    raw = pa.OSFile(str(dump.file.path))
    stream = pa.CompressedInputStream(raw, dump.compression) if dump.compression else raw
    reader = pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(column_names=list(dump.columns), skip_rows=dump.header_lines,
                                      block_size=BLOCK_SIZE, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter=dump.delimiter),
        # The same null spellings as the scan, so an empty field is skipped here as it was there.
        convert_options=pcsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()},
                                            null_values=NULL_VALUES, strings_can_be_null=True),
    )
    first = 0
    with stream:
        for batch in reader:
            if first + batch.num_rows > rows_done:
                cast_column(batch.column(0), target, dump, column, first)
            first += batch.num_rows
    return DataError(f"{dump.location}: column {column}: a value cannot be read as {target} "
                     f"(after {dump.where(rows_done)})")


def _locate_bad_row(dump: Dump, message: str) -> DataError:
    found: list[Any] = []

    def remember(row: Any) -> str:
        found.append(row)
        return "error"

    raw = pa.OSFile(str(dump.file.path))
    stream = pa.CompressedInputStream(raw, dump.compression) if dump.compression else raw
    try:
        with stream:
            # Serial reading is what gives pyarrow the line numbers of bad rows.
            reader = pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(column_names=list(dump.columns), skip_rows=dump.header_lines,
                                              block_size=BLOCK_SIZE, use_threads=False),
                parse_options=pcsv.ParseOptions(delimiter=dump.delimiter, invalid_row_handler=remember),
                convert_options=pcsv.ConvertOptions(include_columns=[dump.columns[0]],
                                                    column_types={dump.columns[0]: pa.string()}),
            )
            for _ in reader:
                pass
    except pa.ArrowException:
        pass
    if found and found[0].number is not None:
        bad = found[0]
        line = int(bad.number) + dump.header_lines
        header = f"the header sidecar {dump.sidecar.location}" if dump.sidecar else "the header row"
        return DataError(f"{dump.location}: row {line - dump.header_lines - 1} (line {line}) has "
                         f"{bad.actual_columns} columns but {header} names {bad.expected_columns}: "
                         f"{_clip(bad.text)}")
    return DataError(f"{dump.location}: {message}")


def cast_column(array: pa.Array | pa.ChunkedArray, target: pa.DataType | None, dump: Dump, column: str,
                first_row: int) -> pa.Array:
    """``array`` as ``target``; a value that does not convert is a :class:`DataError` naming its row."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if target is None or array.type == target:
        return array
    if pa.types.is_boolean(target) and (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return _text_to_bool(array, dump, column, first_row)
    try:
        return array.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for i, value in enumerate(array.to_pylist()):
        if value is None:
            continue
        try:
            pa.array([value], type=array.type).cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            kind = "a number" if pa.types.is_integer(target) or pa.types.is_floating(target) else str(target)
            raise DataError(f"{dump.location}: {dump.where(first_row + i)}, column {column}: {_clip(str(value))!r} "
                            f"is not {kind if not pa.types.is_integer(target) else 'an integer'}") from None
    raise DataError(f"{dump.location}: column {column}: cannot convert {array.type} to {target}")


def _text_to_bool(array: pa.Array, dump: Dump, column: str, first_row: int) -> pa.Array:
    values = np.asarray(array.to_pylist(), dtype=object)
    truth = np.isin(values, TRUE_VALUES)
    falsity = np.isin(values, FALSE_VALUES)
    bad = ~(truth | falsity) & pd.notna(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{dump.location}: {dump.where(first_row + i)}, column {column}: {_clip(str(values[i]))!r} "
                        "is not a boolean (t/f, true/false, 1/0)")
    return pa.array(np.where(pd.notna(values), truth, None), type=pa.bool_())


def first_null(array: pa.Array) -> int | None:
    """Index of the first null in ``array`` (None when it has none)."""
    if array.null_count == 0:
        return None
    return int(np.flatnonzero(~np.asarray(array.is_valid()))[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------------------- write


def postgres_type(dtype: pa.DataType) -> str:
    """The Postgres ``data_type`` name a sidecar gives an arrow type."""
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_integer(dtype):
        return "bigint" if dtype.bit_width > 32 else "integer"
    if pa.types.is_floating(dtype):
        return "double precision"
    if pa.types.is_timestamp(dtype):
        return "timestamp without time zone"
    return "character varying"


def write_dump(frame: pd.DataFrame | pa.Table | Iterable[pa.Table], path: Path, *, compresslevel: int = 6) -> Path:
    """Write ``frame`` in the public dumps' layout: headerless CSV (gzip when ``path`` ends in ``.gz``; booleans as
    ``t``/``f``) plus the ``<name>_header.csv`` sidecar. Returns the sidecar's path.

    Usage: ``write_dump(synapses, tmp / "synapses_pni_2_v1_filtered_view.csv.gz")``

    ``frame`` may also be an iterable of pyarrow tables with one schema (written as consecutive gzip members, so a
    large dump never sits in memory). Both files are written under temporary names and renamed when complete.
    """
    path = Path(path)
    chunks: Iterable[pa.Table]
    if isinstance(frame, pd.DataFrame):
        chunks = [pa.Table.from_pandas(frame, preserve_index=False)]
    elif isinstance(frame, pa.Table):
        chunks = [frame]
    else:
        chunks = frame
    gz = path.name.endswith(".gz")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    schema = None
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                schema = schema or chunk.schema
                text = _csv_bytes(_bools_as_text(chunk))
                if gz:
                    packer = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)  # 31: a gzip member
                    out.write(packer.compress(text.getbuffer()) + packer.flush())
                else:
                    out.write(text.getbuffer())
        if schema is None:
            raise ValueError("write_dump: no rows and no schema")
        sidecar = Path(sidecar_location(str(path)))
        lines = io.StringIO()
        csv.writer(lines, lineterminator="\n").writerows((f.name, postgres_type(f.type)) for f in schema)
        side_tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        side_tmp.write_text(lines.getvalue())
        os.replace(side_tmp, sidecar)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sidecar


def _csv_bytes(table: pa.Table) -> io.BytesIO:
    # Like Postgres: quotes only around values that need them (pyarrow's "needed" quotes every string).
    for style in ("none", "needed"):
        text = io.BytesIO()
        try:
            pcsv.write_csv(table, text, pcsv.WriteOptions(include_header=False, quoting_style=style))
            return text
        except pa.ArrowInvalid:
            continue
    raise AssertionError("unreachable: quoting_style='needed' writes any value")


def _bools_as_text(table: pa.Table) -> pa.Table:
    # Postgres writes booleans as t/f; pyarrow would write true/false.
    for i, f in enumerate(table.schema):
        if pa.types.is_boolean(f.type):
            values = np.where(table.column(i).to_numpy(zero_copy_only=False), "t", "f")
            table = table.set_column(i, f.name, pa.array(values, type=pa.string()))
    return table
