"""Prediction job: score some parts of a planned prediction run (cubes cut from the imagery inside the task).

Runs: :func:`synhpc.predict.predict_part` for each part it is given, with the model loaded once. Needs: a run folder
planned on the login node (``synhpc predict``/``synhpc submit --predict`` write ``predict_plan.parquet``,
``predict.json`` and ``config.yaml``), the model's card and weights, and read access to the imagery. Resumes: parts
are written whole under a temporary name and renamed, carrying the prediction digest; finished parts are skipped.

Usage::

    jobs = executor.map_array(predict_job, [run_dir] * 2, [[0, 2], [1, 3]])   # slurm/launch.py does this
    python -m jobs.predict RUN_DIR PART [PART ...]
    python -m jobs.predict RUN_DIR --roots          # the per-root table once every part is done
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jobs import one_line_errors
from synhpc.errors import SynhpcError


def predict_job(run_dir: str, parts: list[int]) -> int:
    """Score ``parts`` of the prediction run in ``run_dir``; returns the synapses they hold."""
    import torch

    from synhpc.config import load_run_config
    from synhpc.cubes import open_reader
    from synhpc.distributed import resolve_device
    from synhpc.modelcard import load_model
    from synhpc.predict import predict_part
    from synhpc.rundir import RunDir, read_json

    run = RunDir(run_dir)
    cfg = load_run_config(run.path)
    torch.set_num_threads(cfg.train.threads)
    record = read_json(run.predict_provenance, "prediction record")
    model, card = load_model(record["model"], resolve_device(cfg.train.device))
    reader = open_reader(cfg)
    return sum(predict_part(run, part, model=model, card=card, reader=reader) for part in parts)


def roots_job(run_dir: str) -> str:
    """The per-root table of a prediction run whose parts are all done; returns its path."""
    from synhpc.predict import aggregate_roots
    from synhpc.rundir import RunDir

    run = RunDir(run_dir)
    aggregate_roots(run)
    return str(run.roots)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("parts", nargs="*", type=int, metavar="PART")
    parser.add_argument("--roots", action="store_true", help="write roots.csv from the finished parts")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.roots == bool(args.parts):
            raise SynhpcError("give either PART numbers or --roots")
        if args.roots:
            print(f"roots: {roots_job(args.run_dir)}", flush=True)
        else:
            print(f"predict: {predict_job(args.run_dir, args.parts)} synapses", flush=True)

    return one_line_errors("predict", body)


if __name__ == "__main__":
    raise SystemExit(main())
