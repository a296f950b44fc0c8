"""``synhpc <stage> -c CONFIG [dotted.key=value ...]``: the pipeline's stages behind one command.

Every error a user can cause ends as one line on stderr naming the file, key or row, and exit status 2; nothing is
left half-written (every output is written to a temporary sibling and renamed).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from collections.abc import Callable, Sequence

from synhpc.config import Config, load_config
from synhpc.errors import SynhpcError

STAGES: dict[str, str] = {
    "world": "generate the synthetic MICrONS-like world (EM volume + CAVE-schema tables)",
    "prepare": "read the tables, split by neuron and write the run folder's manifest and config (no cubes yet)",
    "extract": "cut cubes around labelled synapses into HDF5 shards (submitit array), then index them",
    "train": "train the configured model; resumes from the newest checkpoint",
    "evaluate": "choose the threshold on validation, apply it to test, write summary.csv and plots",
    "gather": "collect every run's summary.csv into <run.root>/summary.csv",
    "cv": "k-fold cross-validation by neuron (split.folds=k): extract, train and evaluate every fold, then their spread",
    "demo": "world -> extract -> train -> evaluate -> predict the orphan axons -> gather, on the synthetic world",
    "predict": "label the synapses a selection names (unlabelled axons too) with a trained model; per-root calls",
    "pretrain": "contrastive pretraining of the model's backbone on a selection's cubes, unlabelled axons too (model.init)",
    "plan": "counts, shards, SLURM arrays, storage and time for an extraction (or, with --predict, a prediction run)",
    "bench": "benchmarks (CSV + JSON under <run>/bench): extract, train, tables, metrics, predict, labels",
    "submit": "submit every stage not yet done as SLURM jobs with dependencies (--profile local|hyak|PATH)",
    "status": "a run's SLURM jobs and on-disk progress (works without SLURM)",
}


def stage_world(cfg: Config) -> None:
    from synhpc.world import build_world

    start = time.perf_counter()
    path = build_world(cfg.world)
    print(f"world: {path} ({time.perf_counter() - start:.1f} s)")


def stage_prepare(cfg: Config) -> None:
    from slurm.plan import array_chunks, cluster_max_array_size
    from synhpc.cubes import missing_shards
    from synhpc.manifest import prepare_run
    from synhpc.rundir import RunDir

    run = RunDir(cfg.run_dir.resolve())
    sizes, digest = prepare_run(cfg)
    missing = missing_shards(run, sizes, digest)
    print(f"RUN_DIR={run.path}")
    print(f"shards: {len(sizes)} ({len(missing)} missing)")
    limit = cluster_max_array_size() or 1001
    for part in array_chunks(len(sizes), limit):
        print(f"  SHARD_OFFSET={part.start} sbatch --array=0-{len(part) - 1}%<parallelism> slurm/templates/extract_array.sbatch")


def stage_extract(cfg: Config) -> None:
    from slurm.launch import run_extraction

    result = run_extraction(cfg)
    rate = result["cubes"] / result["seconds"] if result["seconds"] > 0 else float("nan")
    print(
        f"extract: {result['cubes']} cubes in {result['shards']} shards ({result['submitted']} written now), "
        f"{result['seconds']:.1f} s, {rate:.0f} cubes/s; {result['edge_cubes']} cubes cross the volume edge, "
        f"{result['missing_chunks']} missing imagery chunks read as zeros"
    )


def stage_train(cfg: Config) -> None:
    from synhpc.distributed import resolve_device
    from synhpc.errors import DataError
    from synhpc.manifest import check_same_extraction
    from synhpc.models import check_model
    from synhpc.rundir import RunDir
    from synhpc.training import train

    # Everything that can be refused is refused before the run folder is touched.
    check_model(cfg.model, cfg.cubes.shape_zyx)
    resolve_device(cfg.train.device)
    if cfg.model.init:
        from synhpc.models.backbone import read_backbone

        read_backbone(cfg.model.init)  # a missing or foreign backbone is refused here, not after the lock is taken
    run = RunDir(cfg.run_dir)
    if not run.provenance.is_file():
        raise DataError(f"{run.path}: no extracted cubes; run `synhpc extract` with this config first")
    check_same_extraction(cfg, run)  # the shards decide cube shape, mip and data: a contradicting config is refused
    result = train(cfg)
    print(
        f"train: {result['steps']} steps, best epoch {result['best_epoch']} "
        f"(val balanced accuracy {result['best_val_balanced_accuracy']:.3f}), skipped steps {result['skipped_steps']}"
    )


def stage_evaluate(cfg: Config) -> None:
    from synhpc.evaluation import evaluate
    from synhpc.gather import format_table
    from synhpc.manifest import check_same_extraction
    from synhpc.rundir import RunDir

    run = RunDir(cfg.run_dir)
    check_same_extraction(cfg, run)
    summary = evaluate(cfg)
    print(format_table(summary))
    print(f"evaluate: {run.summary}")


def stage_gather(cfg: Config) -> None:
    from pathlib import Path

    from synhpc.gather import format_table, gather
    from synhpc.rundir import gathered_summary

    table, skipped = gather(Path(cfg.run.root))
    if skipped:
        print(f"gather: skipped runs without summary.csv: {', '.join(skipped)}")
    if table.empty:
        print(f"gather: no summaries under {cfg.run.root}")
        return
    print(format_table(table))
    print(f"gather: {len(table)} rows -> {gathered_summary(cfg.run.root)}")


def stage_predict(cfg: Config) -> None:
    from slurm.launch import run_prediction
    from synhpc.predict import prediction_summary
    from synhpc.rundir import RunDir

    result = run_prediction(cfg)
    summary = prediction_summary(RunDir(cfg.run_dir))
    rate = result["synapses"] / result["seconds"] if result["seconds"] > 0 else float("nan")
    print(
        f"predict: {result['synapses']} synapses in {result['parts']} parts ({result['submitted']} scored now), {rate:.0f} synapses/s; "
        f"{summary['roots']} roots: {summary['excitatory']} excitatory, {summary['inhibitory']} inhibitory, {summary['undetermined']} undetermined"
    )
    print(f"predict: {RunDir(cfg.run_dir).parts}/part-*.parquet and {RunDir(cfg.run_dir).roots}")


def stage_plan(cfg: Config, *, predict: bool = False, synapses: int | None = None, rate: float | None = None) -> None:
    if predict:
        from slurm.plan import format_prediction_plan, make_prediction_plan

        print(format_prediction_plan(make_prediction_plan(cfg, synapses=synapses, rate_cubes_per_s=rate)))
        return
    from slurm.plan import format_plan, make_plan

    print(format_plan(make_plan(cfg, rate_cubes_per_s=rate)))


def _bench(kind: str, run: Callable[[Config, object], object]) -> Callable[[Config], None]:
    def stage(cfg: Config) -> None:
        from synhpc.rundir import RunDir

        out = RunDir(cfg.run_dir).bench
        frame = run(cfg, out)
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))  # type: ignore[attr-defined]
        print(f"bench: {out / f'bench_{kind}.csv'} and {out / f'bench_{kind}.json'}")

    return stage


def _bench_extract(cfg: Config, out) -> object:
    from synhpc.bench import bench_extract

    return bench_extract(cfg, out)


def _bench_train(cfg: Config, out) -> object:
    from synhpc.bench_train import bench_train

    return bench_train(cfg, out)


def _bench_tables(cfg: Config, out) -> object:
    from synhpc.bench_tables import bench_tables

    return bench_tables(cfg, out)


def _bench_metrics(cfg: Config, out) -> object:
    from synhpc.bench_metrics import bench_metrics

    return bench_metrics(out)


def _bench_predict(cfg: Config, out) -> object:
    from synhpc.bench_predict import bench_predict

    return bench_predict(cfg, out)


def _bench_labels(cfg: Config, out) -> object:
    from synhpc.bench_labels import bench_labels

    return bench_labels(cfg, out)


BENCHES: dict[str, Callable[[Config], None]] = {
    "extract": _bench("extract", _bench_extract),
    "train": _bench("train", _bench_train),
    "tables": _bench("tables", _bench_tables),
    "metrics": _bench("metrics", _bench_metrics),
    "predict": _bench("predict", _bench_predict),
    "labels": _bench("labels", _bench_labels),
}


def stage_orphans(cfg: Config) -> None:
    """The demo's last step: the trained model labels the world's orphan axons (no cell type), scored per root
    against the world's truth file."""
    import copy

    from synhpc.atomic import write_csv
    from synhpc.truth import read_truth, score_roots

    truth = read_truth(cfg.world.path)
    orphans = truth.loc[~truth["in_cell_type_table"].astype(bool), "pre_root_id"].astype("int64").tolist()
    if not orphans:
        print("orphans: the world has none")
        return
    run = copy.deepcopy(cfg)
    run.run.name = f"{cfg.run.name}-orphans"
    run.predict.pre_root_ids, run.predict.labelled, run.predict.model = orphans, "unlabelled", str(cfg.run_dir)
    stage_predict(run)
    import pandas as pd

    from synhpc.rundir import RunDir

    report = score_roots(pd.read_csv(RunDir(run.run_dir).roots), truth)
    write_csv(report, RunDir(run.run_dir).path / "orphan_accuracy.csv")
    print(report.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"orphans: per-root accuracy against the world's truth -> {RunDir(run.run_dir).path / 'orphan_accuracy.csv'}")


