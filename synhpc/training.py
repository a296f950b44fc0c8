"""Training: a :class:`Trainer` that holds the whole training state (model, optimizer, scaler, EMA, step, history)
and moves it one micro-batch (:meth:`Trainer.train_step`), one epoch (:meth:`Trainer.run_epoch`) or one validation
(:meth:`Trainer.validate`) at a time; :func:`train` runs it on a run folder with periodic atomic checkpoints and
resume-on-start.

Everything that decides the trajectory is a function of (seed, epoch, step) or lives in the checkpoint (weights,
optimizer, torch RNG, history), so a run killed anywhere and started again ends with the same weights as one
that never stopped.

Usage::

    result = train(cfg)   # {"steps": ..., "best_epoch": ..., "best_val_balanced_accuracy": ...}
"""

from __future__ import annotations

import copy
import hashlib
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from synhpc.atomic import write_csv
from synhpc.augment import apply, mix, step_seed
from synhpc.checkpoint import atomic_save, load_latest, save_checkpoint
from synhpc.config import START_KEYS, Config, digest_of, save_config
from synhpc.datasets import CubeDataset, ShardSet
from synhpc.distributed import DistInfo, any_rank, broadcast_from_main, cleanup, init_from_env
from synhpc.ema import EMA
from synhpc.errors import DataError
from synhpc.inference import normalize, predict_rows, private_generator
from synhpc.label_budget import budget_record, neuron_subset
from synhpc.losses import balanced_bce, focal_loss, soft_targets
from synhpc.metrics import binary_metrics, sigmoid
from synhpc.models import build_model
from synhpc.models.backbone import load_backbone, split_model
from synhpc.preemption import StopFlag
from synhpc.rundir import RunDir, TrainProgress
from synhpc.splits import SPLITS

# Columns of train_log.csv that measure the machine, not the training: they differ between identical runs.
MEASURED_COLUMNS = ["samples_per_s", "data_wait_fraction", "peak_memory_mb"]
TRAIN_PROBE = 512  # training samples scored at each epoch end for the train columns of train_log.csv


def training_digest(cfg: Config) -> str:
    """What a checkpoint must agree with to be resumed: model, training recipe and data."""
    data = cfg.to_dict()
    # How often to checkpoint or log and how many workers/threads to use do not change what is learned.
    train = {k: v for k, v in data["train"].items() if k not in ("num_workers", "threads", "checkpoint_every", "log_every", "device")}
    # model.init/freeze and the label budget count only when used, so every other run keeps its digest (and resumes).
    model = {k: v for k, v in data["model"].items() if k not in START_KEYS or (v and cfg.model.init)}
    keyed = {"model": model, "train": train, "augment": data["augment"], "cubes": data["cubes"]["shape_zyx"]}
    if cfg.labels.fraction < 1.0:
        keyed["labels"] = {"fraction": cfg.labels.fraction, "seed": cfg.labels.seed}
    return digest_of(keyed)


def trainer_digest(cfg: Config, backbone_sha256: str = "") -> str:
    """What a run's checkpoints carry and must match to resume: the training digest, joined by the sha256 of the
    pretrained backbone ``model.init`` loads (so a checkpoint never resumes onto another backbone)."""
    return digest_of([training_digest(cfg), backbone_sha256]) if backbone_sha256 else training_digest(cfg)


def learning_rate(cfg: Config, step: int, total: int) -> float:
    """Training's schedule: :func:`warmup_cosine` of ``train.lr`` and ``train.warmup_steps``."""
    return warmup_cosine(cfg.train.lr, cfg.train.warmup_steps, step, total)


def warmup_cosine(peak: float, warmup: int, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 1% of the peak (training's and pretraining's schedule)."""
    warm = max(1, warmup)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grads_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def make_loss(cfg: Config, n_pos: int, n_neg: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Class-balanced BCE (weights from training counts) or focal loss; targets may be soft (mixing, smoothing)."""
    if cfg.train.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.train.focal_gamma, cfg.train.focal_alpha)
    # A balanced sampler already shows both classes equally often; weighting again would over-correct.
    return balanced_bce(1.0 if cfg.train.sampler == "balanced" else n_neg / n_pos)


