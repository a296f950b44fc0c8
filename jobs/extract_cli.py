"""Extraction without the Python launcher: the commands slurm/templates/extract_array.sbatch calls.

Runs: :func:`jobs.extract.run_task` for the shards it is given. Needs: a run folder prepared on the login node
(``prepare``: manifest, provenance and ``config.yaml``). Resumes: complete shards are skipped, so the same array can
be submitted again and only missing shards do work.

Usage::

    python -m jobs.extract_cli prepare -c configs/microns.yaml [dotted.key=value ...]   # prints RUN_DIR and --array
    python -m jobs.extract_cli task RUN_DIR SHARD [SHARD ...]                          # = `synhpc extract-task`
    python -m jobs.extract_cli array RUN_DIR [--offset K]     # shard K + $SLURM_ARRAY_TASK_ID
    python -m jobs.extract_cli index RUN_DIR                  # verify every shard, write cubes/index.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from synhpc.errors import SynhpcError


def extract_task(run_dir: str, shards: list[int]) -> int:
    """Extract ``shards`` of the prepared run in ``run_dir`` (complete ones are skipped); returns cubes covered."""
    from jobs.extract import run_task

    return run_task(str(Path(run_dir).resolve()), shards)


def prepare_run(config: str | None, overrides: Sequence[str]) -> tuple[Path, int, list[int]]:
    """Write manifest + config for the run; return (run folder, number of shards, missing shards)."""
    from jobs.extract import missing_shards, prepare
    from synhpc.config import load_config

    cfg = load_config(config, list(overrides))
    cfg.run.root = str(Path(cfg.run.root).resolve())
    sizes, digest = prepare(cfg)  # also writes the resolved config.yaml the tasks read
    return cfg.run_dir, len(sizes), missing_shards(cfg, sizes, digest)


def array_task(run_dir: str, offset: int = 0, task_id: int | None = None) -> int:
    """Extract shard ``offset + SLURM_ARRAY_TASK_ID``; an index past the last shard does nothing."""
    from synhpc.manifest import read_manifest

    if task_id is None:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            raise SynhpcError("array: SLURM_ARRAY_TASK_ID is not set (run this inside an sbatch --array job)")
        task_id = int(os.environ["SLURM_ARRAY_TASK_ID"])
    shard = offset + task_id
    n_shards = int(read_manifest(Path(run_dir))["shard"].max()) + 1
    if shard >= n_shards:
        print(f"shard {shard} does not exist ({n_shards} shards): nothing to do", flush=True)
        return 0
    return extract_task(run_dir, [shard])


def index_run(run_dir: str) -> int:
    from jobs.submit import index_task

    return index_task(str(Path(run_dir).resolve()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.extract_cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write manifest and config; print the run folder and the --array to use")
    p.add_argument("-c", "--config", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("task", help="extract the given shards")
    p.add_argument("run_dir")
    p.add_argument("shards", nargs="+", type=int)
    p = sub.add_parser("array", help="extract shard OFFSET + $SLURM_ARRAY_TASK_ID")
    p.add_argument("run_dir")
    p.add_argument("--offset", type=int, default=0)
    p = sub.add_parser("index", help="verify every shard and write cubes/index.json")
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            run_dir, n, missing = prepare_run(args.config, args.overrides)
            print(f"RUN_DIR={run_dir}")
            print(f"shards: {n} ({len(missing)} missing); submit with --array=0-{max(n - 1, 0)}%<parallelism> "
                  "(split with SHARD_OFFSET when n exceeds the cluster's MaxArraySize)")
        elif args.command == "task":
            print(f"extract: {extract_task(args.run_dir, args.shards)} cubes", flush=True)
        elif args.command == "array":
            print(f"extract: {array_task(args.run_dir, args.offset)} cubes", flush=True)
        else:
            print(f"index: {index_run(args.run_dir)} cubes", flush=True)
    except SynhpcError as exc:
        print(f"extract_cli {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
