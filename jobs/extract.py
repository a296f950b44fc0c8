"""Extraction job: cut the cubes of some shards of a prepared run folder into HDF5 shards.

Runs: :func:`synhpc.cubes.extract_shard` for each shard it is given. Needs: a run folder prepared on the login node
(``synhpc prepare``/``synhpc extract``/``synhpc submit`` write ``config.yaml``, ``synapses.csv`` and
``provenance.json``) and read access to the imagery. Resumes: shards are written whole under a temporary name and
renamed; complete shards are skipped, so the same task or array can simply run again.

Usage::

    jobs = executor.map_array(extract_job, [run_dir] * 2, [[0, 2], [1, 3]])   # slurm/launch.py does this
    python -m jobs.extract RUN_DIR SHARD [SHARD ...]
    python -m jobs.extract RUN_DIR --array [--offset K]     # shard K + $SLURM_ARRAY_TASK_ID (sbatch --array)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from jobs import one_line_errors
from synhpc.errors import SynhpcError


def extract_job(run_dir: str, shards: list[int]) -> int:
    """Extract ``shards`` of the run in ``run_dir`` (complete ones are skipped); returns the cubes they hold."""
    from synhpc.config import load_run_config
    from synhpc.cubes import extract_shard, open_reader
    from synhpc.manifest import read_manifest, read_provenance
    from synhpc.rundir import RunDir

    run = RunDir(run_dir)
    cfg = load_run_config(run.path)
    manifest = read_manifest(run)
    provenance = read_provenance(run)
    reader = open_reader(cfg)
    done = 0
    for shard in shards:
        extract_shard(cfg, manifest, shard, provenance, reader)
        done += int((manifest["shard"] == shard).sum())
    return done


def array_shard(offset: int) -> int:
    """The shard of this array task: ``offset + $SLURM_ARRAY_TASK_ID``."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        raise SynhpcError("--array: SLURM_ARRAY_TASK_ID is not set (run this inside an sbatch --array job)")
    return offset + int(os.environ["SLURM_ARRAY_TASK_ID"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("shards", nargs="*", type=int, metavar="SHARD")
    parser.add_argument("--array", action="store_true", help="extract shard OFFSET + $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--offset", type=int, default=0)
    args = parser.parse_args(argv)

    def body() -> None:
        if args.array == bool(args.shards):
            raise SynhpcError("give either SHARD numbers or --array")
        shards = args.shards
        if args.array:
            from synhpc.manifest import read_manifest
            from synhpc.rundir import RunDir

            shard = array_shard(args.offset)
            n_shards = int(read_manifest(RunDir(args.run_dir))["shard"].max()) + 1
            if shard >= n_shards:
                print(f"shard {shard} does not exist ({n_shards} shards): nothing to do", flush=True)
                return
            shards = [shard]
        print(f"extract: {extract_job(args.run_dir, shards)} cubes", flush=True)

    return one_line_errors("extract", body)

if __name__ == "__main__":
    raise SystemExit(main())
