"""Training: a flat loop with periodic atomic checkpoints and resume-on-start.

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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from synhpc.atomic import write_csv
from synhpc.augment import apply, mix, normalize, step_seed
from synhpc.checkpoint import atomic_save, load_latest, save_checkpoint
from synhpc.config import Config, digest_of
from synhpc.datasets import SPLITS, CubeDataset, ShardSet
from synhpc.distributed import DistInfo, any_rank, broadcast_from_main, cleanup, init_from_env
from synhpc.ema import EMA
from synhpc.errors import DataError
from synhpc.losses import balanced_bce, focal_loss, soft_targets
from synhpc.metrics import binary_metrics, sigmoid
from synhpc.models import build_model
from synhpc.preemption import StopFlag
from synhpc.tta import predict_tta

CKPT_DIR = "checkpoints"
BEST = "best.pt"
TRAIN_LOG = "train_log.csv"
# Columns of train_log.csv that measure the machine, not the training: they differ between identical runs.
MEASURED_COLUMNS = ["samples_per_s", "data_wait_fraction", "peak_memory_mb"]
TRAIN_PROBE = 512  # training samples scored at each epoch end for the train columns of train_log.csv


def training_digest(cfg: Config) -> str:
    """What a checkpoint must agree with to be resumed: model, training recipe and data."""
    data = cfg.to_dict()
    # How often to checkpoint and how many workers/threads to use do not change what is learned.
    train = {k: v for k, v in data["train"].items() if k not in ("num_workers", "threads", "checkpoint_every")}
    keyed = {"model": data["model"], "train": train, "augment": data["augment"], "cubes": data["cubes"]["shape_zyx"]}
    return digest_of(keyed)


def learning_rate(cfg: Config, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 1% of the peak."""
    peak, warm = cfg.train.lr, max(1, cfg.train.warmup_steps)
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


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: ShardSet, indices: np.ndarray, batch_size: int, num_workers: int = 0, views: int = 1) -> np.ndarray:
    """Logits for ``indices`` in order (eval mode), averaged over ``views`` test-time dihedral views."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(CubeDataset(data, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=_private_generator())
    # bf16 inference on GPUs; CPU stays fp32 so results do not depend on oneDNN's bf16 kernels.
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with cast:
        out = [predict_tta(model, normalize(cubes.to(device)), views=views).float().cpu() for cubes, _, _ in loader]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _private_generator() -> torch.Generator:
    """DataLoader iterators draw a seed from the global torch RNG unless given a generator; that draw would shift
    the dropout stream of a resumed run (its loader is created after the checkpoint, not before)."""
    return torch.Generator().manual_seed(0)


def _write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_csv(pd.DataFrame(history), run_dir / TRAIN_LOG)


def make_loss(cfg: Config, n_pos: int, n_neg: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Class-balanced BCE (weights from training counts) or focal loss; targets may be soft (mixing, smoothing)."""
    if cfg.train.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.train.focal_gamma, cfg.train.focal_alpha)
    # A balanced sampler already shows both classes equally often; weighting again would over-correct.
    return balanced_bce(1.0 if cfg.train.sampler == "balanced" else n_neg / n_pos)


