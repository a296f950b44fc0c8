import numpy as np
import pandas as pd
import pytest

from synhpc.config import TablesConfig
from synhpc.errors import ConfigError, DataError
from synhpc.tables import cell_labels, load_labelled_synapses, read_table, vocabularies


def write_tables(tmp_path, syn: pd.DataFrame, cells: pd.DataFrame, fmt: str = "csv.gz") -> TablesConfig:
    syn_path, cell_path = tmp_path / f"syn.{fmt}", tmp_path / f"cells.{fmt}"
    for frame, path in ((syn, syn_path), (cells, cell_path)):
        if fmt == "parquet":
            frame.to_parquet(path)
        elif fmt == "feather":
            frame.reset_index(drop=True).to_feather(path)
        else:
            frame.to_csv(path, index=False)
    return TablesConfig(synapses=str(syn_path), cell_types=str(cell_path))


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


@pytest.mark.parametrize("fmt", ["csv.gz", "parquet", "feather"])
def test_labels_filters_and_drop_report(tmp_path, fmt):
    syn, cells = base_tables()
    cfg = write_tables(tmp_path, syn, cells, fmt)
    cfg.min_size = 50
    frame, drops, _ = load_labelled_synapses(cfg)
    # 4 invalid, 2 too small, 5 autapse (12 -> 12), 7's root 14 has conflicting rows, 12 has no cell type anyway.
    assert frame["synapse_id"].tolist() == [1, 3, 6]
    assert frame["label"].tolist() == [1, 0, 1]
    assert frame[["x", "y", "z"]].to_numpy().tolist() == [[100, 200, 30], [104, 200, 30], [110, 200, 30]]
    assert drops == {
        "synapse_invalid": 1,
        "synapse_below_min_size": 1,
        "synapse_autapse": 1,
        "cell_type_drop_class": 1,
        "cell_type_conflicting_roots": 1,
        "cell_type_duplicate_rows_merged": 1,
        "synapse_pre_root_unlabelled": 1,
    }


def test_packed_positions(tmp_path):
    syn, cells = base_tables()
    syn["ctr_pt_position"] = [f"[{x} {y} {z}]" for x, y, z in syn[["ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"]].to_numpy()]
    syn = syn.drop(columns=["ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"])
    frame, _, _ = load_labelled_synapses(write_tables(tmp_path, syn, cells))
    assert frame["x"].tolist() == [100, 102, 104, 110]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s, c: (s.drop(columns=["pre_pt_root_id"]), c), "syn.csv.gz: missing column 'pre_pt_root_id'"),
        (lambda s, c: (s.drop(columns=["ctr_pt_position_x"]), c), "syn.csv.gz: missing column 'ctr_pt_position'"),
        (lambda s, c: (s.assign(id=[1, 2, 3, 3, 5, 6, 7]), c), "syn.csv.gz: row 3: duplicate synapse id 3"),
        (lambda s, c: (s.assign(ctr_pt_position_y=[200, np.nan, 200, 200, 200, 200, 200]), c), "syn.csv.gz: row 1: synapse 2 has a NaN"),
        (lambda s, c: (s, c.assign(classification_system=["excitatory_neuron"] * 6 + ["glia"])), "cells.csv.gz: row 6: unknown cell-type class classification_system='glia'"),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path, mutate, message):
    syn, cells = mutate(*base_tables())
    with pytest.raises(DataError) as exc:
        load_labelled_synapses(write_tables(tmp_path, syn, cells))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file_and_unknown_vocabulary(tmp_path):
    with pytest.raises(DataError, match="table file not found"):
        read_table(str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="no vocabulary for 'my_table'"):
        cell_labels(pd.DataFrame({"pt_root_id": [1]}), "my_table", "x")


def test_every_vocabulary_maps_to_known_meanings():
    for table, vocab in vocabularies().items():
        assert set(vocab["classes"].values()) <= {"excitatory", "inhibitory", "drop"}, table
    fine = vocabularies()["cell_type_multifeature_combo"]["classes"]
    assert fine["L5ET"] == "excitatory" and fine["ChC"] == "inhibitory"
