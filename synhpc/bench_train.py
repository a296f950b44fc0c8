"""Training throughput benchmark: samples/s per model and precision/layout, and loader + augmentation cubes/s.

Usage::

    frame = bench_train(cfg, cfg.run_dir / "bench")   # also bench_train.csv and bench_train.json there

Each model runs a few warm-up steps (oneDNN/cuDNN pick kernels on first use) and then timed calls of the real
``Trainer.train_step`` (augmentation, forward, loss, backward, guarded optimizer update) on random uint8 cubes of
``cubes.shape_zyx``. On a GPU the per-step FLOPs are
counted once with torch's FlopCounterMode and turned into MFU against the card's dense bf16 peak.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from synhpc.atomic import write_csv, write_text
from synhpc.augment import apply
from synhpc.bench import machine_info
from synhpc.config import Config
from synhpc.inference import normalize

# Dense bf16 tensor-core peaks (FLOP/s), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A40": 150e12}
VARIANTS = (("fp32", False), ("bf16", False), ("bf16", True))


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_steps(cfg: Config, name: str, precision: str, channels_last: bool, batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median seconds of :meth:`synhpc.training.Trainer.train_step` (augmentation, forward, loss, backward, guarded
    optimizer update) on random uint8 cubes of ``cubes.shape_zyx``."""
    from synhpc.distributed import DistInfo
    from synhpc.training import Trainer

    run = copy.deepcopy(cfg)
    run.model.name, run.train.precision, run.train.channels_last = name, precision, channels_last
    run.train.batch_size, run.train.grad_accum = batch, 1
    trainer = Trainer(run, n_pos=1, n_neg=1, per_epoch=warmup + steps, info=DistInfo(0, 1, 0, device))
    gen = torch.Generator().manual_seed(0)
    shape_zyx = run.cubes.shape_zyx
    x = torch.randint(0, 256, (batch, 1, *shape_zyx), generator=gen, dtype=torch.uint8)
    y = torch.tensor([1.0, 0.0] * (batch // 2) + [1.0] * (batch % 2))
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        trainer.train_step(x, y)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    row: dict[str, Any] = {
        "kind": "train",
        "model": name,
        "precision": precision,
        "channels_last_3d": channels_last,
        "batch": batch,
        "shape_zyx": "x".join(map(str, shape_zyx)),
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "nonfinite_grad_steps": trainer.skipped,  # over warm-up and timed steps
        "steps": steps,
    }
    peak = _peak(device)
    if peak is not None:
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        xf = torch.randn(batch, 1, *shape_zyx, device=device).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            flops = _step_flops(trainer.model, xf, y.to(device))
        row["tflops_per_s"] = flops / step_s / 1e12
        row["mfu"] = flops / step_s / peak
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return row


def loader_rate(cfg: Config, shape_zyx: Sequence[int] = (32, 64, 64), n: int = 512, batch: int = 32) -> dict[str, Any]:
    """One worker's cubes/s: read cubes from an HDF5 shard (one sample per chunk), augment, normalise."""
    import h5py

    from synhpc.shards import write_shard

    rng = np.random.default_rng(0)
    cubes = rng.integers(0, 256, (n, *shape_zyx), dtype=np.uint8)
    rows = {k: np.zeros(n, dtype=np.int64) for k in ("synapse_id", "pre_root_id", "post_root_id", "label", "split", "edge")}
    rows["center_vx"] = np.zeros((n, 3), dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "per worker": a DataLoader worker gets one core
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "shard.h5"
            write_shard(path, cubes, rows, {}, compression=cfg.cubes.compression)
            gen = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            with h5py.File(path, "r") as f:
                data = f["cube"]
                for b in range(0, n, batch):
                    block = torch.from_numpy(np.stack([data[i] for i in range(b, min(n, b + batch))]))[:, None]
                    normalize(apply(block, cfg.augment, gen))
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"kind": "loader", "shape_zyx": "x".join(map(str, shape_zyx)), "batch": batch, "compression": cfg.cubes.compression, "cubes_per_s_per_worker": n / seconds}


def bench_train(
    cfg: Config, out_dir: Path, *, models: Sequence[str] = ("small3d", "r3d_18", "mc3_18", "r2plus1d_18"), batch: int | None = None, steps: int = 5, warmup: int = 2
) -> pd.DataFrame:
    from synhpc.distributed import resolve_device

    device = resolve_device(cfg.train.device)
    torch.set_num_threads(cfg.train.threads)
    batch = batch or (cfg.train.batch_size if device.type == "cuda" else 2)
    rows = [time_steps(cfg, m, p, cl, batch, steps, warmup, device) for m in models for p, cl in VARIANTS]
    rows.append(loader_rate(cfg))
    frame = pd.DataFrame(rows)
    fp32 = frame[(frame["kind"] == "train") & (frame["precision"] == "fp32")].set_index("model")["samples_per_s"]
    frame["speedup_vs_fp32"] = [r.samples_per_s / fp32[r.model] if r.kind == "train" else np.nan for r in frame.itertuples()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(frame, out_dir / "bench_train.csv")
    info = machine_info() | {"device": str(device), "threads": cfg.train.threads}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda}
    write_text(out_dir / "bench_train.json", json.dumps({"machine": info, "rows": json.loads(frame.to_json(orient="records"))}, indent=1))
    return frame
