"""The dump reader (real headerless layout + sidecar, header-row CSV, parquet), its one-line errors, and the
resumable download cache, against a loopback HTTP server."""

import gzip
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ is not a package; the server sits beside us

from http_dump_server import DumpServer  # noqa: E402

from synhpc.dumps import (  # noqa: E402
    download,
    download_path,
    iter_batches,
    localize,
    open_dump,
    read_dump,
    read_sidecar,
    sidecar_location,
    write_dump,
)
from synhpc.errors import DataError  # noqa: E402


def frame(n=6):
    return pd.DataFrame({
        "id": np.arange(100, 100 + n, dtype=np.int64),
        "valid": [True, False] * (n // 2),
        "pre_pt_root_id": np.full(n, 864691135000000001, dtype=np.int64),
        "size": np.linspace(1.5, 9.5, n),
        "cell_type": ["23P", "BC"] * (n // 2),
    })


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_sidecar_names_follow_the_public_dumps():
    base = "https://storage.googleapis.com/mat_dbs/public/minnie65_phase3_v1/v1300/"
    assert sidecar_location(base + "synapses_pni_2_v1_filtered_view.csv.gz") == base + "synapses_pni_2_v1_filtered_view_header.csv"
    assert sidecar_location(base + "aibs_metamodel_celltypes_v661_merged.csv.gz") == base + "aibs_metamodel_celltypes_v661_merged_header.csv"
    assert sidecar_location("/data/t.csv") == "/data/t_header.csv"
    assert sidecar_location("/data/export.gz") == "/data/export_header.csv"


def test_headerless_dump_round_trip_with_postgres_types(tmp_path):
    data = frame()
    sidecar = write_dump(data, tmp_path / "t_merged.csv.gz")
    assert sidecar == tmp_path / "t_merged_header.csv"
    assert sidecar.read_text().splitlines() == [
        "id,bigint", "valid,boolean", "pre_pt_root_id,bigint", "size,double precision", "cell_type,character varying"]
    with gzip.open(tmp_path / "t_merged.csv.gz", "rt") as fh:
        assert fh.readline() == "100,t,864691135000000001,1.5,23P\n"  # no header row; booleans as t/f
    dump = open_dump(str(tmp_path / "t_merged.csv.gz"))
    assert (dump.format, dump.header_lines, dump.compression) == ("csv", 0, "gzip")
    assert dump.columns == tuple(data.columns)
    pd.testing.assert_frame_equal(read_dump(dump), data)
    only = read_dump(dump, {"valid": pa.bool_(), "id": pa.int64()})  # column selection, in the order asked
    assert list(only.columns) == ["valid", "id"] and only["valid"].tolist() == [True, False] * 3


def test_sidecar_order_is_trusted_not_guessed(tmp_path):
    write_dump(frame(), tmp_path / "t.csv")
    (tmp_path / "t_header.csv").write_text("id,bigint\nvalid,boolean\nsize,double precision\n"
                                           "pre_pt_root_id,bigint\ncell_type,text\n")
    with pytest.raises(DataError) as exc:  # the sidecar now claims column 3 is the root id: "1.5" is not an integer
        read_dump(open_dump(str(tmp_path / "t.csv")), {"pre_pt_root_id": pa.int64()})
    assert one_line(exc).endswith("t.csv: row 0 (line 1), column pre_pt_root_id: '1.5' is not an integer")


def test_header_row_files_and_explicit_sidecars(tmp_path):
    data = frame()
    data.to_csv(tmp_path / "plain.csv.gz", index=False)  # today's format: a header row, no sidecar
    dump = open_dump(str(tmp_path / "plain.csv.gz"))
    assert dump.header_lines == 1 and dump.sidecar is None
    pd.testing.assert_frame_equal(read_dump(dump), data)
    # A sidecar elsewhere, named explicitly (tables.synapses_header), for a file with an unusual name.
    write_dump(data, tmp_path / "export.gz")
    (tmp_path / "export_header.csv").rename(tmp_path / "columns.csv")
    dump = open_dump(str(tmp_path / "export.gz"), header=str(tmp_path / "columns.csv"))
    assert dump.sidecar.location.endswith("columns.csv")
    pd.testing.assert_frame_equal(read_dump(dump), data)
    # A header-row file that also has a sidecar: the header line is recognised and skipped.
    data.to_csv(tmp_path / "both.csv", index=False)
    (tmp_path / "both_header.csv").write_text((tmp_path / "columns.csv").read_text())
    assert open_dump(str(tmp_path / "both.csv")).header_lines == 1


def test_parquet_and_feather(tmp_path):
    data = frame()
    data.to_parquet(tmp_path / "t.parquet")
    data.to_feather(tmp_path / "t.feather")
    for name in ("t.parquet", "t.feather"):
        got = read_dump(open_dump(str(tmp_path / name)), {"id": pa.int64(), "size": pa.float64()})
        pd.testing.assert_frame_equal(got, data[["id", "size"]])


def test_multi_member_gzip_reads_whole(tmp_path):
    chunks = [pa.Table.from_pandas(frame().assign(id=np.arange(i * 6, i * 6 + 6)), preserve_index=False) for i in range(3)]
    write_dump(iter(chunks), tmp_path / "m.csv.gz")
    assert read_dump(open_dump(str(tmp_path / "m.csv.gz")))["id"].tolist() == list(range(18))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p / "t_header.csv").unlink(),
         "t.csv.gz: has no header row (its first row is data: 100,t,864691135000000001,1.5,23P) and its header "
         "sidecar {p}/t_header.csv is missing; set the header sidecar to the column_name,data_type file"),
        (lambda p: (p / "t_header.csv").write_text("id,bigint\nvalid,boolean\nsize,double precision\n"),
         "t.csv.gz: row 0 (line 1) has 5 columns but the header sidecar {p}/t_header.csv names 3"),
        (lambda p: (p / "t_header.csv").write_text(""), "t_header.csv: header sidecar is empty"),
        (lambda p: (p / "t_header.csv").write_text("id,bigint\nid,bigint\na,text\nb,text\nc,text\n"),
         "t_header.csv: column 'id' appears twice"),
        (lambda p: (p / "t.csv.gz").write_bytes((p / "t.csv.gz").read_bytes()[:40]),
         "t.csv.gz: cannot read (Truncated compressed stream; truncated or corrupt gzip?)"),
    ],
)
def test_bad_layouts_are_one_line_errors(tmp_path, make, message):
    write_dump(frame(), tmp_path / "t.csv.gz")
    make(tmp_path)
    with pytest.raises(DataError) as exc:
        read_dump(open_dump(str(tmp_path / "t.csv.gz")))
    assert message.format(p=tmp_path) in one_line(exc)


