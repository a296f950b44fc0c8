"""Extraction plan: SLURM array splitting, MaxArraySize discovery, and counts that match the data."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from slurm.plan import SLURM_DEFAULT_MAX_ARRAY_SIZE, array_chunks, cluster_max_array_size, format_plan, make_plan
from synhpc.config import load_config
from synhpc.manifest import plan_manifest


@pytest.mark.parametrize(
    ("n", "size", "lengths"),
    [
        (2002, 1001, [1001, 1001]),  # exact multiple
        (2003, 1001, [1001, 1001, 1]),
        (1, 1001, [1]),
        (1001, 1001, [1001]),
        (5, 1, [1, 1, 1, 1, 1]),  # MaxArraySize 1: only index 0 is legal
        (0, 10, []),
    ],
)
def test_array_chunks(n, size, lengths):
    chunks = array_chunks(n, size)
    assert [len(r) for r in chunks] == lengths
    assert [i for r in chunks for i in r] == list(range(n))  # every task once, in order
    assert all(len(r) - 1 < size for r in chunks)  # the largest index submitit uses is len-1


def test_array_chunks_rejects_nonsense():
    with pytest.raises(ValueError):
        array_chunks(3, 0)


def _fake_scontrol(folder: Path, body: str, rc: int = 0) -> None:
    script = folder / "scontrol"
    # Only shell builtins: PATH holds nothing but this folder.
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{body}'\nexit {rc}\n")
    script.chmod(0o755)


def test_cluster_max_array_size(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cluster_max_array_size() is None  # no scontrol
    _fake_scontrol(tmp_path, "Configuration data as of 2026-01-01T00:00:00\nMaxArraySize            = 40001\nMaxJobCount = 10000")
    assert cluster_max_array_size() == 40001
    _fake_scontrol(tmp_path, "MaxJobCount = 10000")
    assert cluster_max_array_size() is None
    _fake_scontrol(tmp_path, "slurm_load_ctl_conf error: Unable to contact slurm controller", rc=1)
    assert cluster_max_array_size() is None


def test_plan_of_an_extracted_run(extracted_run, tmp_path, monkeypatch):
    from slurm.launch import task_groups

    run, args = extracted_run
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: SLURM's default applies
    cfg = load_config("configs/demo.yaml", args)
    plan = make_plan(cfg)
    manifest = pd.read_csv(run / "synapses.csv")
    for s, name in enumerate(("train", "val", "test")):
        for value, cls in ((1, "excitatory"), (0, "inhibitory")):
            rows = manifest[(manifest["split"] == s) & (manifest["label"] == value)]
            assert plan["counts"][name][cls] == len(rows)
            assert plan["counts"][name][f"{cls}_neurons"] == rows["pre_root_id"].nunique()
    shards = sorted((run / "cubes").glob("shard-*.h5"))
    assert plan["synapses"] == len(manifest) and plan["shards"] == len(shards)
    assert plan["tasks"] == len(task_groups(list(range(plan["shards"])), cfg.execution))
    assert plan["max_array_size"] == SLURM_DEFAULT_MAX_ARRAY_SIZE and plan["arrays"] == []  # not a slurm run
    stored = 0
    for path in shards:
        with h5py.File(path, "r") as f:
            stored += f["cube"].id.get_storage_size()
    assert plan["storage_bytes"] == stored  # compression none: the estimate is exact
    text = format_plan(plan)
    assert f"{plan['synapses']:,}" in text and "shard(s)" in text

    slurm = load_config("configs/demo.yaml", [*args, "execution.executor=slurm", "execution.profile=local"])
    _fake_scontrol(tmp_path, "MaxArraySize = 2")
    plan = make_plan(slurm, rate_cubes_per_s=10.0)
    assert plan["tasks"] == plan["shards"] and plan["max_array_size_source"] == "scontrol"
    assert plan["arrays"] == [[r.start, r.stop] for r in array_chunks(plan["shards"], 2)]
    assert plan["array_specs"][0] == "0-1%2"  # the local profile's extract.array_parallelism
    assert plan["seconds"] == pytest.approx(plan["synapses"] / 10.0)
    assert make_plan(slurm, max_array_size=1000)["max_array_size_source"] == "argument"
    assert "sbatch --array" in format_plan(plan)


def _big_world(root: Path, n: int, n_roots: int, seed: int = 0) -> dict[str, object]:
    """A parquet synapse table of ``n`` rows with heavy-tailed neurons and planted drops, plus an info-only volume."""
    from cloudvolume import CloudVolume

    rng = np.random.default_rng(seed)
    roots = 864691135000000000 + np.arange(n_roots, dtype=np.int64)
    kind = np.arange(n_roots) % 10  # 0-3 inhibitory, 4-7 excitatory, 8 non-neuronal (dropped), 9 not in the cell table
    weight = rng.pareto(1.2, n_roots) + 1
    pre_index = rng.choice(n_roots, size=n, p=weight / weight.sum())
    post = 10**17 + np.arange(n, dtype=np.int64)
    autapse = rng.random(n) < 0.01
    post[autapse] = roots[pre_index[autapse]]
    valid = rng.random(n) >= 0.02
    shape = np.array([4096, 4096, 512])
    pos = rng.integers(0, shape, size=(n, 3)) * np.array([2, 2, 1])
    pd.DataFrame(
        {
            "id": 10**8 + np.arange(n), "valid": valid, "pre_pt_root_id": roots[pre_index], "post_pt_root_id": post,
            "size": 300, "ctr_pt_position_x": pos[:, 0], "ctr_pt_position_y": pos[:, 1], "ctr_pt_position_z": pos[:, 2],
        }
    ).to_parquet(root / "syn.parquet")  # fmt: skip
    in_table = kind != 9
    system = np.select([kind < 4, kind < 8], ["inhibitory_neuron", "excitatory_neuron"], "nonneuron")
    cell_type = np.select([kind < 4, kind < 8], ["BC", "23P"], "astrocyte")
    pd.DataFrame({"pt_root_id": roots[in_table], "classification_system": system[in_table], "cell_type": cell_type[in_table]}).to_parquet(
        root / "cells.parquet"
    )
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw", resolution=[8, 8, 40],
        voxel_offset=[0, 0, 0], chunk_size=[128, 128, 16], volume_size=shape.tolist(),
    )  # fmt: skip
    CloudVolume("file://" + str((root / "em").resolve()), info=info).commit_info()
    kept = valid & ~autapse & (kind[pre_index] < 8)
    label = np.where(kind < 4, 0, 1)
    return {"kept": kept, "pre_index": pre_index, "label_of_root": label, "roots": roots, "valid": valid, "autapse": autapse}


def test_plan_counts_on_a_large_table(tmp_path):
    n, n_roots = 200_000, 3000
    truth = _big_world(tmp_path, n, n_roots)
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"tables.synapses={tmp_path / 'syn.parquet'}", f"tables.cell_types={tmp_path / 'cells.parquet'}",
            "tables.targets=\"\"", f"imagery.url=file://{tmp_path / 'em'}", "execution.executor=slurm", "cubes.shard_size=256",
        ],
    )  # fmt: skip
    plan = make_plan(cfg, max_array_size=100)  # speed is measured by `synhpc plan` on 2 M synapses, not asserted here
    kept = truth["kept"]
    assert plan["synapses"] == int(kept.sum())
    assert plan["drops"]["synapse_invalid"] == int((~truth["valid"]).sum())
    assert plan["drops"]["synapse_autapse"] == int((truth["valid"] & truth["autapse"]).sum())
    # Independent count: synapses per root from the generator, summed over the roots the plan put in each split.
    per_root = np.bincount(truth["pre_index"][kept], minlength=n_roots)
    manifest = plan_manifest(cfg)[0]
    split_of = manifest.groupby("pre_root_id")["split"].agg(["min", "max"])
    assert (split_of["min"] == split_of["max"]).all()
    index_of = {int(r): i for i, r in enumerate(truth["roots"])}
    for s, name in enumerate(("train", "val", "test")):
        members = np.array([index_of[int(r)] for r in split_of.index[split_of["min"] == s]])
        for value, cls in ((1, "excitatory"), (0, "inhibitory")):
            chosen = members[truth["label_of_root"][members] == value]
            assert plan["counts"][name][cls] == int(per_root[chosen].sum())
            assert plan["counts"][name][f"{cls}_neurons"] == int((per_root[chosen] > 0).sum())
    assert sum(row["total"] for row in plan["counts"].values()) == plan["synapses"]
    assert plan["shards"] == math.ceil(plan["synapses"] / 256) == plan["tasks"]
    assert [b - a for a, b in plan["arrays"]] == [100] * (plan["shards"] // 100) + ([plan["shards"] % 100] if plan["shards"] % 100 else [])
    assert plan["raw_bytes"] == plan["synapses"] * 16 * 48 * 48
