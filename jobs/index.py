"""Index job: verify every shard of the manifest and write ``cubes/index.json`` (row counts and checksums).

Runs after every extraction task (``afterok``). Needs: the run's manifest, provenance and shards. Resumes: reading
and hashing shards changes nothing, so a requeued or repeated job simply runs again.

Usage::

    job = executor.submit(index_job, run_dir)
    python -m jobs.index RUN_DIR
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import run_dir_main


def index_job(run_dir: str) -> int:
    """Verify every shard and write the index; returns the number of cubes."""
    from synhpc.cubes import shard_sizes
    from synhpc.manifest import read_manifest, read_provenance
    from synhpc.rundir import RunDir
    from synhpc.shards import build_index

    run = RunDir(run_dir)
    index = build_index(run, shard_sizes(read_manifest(run)), read_provenance(run)["extraction_digest"])
    return int(index["n"])


def main(argv: Sequence[str] | None = None) -> int:
    return run_dir_main("index", index_job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