def big_dump(tmp_path, n=60_000, bad_row=None, bad_value="abc", column="pre_pt_root_id", ragged_row=None):
    data = pd.DataFrame({"id": np.arange(n, dtype=np.int64), "pre_pt_root_id": np.arange(n, dtype=np.int64) * 7,
                         "ctr_pt_position_x": np.arange(n, dtype=np.int64)})
    write_dump(data, tmp_path / "big.csv.gz", compresslevel=1)
    if bad_row is not None or ragged_row is not None:
        lines = gzip.decompress((tmp_path / "big.csv.gz").read_bytes()).decode().splitlines()
        if bad_row is not None:
            fields = lines[bad_row].split(",")
            fields[list(data.columns).index(column)] = bad_value
            lines[bad_row] = ",".join(fields)
        if ragged_row is not None:
            lines[ragged_row] = lines[ragged_row].rsplit(",", 1)[0]
        (tmp_path / "big.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), 1))
    return open_dump(str(tmp_path / "big.csv.gz"))


TYPES = {"id": pa.int64(), "pre_pt_root_id": pa.int64(), "ctr_pt_position_x": pa.float64()}


def test_streams_in_blocks_in_file_order(tmp_path):
    dump = big_dump(tmp_path)
    firsts, ids = [], []
    for first, batch in iter_batches(dump, TYPES, block_size=1 << 16):
        firsts.append(first)
        ids.append(batch.column("id").to_numpy())
    assert len(firsts) > 5 and firsts[0] == 0
    assert np.array_equal(np.concatenate(ids), np.arange(60_000))
    assert firsts == list(np.cumsum([0] + [len(i) for i in ids[:-1]]))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"bad_row": 51_234}, "big.csv.gz: row 51234 (line 51235), column pre_pt_root_id: 'abc' is not an integer"),
        ({"bad_row": 40_001, "column": "ctr_pt_position_x", "bad_value": "12;5"},
         "big.csv.gz: row 40001 (line 40002), column ctr_pt_position_x: '12;5' is not a number"),
        ({"ragged_row": 45_678}, "big.csv.gz: row 45678 (line 45679) has 2 columns but the header sidecar"),
    ],
)
def test_bad_rows_deep_in_a_file_are_named(tmp_path, bad, message):
    dump = big_dump(tmp_path, **bad)
    with pytest.raises(DataError) as exc:
        for _ in iter_batches(dump, TYPES, block_size=1 << 16):
            pass
    assert message in one_line(exc)


