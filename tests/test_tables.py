import os
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ is not a package; the server sits beside us

from http_dump_server import DumpServer  # noqa: E402

from synhpc.config import TablesConfig  # noqa: E402
from synhpc.dumps import write_dump  # noqa: E402
from synhpc.errors import ConfigError, DataError  # noqa: E402
from synhpc.tables import (  # noqa: E402
    cell_labels,
    load_labelled_synapses,
    load_targets,
    read_table,
    vocabularies,
)

FORMATS = ["csv.gz", "headerless", "parquet", "feather"]


def write_tables(tmp_path, syn: pd.DataFrame, cells: pd.DataFrame, fmt: str = "csv.gz") -> TablesConfig:
    """Both tables in one format; ``headerless`` is the public dumps' layout (no header row, a sidecar, t/f)."""
    ext = "csv.gz" if fmt == "headerless" else fmt
    syn_path, cell_path = tmp_path / f"syn.{ext}", tmp_path / f"cells.{ext}"
    for frame, path in ((syn, syn_path), (cells, cell_path)):
        if fmt == "parquet":
            frame.to_parquet(path)
        elif fmt == "feather":
            frame.reset_index(drop=True).to_feather(path)
        elif fmt == "headerless":
            write_dump(frame, path)
        else:
            frame.to_csv(path, index=False)
    return TablesConfig(synapses=str(syn_path), cell_types=str(cell_path), cache_dir=str(tmp_path / "cache"))


def base_tables():
    syn = pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6, 7],
            "valid": [True, True, True, False, True, True, True],
            "pre_pt_root_id": [10, 10, 11, 11, 12, 13, 14],
            "post_pt_root_id": [20, 21, 22, 23, 12, 24, 25],
            "size": [100, 5, 300, 300, 300, 300, 300],
            "ctr_pt_position_x": [100, 102, 104, 106, 108, 110, 112],
            "ctr_pt_position_y": [200] * 7,
            "ctr_pt_position_z": [30] * 7,
        }
    )
    cells = pd.DataFrame(
        {
            "pt_root_id": [10, 11, 13, 13, 14, 14, 99],
            "classification_system": ["excitatory_neuron", "inhibitory_neuron", "excitatory_neuron", "excitatory_neuron", "excitatory_neuron", "inhibitory_neuron", "nonneuron"],
            "cell_type": ["23P", "BC", "4P", "4P", "5P-IT", "MC", "astrocyte"],
        }
    )
    return syn, cells


