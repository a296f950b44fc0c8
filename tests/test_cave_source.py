"""The CAVE table source against a loopback CAVE server driven by the real caveclient.

Usage: ``python -m pytest tests/test_cave_source.py``
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ is not a package; cave_server sits beside us

from cave_server import CaveServer  # noqa: E402

from synhpc.config import TablesConfig  # noqa: E402
from synhpc.errors import ConfigError, DataError  # noqa: E402
from synhpc.sources.cave import SUPERVOXEL_COLUMNS, SYNAPSE_COLUMNS, fetch_tables  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"
DS = "minnie65_public"
SYN, CELLS = "synapses_pni_2", "aibs_metamodel_celltypes_v661"
LABELLED = [101, 102, 103, 104, 105]
UNLABELLED = 999


def make_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """~50 synapses in 4x4x40 nm voxels with invalid rows, small ones, an autapse and an unlabelled pre root."""
    rng = np.random.default_rng(seed)
    n = 50
    pre = rng.choice(LABELLED + [UNLABELLED], n)
    post = rng.choice([201, 202, 203, 204], n)
    pre[7], post[7] = 101, 101  # autapse
    valid = np.ones(n, bool)
    valid[[3, 11, 29]] = False
    size = rng.integers(20, 600, n)
    size[[5, 6]] = [12, 15]
    syn = {"id": rng.permutation(np.arange(1000, 1000 + n)), "valid": valid,
           "pre_pt_supervoxel_id": rng.integers(1, 10**17, n), "pre_pt_root_id": pre,
           "post_pt_supervoxel_id": rng.integers(1, 10**17, n), "post_pt_root_id": post, "size": size}
    ctr = np.stack([rng.integers(100_000, 200_000, n), rng.integers(80_000, 160_000, n),
                    rng.integers(15_000, 27_000, n)], axis=1)
    for name, shift in (("pre_pt_position", -10), ("ctr_pt_position", 0), ("post_pt_position", 10)):
        for i, axis in enumerate("xyz"):
            syn[f"{name}_{axis}"] = ctr[:, i] + (shift if axis != "z" else 0)
    cells = pd.DataFrame({
        "id": np.arange(1, 8), "valid": True,
        "pt_root_id": LABELLED + [0, 103],  # root 0 (no segment) and a duplicate row for 103
        "classification_system": ["excitatory_neuron", "inhibitory_neuron", "excitatory_neuron",
                                  "inhibitory_neuron", "nonneuron", "excitatory_neuron", "excitatory_neuron"],
        "cell_type": ["23P", "BC", "5P-IT", "MC", "astrocyte", "23P", "5P-IT"],
        # Packed positions here: the server splits them, as the real one does for split_positions=True.
        "pt_position": [np.array([150_000 + i, 120_000, 20_000]) for i in range(7)],
    })
    return pd.DataFrame(syn), cells


def expected(syn: pd.DataFrame, roots: list[int], min_size: int = 0, drop_autapses: bool = True) -> pd.DataFrame:
    keep = syn["valid"] & syn["pre_pt_root_id"].isin(roots) & (syn["size"] >= min_size)
    if drop_autapses:
        keep &= syn["pre_pt_root_id"] != syn["post_pt_root_id"]
    out = syn.loc[keep, SYNAPSE_COLUMNS + SUPERVOXEL_COLUMNS]
    return out.sort_values("id").reset_index(drop=True)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    # caveclient reads ~/.cloudvolume/secrets and a datastack->server cache: keep the developer's out of the tests.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CAVE_TOKEN", raising=False)


@pytest.fixture
def tables():
    return make_tables()


@pytest.fixture
def server(tables):
    syn, cells = tables
    data = {v: {SYN: syn, CELLS: cells} for v in (943, 1300)}
    with CaveServer(data, datastack=DS, token=TOKEN) as srv:
        yield srv


def config(srv: CaveServer | None, **kw) -> TablesConfig:
    base = TablesConfig(source="cave", datastack=DS, server_address=srv.url if srv else "",
                        materialization_version=943)
    return replace(base, **kw)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and TOKEN not in text
    return text


def test_rows_columns_and_provenance(server, tables):
    syn, cells = tables
    out, cell_rows, info = fetch_tables(config(server), token=TOKEN)
    pd.testing.assert_frame_equal(out, expected(syn, LABELLED))
    assert UNLABELLED not in set(out["pre_pt_root_id"]) and 101 in set(out["pre_pt_root_id"])
    assert list(cell_rows["pt_root_id"]) == list(cells["pt_root_id"])
    assert {"pt_position_x", "pt_position_y", "pt_position_z", "cell_type", "classification_system"} <= set(cell_rows)
    assert cell_rows["pt_position_x"].tolist() == [150_000 + i for i in range(7)]
    assert info["materialization_version"] == 943 and info["datastack"] == DS
    assert info["synapse_table"] == SYN and info["cell_type_table"] == CELLS
    assert info["voxel_resolution_nm"] == [4.0, 4.0, 40.0] and info["server_address"] == server.url
    assert info["rows"] == {"synapses": len(out), "cell_types": 7} and info["n_pages"] == 1
    assert TOKEN not in repr(info)
    # Positions must come back in table units: nobody asked the server (or caveclient) to rescale them.
    for q in server.queries():
        assert "desired_resolution" not in q.body
    assert all(r.path.startswith(("/info/", "/materialize/")) for r in server.requests)


def test_paging_by_presynaptic_roots(server, tables):
    syn, _ = tables
    out, _, info = fetch_tables(config(server), token=TOKEN, page_size=2)
    pages = server.queries(SYN)
    assert len(pages) == info["n_pages"] == 3  # roots 101..105 in pages of 2
    asked = [q.body["filter_in_dict"][SYN]["pre_pt_root_id"] for q in pages]
    assert all(len(a) <= 2 for a in asked) and sorted(sum(asked, [])) == LABELLED
    assert all(q.body["filter_equal_dict"] == {SYN: {"valid": True}} for q in pages)
    assert sum(info["rows_per_page"]) >= len(out)
    pd.testing.assert_frame_equal(out, expected(syn, LABELLED))


def test_pages_that_hit_the_row_limit_are_split(server, tables):
    syn, _ = tables
    out, _, info = fetch_tables(config(server), token=TOKEN, page_size=10, max_rows=15)
    pd.testing.assert_frame_equal(out, expected(syn, LABELLED))
    assert info["n_pages"] >= 3 and max(info["rows_per_page"]) < 15
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server), token=TOKEN, max_rows=3)
    assert "query limit" in one_line(exc)


def test_pre_root_ids_restriction(server, tables):
    syn, _ = tables
    out, _, _ = fetch_tables(config(server, pre_root_ids=[102, UNLABELLED]), token=TOKEN)
    pd.testing.assert_frame_equal(out, expected(syn, [102, UNLABELLED]))
    (query,) = server.queries(SYN)
    assert sorted(query.body["filter_in_dict"][SYN]["pre_pt_root_id"]) == [102, UNLABELLED]


def test_min_size_filter(server, tables):
    syn, _ = tables
    out, _, _ = fetch_tables(config(server, min_size=100), token=TOKEN)
    assert (out["size"] >= 100).all()
    pd.testing.assert_frame_equal(out, expected(syn, LABELLED, min_size=100))
    assert server.queries(SYN)[0].body["filter_greater_equal_dict"] == {SYN: {"size": 100}}


def test_autapses(server, tables):
    syn, _ = tables
    dropped, _, _ = fetch_tables(config(server), token=TOKEN)
    kept, _, _ = fetch_tables(config(server, drop_autapses=False), token=TOKEN)
    assert not (dropped["pre_pt_root_id"] == dropped["post_pt_root_id"]).any()
    assert (kept["pre_pt_root_id"] == kept["post_pt_root_id"]).sum() == 1
    pd.testing.assert_frame_equal(kept, expected(syn, LABELLED, drop_autapses=False))


def test_missing_version_lists_available(server):
    with pytest.raises(ConfigError) as exc:
        fetch_tables(config(server, materialization_version=0), token=TOKEN)
    assert "materialization_version is required" in one_line(exc) and "943, 1300" in str(exc.value)


def test_unknown_version_lists_available(server):
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server, materialization_version=661), token=TOKEN)
    text = one_line(exc)
    assert "661" in text and "943, 1300" in text


def test_missing_table(server):
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server, cell_type_table="nope_table"), token=TOKEN)
    assert "nope_table" in one_line(exc)


def test_resolution_mismatch(server):
    server.voxel_resolution[SYN] = (8.0, 8.0, 40.0)
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server), token=TOKEN)
    text = one_line(exc)
    assert "8x8x40" in text and "4x4x40" in text
    out, _, _ = fetch_tables(config(server, position_resolution_nm=[8.0, 8.0, 40.0]), token=TOKEN)
    assert len(out) > 0


def test_token_never_shown(server, tables, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CAVE_TOKEN", TOKEN)  # the env var is the path most users take
    out, _, info = fetch_tables(config(server))
    assert len(out) > 0 and TOKEN not in repr(info)
    assert all(r.method != "POST" or r.body for r in server.requests)
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server), token="f" * 32)
    text = one_line(exc)
    assert "HTTP 401" in text and "f" * 32 not in text
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_no_token_at_all(server):
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server))
    assert "credentials" in one_line(exc)


def test_retries_transient_failures(server, tables):
    syn, _ = tables
    server.fail_next(2, status=503)
    out, _, _ = fetch_tables(config(server), token=TOKEN)
    pd.testing.assert_frame_equal(out, expected(syn, LABELLED))
    server.fail_next(50, status=500)  # not retried by caveclient: must still be one line
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server), token=TOKEN)
    assert "HTTP 500" in one_line(exc)


def test_unknown_datastack(server):
    with pytest.raises(DataError) as exc:
        fetch_tables(config(server, datastack="minnie99"), token=TOKEN)
    assert "minnie99" in one_line(exc)


def test_unreachable_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    cfg = TablesConfig(source="cave", datastack=DS, server_address=address, materialization_version=943)
    with pytest.raises(DataError) as exc:
        fetch_tables(cfg, token=TOKEN)
    text = one_line(exc)
    assert address in text and "unreachable" in text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    # A missing version is still reported as the config mistake it is, with the known public versions.
    with pytest.raises(ConfigError) as exc:
        fetch_tables(replace(cfg, materialization_version=0), token=TOKEN)
    assert "1300" in one_line(exc)
    assert TOKEN not in "".join(capsys.readouterr())


def test_datastack_required():
    with pytest.raises(ConfigError) as exc:
        fetch_tables(TablesConfig(source="cave", materialization_version=943))
    assert "tables.datastack" in one_line(exc)