def stage_cv(cfg: Config) -> None:
    from pathlib import Path

    from synhpc.folds import cv_summary, fold_configs
    from synhpc.gather import gather
    from synhpc.rundir import cv_gathered

    for fold_cfg in fold_configs(cfg):
        print(f"cv: fold {fold_cfg.split.fold} of {cfg.split.folds} -> {fold_cfg.run_dir}")
        for stage in (stage_extract, stage_train, stage_evaluate):
            stage(fold_cfg)
    table, _ = gather(Path(cfg.run.root))
    cv = cv_summary(table)
    mine = cv[(cv["cv"] == cfg.run.name) & (cv["split"] == "test")]
    columns = ["model", "level", "folds", "balanced_accuracy_mean", "balanced_accuracy_sd", "balanced_accuracy_min", "balanced_accuracy_max", "roc_auc_mean", "roc_auc_sd"]
    print(mine[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"cv: {cfg.split.folds} folds -> {cv_gathered(cfg.run.root)}")


def stage_pretrain(cfg: Config) -> None:
    from synhpc.pretrain import run_pretraining
    from synhpc.rundir import RunDir

    result = run_pretraining(cfg)
    data = result["data"]
    print(
        f"pretrain: {data['cubes']} cubes in {data['shards']} shards ({data['cut_now']} cut now), {result['steps']} steps, "
        f"final loss {result['loss']:.4f}, neighbour balanced accuracy {result['knn_balanced_accuracy']:.3f}, skipped steps {result['skipped_steps']}"
    )
    print(f"pretrain: {result['backbone']} (train from it: model.init={RunDir(cfg.run_dir).pretrain.path})")


def stage_demo(cfg: Config) -> None:
    start = time.perf_counter()
    for stage in (stage_world, stage_extract, stage_train, stage_evaluate, stage_orphans, stage_gather):
        stage(cfg)
    print(f"demo: finished in {time.perf_counter() - start:.0f} s; outputs in {cfg.run_dir}")


HANDLERS: dict[str, Callable[[Config], None]] = {
    "world": stage_world,
    "prepare": stage_prepare,
    "extract": stage_extract,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "gather": stage_gather,
    "demo": stage_demo,
    "cv": stage_cv,
    "predict": stage_predict,
    "pretrain": stage_pretrain,
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
        if name == "bench":
            kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
            for kind in sorted(BENCHES):
                _add_config_arguments(kinds.add_parser(kind, help=f"benchmark {kind}"))
            continue
        if name == "submit":
            from synhpc.rundir import STAGES as PIPELINE

            p.add_argument("--profile", default="local", help="cluster profile: slurm/profiles/NAME.yaml or a path [local]")
            p.add_argument("--until", default="gather", choices=list(PIPELINE), help="last stage to submit [gather]")
            p.add_argument("--predict", metavar="MODEL", default=None, help="submit a prediction run with MODEL (a trained run folder or its model.json) instead of training")
            p.add_argument("--pretrain", action="store_true", help="submit the run's contrastive pretraining (<run>/pretrain) instead of training")
        if name == "predict":
            p.add_argument("--model", required=True, metavar="DIR_OR_CARD", help="a trained run folder, its model.json or its best.pt")
        if name == "plan":
            p.add_argument("--predict", action="store_true", help="plan a prediction run (the predict section's selection)")
            p.add_argument("--synapses", type=int, default=None, metavar="N", help="plan for N synapses instead of reading the tables (what-if)")
            p.add_argument("--rate", type=float, default=None, metavar="CUBES_PER_S", help="measured cubes/s per task (synhpc bench extract|predict)")
        _add_config_arguments(p)
    return parser


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure: what, where, and the likely cause for the common ones."""
    where = f"{exc.filename}: " if exc.filename else ""
    hint = {
        errno.ENOSPC: " (the disk is full; free space or point run.root elsewhere)",
        errno.EDQUOT: " (disk quota exceeded)",
        errno.EROFS: " (read-only file system; point run.root at a writable folder)",
        errno.EACCES: " (permission denied)",
    }.get(exc.errno or 0, "")
    return f"{where}{exc.strerror or exc.__class__.__name__}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.stage == "status":
            from slurm.status import status

            print(status(args.run_dir))
            return 0
        if args.stage == "submit":
            from slurm.submit import submit_command

            print(submit_command(args.config, args.profile, args.overrides, args.until, predict=args.predict, pretrain=args.pretrain))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.stage == "predict":
            cfg.predict.model = args.model
        if args.stage == "plan":
            stage_plan(cfg, predict=args.predict, synapses=args.synapses, rate=args.rate)
            return 0
        handler = BENCHES[args.kind] if args.stage == "bench" else HANDLERS[args.stage]
        handler(cfg)
    except SynhpcError as exc:
        print(f"synhpc {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"synhpc {args.stage}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synhpc {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
