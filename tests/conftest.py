"""Shared fixtures: small precomputed volumes with known voxels, and table writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture: a real SLURM cluster, or a skip)


def make_volume(path: Path, data_xyz: np.ndarray, resolution=(8, 8, 40), chunk=(32, 32, 8), offset=(0, 0, 0)) -> str:
    """Write ``data_xyz`` (uint8, X, Y, Z) as a precomputed image layer; return its file:// URL."""
    from cloudvolume import CloudVolume

    url = "file://" + str(path.resolve())
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="image",
        data_type="uint8",
        encoding="raw",
        resolution=list(resolution),
        voxel_offset=list(offset),
        chunk_size=list(chunk),
        volume_size=list(data_xyz.shape),
    )
    vol = CloudVolume(url, info=info, progress=False)
    vol.commit_info()
    x0, y0, z0 = offset
    vol[x0 : x0 + data_xyz.shape[0], y0 : y0 + data_xyz.shape[1], z0 : z0 + data_xyz.shape[2]] = data_xyz[..., None]
    return url


@pytest.fixture(scope="session")
def random_volume(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 100 x 90 x 30 volume of random voxels; its size is no multiple of the chunk size, so edge chunks are partial."""
    data = np.random.default_rng(7).integers(1, 256, size=(100, 90, 30), dtype=np.uint8)
    url = make_volume(tmp_path_factory.mktemp("vol") / "em", data)
    return url, data


def write_labelled_world(root: Path, n_synapses: int = 300, n_neurons: int = 24, seed: int = 0) -> dict[str, str]:
    """A small volume whose synapses are bright (inhibitory) or dark (excitatory) blobs, with matching tables.

    Much simpler than :mod:`synhpc.world`; it keeps training tests fast and independent of the renderer.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    shape = (192, 192, 32)
    data = rng.integers(100, 160, size=shape, dtype=np.uint8)
    roots = 864691135000000000 + np.arange(n_neurons)
    labels = np.arange(n_neurons) % 2
    rows = []
    for i in range(n_synapses):
        k = int(rng.integers(n_neurons))
        c = [int(rng.integers(2, s - 2)) for s in shape]
        data[max(c[0] - 3, 0) : c[0] + 3, max(c[1] - 3, 0) : c[1] + 3, max(c[2] - 1, 0) : c[2] + 2] = 40 if labels[k] else 220
        rows.append((10**8 + i, True, roots[k], 10**17 + i, 200, 2 * c[0], 2 * c[1], c[2]))
    columns = ["id", "valid", "pre_pt_root_id", "post_pt_root_id", "size", "ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z"]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(root / "syn.csv.gz", index=False)
    pd.DataFrame(
        {
            "pt_root_id": roots,
            "classification_system": np.where(labels == 1, "excitatory_neuron", "inhibitory_neuron"),
            "cell_type": np.where(labels == 1, "23P", "BC"),
        }
    ).to_csv(root / "cells.csv.gz", index=False)
    url = make_volume(root / "em", data, chunk=(64, 64, 16))
    # No target table: the demo config's targets live in its own world, which these tests never generate.
    return {"tables.synapses": str(root / "syn.csv.gz"), "tables.cell_types": str(root / "cells.csv.gz"), "tables.targets": "\"\"", "imagery.url": url}


def overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


FAST_TRAINING = {
    "cubes.shape_zyx": "[8, 24, 24]",
    "cubes.shard_size": 64,
    "model.width": 8,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.checkpoint_every": 3,
    "train.warmup_steps": 5,
    "train.threads": 1,
    "execution.executor": "debug",
}


@pytest.fixture(scope="session")
def extracted_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run folder with extracted cubes (debug executor), and the overrides that describe it."""
    from slurm.launch import run_extraction
    from synhpc.config import load_config

    root = tmp_path_factory.mktemp("labelled")
    args = overrides(write_labelled_world(root / "world") | FAST_TRAINING | {"run.root": str(root / "logs"), "run.name": "base"})
    cfg = load_config("configs/demo.yaml", args)
    run_extraction(cfg, progress=False)
    return cfg.run_dir, args


def run_ranks(target, payload, world_size: int = 2) -> dict[int, dict]:
    """Run ``target(rank, world_size, port, payload, queue)`` in ``world_size`` spawned processes (a gloo group on a
    free loopback port); each puts ``(rank, result)`` on the queue. Returns the results by rank, every process exited 0."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # cloud-volume imports gevent; forked children can deadlock
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world_size, port, payload, out)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