def test_truncated_gzip_after_many_rows_names_how_far_it_got(tmp_path):
    big_dump(tmp_path)
    data = (tmp_path / "big.csv.gz").read_bytes()
    (tmp_path / "big.csv.gz").write_bytes(data[: len(data) * 3 // 4])
    dump = open_dump(str(tmp_path / "big.csv.gz"))
    with pytest.raises(DataError) as exc:
        for _ in iter_batches(dump, TYPES, block_size=1 << 16):
            pass
    assert "big.csv.gz: unreadable after row " in one_line(exc) and "truncated or corrupt gzip" in one_line(exc)


def test_parquet_values_that_do_not_convert_name_row_and_column(tmp_path):
    pd.DataFrame({"id": ["1", "2", "x3"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError) as exc:
        read_dump(open_dump(str(tmp_path / "t.parquet")), {"id": pa.int64()})
    assert one_line(exc).endswith("t.parquet: row 2, column id: 'x3' is not an integer")


def test_text_booleans_must_be_booleans(tmp_path):
    pd.DataFrame({"id": [1, 2, 3], "valid": ["t", "f", "maybe"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError) as exc:
        read_dump(open_dump(str(tmp_path / "t.parquet")), {"valid": pa.bool_()})
    assert one_line(exc).endswith("t.parquet: row 2, column valid: 'maybe' is not a boolean (t/f, true/false, 1/0)")


def test_missing_local_file():
    with pytest.raises(DataError, match="table file not found: /nonexistent/x.csv"):
        open_dump("/nonexistent/x.csv")


# ------------------------------------------------------------------------------------------------------ downloads


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr("synhpc.dumps.RETRY_BACKOFF_S", 0.0)


def payload(n=300_000) -> bytes:
    return zlib.compress(np.arange(n, dtype=np.int64).tobytes(), 1)  # incompressible enough to be large-ish


def test_download_once_then_from_cache(tmp_path):
    data = payload()
    with DumpServer({"/v1300/x.csv.gz": data}) as server:
        url = server.url + "/v1300/x.csv.gz"
        local = localize(url, tmp_path)
        assert local.path == download_path(url, tmp_path)
        assert local.path.read_bytes() == data and local.identity["size"] == len(data)
        assert local.identity["etag"]
        seen = len(server.requests)
        assert localize(url, tmp_path).path == local.path and len(server.requests) == seen  # no second request
    assert not list(local.path.parent.glob("*.part"))


def test_download_resumes_after_a_dropped_connection_and_a_5xx(tmp_path):
    data = payload()
    with DumpServer({"/x.bin": data}) as server:
        server.faults = [("cut", 100_000), ("status", 503), ("cut", 50_000)]
        meta = download(server.url + "/x.bin", tmp_path / "x.bin")
        gets = [r for r in server.requests if r[0] == "GET"]
    assert (tmp_path / "x.bin").read_bytes() == data and meta["size"] == len(data)
    assert [g[2] for g in gets] == [None, "bytes=100000-", "bytes=100000-", "bytes=150000-"]
    assert not (tmp_path / "x.bin.part").exists()


def test_a_file_that_changed_on_the_server_restarts_from_zero(tmp_path):
    old, new = payload(), payload(310_000)
    with DumpServer({"/x.bin": old}) as server:
        server.faults = [("cut", 100_000)]
        with pytest.raises(DataError, match="download failed after 1 attempts"):
            download(server.url + "/x.bin", tmp_path / "x.bin", retries=0)
        assert (tmp_path / "x.bin.part").stat().st_size == 100_000 and not (tmp_path / "x.bin").exists()
        server.files["/x.bin"] = new  # new ETag: If-Range makes the server send the whole new file
        download(server.url + "/x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == new


def test_download_errors_are_one_line_and_leave_no_file(tmp_path):
    with DumpServer({"/x.bin": payload()}) as server:
        with pytest.raises(DataError) as exc:
            download(server.url + "/missing.bin", tmp_path / "missing.bin")
        assert one_line(exc) == f"{server.url}/missing.bin: HTTP 404 (Not Found)"
        server.faults = [("status", 500)] * 3
        with pytest.raises(DataError) as exc:
            download(server.url + "/x.bin", tmp_path / "x.bin", retries=2)
        assert "download failed after 3 attempts (HTTP 500)" in one_line(exc)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "missing.bin").exists()


def test_remote_headerless_dump_finds_its_sidecar_by_name(tmp_path):
    (tmp_path / "src").mkdir()
    write_dump(frame(), tmp_path / "src" / "t_merged.csv.gz")
    files = {f"/v1300/{p.name}": p.read_bytes() for p in (tmp_path / "src").iterdir()}
    with DumpServer(files) as server:
        dump = open_dump(server.url + "/v1300/t_merged.csv.gz", cache_dir=tmp_path / "cache")
        got = read_dump(dump)
    pd.testing.assert_frame_equal(got, frame())
    assert dump.sidecar.location == server.url + "/v1300/t_merged_header.csv"
    assert dump.provenance()["url"] == server.url + "/v1300/t_merged.csv.gz"
    assert read_sidecar(dump.sidecar)[0] == ("id", "bigint")


def test_remote_dump_without_sidecar_is_a_one_line_error(tmp_path):
    (tmp_path / "src").mkdir()
    write_dump(frame(), tmp_path / "src" / "t.csv.gz")
    with DumpServer({"/t.csv.gz": (tmp_path / "src" / "t.csv.gz").read_bytes()}) as server:
        with pytest.raises(DataError) as exc:
            open_dump(server.url + "/t.csv.gz", cache_dir=tmp_path / "cache", header_key="tables.synapses_header")
    assert f"its header sidecar {server.url}/t_header.csv is missing; set tables.synapses_header" in one_line(exc)


# ------------------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow  # three child processes
def test_bench_tables_writes_its_tables_and_reuses_generated_dumps(tmp_path):
    import json

    from synhpc.bench_tables import bench_tables, generate_dumps
    from synhpc.config import load_config

    syn, _ = generate_dumps(tmp_path / "dumps", 20_000)
    dump = open_dump(str(syn))
    assert dump.header_lines == 0 and len(dump.columns) == 15 and dump.columns[12] == "pre_pt_root_id"
    stamp = syn.stat().st_mtime_ns
    frame = bench_tables(load_config(None), tmp_path / "out", sizes=(20_000,), engines=("synhpc",),
                         dumps_dir=tmp_path / "dumps")
    assert syn.stat().st_mtime_ns == stamp  # generated once, reused
    assert frame["engine"].tolist() == ["synhpc"] and frame["rows"].tolist() == [20_000]
    assert 100 < frame["labelled_rows"].iloc[0] < 400  # ~1 % of the rows belong to labelled roots
    assert (frame["peak_rss_mb"] > 0).all() and (frame["full_dump_minutes"] > 0).all()
    saved = json.loads((tmp_path / "out" / "bench_tables.json").read_text())
    assert saved["summary"]["full_dump_rows"] == 337_312_429 and saved["rows"][0]["rows"] == 20_000
    assert pd.read_csv(tmp_path / "out" / "bench_tables.csv")["rows"].tolist() == [20_000]
    assert not list((tmp_path / "out").glob(".bench-tables-*"))  # scratch caches are removed