def epoch_order(cfg: Config, train_idx: np.ndarray, labels: np.ndarray, epoch: int, length: int | None) -> np.ndarray:
    """The epoch's sample order, a function of (seed, epoch) only: a shuffle, or with ``train.sampler=balanced``
    as many excitatory as inhibitory draws (the minority class with replacement). ``length`` wraps the order around
    so every rank gets full batches."""
    rng = np.random.default_rng([cfg.train.seed, epoch])
    if cfg.train.sampler == "balanced":
        half = len(train_idx) // 2
        parts = [rng.choice(train_idx[labels == c], half, replace=int((labels == c).sum()) < half) for c in (0, 1)]
        order = rng.permutation(np.concatenate(parts))
    else:
        order = rng.permutation(train_idx)
    return np.resize(order, length) if length else order


class Trainer:
    """The state of one training run and the steps that move it.

    ``step`` counts micro-batches of this rank; the optimizer steps every ``train.grad_accum`` of them (and at epoch
    end), and checkpoints fall only on those boundaries, so no half-accumulated gradient is ever lost or duplicated.

    Usage::

        trainer = Trainer(cfg, n_pos=900, n_neg=700, per_epoch=50, info=init_from_env())
        loss = trainer.train_step(cubes_uint8, targets)      # one micro-batch: augment, forward, backward, maybe update
        trainer.load_state_dict(torch.load(ckpt, weights_only=True))
    """

    def __init__(self, cfg: Config, *, n_pos: int, n_neg: int, per_epoch: int, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.layout = torch.channels_last_3d if cfg.train.channels_last else torch.contiguous_format
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.cubes.shape_zyx)
        # model.init: the pretrained backbone replaces the built one's weights (the head stays as built) before
        # anything copies the model; its file's sha256 joins the digest (trainer_digest).
        self.init = load_backbone(self.model, cfg.model.init, expect=cfg.model.name, freeze=cfg.model.freeze) if cfg.model.init else None
        self.card_extra: dict[str, Any] = {"pretraining": self.init} if self.init else {}
        self.model = self.model.to(self.device, memory_format=self.layout)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        # Validation (and best.pt) use the averaged weights when there are any: they are what evaluation scores.
        self.scored = copy.deepcopy(self.model) if self.ema is not None else self.model
        self.loss_fn = make_loss(cfg, n_pos, n_neg)
        self.per_epoch = per_epoch
        self.total = per_epoch * cfg.train.epochs
        self.updates_total = math.ceil(per_epoch / cfg.train.grad_accum) * cfg.train.epochs
        self.digest = trainer_digest(cfg, self.init["sha256"] if self.init else "")
        self.step, self.history, self.skipped = 0, [], 0
        self.best = {"balanced_accuracy": -1.0, "epoch": -1}
        # Loss summed over the epoch so far; checkpointed so a resumed epoch reports the same mean.
        self.epoch_loss = {"sum": 0.0, "n": 0}
        self.net: torch.nn.Module = self.model

    def wrap_distributed(self) -> None:
        """DDP after loading: it broadcasts rank 0's weights at construction, and every rank loaded the same file."""
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _param_groups(self) -> Any:
        """All parameters in one group, or with a pretrained backbone and ``model.init_lr_scale`` < 1 the backbone's
        in a group whose learning rate is that share of the schedule's (a fine-tune that keeps more of what
        pretraining learnt)."""
        scale = self.cfg.model.init_lr_scale
        if self.init is None or scale == 1.0:
            return self.model.parameters()
        head = {id(p) for p in split_model(self.model).head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head]
        # The head first: train_log.csv's lr column reads group 0.
        return [{"params": [p for p in self.model.parameters() if id(p) in head]}, {"params": backbone, "lr_scale": scale}]

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "history": self.history,
            "best": self.best,
            "skipped_steps": self.skipped,
            "epoch_loss": self.epoch_loss,
            "digest": self.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history, self.best, self.skipped = state["step"], state["history"], state["best"], state["skipped_steps"]
        self.epoch_loss = state["epoch_loss"]

    # ------------------------------------------------------------------------------------------------ steps
    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if grads_finite(self.model):
            if self.cfg.train.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
            self.scaler.step(self.optimizer)
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self.skipped += 1  # bf16 Conv3d weight grads on CPU are sometimes inf; one skipped step costs little
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, cubes: torch.Tensor, targets: torch.Tensor) -> float:
        """One micro-batch of uint8 cubes (B, 1, Z, Y, X): augment (seeded by the step), forward, backward, and the
        optimizer update when this micro-batch closes an accumulation group. Returns the loss."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        epoch = self.step // self.per_epoch
        update = epoch * math.ceil(self.per_epoch / accum) + (self.step - epoch * self.per_epoch) // accum
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, update, self.updates_total)
            if "lr_scale" in group:  # only a fine-tuned pretrained backbone's group has one
                group["lr"] *= group["lr_scale"]
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, self.step))
        cubes, targets = cubes.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        x, y = mix(normalize(apply(cubes, cfg.augment, gen)), targets, cfg.augment, gen)
        if cfg.train.label_smoothing > 0:
            y = soft_targets(y, cfg.train.label_smoothing)
        with autocast(cfg.train.precision, self.device):
            loss = self.loss_fn(self.net(x.contiguous(memory_format=self.layout)).float(), y)
        self.scaler.scale(loss / accum).backward()
        self.step += 1
        in_epoch = self.step - epoch * self.per_epoch
        if in_epoch % accum == 0 or in_epoch == self.per_epoch:
            self._optimizer_step()
        value = float(loss.detach())
        self.epoch_loss = {"sum": self.epoch_loss["sum"] + value, "n": self.epoch_loss["n"] + 1}
        return value

    def at_boundary(self) -> bool:
        """True after a micro-batch that closed an accumulation group inside an epoch (a safe checkpoint point; an
        epoch's last step is checkpointed after validation instead, so resuming never skips it)."""
        in_epoch = self.step - (self.step - 1) // self.per_epoch * self.per_epoch
        return in_epoch % self.cfg.train.grad_accum == 0 and in_epoch != self.per_epoch

    def run_epoch(self, data: ShardSet, train_idx: np.ndarray, labels: np.ndarray, *, on_step: Callable[[], bool]) -> dict[str, float]:
        """The rest of the current epoch (from a resumed step if need be). ``on_step`` runs after every micro-batch
        and returns True to stop early (a checkpoint was written and the run must leave). Returns seen samples,
        seconds, data-wait seconds and whether it stopped."""
        info, batch, world = self.info, self.cfg.train.batch_size, self.info.world_size
        epoch, first = divmod(self.step, self.per_epoch)
        order = epoch_order(self.cfg, train_idx, labels, epoch, self.per_epoch * batch * world if world > 1 else None)
        # Rank r takes the r-th slice of each global batch; one process takes the whole order.
        positions = [list(range((b * world + info.rank) * batch, min((b * world + info.rank + 1) * batch, len(order)))) for b in range(first, self.per_epoch)]
        loader = DataLoader(CubeDataset(data, order), batch_sampler=positions, num_workers=self.cfg.train.num_workers, generator=private_generator())
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if first == 0:
            self.epoch_loss = {"sum": 0.0, "n": 0}
        seen, wait, started, skipped_before = 0, 0.0, time.perf_counter(), self.skipped
        fetched = time.perf_counter()
        for cubes, targets, _ in loader:
            wait += time.perf_counter() - fetched
            self.train_step(cubes, targets)
            seen += len(targets)
            if on_step():
                return {"seen": seen, "seconds": time.perf_counter() - started, "wait": wait, "stopped": True}
            fetched = time.perf_counter()
        updates = math.ceil((self.per_epoch - first) / self.cfg.train.grad_accum)
        if updates and self.skipped - skipped_before == updates:
            raise DataError(
                f"{self.cfg.run_dir}: every optimizer step of epoch {epoch} had non-finite gradients under "
                f"{self.cfg.train.precision}; train this model in fp32"
            )
        return {"seen": seen, "seconds": time.perf_counter() - started, "wait": wait, "stopped": False}

    def validate(self, data: ShardSet, val_idx: np.ndarray, probe_idx: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics at tau 0.5 of the scored (EMA) weights on validation and on a fixed training probe."""
        # Ranks hold the same parameters but their own BatchNorm statistics; take rank 0's so every rank validates
        # (and later resumes) the same network.
        ema_buffers = list(self.ema.buffers.values()) if self.ema is not None else []
        broadcast_from_main([b for _, b in self.model.named_buffers()] + ema_buffers, self.info)
        if self.ema is not None:
            self.ema.copy_to(self.scored)
        batch = self.cfg.evaluate.batch_size
        val = binary_metrics(data.rows["label"][val_idx], sigmoid(predict_rows(self.scored, data, val_idx, batch)), 0.5)
        fit = binary_metrics(data.rows["label"][probe_idx], sigmoid(predict_rows(self.scored, data, probe_idx, batch)), 0.5)
        return val, fit

    def progress(self) -> TrainProgress:
        return TrainProgress(
            planned_steps=self.total, done_steps=self.step, steps_per_epoch=self.per_epoch, epochs=self.cfg.train.epochs,
            world_size=self.info.world_size, batch_size=self.cfg.train.batch_size, training_digest=self.digest, updated_at=time.time(),
        )


def train(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) the configured model on the run's train split; validation picks the best epoch.

    Rank 0 holds the run's training lock, writes checkpoints, ``best.pt`` with its model card, the train log and the
    progress record; every rank reads the same verified shards.
    """
    torch.set_num_threads(cfg.train.threads)
    run = RunDir(cfg.run_dir)
    info = init_from_env(cfg.train.device)
    data = ShardSet(run)
    train_idx, val_idx = data.indices(SPLITS["train"]), data.indices(SPLITS["val"])
    budget = None
    if cfg.labels.fraction < 1.0:  # a label budget: a seeded share of the train neurons per class (synhpc.label_budget)
        roots, classes = data.rows["pre_root_id"][train_idx], data.rows["label"][train_idx]
        keep = neuron_subset(roots, classes, cfg.labels.fraction, cfg.labels.seed)
        budget = budget_record(roots, classes, keep, cfg.labels.fraction, cfg.labels.seed)
        train_idx = train_idx[keep]
    labels = data.rows["label"][train_idx]
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{run.path}: the train split holds only one class (excitatory {n_pos}, inhibitory {n_neg})")
    per_epoch = math.ceil(len(train_idx) / (cfg.train.batch_size * info.world_size))  # batch_size is per rank
    lock = run.train_lock() if info.is_main else nullcontext()
    with lock:
        if info.is_main:
            save_config(cfg, run.config)  # the recipe this run trains with; extraction sections were checked equal
        trainer = Trainer(cfg, n_pos=n_pos, n_neg=n_neg, per_epoch=per_epoch, info=info)
        if budget is not None:
            trainer.card_extra["label_budget"] = budget
        state, path = load_latest(run.checkpoints)
        if state is not None:
            if state["digest"] != trainer.digest:
                raise DataError(f"{path}: checkpoint was written by a different model/training config; use a new run.name")
            trainer.load_state_dict(state)
            print(f"resuming from {path} at step {trainer.step}", flush=True)
        trainer.wrap_distributed()
        return _loop(cfg, run, trainer, data, train_idx, labels, val_idx, progress)


def _loop(cfg: Config, run: RunDir, trainer: Trainer, data: ShardSet, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    info = trainer.info
    probe = train_idx[:: max(1, len(train_idx) // TRAIN_PROBE)][:TRAIN_PROBE]
    bar = tqdm(total=trainer.total, initial=trainer.step, unit="step", desc="train", disable=not progress)
    log = _StepLog(cfg, trainer, enabled=info.is_main and not progress)
    with bar, StopFlag() as stop:  # the bar ends its line before any error message is printed

        def on_step() -> bool:
            bar.update(1)
            log.step()
            stopping = trainer.at_boundary() and any_rank(stop.requested, info)
            if trainer.at_boundary() and (trainer.step % cfg.train.checkpoint_every == 0 or stopping):
                _checkpoint(run, trainer)
            return stopping

        while trainer.step < trainer.total:
            epoch = trainer.step // trainer.per_epoch
            done = trainer.run_epoch(data, train_idx, labels, on_step=on_step)
            if done["stopped"]:
                bar.close()
                leave_together(stop, info)
            val, fit = trainer.validate(data, val_idx, probe)
            row = {
                "epoch": epoch,
                "step": trainer.step,
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "train_loss": trainer.epoch_loss["sum"] / trainer.epoch_loss["n"] if trainer.epoch_loss["n"] else math.nan,
                "train_balanced_accuracy": fit["balanced_accuracy"],
                "train_roc_auc": fit["roc_auc"],
                "val_balanced_accuracy": val["balanced_accuracy"],
                "val_roc_auc": val["roc_auc"],
                "samples_per_s": done["seen"] / done["seconds"] if done["seconds"] > 0 else math.nan,
                "data_wait_fraction": done["wait"] / done["seconds"] if done["seconds"] > 0 else math.nan,
                "peak_memory_mb": _peak_memory_mb(trainer.device),
                "skipped_steps": trainer.skipped,
            }
            trainer.history = [*trainer.history, row]
            if val["balanced_accuracy"] > trainer.best["balanced_accuracy"]:
                trainer.best = {"balanced_accuracy": val["balanced_accuracy"], "epoch": epoch}
                if info.is_main:
                    _save_best(cfg, run, trainer, data, val, epoch)
            _checkpoint(run, trainer)
            if info.is_main:
                write_csv(pd.DataFrame(trainer.history), run.train_log)
            log.epoch(row)
            bar.set_postfix(val_ba=f"{val['balanced_accuracy']:.3f}")
            if any_rank(stop.requested, info):
                bar.close()
                leave_together(stop, info)
    cleanup(info)
    return {
        "steps": trainer.step,
        "best_epoch": trainer.best["epoch"],
        "best_val_balanced_accuracy": trainer.best["balanced_accuracy"],
        "skipped_steps": trainer.skipped,
        "weights_sha256": weights_digest(trainer.model),
    }


def _checkpoint(run: RunDir, trainer: Trainer) -> None:
    if trainer.info.is_main:
        save_checkpoint(run.checkpoints, trainer.step, trainer.state_dict())
        run.write_progress(trainer.progress())


def _save_best(cfg: Config, run: RunDir, trainer: Trainer, data: ShardSet, val: dict[str, float], epoch: int) -> None:
    """best.pt (the scored weights) and its model card, the card last so it never names weights not yet written."""
    from synhpc.manifest import read_provenance
    from synhpc.modelcard import card_from_training, write_card
    from synhpc.shards import file_sha256

    weights = {k: v.detach().cpu() for k, v in trainer.scored.state_dict().items()}
    atomic_save({"model": weights, "ema": trainer.ema is not None, "epoch": epoch, "step": trainer.step, "digest": trainer.digest, "model_name": cfg.model.name}, run.best)
    validation = {k: float(v) for k, v in val.items() if k in ("balanced_accuracy", "roc_auc", "pr_auc", "accuracy", "mcc")}
    card = card_from_training(
        cfg, epoch=epoch, step=trainer.step, training_digest=trainer.digest, weights_sha256=file_sha256(run.best),
        provenance=read_provenance(run), counts=data.counts(), validation=validation, ema=trainer.ema is not None, extra=trainer.card_extra,
    )
    write_card(run, card)


class _StepLog:
    """Plain log lines for batch jobs (where no progress bar is drawn): every ``train.log_every`` steps and at each
    epoch end, with step, loss, samples/s and the estimated time left."""

    def __init__(self, cfg: Config, trainer: Trainer, enabled: bool):
        self.cfg, self.trainer, self.enabled = cfg, trainer, enabled
        self.start_step, self.started = trainer.step, time.perf_counter()
        if enabled:
            device = trainer.device
            cudnn = f", cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else ""
            print(f"train: {cfg.model.name} on {device}{cudnn}, {trainer.info.world_size} rank(s), step {trainer.step}/{trainer.total}", flush=True)

    def _rate(self) -> tuple[float, str]:
        seconds = time.perf_counter() - self.started
        steps = self.trainer.step - self.start_step
        per_s = steps / seconds if seconds > 0 else 0.0
        left = (self.trainer.total - self.trainer.step) / per_s if per_s > 0 else math.inf
        eta = "?" if not math.isfinite(left) else time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} d"
        return per_s * self.cfg.train.batch_size * self.trainer.info.world_size, eta

    def step(self) -> None:
        t = self.trainer
        if self.enabled and self.cfg.train.log_every > 0 and t.step % self.cfg.train.log_every == 0:
            rate, eta = self._rate()
            loss = t.epoch_loss["sum"] / t.epoch_loss["n"] if t.epoch_loss["n"] else math.nan
            print(f"step {t.step}/{t.total} loss {loss:.4f} {rate:.1f} samples/s eta {eta}", flush=True)

    def epoch(self, row: dict[str, Any]) -> None:
        if self.enabled:
            rate, eta = self._rate()
            print(
                f"epoch {row['epoch'] + 1}/{self.cfg.train.epochs} step {row['step']}/{self.trainer.total} loss {row['train_loss']:.4f} "
                f"val balanced accuracy {row['val_balanced_accuracy']:.3f} {rate:.1f} samples/s eta {eta}",
                flush=True,
            )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean bit-identical weights (e.g. across DDP ranks)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def leave_together(stop: StopFlag, info: DistInfo) -> None:
    """Every rank leaves at the same step; ranks the signal has not reached yet exit as if it had."""
    cleanup(info)
    if stop.requested:
        stop.finish()
    raise SystemExit(128 + signal.SIGTERM)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
