"""The synthetic world: determinism, table schemas and units, volume layout, rendered cues, rebuild rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cloudvolume import CloudVolume

from synhpc import world as world_module
from synhpc.config import WorldConfig
from synhpc.errors import ConfigError
from synhpc.world import (
    CELL_TYPE_COLUMNS,
    SYNAPSE_COLUMNS,
    TARGET_COLUMNS,
    TARGET_TAGS,
    TRUTH_COLUMNS,
    build_world,
    config_digest,
)

TABLES = ("synapses_pni_2.csv.gz", "aibs_metamodel_celltypes_v661.csv.gz", "synapse_target_predictions_ssa.csv.gz", "truth.csv")

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
    for name in TABLES:
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


def read_truth(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "truth.csv", keep_default_na=False)


def test_truth_file_orphans_and_label_noise(world: Path, tmp_path: Path) -> None:
    noisy = build_world(tiny(tmp_path / "noisy", n_synapses=60, orphan_min_synapses=9, label_noise=0.5), progress=False)
    syn = pd.read_csv(noisy / "synapses_pni_2.csv.gz")
    cells = pd.read_csv(noisy / "aibs_metamodel_celltypes_v661.csv.gz").set_index("pt_root_id")
    truth = read_truth(noisy)
    assert list(truth.columns) == TRUTH_COLUMNS
    assert sorted(truth["pre_root_id"]) == sorted(syn["pre_pt_root_id"].unique())  # every presynaptic neuron once
    assert truth["n_synapses"].tolist() == syn.groupby("pre_pt_root_id").size().loc[truth["pre_root_id"]].tolist()
    assert truth["true_label"].tolist() == (truth["true_class"] == "excitatory").astype(int).tolist()
    listed = truth[truth["in_cell_type_table"]]
    table = cells.loc[listed["pre_root_id"], "classification_system"].str.replace("_neuron", "").tolist()
    assert listed["table_class"].tolist() == table
    assert (listed["mislabelled"] == (listed["table_class"] != listed["true_class"])).all()
    assert int(listed["mislabelled"].sum()) == round(0.5 * 6)  # label_noise of the 6 labelled neurons
    orphans = truth[~truth["in_cell_type_table"]]
    assert len(orphans) == 2 and not set(orphans["pre_root_id"]) & set(cells.index)
    assert (orphans["table_class"] == "").all() and not orphans["mislabelled"].any()
    assert (orphans["n_synapses"] >= 9).all() and set(orphans["true_class"]) == {"excitatory", "inhibitory"}
    record = json.loads((noisy / "world.json").read_text())
    assert record["counts"]["neurons"]["mislabelled"] == 3 and record["files"]["truth"] == "truth.csv"

    # Label noise draws from its own stream: the clean world shares every synapse and every voxel with the noisy one.
    clean = build_world(tiny(tmp_path / "clean", n_synapses=60, orphan_min_synapses=9), progress=False)
    assert (clean / "synapses_pni_2.csv.gz").read_bytes() == (noisy / "synapses_pni_2.csv.gz").read_bytes()
    assert chunk_bytes(clean) == chunk_bytes(noisy)
    assert not read_truth(clean)["mislabelled"].any()
    assert read_truth(clean)["true_class"].tolist() == truth["true_class"].tolist()


def test_target_table_links_every_synapse(world: Path) -> None:
    syn = pd.read_csv(world / "synapses_pni_2.csv.gz")
    targets = pd.read_csv(world / "synapse_target_predictions_ssa.csv.gz")
    assert list(targets.columns) == TARGET_COLUMNS == ["id", "synapse_id", "tag"]
    assert targets["id"].is_unique and targets["synapse_id"].tolist() == syn["id"].tolist()
    assert set(targets["tag"]) <= set(TARGET_TAGS)
    record = json.loads((world / "world.json").read_text())
    assert sum(sum(v.values()) for v in record["counts"]["targets"].values()) == len(syn)


def test_target_shares_follow_the_true_class() -> None:
    cfg = WorldConfig()
    neuron_exc = np.arange(400) % 2 == 1
    syn_neuron = np.repeat(np.arange(400), 50)
    tags = world_module._draw_targets(cfg, neuron_exc, syn_neuron)
    exc = neuron_exc[syn_neuron]
    for is_exc, expected in ((True, cfg.targets_excitatory), (False, cfg.targets_inhibitory)):
        shares = np.bincount(tags[exc == is_exc], minlength=3) / (exc == is_exc).sum()
        np.testing.assert_allclose(shares, expected, atol=0.03)
    # Neurons differ in whom they contact: per-neuron spine shares spread more than binomial sampling alone would.
    spine = pd.Series(tags == 0).groupby(syn_neuron).mean()[neuron_exc]
    assert spine.std() > 1.5 * np.sqrt(0.8 * 0.2 / 50)


def test_class_cues_overlap_so_neuron_calls_firm_up_with_more_synapses() -> None:
    n_neurons, per = 2000, 40
    neuron_exc = np.arange(n_neurons) % 2 == 1
    syn_neuron = np.repeat(np.arange(n_neurons), per)
    flat = WorldConfig(neuron_cue_spread=0.0, synapse_cue_jitter=0.0)
    cue, strength = world_module._class_cues(flat, neuron_exc, syn_neuron)
    gap = 1.0 - 0.96 * flat.difficulty
    np.testing.assert_allclose(cue, np.where(neuron_exc[syn_neuron], gap, -gap))  # every synapse alike: no overlap
    assert (strength == 1.0).all()

    cfg = WorldConfig(neuron_cue_spread=0.5, synapse_cue_jitter=0.4)
    cue, strength = world_module._class_cues(cfg, neuron_exc, syn_neuron)
    assert abs(strength.mean() - 1.0) < 0.03 and abs(strength.std() - 0.5) < 0.03
    right = np.where(neuron_exc[syn_neuron], cue > 0, cue < 0).reshape(n_neurons, per)
    # The share of neurons whose mean cue over their first k synapses points the right way rises with k.
    signed = np.where(neuron_exc[syn_neuron], cue, -cue).reshape(n_neurons, per)
    by_k = [float((signed[:, :k].mean(axis=1) > 0).mean()) for k in (1, 5, 20)]
    assert abs(right.mean() - by_k[0]) < 0.01 and right.mean() < 0.97 and by_k[0] < by_k[1] < by_k[2]
    assert (strength < 0.25).any()  # some neurons show their class only faintly
    assert np.abs(cue).max() <= 1.5


def test_cleft_tilt_limits_normals_and_nothing_else(world: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    iso = world_module._cleft_normals(WorldConfig(), rng, 20000)
    np.testing.assert_allclose(np.linalg.norm(iso, axis=1), 1.0)
    assert abs(np.abs(iso[:, 2]).mean() - 0.5) < 0.01  # isotropic: |n_z| uniform on [0, 1]
    steep = world_module._cleft_normals(WorldConfig(cleft_tilt_deg=15.0), np.random.default_rng(0), 20000)
    assert np.abs(steep[:, 2]).max() <= np.sin(np.radians(15.0)) + 1e-12
    np.testing.assert_allclose(np.linalg.norm(steep, axis=1), 1.0)

    # "Steep clefts, low jitter" is a pure config variant: same neurons, partners, sizes, targets and truth.
    variant = build_world(tiny(tmp_path / "steep", cleft_tilt_deg=15.0, annotation_jitter_nm=[10.0, 10.0, 0.0]), progress=False)
    base_syn, steep_syn = (pd.read_csv(r / "synapses_pni_2.csv.gz") for r in (world, variant))
    same = ["id", "pre_pt_root_id", "post_pt_root_id", "size", "valid"]
    pd.testing.assert_frame_equal(base_syn[same], steep_syn[same])
    for name in ("synapse_target_predictions_ssa.csv.gz", "truth.csv", "aibs_metamodel_celltypes_v661.csv.gz"):
        assert (world / name).read_bytes() == (variant / name).read_bytes()
    assert not np.array_equal(volume(world)[:, :, :], volume(variant)[:, :, :])


def test_section_contrast_scales_structure(world: Path, tmp_path: Path) -> None:
    faint = build_world(tiny(tmp_path / "faint", section_contrast=0.5), progress=False)
    base = np.asarray(volume(world)[:, :, :], dtype=np.float64)
    low = np.asarray(volume(faint)[:, :, :], dtype=np.float64)
    # Contrast halves around the cytoplasm level; the section noise (not scaled) keeps it above half.
    assert 0.5 * base.std() < low.std() < 0.8 * base.std()
    # Per-section jitter: each section's spread of grey levels changes by its own factor (sd 0.3 in log).
    uneven = build_world(tiny(tmp_path / "uneven", section_contrast_jitter=0.3), progress=False)
    spread = lambda v: np.asarray(v[:, :, :], dtype=np.float64)[..., 0].std(axis=(0, 1))  # noqa: E731
    base_z, uneven_z = spread(volume(world)), spread(volume(uneven))
    shown = base_z > 5.0  # missing sections are flat in both
    assert 0.15 < np.log(uneven_z[shown] / base_z[shown]).std() < 0.4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"label_noise": 1.5}, "world.label_noise must lie in [0, 1]"),
        ({"cleft_tilt_deg": 120.0}, "world.cleft_tilt_deg must lie in [0, 90] (90: isotropic clefts)"),
        ({"targets_excitatory": [0.5, 0.5, 0.5]}, "world.targets_excitatory must be 3 shares (spine, shaft, soma) >= 0 that sum to 1"),
        ({"cue_strength": 0.0}, "world.cue_strength must be positive"),
        ({"synapse_cue_jitter": -0.1}, "world.synapse_cue_jitter must be >= 0"),
        ({"orphan_min_synapses": 20}, "world.n_synapses must be at least 58: 3 per labelled neuron plus world.orphan_min_synapses per orphan"),
    ],
)
def test_bad_world_config_is_one_line(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_world(tiny(tmp_path / "bad", **override), progress=False)
    assert str(exc.value) == message
    assert not (tmp_path / "bad").exists()


def test_digest_changes_with_the_world_format(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = WorldConfig()
    before = config_digest(cfg)
    monkeypatch.setattr(world_module, "FORMAT_VERSION", world_module.FORMAT_VERSION + 1)
    assert config_digest(cfg) != before
