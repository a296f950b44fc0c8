"""Extraction: shards follow the contract, reruns skip finished shards, and the index refuses missing ones."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from slurm.launch import run_extraction
from synhpc.config import load_config
from synhpc.errors import DataError
from synhpc.imagery import CubeReader
from synhpc.rundir import RunDir, shard_name
from synhpc.shards import build_index


def test_shards_follow_the_contract(extracted_run):
    run, args = extracted_run
    cfg = load_config("configs/demo.yaml", args)
    manifest = pd.read_csv(run / "synapses.csv")
    reader = CubeReader(cfg.imagery.url)
    seen = []
    for path in sorted((run / "cubes").glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            n = f.attrs["n"]
            assert f["cube"].dtype == np.uint8 and f["cube"].shape == (n, 8, 24, 24) and f["cube"].chunks == (1, 8, 24, 24)
            for name, dtype in (("synapse_id", np.int64), ("pre_root_id", np.int64), ("post_root_id", np.int64), ("label", np.int8), ("split", np.int8)):
                assert f[name].dtype == dtype and f[name].shape == (n,)
            assert f["center_vx"].shape == (n, 3) and f["center_vx"].dtype == np.int64
            assert list(f.attrs["resolution_nm"]) == [8, 8, 40] and f.attrs["mip"] == 0
            assert list(f.attrs["cube_shape_zyx"]) == [8, 24, 24] and f.attrs["imagery_url"] == cfg.imagery.url
            assert "materialization_version" in f.attrs
            expected = reader.cubes(f["center_vx"][...], (8, 24, 24))[0]
            np.testing.assert_array_equal(f["cube"][...], expected)
            seen.extend(f["synapse_id"][...].tolist())
            # centre = floor(position * 4x4x40 / 8x8x40)
            rows = manifest.set_index("synapse_id").loc[f["synapse_id"][...]]
            np.testing.assert_array_equal(f["center_vx"][...], np.floor(rows[["x", "y", "z"]].to_numpy() * [0.5, 0.5, 1]).astype(np.int64))
            np.testing.assert_array_equal(f["split"][...], rows["split"].to_numpy())
    assert sorted(seen) == sorted(manifest["synapse_id"].tolist())


def test_no_presynaptic_neuron_in_two_splits(extracted_run):
    run, _ = extracted_run
    manifest = pd.read_csv(run / "synapses.csv")
    assert (manifest.groupby("pre_root_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {0, 1, 2}


def test_rerun_writes_only_missing_shards(extracted_run, tmp_path):
    base, args = extracted_run
    args = [*args, f"run.root={tmp_path}", "run.name=rerun"]
    cfg = load_config("configs/demo.yaml", args)
    first = run_extraction(cfg, progress=False)
    victim = cfg.run_dir / "cubes" / shard_name(1)
    before = {p.name: p.stat().st_mtime_ns for p in (cfg.run_dir / "cubes").glob("shard-*.h5")}
    victim.unlink()
    second = run_extraction(cfg, progress=False)
    assert first["submitted"] == first["shards"] and second["submitted"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in (cfg.run_dir / "cubes").glob("shard-*.h5")}
    assert {k for k in after if after[k] != before.get(k)} == {victim.name}


def test_index_names_missing_shards(tmp_path):
    with pytest.raises(DataError, match=r"2 shard\(s\) missing, incomplete or from another extraction: shard-00000.h5, shard-00001.h5"):
        build_index(RunDir(tmp_path), {0: 4, 1: 4}, "digest")


def test_synapses_outside_the_imagery_are_dropped_and_counted(extracted_run, tmp_path):
    from synhpc.manifest import plan_manifest

    _, args = extracted_run
    # 8 nm table units double x and y: synapses in the far half of the volume now map outside it.
    cfg = load_config("configs/demo.yaml", [*args, "tables.position_resolution_nm=[8, 8, 40]", "split.tolerance=0.3", f"run.root={tmp_path}"])
    manifest, drops, _, volume = plan_manifest(cfg)
    table = pd.read_csv(cfg.tables.synapses)
    outside = ((table[["ctr_pt_position_x", "ctr_pt_position_y"]] * 8 // 8) >= np.array(volume["hi"][:2])).any(axis=1)
    assert drops["synapse_centre_outside_imagery"] == int(outside.sum()) > 0
    assert set(manifest["synapse_id"]) == set(table.loc[~outside, "id"]) - set(table.loc[~outside & (table["pre_pt_root_id"] == table["post_pt_root_id"]), "id"])


def test_all_synapses_outside_the_imagery_is_a_units_error(extracted_run, tmp_path):
    _, args = extracted_run
    cfg = load_config("configs/demo.yaml", [*args, "tables.position_resolution_nm=[400, 400, 400]", f"run.root={tmp_path}"])
    with pytest.raises(DataError, match="outside the volume .* as do all others; check tables.position_resolution_nm"):
        run_extraction(cfg, progress=False)
    assert not (tmp_path / "base").exists()


def test_unreachable_imagery_is_one_line_error(extracted_run, tmp_path):
    _, args = extracted_run
    cfg = load_config("configs/demo.yaml", [*args, f"imagery.url=file://{tmp_path}/nothing", f"run.root={tmp_path}"])
    with pytest.raises(DataError, match="no precomputed volume there"):
        run_extraction(cfg, progress=False)


def test_stale_temp_files_are_removed_fresh_ones_kept(tmp_path):
    import os
    import time

    from synhpc.shards import remove_stale_temps

    target = tmp_path / "shard-00003.h5"
    old, fresh = tmp_path / ".shard-00003.h5.node1.10.aaaaaaaa.tmp", tmp_path / ".shard-00003.h5.node2.11.bbbbbbbb.tmp"
    unrelated = tmp_path / ".shard-00004.h5.node1.10.cccccccc.tmp"
    for p in (old, fresh, unrelated):
        p.write_bytes(b"partial")
    week_ago = time.time() - 7 * 86400
    os.utime(old, (week_ago, week_ago))
    os.utime(unrelated, (week_ago, week_ago))
    assert remove_stale_temps(target) == 1
    assert not old.exists() and fresh.exists() and unrelated.exists()