EXPECTED_DROPS = {
    "synapse_invalid": 1,
    "synapse_below_min_size": 1,
    "synapse_autapse": 1,
    "cell_type_drop_class": 1,
    "cell_type_conflicting_roots": 1,
    "cell_type_duplicate_rows_merged": 1,
    "synapse_pre_root_unlabelled": 1,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_labels_filters_and_drop_report(tmp_path, fmt):
    syn, cells = base_tables()
    cfg = write_tables(tmp_path, syn, cells, fmt)
    cfg.min_size = 50
    frame, drops, provenance = load_labelled_synapses(cfg)
    # 4 invalid, 2 too small, 5 autapse (12 -> 12), 7's root 14 has conflicting rows, 12 has no cell type anyway.
    assert list(frame.columns) == ["synapse_id", "pre_root_id", "post_root_id", "size", "x", "y", "z", "label"]
    assert frame["synapse_id"].tolist() == [1, 3, 6]
    assert frame["label"].tolist() == [1, 0, 1]
    assert frame[["x", "y", "z"]].to_numpy().tolist() == [[100, 200, 30], [104, 200, 30], [110, 200, 30]]
    assert [str(t) for t in frame.dtypes] == ["int64"] * 4 + ["float64"] * 3 + ["int8"]
    assert drops == EXPECTED_DROPS
    assert list(drops)[-1] == "synapse_pre_root_unlabelled"  # drops.csv keeps its row order
    assert provenance["synapses"] == cfg.synapses and provenance["files"]["synapses"]["size"] > 0
    if fmt == "headerless":
        assert provenance["files"]["synapses"]["sidecar"]["location"].endswith("syn_header.csv")
    elif fmt == "csv.gz":
        assert provenance["files"]["synapses"]["header_row"] is True
    assert provenance["subset_cache"] is None  # small tables are scanned, not cached


def test_postgres_text_booleans(tmp_path):
    """Raw Postgres exports write booleans as t/f; "f" must read as False (astype(bool) would say True)."""
    syn, cells = base_tables()
    syn["valid"] = np.where(syn["valid"], "t", "f")
    cells["valid"] = ["t", "t", "t", "t", "t", "t", "f"]
    cfg = write_tables(tmp_path, syn, cells)
    frame, drops, _ = load_labelled_synapses(cfg)
    assert 4 not in frame["synapse_id"].tolist() and drops["synapse_invalid"] == 1
    assert drops["cell_type_invalid"] == 1 and drops["cell_type_drop_class"] == 0


def test_the_real_dump_layout_without_valid_column(tmp_path):
    """synapses_pni_2_v1_filtered_view: 15 columns in the sidecar's order, no valid column, integer positions."""
    rng = np.random.default_rng(0)
    n = 500
    syn = pd.DataFrame({"id": np.arange(n, dtype=np.int64) + 10**8})
    for p in ("pre", "ctr", "post"):
        for a, hi in zip("xyz", (350000, 300000, 27868)):
            syn[f"{p}_pt_position_{a}"] = rng.integers(1000, hi, n)
    syn["size"] = rng.integers(20, 5000, n)
    roots = 864691135000000000 + np.arange(40)
    syn["pre_pt_supervoxel_id"] = rng.integers(8 * 10**16, 9 * 10**16, n)
    syn["pre_pt_root_id"] = rng.choice(roots, n)
    syn["post_pt_supervoxel_id"] = rng.integers(8 * 10**16, 9 * 10**16, n)
    syn["post_pt_root_id"] = rng.choice(roots, n)
    cells = pd.DataFrame({"id": np.arange(20), "target_id": np.arange(20) + 500,
                          "classification_system": ["excitatory_neuron", "inhibitory_neuron"] * 10,
                          "cell_type": ["23P", "BC"] * 10, "volume": np.linspace(100.0, 300.0, 20),
                          "pt_supervoxel_id": np.arange(20) + 8 * 10**16, "pt_root_id": roots[:20],
                          "pt_position_x": np.arange(20), "pt_position_y": np.arange(20), "pt_position_z": np.arange(20)})
    write_dump(syn, tmp_path / "synapses_pni_2_v1_filtered_view.csv.gz")
    write_dump(cells, tmp_path / "aibs_metamodel_celltypes_v661_merged.csv.gz")
    cfg = TablesConfig(synapses=str(tmp_path / "synapses_pni_2_v1_filtered_view.csv.gz"),
                       cell_types=str(tmp_path / "aibs_metamodel_celltypes_v661_merged.csv.gz"),
                       cache_dir=str(tmp_path / "cache"))
    frame, drops, provenance = load_labelled_synapses(cfg)
    expected = syn[syn["pre_pt_root_id"].isin(roots[:20]) & (syn["pre_pt_root_id"] != syn["post_pt_root_id"])]
    assert frame["synapse_id"].tolist() == expected["id"].tolist()
    assert frame["x"].tolist() == expected["ctr_pt_position_x"].astype(float).tolist()
    assert frame["size"].tolist() == expected["size"].tolist()
    label = dict(zip(roots[:20], [1, 0] * 10))
    assert frame["label"].tolist() == [label[r] for r in expected["pre_pt_root_id"]]
    assert "synapse_invalid" not in drops
    assert drops["synapse_autapse"] + drops["synapse_pre_root_unlabelled"] + len(frame) == n
    assert provenance["files"]["synapses"]["sidecar"]["location"].endswith("synapses_pni_2_v1_filtered_view_header.csv")


def ewkb_point_z(x: float, y: float, z: float) -> str:
    return (struct.pack("<BI", 1, 0x80000001) + struct.pack("<3d", x, y, z)).hex().upper()


@pytest.mark.parametrize("packing", ["text", "ewkb"])
def test_packed_positions(tmp_path, packing):
    syn, cells = base_tables()
    xyz = syn[["ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"]].to_numpy()
    syn["ctr_pt_position"] = [f"[{x} {y} {z}]" if packing == "text" else ewkb_point_z(x, y, z) for x, y, z in xyz]
    syn = syn.drop(columns=["ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"])
    frame, _, _ = load_labelled_synapses(write_tables(tmp_path, syn, cells, "headerless"))
    assert frame["x"].tolist() == [100, 102, 104, 110] and frame["z"].tolist() == [30] * 4


@pytest.mark.parametrize(
    "fmt, mutate, message",
    [
        ("csv.gz", lambda s, c: (s.drop(columns=["pre_pt_root_id"]), c), "syn.csv.gz: missing column 'pre_pt_root_id'"),
        ("csv.gz", lambda s, c: (s.drop(columns=["ctr_pt_position_x"]), c), "syn.csv.gz: missing column 'ctr_pt_position'"),
        ("csv.gz", lambda s, c: (s.assign(id=[1, 2, 3, 4, 5, 1, 7]), c), "syn.csv.gz: row 5 (line 7): duplicate synapse id 1"),
        ("parquet", lambda s, c: (s.assign(id=[1, 2, 3, 4, 5, 1, 7]), c), "syn.parquet: row 5: duplicate synapse id 1"),
        ("csv.gz", lambda s, c: (s.assign(ctr_pt_position_y=[200, np.nan, 200, 200, 200, 200, 200]), c),
         "syn.csv.gz: row 1 (line 3), column ctr_pt_position_y: empty value"),
        ("parquet", lambda s, c: (s.assign(ctr_pt_position_y=[200, np.inf, 200, 200, 200, 200, 200]), c),
         "syn.parquet: row 1: synapse 2 has a NaN or infinite ctr_pt_position"),
        ("headerless", lambda s, c: (s.assign(pre_pt_root_id=["10", "10", "11", "11", "x12", "13", "14"]), c),
         "syn.csv.gz: row 4 (line 5), column pre_pt_root_id: 'x12' is not an integer"),
        ("csv.gz", lambda s, c: (s.assign(ctr_pt_position_z=["30", "30", "30", "30", "30", "3O", "30"]), c),
         "syn.csv.gz: row 5 (line 7), column ctr_pt_position_z: '3O' is not a number"),
        ("headerless", lambda s, c: (s, c.assign(pt_root_id=["10", "11", "13", "13", "14", "14", "9 9"])),
         "cells.csv.gz: row 6 (line 7), column pt_root_id: '9 9' is not an integer"),
        ("csv.gz", lambda s, c: (s, c.assign(classification_system=["excitatory_neuron"] * 6 + ["glia"])),
         "cells.csv.gz: row 6 (line 8): unknown cell-type class classification_system='glia'"),
        ("csv.gz", lambda s, c: (s.assign(valid=["t", "t", "t", "f", "t", "maybe", "t"]), c),
         "syn.csv.gz: row 5 (line 7), column valid: 'maybe' is not a boolean (t/f, true/false, 1/0)"),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path, fmt, mutate, message):
    syn, cells = mutate(*base_tables())
    with pytest.raises(DataError) as exc:
        load_labelled_synapses(write_tables(tmp_path, syn, cells, fmt))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cave_rows_go_through_the_same_scan(monkeypatch):
    syn, cells = base_tables()
    monkeypatch.setattr("synhpc.sources.cave.fetch_tables", lambda cfg: (syn, cells.assign(valid=True), {"source": "cave"}))
    cfg = TablesConfig(source="cave", datastack="ds", materialization_version=943, min_size=50)
    frame, drops, provenance = load_labelled_synapses(cfg)
    assert frame["synapse_id"].tolist() == [1, 3, 6] and frame["label"].tolist() == [1, 0, 1]
    assert drops == EXPECTED_DROPS | {"cell_type_invalid": 0}
    assert provenance == {"source": "cave", "materialization_version": 943, "position": "ctr_pt_position"}


def test_missing_file_and_unknown_vocabulary(tmp_path):
    with pytest.raises(DataError, match="table file not found"):
        read_table(str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="no vocabulary for 'my_table'"):
        cell_labels(pd.DataFrame({"pt_root_id": [1]}), "my_table", "x")


def test_root_zero_is_no_cell(tmp_path):
    syn, cells = base_tables()
    syn.loc[6, "pre_pt_root_id"] = 0
    cells.loc[6, ["pt_root_id", "classification_system"]] = [0, "excitatory_neuron"]
    frame, drops, _ = load_labelled_synapses(write_tables(tmp_path, syn, cells))
    assert 7 not in frame["synapse_id"].tolist() and drops["cell_type_root_zero"] == 1


def test_every_vocabulary_maps_to_known_meanings():
    for table, vocab in vocabularies().items():
        assert set(vocab["classes"].values()) <= {"excitatory", "inhibitory", "drop"}, table
    fine = vocabularies()["cell_type_multifeature_combo"]["classes"]
    assert fine["L5ET"] == "excitatory" and fine["ChC"] == "inhibitory"


# ------------------------------------------------------------------------------------------------- subset cache


def cached_config(tmp_path) -> TablesConfig:
    syn, cells = base_tables()
    cfg = write_tables(tmp_path, syn, cells, "headerless")
    cfg.subset_cache_min_mb = 0.0  # cache even these tiny tables
    return cfg


def test_labelled_subset_is_written_once_and_reused(tmp_path):
    cfg = cached_config(tmp_path)
    frame, drops, first = load_labelled_synapses(cfg)
    cache_file = Path(first["subset_cache"])
    assert cache_file.is_file() and cache_file.parent == tmp_path / "cache" / "subsets"
    assert cache_file.name.startswith("syn-") and cache_file.suffix == ".parquet"
    assert first["subset_cache_hit"] is False and first["rows_scanned"] == 7
    stamp = cache_file.stat().st_mtime_ns
    again, drops_again, second = load_labelled_synapses(cfg)
    assert second["subset_cache_hit"] is True and cache_file.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, frame)
    assert drops_again == drops and list(drops_again) == list(drops)
    assert sorted(os.listdir(cache_file.parent)) == [cache_file.name]  # no temporary left behind


def test_cache_key_follows_inputs(tmp_path):
    cfg = cached_config(tmp_path)
    _, _, base = load_labelled_synapses(cfg)
    cfg.min_size = 50
    _, drops, other = load_labelled_synapses(cfg)
    assert other["subset_cache"] != base["subset_cache"] and drops["synapse_below_min_size"] == 1
    cfg.min_size = 0
    cfg.position = "pre_pt_position"  # a different position column is a different subset
    syn, _ = base_tables()
    for a in "xyz":
        syn[f"pre_pt_position_{a}"] = syn[f"ctr_pt_position_{a}"] + 1
    write_dump(syn, Path(cfg.synapses))  # also a new size/mtime
    frame, _, moved = load_labelled_synapses(cfg)
    assert moved["subset_cache"] not in (base["subset_cache"], other["subset_cache"])
    assert frame["x"].tolist() == [101, 103, 105, 111]
    assert len(os.listdir(tmp_path / "cache" / "subsets")) == 3


def big_synapses(n=150_000):
    syn, _ = base_tables()
    rows = syn.iloc[np.arange(n) % len(syn)].reset_index(drop=True)
    return rows.assign(id=np.arange(n) + 1)


@pytest.mark.parametrize("damage, message", [
    ("duplicate", "syn.csv.gz: row 149998 (line 149999): duplicate synapse id 1"),
    ("truncate", "syn.csv.gz: unreadable after row "),
])
def test_a_failed_scan_leaves_no_cache_file(tmp_path, damage, message):
    syn = big_synapses()
    if damage == "duplicate":
        syn.loc[len(syn) - 2, "id"] = 1  # a kept row (the last one is invalid)
    cfg = write_tables(tmp_path, syn, base_tables()[1], "headerless")
    cfg.subset_cache_min_mb = 0.0
    if damage == "truncate":
        data = Path(cfg.synapses).read_bytes()
        Path(cfg.synapses).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as exc:
        load_labelled_synapses(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert os.listdir(tmp_path / "cache" / "subsets") == []  # neither a cache file nor a temporary


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    cfg = cached_config(tmp_path)
    frame, _, info = load_labelled_synapses(cfg)
    Path(info["subset_cache"]).write_bytes(b"PAR1 not really")
    again, _, info2 = load_labelled_synapses(cfg)
    assert info2["subset_cache_hit"] is False
    pd.testing.assert_frame_equal(again, frame)


def test_tables_from_urls_are_downloaded_once(tmp_path):
    """The dumps configuration's shape: remote headerless dumps with sidecars, no token."""
    syn, cells = base_tables()
    src = tmp_path / "src"
    src.mkdir()
    write_dump(syn.drop(columns=["valid"]), src / "synapses_pni_2_v1_filtered_view.csv.gz")
    write_dump(cells, src / "aibs_metamodel_celltypes_v661_merged.csv.gz")
    files = {f"/mat_dbs/v1300/{p.name}": p.read_bytes() for p in src.iterdir()}
    with DumpServer(files) as server:
        base = server.url + "/mat_dbs/v1300/"
        cfg = TablesConfig(synapses=base + "synapses_pni_2_v1_filtered_view.csv.gz",
                           cell_types=base + "aibs_metamodel_celltypes_v661_merged.csv.gz",
                           cache_dir=str(tmp_path / "cache"), subset_cache_min_mb=0.0)
        frame, _, provenance = load_labelled_synapses(cfg)
        asked = len(server.requests)
        again, _, second = load_labelled_synapses(cfg)
        assert len(server.requests) == asked == 4  # two dumps and two sidecars, each fetched once
    assert frame["synapse_id"].tolist() == [1, 2, 3, 4, 6] and again.equals(frame)
    assert second["subset_cache_hit"] is True
    assert provenance["files"]["synapses"]["url"] == cfg.synapses and provenance["files"]["synapses"]["etag"]
    assert provenance["files"]["cell_types"]["sidecar"]["location"] == base + "aibs_metamodel_celltypes_v661_merged_header.csv"


# ------------------------------------------------------------------------------------------------------ targets


def test_targets_accept_synapse_id_or_reference_target_id(tmp_path):
    world = pd.DataFrame({"id": [900, 901, 902, 903], "synapse_id": [1, 2, 3, 3], "tag": ["spine", "Shaft ", "soma", "soma"]})
    world.to_csv(tmp_path / "world.csv.gz", index=False)
    frame = load_targets(TablesConfig(targets=str(tmp_path / "world.csv.gz")))
    assert frame.to_dict("list") == {"synapse_id": [1, 2, 3], "target": ["spine", "shaft", "soma"]}
    assert str(frame["synapse_id"].dtype) == "int64" and frame.attrs["drops"]["target_duplicate_rows_merged"] == 1
    # A CAVE reference annotation: id is the annotation's own, target_id the synapse's; headerless with t/f.
    cave = pd.DataFrame({"id": [1, 2, 3, 4], "valid": [True, True, False, True], "target_id": [11, 12, 13, 14],
                         "tag": ["spine", "shaft", "spine", "soma"]})
    write_dump(cave, tmp_path / "synapse_target_predictions_ssa_merged.csv.gz")
    cfg = TablesConfig(targets=str(tmp_path / "synapse_target_predictions_ssa_merged.csv.gz"))
    frame = load_targets(cfg)
    assert frame["synapse_id"].tolist() == [11, 12, 14] and frame.attrs["drops"]["target_invalid"] == 1
    assert load_targets(cfg, synapse_ids=[14, 12, 99])["synapse_id"].tolist() == [12, 14]


def test_targets_errors(tmp_path):
    pd.DataFrame({"synapse_id": [1, 2], "target": ["spine", "bouton"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError) as exc:
        load_targets(TablesConfig(targets=str(tmp_path / "t.parquet")))
    assert str(exc.value).endswith("t.parquet: row 1, column target: unknown target 'bouton' (expected spine, shaft, soma)")
    pd.DataFrame({"synapse_id": [1, 1, 2], "target": ["spine", "shaft", "soma"]}).to_parquet(tmp_path / "c.parquet")
    frame = load_targets(TablesConfig(targets=str(tmp_path / "c.parquet")))
    assert frame["synapse_id"].tolist() == [2] and frame.attrs["drops"]["target_conflicting_synapses"] == 1
    pd.DataFrame({"synapse_id": [1], "compartment": ["spine"]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(DataError, match="n.parquet: missing column target \\(or tag\\)"):
        load_targets(TablesConfig(targets=str(tmp_path / "n.parquet")))
    with pytest.raises(ConfigError, match="tables.targets is empty"):
        load_targets(TablesConfig())


# ------------------------------------------------------------------------------------------------------ configs


def test_microns_dumps_config_is_microns_without_cave():
    from synhpc.config import load_config

    cave, dumps = load_config("configs/microns.yaml").to_dict(), load_config("configs/microns-dumps.yaml").to_dict()
    assert {k for k in cave if cave[k] != dumps[k]} == {"tables"}
    differ = {k for k in cave["tables"] if cave["tables"][k] != dumps["tables"][k]}
    assert differ == {"source", "synapses", "cell_types"} and dumps["tables"]["source"] == "files"
    base = "https://storage.googleapis.com/mat_dbs/public/minnie65_phase3_v1/v1300/"
    assert dumps["tables"]["synapses"] == base + "synapses_pni_2_v1_filtered_view.csv.gz"
    assert dumps["tables"]["cell_types"] == base + "aibs_metamodel_celltypes_v661_merged.csv.gz"
    comment = Path("configs/microns.yaml").read_text()
    assert base + "synapses_pni_2_v1_filtered_view.csv.gz" in comment and "synapses_pni_2.csv.gz" not in comment


def test_cache_settings_are_checked(tmp_path):
    cfg = cached_config(tmp_path)
    cfg.subset_cache_min_mb = -1.0
    with pytest.raises(ConfigError, match="tables.subset_cache_min_mb must be >= 0"):
        load_labelled_synapses(cfg)
    remote = TablesConfig(cell_types="https://example.invalid/cells.csv.gz", cache_dir="")
    with pytest.raises(ConfigError, match="tables.cell_types: https://example.invalid/cells.csv.gz is remote and "
                                          "tables.cache_dir is empty"):
        load_labelled_synapses(remote)
