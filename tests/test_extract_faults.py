"""Extraction under SIGKILL: a killed shard task never leaves a partial shard visible, and rerunning it yields a
dataset identical to an uninterrupted run's.

Each trial starts a shard task that SIGKILLs itself at a seeded write event (a dataset created in a temporary shard,
the fsync or the rename; set SYNHPC_FAULT_SEED to explore other points), so every kill lands whatever the machine's
load, then checks what a reader would see. Two more trials kill the exact
``python -c "from jobs.extract import extract_job; ..."`` command a job runs from outside, while it works.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import overrides, write_labelled_world

from jobs.extract import extract_job
from synhpc.config import load_config
from synhpc.manifest import prepare_run
from synhpc.shards import shard_complete

BASE_SEED = int(os.environ.get("SYNHPC_FAULT_SEED", "20260601"))
# Small, many shards with compression so kills often land inside a shard's write.
FAULT_RUN = {
    "cubes.shape_zyx": "[8, 32, 32]",
    "cubes.shard_size": 4,
    "cubes.compression": "gzip",
    "imagery.threads": 1,
    "execution.executor": "debug",
}
TMP_NAME = re.compile(r"^\.shard-\d{5}\.h5\.[^/]+\.\d+\.[0-9a-f]{8}\.tmp$")


def _cfg(world: dict, root: Path, name: str):
    return load_config("configs/demo.yaml", overrides(world | FAULT_RUN | {"run.root": str(root), "run.name": name}))


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    """A prepared reference run (extracted without interruption) and the world it came from."""
    root = tmp_path_factory.mktemp("faults")
    world = write_labelled_world(root / "world", n_synapses=240, n_neurons=24, seed=5)
    ref = _cfg(world, root / "logs", "reference")
    sizes, _ = prepare_run(ref)
    extract_job(str(ref.run_dir), sorted(sizes))
    return world, root, ref, sizes


def _read_shard(path: Path) -> dict:
    """Every dataset (values, dtype, chunking, filters) and every attribute of a shard."""
    out = {}
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            out[f"ds:{name}"] = (ds[...], ds.dtype.str, ds.shape, ds.chunks, ds.compression, ds.compression_opts)
        for key, value in f.attrs.items():
            out[f"attr:{key}"] = np.asarray(value)
    return out


def _assert_same_shard(path: Path, ref_path: Path) -> None:
    got, want = _read_shard(path), _read_shard(ref_path)
    assert sorted(got) == sorted(want), path.name
    for key in want:
        if key.startswith("ds:"):
            (a, *meta_a), (b, *meta_b) = got[key], want[key]
            assert meta_a == meta_b, f"{path.name} {key}"
            assert a.tobytes() == b.tobytes(), f"{path.name} {key} differs"
        else:
            assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), f"{path.name} {key}"


def _check_visible(cubes: Path, ref_cubes: Path, sizes: dict[int, int], context: str) -> int:
    """Every final-name shard is complete and equal to the reference; anything else is a known temp name."""
    visible = 0
    for path in cubes.iterdir():
        if path.name.startswith("shard-"):
            shard = int(path.name[len("shard-") : len("shard-") + 5])
            assert shard_complete(path, sizes[shard]), f"{context}: partial shard visible: {path.name}"
            _assert_same_shard(path, ref_cubes / path.name)
            visible += 1
        else:
            assert TMP_NAME.match(path.name), f"{context}: unexpected file {path.name}"
    return visible


# A task process that imports everything, says "ready", then reads its shard list and a kill point from stdin and
# runs the shards. It SIGKILLs itself at the kill point: the n-th write event (a dataset created inside a temporary
# shard, the fsync, or the rename into place), so every trial kills at a chosen spot, however loaded the machine is.
# Tasks are started one trial ahead so their imports overlap the previous trial (fork from pytest is not used:
# cloud-volume imports gevent and forked children can deadlock).
WARM_TASK = """
import json, os, signal, sys
import h5py, cloudvolume
from jobs.extract import extract_job
print('ready', flush=True)
run_dir, shards, kill_at = json.loads(sys.stdin.readline())
events = [0]
def tick():
    events[0] += 1
    if events[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def counted(fn):
    def wrapper(*args, **kwargs):
        tick()
        return fn(*args, **kwargs)
    return wrapper
h5py.Group.create_dataset = counted(h5py.Group.create_dataset)
os.fsync = counted(os.fsync)
os.replace = counted(os.replace)
extract_job(run_dir, shards)
print('events', events[0], flush=True)
"""


def _warm_task() -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WARM_TASK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)


def _events_per_task(run_dir: Path, shards: list[int]) -> int:
    """Write events of one whole uninterrupted task (its shards are removed again); kill points are drawn below it."""
    import json

    task = _warm_task()
    assert task.stdout.readline().strip() == "ready"
    out, _ = task.communicate(json.dumps([str(run_dir), shards, 0]) + "\n")
    for path in (run_dir / "cubes").glob("shard-*.h5"):
        path.unlink()
    return int(out.split()[-1])


def test_sigkill_never_leaves_a_partial_shard(fault_world):
    import json

    world, root, ref, sizes = fault_world
    cfg = _cfg(world, root / "logs", "victim")
    prepare_run(cfg)
    cubes, ref_cubes = cfg.run_dir / "cubes", ref.run_dir / "cubes"
    cubes.mkdir(parents=True, exist_ok=True)
    shards = sorted(sizes)
    kills = mid_write = 0
    trials = 20
    events = _events_per_task(cfg.run_dir, shards)
    upcoming = _warm_task()
    try:
        for trial in range(trials):
            seed = BASE_SEED + trial
            rng = random.Random(seed)
            context = f"trial {trial} (SYNHPC_FAULT_SEED={BASE_SEED}, seed {seed})"
            # A fresh start each trial so a kill always finds work; temp files of earlier kills stay, as on a cluster.
            for path in cubes.glob("shard-*.h5"):
                path.unlink()
            tmp_before = {p.name for p in cubes.glob(".shard-*.tmp")}
            # Shuffled shard order: kills land on different shards.
            order = shards[:]
            rng.shuffle(order)
            proc, upcoming = upcoming, (_warm_task() if trial < trials - 1 else None)
            assert proc.stdout.readline().strip() == "ready"
            proc.stdin.write(json.dumps([str(cfg.run_dir), order, rng.randint(1, events)]) + "\n")
            proc.stdin.flush()
            kills += proc.wait() == -signal.SIGKILL
            proc.stdin.close()
            proc.stdout.close()
            mid_write += bool({p.name for p in cubes.glob(".shard-*.tmp")} - tmp_before)
            _check_visible(cubes, ref_cubes, sizes, context)
            if trial % 5 == 4 or trial == trials - 1:
                # Rerun to completion: identical to the uninterrupted run, shard by shard, dataset by dataset.
                extract_job(str(cfg.run_dir), shards)
                assert _check_visible(cubes, ref_cubes, sizes, context) == len(shards)
    finally:
        if upcoming is not None:
            upcoming.kill()
            upcoming.wait()
    assert kills == trials, f"only {kills} of {trials} tasks died at their kill point"
    assert mid_write >= 1, "no kill landed inside a shard write; the test is not exercising the atomic rename"
    print(f"\n{kills} kills, {mid_write} mid-write, {len(list(cubes.glob('.shard-*.tmp')))} temp files left behind")


def test_sigkill_of_the_job_command(fault_world):
    """The command a SLURM task runs, killed twice, then rerun in a fresh interpreter."""
    world, root, ref, sizes = fault_world
    cfg = _cfg(world, root / "logs", "command")
    prepare_run(cfg)
    cubes, ref_cubes = cfg.run_dir / "cubes", ref.run_dir / "cubes"
    shards = sorted(sizes)
    # Imports first, then a line on stdout: the delay starts when the task starts its work.
    code = (
        "import sys; from jobs.extract import extract_job; import cloudvolume, h5py; print('ready', flush=True); "
        f"extract_job({str(cfg.run_dir)!r}, {shards!r})"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    kills = 0
    for trial in range(2):
        seed = BASE_SEED + 100 + trial
        rng = random.Random(seed)
        for path in cubes.glob("shard-*.h5") if cubes.is_dir() else []:
            path.unlink()  # leave the task enough work that the kill lands
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready"
        # Kill once the k-th shard (k in the first half) is in place: most of the task's work is still ahead, so the
        # signal lands in a running task however slow or loaded the machine is.
        target = rng.randint(1, len(shards) // 2)
        while proc.poll() is None and len(list(cubes.glob("shard-*.h5")) if cubes.is_dir() else []) < target:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait() == -signal.SIGKILL
        proc.stdout.close()
        if cubes.is_dir():
            _check_visible(cubes, ref_cubes, sizes, f"command trial {trial} (seed {seed})")
    assert kills == 2
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _check_visible(cubes, ref_cubes, sizes, "command rerun") == len(shards)
