"""Training: a flat loop with periodic atomic checkpoints and resume-on-start.

Everything that decides the trajectory is a function of (seed, epoch, step) or lives in the checkpoint (weights,
optimizer, torch RNG, history), so a run killed anywhere and started again ends with the same weights as one
that never stopped.

Usage::

    result = train(cfg)   # {"steps": ..., "best_epoch": ..., "best_val_balanced_accuracy": ...}
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from synhpc.checkpoint import atomic_save, load_latest, save_checkpoint
from synhpc.config import Config, digest_of
from synhpc.datasets import SPLITS, CubeDataset, ShardSet
from synhpc.errors import DataError
from synhpc.metrics import binary_metrics
from synhpc.models import build_model
from synhpc.preemption import StopFlag
from synhpc.transforms import augment, normalize, step_seed
from synhpc.tta import predict_tta

CKPT_DIR = "checkpoints"
BEST = "best.pt"
TRAIN_LOG = "train_log.csv"


def training_digest(cfg: Config) -> str:
    """What a checkpoint must agree with to be resumed: model, training recipe and data."""
    data = cfg.to_dict()
    train = {k: v for k, v in data["train"].items() if k not in ("num_workers", "threads")}
    keyed = {"model": data["model"], "train": train, "cubes": data["cubes"]["shape_zyx"]}
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
    loader = DataLoader(CubeDataset(data, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=_private_generator())
    out = [predict_tta(model, normalize(cubes), views=views).float() for cubes, _, _ in loader]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _private_generator() -> torch.Generator:
    """DataLoader iterators draw a seed from the global torch RNG unless given a generator; that draw would shift
    the dropout stream of a resumed run (its loader is created after the checkpoint, not before)."""
    return torch.Generator().manual_seed(0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    tmp = run_dir / f".{TRAIN_LOG}.tmp"
    pd.DataFrame(history).to_csv(tmp, index=False)
    os.replace(tmp, run_dir / TRAIN_LOG)


def train(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) the configured model on the run's train split; validation picks the best epoch."""
    torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / CKPT_DIR
    device = torch.device("cpu")
    data = ShardSet(run_dir / "cubes")
    train_idx, val_idx = data.indices(SPLITS["train"]), data.indices(SPLITS["val"])
    labels = data.rows["label"][train_idx]
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{run_dir}: the train split holds only one class (excitatory {n_pos}, inhibitory {n_neg})")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.cubes.shape_zyx).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # Class-balanced BCE: the loss weighs both classes equally whatever their synapse counts.
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / n_pos))
    batch = cfg.train.batch_size
    per_epoch = math.ceil(len(train_idx) / batch)
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
        torch.set_rng_state(state["torch_rng"])
        step, history, best, skipped = state["step"], state["history"], state["best"], state["skipped_steps"]
        epoch_loss = state["epoch_loss"]
        print(f"resuming from {path} at step {step}", flush=True)

    def snapshot() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "history": history,
            "best": best,
            "skipped_steps": skipped,
            "epoch_loss": epoch_loss,
            "digest": digest,
        }

    bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not progress)
    with StopFlag() as stop:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            order = np.random.default_rng([cfg.train.seed, epoch]).permutation(train_idx)
            positions = [list(range(b * batch, min((b + 1) * batch, len(order)))) for b in range(first, per_epoch)]
            loader = DataLoader(CubeDataset(data, order), batch_sampler=positions, num_workers=cfg.train.num_workers, generator=_private_generator())
            model.train()
            if first == 0:
                epoch_loss = {"sum": 0.0, "n": 0}
            seen, wait, started = 0, 0.0, time.perf_counter()
            fetched = time.perf_counter()
            for cubes, targets, _ in loader:
                wait += time.perf_counter() - fetched
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step, total)
                gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
                x = normalize(augment(cubes, gen) if cfg.train.augment else cubes)
                with autocast(cfg.train.precision, device):
                    loss = loss_fn(model(x).float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grads_finite(model):
                    optimizer.step()
                else:
                    skipped += 1  # bf16 Conv3d weight grads on CPU are sometimes inf; one skipped step costs little
                epoch_loss = {"sum": epoch_loss["sum"] + float(loss.detach()), "n": epoch_loss["n"] + 1}
                seen += len(targets)
                step += 1
                bar.update(1)
                # An epoch's last step is checkpointed after validation, below, so resuming never skips it.
                if (step % cfg.train.checkpoint_every == 0 or stop.requested) and step % per_epoch != 0:
                    save_checkpoint(ckpt_dir, step, snapshot())
                    if stop.requested:
                        bar.close()
                        stop.finish()
                fetched = time.perf_counter()
            seconds = time.perf_counter() - started
            val_logits = predict_logits(model, data, val_idx, cfg.evaluate.batch_size)
            val = binary_metrics(data.rows["label"][val_idx], _sigmoid(val_logits), 0.5)
            row = {
                "epoch": epoch,
                "step": step,
                "lr": learning_rate(cfg, step - 1, total),
                "train_loss": epoch_loss["sum"] / epoch_loss["n"] if epoch_loss["n"] else math.nan,
                "val_balanced_accuracy": val["balanced_accuracy"],
                "val_roc_auc": val["roc_auc"],
                "samples_per_s": seen / seconds if seconds > 0 else math.nan,
                "data_wait_fraction": wait / seconds if seconds > 0 else math.nan,
                "skipped_steps": skipped,
            }
            history = [*history, row]
            if val["balanced_accuracy"] > best["balanced_accuracy"]:
                best = {"balanced_accuracy": val["balanced_accuracy"], "epoch": epoch}
                atomic_save({"model": model.state_dict(), "epoch": epoch, "step": step, "digest": digest, "model_name": cfg.model.name}, run_dir / BEST)
            save_checkpoint(ckpt_dir, step, snapshot())
            _write_log(run_dir, history)
            bar.set_postfix(val_ba=f"{val['balanced_accuracy']:.3f}")
            if stop.requested:
                bar.close()
                stop.finish()
    bar.close()
    if history:
        _write_log(run_dir, history)
    return {"steps": step, "best_epoch": best["epoch"], "best_val_balanced_accuracy": best["balanced_accuracy"], "skipped_steps": skipped}