def train(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) the configured model on the run's train split; validation picks the best epoch.

    ``step`` counts micro-batches; the optimizer steps every ``train.grad_accum`` of them (and at epoch end), and
    checkpoints fall only on those boundaries, so no half-accumulated gradient is ever lost or duplicated.
    """
    torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / CKPT_DIR
    info = init_from_env()
    device, world = info.device, info.world_size
    layout = torch.channels_last_3d if cfg.train.channels_last else torch.contiguous_format
    data = ShardSet(run_dir / "cubes")
    train_idx, val_idx = data.indices(SPLITS["train"]), data.indices(SPLITS["val"])
    labels = data.rows["label"][train_idx]
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{run_dir}: the train split holds only one class (excitatory {n_pos}, inhibitory {n_neg})")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.cubes.shape_zyx).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # Validation (and best.pt) use the averaged weights when there are any: they are what evaluation scores.
    scored = copy.deepcopy(model) if ema is not None else model
    loss_fn = make_loss(cfg, n_pos, n_neg)
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    per_epoch = math.ceil(len(train_idx) / (batch * world))  # batch_size is per rank
    total = per_epoch * cfg.train.epochs
    digest = training_digest(cfg)

    step, history, best, skipped = 0, [], {"balanced_accuracy": -1.0, "epoch": -1}, 0
    # Loss summed over the epoch so far; checkpointed so a resumed epoch reports the same mean.
    epoch_loss = {"sum": 0.0, "n": 0}
    state, path = load_latest(ckpt_dir)
    if state is not None:
        if state["digest"] != digest:
            raise DataError(f"{path}: checkpoint was written by a different model/training config; use a new run.name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        step, history, best, skipped = state["step"], state["history"], state["best"], state["skipped_steps"]
        epoch_loss = state["epoch_loss"]
        print(f"resuming from {path} at step {step}", flush=True)
    # Wrapped after loading: DDP broadcasts rank 0's weights at construction, and every rank loaded the same file.
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    def snapshot() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "history": history,
            "best": best,
            "skipped_steps": skipped,
            "epoch_loss": epoch_loss,
            "digest": digest,
        }

    def optimizer_step() -> None:
        nonlocal skipped
        scaler.unscale_(optimizer)
        if grads_finite(model):
            if cfg.train.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            scaler.step(optimizer)
            if ema is not None:
                ema.update(model)
        else:
            skipped += 1  # bf16 Conv3d weight grads on CPU are sometimes inf; one skipped step costs little
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not progress)
    with StopFlag() as stop:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            order = epoch_order(cfg, train_idx, labels, epoch, per_epoch * batch * world if world > 1 else None)
            # Rank r takes the r-th slice of each global batch; one process takes the whole order.
            positions = [list(range((b * world + info.rank) * batch, min((b * world + info.rank + 1) * batch, len(order)))) for b in range(first, per_epoch)]
            loader = DataLoader(CubeDataset(data, order), batch_sampler=positions, num_workers=cfg.train.num_workers, generator=_private_generator())
            model.train()
            optimizer.zero_grad(set_to_none=True)
            if first == 0:
                epoch_loss = {"sum": 0.0, "n": 0}
            seen, wait, started, skipped_before = 0, 0.0, time.perf_counter(), skipped
            fetched = time.perf_counter()
            for cubes, targets, _ in loader:
                wait += time.perf_counter() - fetched
                update = epoch * math.ceil(per_epoch / accum) + (step - epoch * per_epoch) // accum
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, update, total_updates(cfg, per_epoch))
                gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
                cubes, targets = cubes.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                x, y = mix(normalize(apply(cubes, cfg.augment, gen)), targets, cfg.augment, gen)
                if cfg.train.label_smoothing > 0:
                    y = soft_targets(y, cfg.train.label_smoothing)
                with autocast(cfg.train.precision, device):
                    loss = loss_fn(net(x.contiguous(memory_format=layout)).float(), y)
                scaler.scale(loss / accum).backward()
                step += 1
                in_epoch = step - epoch * per_epoch
                if in_epoch % accum == 0 or in_epoch == per_epoch:
                    optimizer_step()
                epoch_loss = {"sum": epoch_loss["sum"] + float(loss.detach()), "n": epoch_loss["n"] + 1}
                seen += len(targets)
                bar.update(1)
                # An epoch's last step is checkpointed after validation, below, so resuming never skips it.
                boundary = in_epoch % accum == 0 and in_epoch != per_epoch
                stopping = boundary and any_rank(stop.requested, info)
                if boundary and (step % cfg.train.checkpoint_every == 0 or stopping):
                    if info.is_main:
                        save_checkpoint(ckpt_dir, step, snapshot())
                    if stopping:
                        bar.close()
                        _leave(stop, info)
                fetched = time.perf_counter()
            seconds = time.perf_counter() - started
            updates = math.ceil((per_epoch - first) / accum)
            if updates and skipped - skipped_before == updates:
                raise DataError(
                    f"{run_dir}: every optimizer step of epoch {epoch} had non-finite gradients under {cfg.train.precision}; "
                    "train this model in fp32"
                )
            # Ranks hold the same parameters but their own BatchNorm statistics; take rank 0's so every rank
            # validates (and later resumes) the same network.
            broadcast_from_main([b for _, b in model.named_buffers()] + (list(ema.buffers.values()) if ema is not None else []), info)
            if ema is not None:
                ema.copy_to(scored)
            val_logits = predict_logits(scored, data, val_idx, cfg.evaluate.batch_size)
            val = binary_metrics(data.rows["label"][val_idx], sigmoid(val_logits), 0.5)
            # Train metrics on a fixed, evenly spaced subset, scored like validation (no augmentation, eval mode).
            probe = train_idx[:: max(1, len(train_idx) // TRAIN_PROBE)][:TRAIN_PROBE]
            fit = binary_metrics(data.rows["label"][probe], sigmoid(predict_logits(scored, data, probe, cfg.evaluate.batch_size)), 0.5)
            row = {
                "epoch": epoch,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": epoch_loss["sum"] / epoch_loss["n"] if epoch_loss["n"] else math.nan,
                "train_balanced_accuracy": fit["balanced_accuracy"],
                "train_roc_auc": fit["roc_auc"],
                "val_balanced_accuracy": val["balanced_accuracy"],
                "val_roc_auc": val["roc_auc"],
                "samples_per_s": seen / seconds if seconds > 0 else math.nan,
                "data_wait_fraction": wait / seconds if seconds > 0 else math.nan,
                "peak_memory_mb": _peak_memory_mb(device),
                "skipped_steps": skipped,
            }
            history = [*history, row]
            if val["balanced_accuracy"] > best["balanced_accuracy"]:
                best = {"balanced_accuracy": val["balanced_accuracy"], "epoch": epoch}
                if info.is_main:
                    weights = {k: v.detach().cpu() for k, v in scored.state_dict().items()}
                    atomic_save({"model": weights, "ema": ema is not None, "epoch": epoch, "step": step, "digest": digest, "model_name": cfg.model.name}, run_dir / BEST)
            if info.is_main:
                save_checkpoint(ckpt_dir, step, snapshot())
                _write_log(run_dir, history)
            bar.set_postfix(val_ba=f"{val['balanced_accuracy']:.3f}")
            if any_rank(stop.requested, info):
                bar.close()
                _leave(stop, info)
    bar.close()
    cleanup(info)
    return {
        "steps": step,
        "best_epoch": best["epoch"],
        "best_val_balanced_accuracy": best["balanced_accuracy"],
        "skipped_steps": skipped,
        "weights_sha256": weights_digest(model),
    }


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


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean bit-identical weights (e.g. across DDP ranks)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _leave(stop: StopFlag, info: DistInfo) -> None:
    """Every rank leaves at the same step; ranks the signal has not reached yet exit as if it had."""
    cleanup(info)
    if stop.requested:
        stop.finish()
    raise SystemExit(128 + signal.SIGTERM)


def total_updates(cfg: Config, per_epoch: int) -> int:
    """Optimizer steps in the whole run: each epoch's last partial accumulation group still steps."""
    return math.ceil(per_epoch / cfg.train.grad_accum) * cfg.train.epochs


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
