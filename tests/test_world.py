"""The synthetic world: determinism, table schemas and units, volume layout, rendered cues, rebuild rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cloudvolume import CloudVolume

from synhpc.config import WorldConfig
from synhpc.world import CELL_TYPE_COLUMNS, SYNAPSE_COLUMNS, build_world, config_digest

SHAPE = [128, 128, 32]


def tiny(path: Path, **kw: object) -> WorldConfig:
    base: dict[str, object] = dict(path=str(path), shape_vx=SHAPE, chunk_vx=[64, 64, 16], n_neurons=8, n_synapses=40)
    base.update(unlabeled_fraction=0.25, **kw)
    return WorldConfig(**base)  # type: ignore[arg-type]


def volume(root: Path, mip: int = 0) -> CloudVolume:
    return CloudVolume("file://" + str((root / "em").resolve()), mip=mip, progress=False)


def chunk_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "em").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(tiny(tmp_path_factory.mktemp("w") / "world"), progress=False)


def test_same_seed_is_byte_identical_and_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = build_world(tiny(tmp_path / "world"), progress=False)
    for name in ("synapses_pni_2.csv.gz", "aibs_metamodel_celltypes_v661.csv.gz"):
        assert (world / name).read_bytes() == (again / name).read_bytes()
    assert chunk_bytes(world) == chunk_bytes(again)
    other = build_world(tiny(tmp_path / "other", seed=1), progress=False)
    assert not np.array_equal(volume(world)[:, :, :], volume(other)[:, :, :])
    assert (world / "synapses_pni_2.csv.gz").read_bytes() != (other / "synapses_pni_2.csv.gz").read_bytes()


def test_tables_follow_cave_schema_and_units(world: Path) -> None:
    syn = pd.read_csv(world / "synapses_pni_2.csv.gz")
    cells = pd.read_csv(world / "aibs_metamodel_celltypes_v661.csv.gz")
    assert list(syn.columns) == SYNAPSE_COLUMNS
    assert list(cells.columns) == CELL_TYPE_COLUMNS
    assert len(syn) == 40 and syn["id"].is_unique and syn["id"].dtype == np.int64
    assert syn["pre_pt_root_id"].min() > 10**17
    # Positions are 4x4x40 nm units: x, y run to twice the mip-0 voxel count, z to the section count.
    limit = np.array(SHAPE) * [2, 2, 1]
    for point in ("pre_pt", "ctr_pt", "post_pt"):
        pos = syn[[f"{point}_position_{a}" for a in "xyz"]].to_numpy()
        assert (pos >= 0).all() and (pos < limit).all()
    assert syn["valid"].sum() >= len(syn) - 3
    assert set(cells["classification_system"]) == {"excitatory_neuron", "inhibitory_neuron", "nonneuron"}

    pre = set(syn["pre_pt_root_id"])
    autapse_roots = set(syn.loc[syn.pre_pt_root_id == syn.post_pt_root_id, "pre_pt_root_id"])
    assert not pre & set(syn["post_pt_root_id"]) - autapse_roots
    neurons = cells[cells["classification_system"] != "nonneuron"]
    assert neurons["pt_root_id"].is_unique
    labelled = pre & set(neurons["pt_root_id"])
    assert len(pre) == 8 and len(pre - labelled) == round(0.25 * 8)
    assert not pre & set(cells.loc[cells["classification_system"] == "nonneuron", "pt_root_id"])
    per_neuron = syn[syn["pre_pt_root_id"].isin(labelled)].groupby("pre_pt_root_id").size()
    assert per_neuron.min() >= 3


def test_volume_scales_and_rendered_cleft(world: Path) -> None:
    vol = volume(world)
    scales = vol.info["scales"]
    assert [list(s["resolution"]) for s in scales] == [[8, 8, 40], [16, 16, 40]]
    assert list(scales[0]["size"]) == SHAPE and list(scales[1]["size"]) == [64, 64, 32]
    mip1 = np.asarray(volume(world, mip=1)[:, :, :])[..., 0]
    assert mip1.shape == (64, 64, 32)

    data = np.asarray(vol[:, :, :])[..., 0].astype(np.float64)
    syn = pd.read_csv(world / "synapses_pni_2.csv.gz")
    ctr = np.floor(syn[[f"ctr_pt_position_{a}" for a in "xyz"]].to_numpy() * [4, 4, 40] / [8, 8, 40]).astype(int)
    # Two membranes, a density and a vesicle cloud lie within ~60 nm of every cleft centre: a 5x5-voxel
    # neighbourhood there holds voxels far darker than the volume's median.
    local = np.array([data[x - 2 : x + 3, y - 2 : y + 3, z] for x, y, z in np.clip(ctr, 2, np.array(SHAPE) - 3)])
    assert local.min(axis=(1, 2)).mean() < np.median(data) - 40


def test_rerun_skips_and_changed_config_rebuilds(world: Path, tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "world")
    root = build_world(cfg, progress=False)
    record = json.loads((root / "world.json").read_text())
    assert record["digest"] == config_digest(cfg) and record["config"] == dataclasses.asdict(cfg)
    assert record["counts"]["neurons"]["unlabeled"] == 2
    stamp = (root / "synapses_pni_2.csv.gz").stat().st_mtime_ns
    build_world(cfg, progress=False)
    assert (root / "synapses_pni_2.csv.gz").stat().st_mtime_ns == stamp

    changed = dataclasses.replace(cfg, n_synapses=48)
    build_world(changed, progress=False)
    assert len(pd.read_csv(root / "synapses_pni_2.csv.gz")) == 48
    assert json.loads((root / "world.json").read_text())["digest"] == config_digest(changed)
    assert not (root / "em.partial").exists()
