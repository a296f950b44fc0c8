"""The real-data path end to end on faithful replicas: configs/microns-dumps.yaml (configs/microns.yaml with the
tables read from the public static dumps) extracts, trains and evaluates with only URL and path overrides (plus a
short recipe so the test runs in seconds), against

- dumps in the real headerless layout (``<table>_merged.csv.gz`` / ``synapses_pni_2_v1_filtered_view.csv.gz``, each
  with a ``_header.csv`` sidecar whose column order is not the CSV writer's), served over loopback HTTP with latency
  and transient 5xx, downloaded once into the table cache;
- an EM replica with minnie65's geometry (8x8x40 nm mip 0, voxel offset in the tens of thousands, JPEG, 128x128x16
  chunks, a few chunks missing), sharded and unsharded, over the same kind of server.

Synapses whose centre lies outside the EM are dropped and counted; cubes that cross the edge stay, zero-filled and
counted; zstd shards (microns' setting) train in a new process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from replica import replica_server, replicas, synapse_positions  # noqa: F401  (session fixtures)

from synhpc.cli import main
from synhpc.dumps import write_dump
from synhpc.replicas import LoopbackServer

ENV = os.environ | {"PYTHONUNBUFFERED": "1"}
ROOT_BASE = 864691135000000000
# The public dump's 15 columns, deliberately not in the order a CSV writer would guess: only the sidecar says it.
SYNAPSE_ORDER = [
    "id", "pre_pt_position_x", "pre_pt_position_y", "pre_pt_position_z", "ctr_pt_position_x", "ctr_pt_position_y",
    "ctr_pt_position_z", "post_pt_position_x", "post_pt_position_y", "post_pt_position_z", "size",
    "pre_pt_supervoxel_id", "pre_pt_root_id", "post_pt_supervoxel_id", "post_pt_root_id",
]  # fmt: skip


def write_real_dumps(folder: Path, n_roots: int = 40) -> tuple[pd.DataFrame, np.ndarray]:
    """Synapse and cell-type dumps in the public layout around the replica's synapse positions."""
    pos = synapse_positions(300)
    n = len(pos.table_xyz)
    rng = np.random.default_rng(3)
    roots = ROOT_BASE + np.arange(n_roots)
    pre = roots[np.arange(n) % n_roots]
    syn = pd.DataFrame({"id": 10**8 + np.arange(n), "size": rng.integers(50, 900, n), "pre_pt_root_id": pre,
                        "post_pt_root_id": ROOT_BASE + 10**6 + rng.integers(0, 80, n),
                        "pre_pt_supervoxel_id": 88 * 10**15 + rng.integers(0, 10**9, n), "post_pt_supervoxel_id": 88 * 10**15 + rng.integers(0, 10**9, n)})  # fmt: skip
    for name, shift in (("pre_pt_position", -20), ("ctr_pt_position", 0), ("post_pt_position", 20)):
        for axis, column in zip("xyz", pos.table_xyz.T):
            syn[f"{name}_{axis}"] = column + (shift if axis == "x" else 0)
    write_dump(syn[SYNAPSE_ORDER], folder / "synapses_pni_2_v1_filtered_view.csv.gz")
    excitatory = np.arange(n_roots) % 2 == 0
    cells = pd.DataFrame({
        "id": np.arange(n_roots) + 1, "target_id": np.arange(n_roots) + 500,
        "classification_system": np.where(excitatory, "excitatory_neuron", "inhibitory_neuron"),
        "cell_type": np.where(excitatory, "23P", "BC"), "volume": rng.random(n_roots) * 300,
        "pt_supervoxel_id": 88 * 10**15 + np.arange(n_roots), "pt_root_id": roots,
        "pt_position_x": 60000, "pt_position_y": 70000, "pt_position_z": 20000,
    })  # fmt: skip
    write_dump(cells, folder / "aibs_metamodel_celltypes_v661_merged.csv.gz")
    return syn, pos.kind


@pytest.fixture(scope="module")
def dump_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dumps")
    syn, kind = write_real_dumps(folder)
    with LoopbackServer(folder, latency_ms=5, fail_every=3) as server:
        yield server, syn, kind, tmp_path_factory.mktemp("table-cache")


def _args(tmp: Path, dumps: LoopbackServer, cache: Path, em_url: str, name: str) -> list[str]:
    return [
        f"run.root={tmp / 'logs'}", f"run.name={name}", f"tables.cache_dir={cache}",
        f"tables.synapses={dumps.url}/synapses_pni_2_v1_filtered_view.csv.gz",
        f"tables.cell_types={dumps.url}/aibs_metamodel_celltypes_v661_merged.csv.gz",
        f"imagery.url=precomputed://{em_url}",
        # A short recipe and no cluster: what keeps the test to seconds, not part of the data path under test.
        "execution.executor=debug", "train.epochs=1", "train.num_workers=0", "evaluate.bootstrap=50", "evaluate.tta_views=1",
    ]  # fmt: skip


@pytest.mark.parametrize("variant", ["unsharded", "sharded"])
def test_microns_config_runs_end_to_end_on_replicas(variant, replicas, replica_server, dump_server, tmp_path):  # noqa: F811
    dumps, syn, kind, cache = dump_server
    args = _args(tmp_path, dumps, cache, replicas[variant].http_url(replica_server), f"replica-{variant}")
    assert main(["extract", "-c", "configs/microns-dumps.yaml", *args]) == 0
    run = tmp_path / "logs" / f"replica-{variant}"
    drops = pd.read_csv(run / "drops.csv").set_index("reason")["rows"]
    assert drops["synapse_centre_outside_imagery"] == int((kind == "outside").sum())
    index = json.loads((run / "cubes" / "index.json").read_text())
    assert index["edge_cubes"] == int((kind == "edge").sum()) and index["missing_chunks"] > 0
    manifest = pd.read_csv(run / "synapses.csv")
    assert len(manifest) == int((kind != "outside").sum())
    # The labels come from the headerless cell-type dump, through its sidecar.
    labels = dict(zip(ROOT_BASE + np.arange(40), (np.arange(40) % 2 == 0).astype(int)))
    assert (manifest["label"] == manifest["pre_root_id"].map(labels)).all()
    # Downloaded once for both variants and every stage: the cache holds the two dumps (and their sidecars).
    assert len(list((cache / "downloads").rglob("*.csv.gz"))) == 2
    if variant == "unsharded":
        return  # training and evaluation do not depend on how the imagery was stored; once is enough
    # zstd shards (microns' setting) train in a new process: the filter is loaded on the read side.
    proc = subprocess.run([sys.executable, "-m", "synhpc", "train", "-c", "configs/microns-dumps.yaml", *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["evaluate", "-c", "configs/microns-dumps.yaml", *args]) == 0
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary["split"]) == {"val", "test"} and (summary["materialization_version"] == 1300).all()
