"""The run folder: every path a stage reads or writes under ``<run.root>/<run.name>/``, the training progress
record, and the lock that keeps two trainers off one run.

Nothing else in synhpc spells a run-folder file name; stages, ``status`` and ``submit`` ask a :class:`RunDir`.
This module imports only the standard library, so login-node commands (``status``, ``submit``) stay fast.

Usage::

    run = RunDir(cfg.run_dir)
    run.manifest                      # <run>/synapses.csv
    run.shard(3)                      # <run>/cubes/shard-00003.h5
    progress = run.read_progress()    # TrainProgress or None
    with run.train_lock():            # one trainer per run folder; released when the process dies
        ...
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synhpc.atomic import write_text
from synhpc.errors import DataError

# Pipeline stages in the order they run; submit, status and the CLI list them from here.
STAGES = ("extract", "index", "train", "evaluate", "gather")
# A prediction run's stages: parts scored by an array, then the per-root table.
PREDICTION_STAGES = ("predict", "roots")
# Contrastive pretraining (its cubes are cut by extract and index jobs): one requeueable, data-parallel job.
PRETRAIN_STAGES = ("pretrain",)
# Every kind of batch job, each with its own resources in a cluster profile.
JOB_STAGES = (*STAGES, *PREDICTION_STAGES, *PRETRAIN_STAGES)


@dataclass(frozen=True)
class TrainProgress:
    """What training has planned and done, written by rank 0 at every checkpoint (``progress.json``).

    ``planned_steps`` counts micro-batches of one rank (each rank takes ``batch_size`` samples of every global batch
    of ``batch_size * world_size``), so a multi-GPU run plans fewer steps than a single process would.
    """

    planned_steps: int
    done_steps: int
    steps_per_epoch: int
    epochs: int
    world_size: int
    batch_size: int
    training_digest: str
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.planned_steps


class RunDir:
    """Paths of one run folder (nothing is created until a stage writes)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------------------ prepared by extract
    @property
    def config(self) -> Path:
        """The resolved config every batch job of the run reads."""
        return self.path / "config.yaml"

    @property
    def manifest(self) -> Path:
        """Every labelled synapse with its split, voxel centre, shard and row (the source of truth for shards)."""
        return self.path / "synapses.csv"

    @property
    def drops(self) -> Path:
        return self.path / "drops.csv"

    @property
    def provenance(self) -> Path:
        return self.path / "provenance.json"

    @property
    def split_shares(self) -> Path:
        """Achieved neuron and synapse shares per class and split."""
        return self.path / "split_shares.csv"

    @property
    def cubes(self) -> Path:
        return self.path / "cubes"

    def shard(self, shard: int) -> Path:
        return self.cubes / shard_name(shard)

    @property
    def index(self) -> Path:
        return self.cubes / "index.json"

    @property
    def verified(self) -> Path:
        """Checksums of shards already verified against the index, keyed by file size and mtime."""
        return self.cubes / "verified.json"

    # ------------------------------------------------------------------------------------------------ training
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        """Weights of the best epoch on validation (the EMA weights when training keeps an average)."""
        return self.path / "best.pt"

    @property
    def model_card(self) -> Path:
        """Everything needed to use ``best.pt`` without the training config (``synhpc.modelcard``)."""
        return self.path / "model.json"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.csv"

    @property
    def training_curves(self) -> Path:
        return self.path / "training_curves.png"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"

    @property
    def lock(self) -> Path:
        return self.path / "train.lock"

    # ---------------------------------------------------------------------------------------------- evaluation
    @property
    def predictions(self) -> Path:
        """Per-synapse logits, probabilities and predictions of the scored splits."""
        return self.path / "predictions.csv"

    @property
    def neuron_predictions(self) -> Path:
        """Per presynaptic neuron: mean logit, probability and prediction."""
        return self.path / "neuron_predictions.csv"

    @property
    def accuracy_vs_synapses(self) -> Path:
        """Neuron accuracy against the number of synapses seen per neuron (with bootstrap bands)."""
        return self.path / "accuracy_vs_synapses.csv"

    @property
    def tau_sweep(self) -> Path:
        return self.path / "tau_sweep.csv"

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def inspect(self) -> Path:
        """Neuroglancer states, links and centre-section galleries of the most uncertain roots and confident errors."""
        return self.path / "inspect"

    def plot(self, name: str) -> Path:
        """``<run>/<name>.png``: confusion_matrix, roc, tau_sweep, accuracy_vs_synapses, reliability, ..."""
        return self.path / f"{name}.png"

    # ---------------------------------------------------------------------------------------------- prediction
    @property
    def predict_plan(self) -> Path:
        """The selected synapses of a prediction run, each with its voxel centre, part and row."""
        return self.path / "predict_plan.parquet"

    @property
    def predict_provenance(self) -> Path:
        return self.path / "predict.json"

    @property
    def parts(self) -> Path:
        return self.path / "parts"

    def part(self, part: int) -> Path:
        """Predictions of one part: CAVE's column names plus logit, probability, prediction."""
        return self.parts / f"part-{part:05d}.parquet"

    def part_cubes(self, part: int) -> Path:
        return self.parts / f"cubes-{part:05d}.h5"

    @property
    def roots(self) -> Path:
        """Per presynaptic root: synapses, summed and mean log-odds, P(excitatory) two ways, and the call."""
        return self.path / "roots.csv"

    def evaluation_current(self) -> bool:
        """summary.csv exists and was written after the best model it evaluates."""
        return self.summary.is_file() and self.best.is_file() and self.summary.stat().st_mtime >= self.best.stat().st_mtime

    def part_embeddings(self, part: int) -> Path:
        """Backbone embeddings of one part (``predict.embeddings``): id, pre_pt_root_id, embedding (float32 list)."""
        return self.parts / f"embeddings-{part:05d}.parquet"

    # ---------------------------------------------------------------------------------------------- pretraining
    @property
    def pretrain(self) -> RunDir:
        """Contrastive pretraining of this run (``synhpc pretrain``): a run folder of its own, ``<run>/pretrain/``,
        whose manifest, shards and index hold the pretraining cubes (label -1 where the presynaptic root has no
        cell type, split -1) beside its config, checkpoints, progress record and lock."""
        return RunDir(self.path / "pretrain")

    @property
    def backbone(self) -> Path:
        """The pretrained feature extractor (``synhpc.models.backbone``), written when pretraining finishes."""
        return self.path / "backbone.pt"

    @property
    def pretrain_record(self) -> Path:
        """What was pretrained on what: selection, counts, recipe, digests, the backbone's sha256."""
        return self.path / "pretrain.json"

    @property
    def pretrain_log(self) -> Path:
        """Per-epoch contrastive loss and accuracy, lr, neighbour accuracy of labelled embeddings, samples/s."""
        return self.path / "pretrain_log.csv"

    @property
    def label_sweep(self) -> Path:
        """``synhpc bench labels``: one training run folder per (arm, label fraction, repeat)."""
        return self.bench / "labels"

    # ---------------------------------------------------------------------------------------------- cluster
    @property
    def jobs_csv(self) -> Path:
        return self.path / "jobs.csv"

    def job_folder(self, stage: str) -> Path:
        return self.path / "jobs" / stage

    @property
    def bench(self) -> Path:
        return self.path / "bench"

    # ---------------------------------------------------------------------------------------------- progress
    def write_progress(self, progress: TrainProgress) -> None:
        write_text(self.progress, json.dumps(dataclasses.asdict(progress), indent=1))

    def read_progress(self) -> TrainProgress | None:
        """The progress record, or None when training never wrote one; a damaged record is a one-line error."""
        if not self.progress.is_file():
            return None
        try:
            data = json.loads(self.progress.read_text())
            return TrainProgress(**{f.name: data[f.name] for f in dataclasses.fields(TrainProgress)})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{self.progress}: unreadable training progress record ({exc.__class__.__name__})") from None

    # ---------------------------------------------------------------------------------------------- the lock
    @contextmanager
    def train_lock(self) -> Iterator[None]:
        """Hold ``train.lock`` while training; a second trainer gets a one-line error naming the holder.

        A POSIX record lock (``fcntl.lockf``) belongs to the process: the kernel (or GPFS, cluster-wide) drops it
        when the process dies, so the lock file a killed job leaves behind never blocks its requeued successor.
        """
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                raise DataError(f"{self.lock}: another trainer is running on this run folder ({holder}); wait for it or use a new run.name") from None
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, " ".join(f"{k}={v}" for k, v in holder.items() if v != "").encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock; the file stays (removing it would race a waiting trainer)


SUMMARY = "summary.csv"  # each run's summary and, under run.root, the gathered table of every run


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.h5"


def gathered_summary(root: str | os.PathLike[str]) -> Path:
    """``<run.root>/summary.csv``: every run's summary rows in one table."""
    return Path(root) / SUMMARY


def cv_gathered(root: str | os.PathLike[str]) -> Path:
    """``<run.root>/summary_cv.csv``: every cross-validation's spread over its folds."""
    return Path(root) / "summary_cv.csv"


def read_json(path: Path, what: str) -> Any:
    """A JSON file a stage wrote earlier, or a one-line DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing {what}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc.__class__.__name__})") from None
