"""``synhpc <stage> -c CONFIG [dotted.key=value ...]``: the pipeline's stages behind one command.

Stages: world, extract, train, evaluate, gather, demo (all of them in order); on SLURM: submit, status, extract-task.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from synhpc.config import RUN_CONFIG, Config, load_config, save_config
from synhpc.errors import SynhpcError

STAGES: dict[str, str] = {
    "world": "generate the synthetic MICrONS-like world (EM volume + CAVE-schema tables)",
    "extract": "cut cubes around labelled synapses into HDF5 shards (submitit array)",
    "train": "train the configured model; resumes from the newest checkpoint",
    "evaluate": "choose the threshold on validation, apply it to test, write summary.csv and plots",
    "gather": "collect every run's summary.csv into <run.root>/summary.csv",
    "demo": "world -> extract -> train -> evaluate -> gather on the configured (synthetic) data",
    "plan": "counts per split and class, shards, SLURM arrays, storage and time for an extraction",
    "bench": "benchmarks: `bench extract` (naive vs synhpc vs chunk-read limit, compression), `bench train` (samples/s)",
    "submit": "submit every stage not yet done as SLURM jobs with dependencies (--profile local|hyak|PATH)",
    "status": "a run's SLURM jobs and on-disk progress (works without SLURM)",
    "extract-task": "extract the given shards of a prepared run folder (what an array task runs)",
}


def stage_world(cfg: Config) -> None:
    from synhpc.world import build_world

    start = time.perf_counter()
    path = build_world(cfg.world)
    print(f"world: {path} ({time.perf_counter() - start:.1f} s)")


def stage_extract(cfg: Config) -> None:
    from jobs.extract import run_extraction

    result = run_extraction(cfg)
    rate = result["cubes"] / result["seconds"] if result["seconds"] > 0 else float("nan")
    print(
        f"extract: {result['cubes']} cubes in {result['shards']} shards ({result['submitted']} written now), "
        f"{result['seconds']:.1f} s, {rate:.0f} cubes/s"
    )


def stage_train(cfg: Config) -> None:
    from synhpc.models import check_model
    from synhpc.training import train

    check_model(cfg.model, cfg.cubes.shape_zyx)  # before the run folder is touched
    save_config(cfg, cfg.run_dir / RUN_CONFIG)
    result = train(cfg)
    print(f"train: {result['steps']} steps, best epoch {result['best_epoch']} (val balanced accuracy {result['best_val_balanced_accuracy']:.3f}), skipped steps {result['skipped_steps']}")


def stage_evaluate(cfg: Config) -> None:
    from synhpc.evaluation import SUMMARY, evaluate
    from synhpc.gather import format_table

    summary = evaluate(cfg)
    print(format_table(summary))
    print(f"evaluate: {cfg.run_dir / SUMMARY}")


def stage_gather(cfg: Config) -> None:
    from pathlib import Path

    from synhpc.gather import SUMMARY, format_table, gather

    table, skipped = gather(Path(cfg.run.root))
    if skipped:
        print(f"gather: skipped runs without summary.csv: {', '.join(skipped)}")
    if table.empty:
        print(f"gather: no summaries under {cfg.run.root}")
        return
    print(format_table(table))
    print(f"gather: {len(table)} rows -> {Path(cfg.run.root) / SUMMARY}")


def stage_plan(cfg: Config) -> None:
    from jobs.plan import format_plan, make_plan

    print(format_plan(make_plan(cfg)))


def stage_bench_extract(cfg: Config) -> None:
    from synhpc.bench import bench_extract

    out = cfg.run_dir / "bench"
    frame = bench_extract(cfg, out)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"bench: {out / 'bench_extract.csv'} and {out / 'bench_extract.json'}")


def stage_bench_train(cfg: Config) -> None:
    from synhpc.bench_train import bench_train

    out = cfg.run_dir / "bench"
    frame = bench_train(cfg, out)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"bench: {out / 'bench_train.csv'} and {out / 'bench_train.json'}")


BENCHES: dict[str, Callable[[Config], None]] = {"extract": stage_bench_extract, "train": stage_bench_train}


def stage_demo(cfg: Config) -> None:
    start = time.perf_counter()
    for stage in (stage_world, stage_extract, stage_train, stage_evaluate, stage_gather):
        stage(cfg)
    print(f"demo: finished in {time.perf_counter() - start:.0f} s; outputs in {cfg.run_dir}")


HANDLERS: dict[str, Callable[[Config], None]] = {
    "world": stage_world,
    "extract": stage_extract,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "gather": stage_gather,
    "demo": stage_demo,
    "plan": stage_plan,
}


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="YAML config (default: built-in defaults = the demo)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, e.g. train.epochs=2 (submit: profile.KEY=VALUE overrides the profile)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synhpc", description="Excitatory/inhibitory synapse classification from EM cubes.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "status":
            p.add_argument("run_dir", metavar="RUN_DIR")
            continue
        if name == "extract-task":
            p.add_argument("run_dir", metavar="RUN_DIR")
            p.add_argument("shards", nargs="+", type=int, metavar="SHARD")
            continue
        if name == "bench":
            kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
            for kind in sorted(BENCHES):
                _add_config_arguments(kinds.add_parser(kind, help=f"benchmark {kind}"))
            continue
        if name == "submit":
            p.add_argument("--profile", default="local", help="cluster profile: slurm/profiles/NAME.yaml or a path [local]")
            p.add_argument("--until", default="gather", choices=["extract", "index", "train", "evaluate", "gather"], help="last stage to submit [gather]")
        _add_config_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.stage == "status":
            from jobs.status import status

            print(status(args.run_dir))
            return 0
        if args.stage == "extract-task":
            from jobs.extract_cli import extract_task

            print(f"extract-task: {extract_task(args.run_dir, args.shards)} cubes")
            return 0
        if args.stage == "submit":
            from jobs.submit import submit_command

            print(submit_command(args.config, args.profile, args.overrides, args.until))
            return 0
        cfg = load_config(args.config, args.overrides)
        handler = BENCHES[args.kind] if args.stage == "bench" else HANDLERS[args.stage]
        handler(cfg)
    except SynhpcError as exc:
        print(f"synhpc {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synhpc {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
