"""Index job: verify every shard of the manifest and write ``cubes/index.json`` (row counts and checksums).

Runs after every extraction task (``afterok``). Needs: the run's manifest, provenance and shards. Resumes: reading
and hashing shards changes nothing, so a requeued or repeated job simply runs again.

Usage::

    job = executor.submit(index_job, run_dir)
    python -m jobs.index RUN_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from synhpc.errors import SynhpcError


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
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m jobs.index RUN_DIR", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        print(f"index: {index_job(args[0])} cubes", flush=True)
    except SynhpcError as exc:
        print(f"jobs.index: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
