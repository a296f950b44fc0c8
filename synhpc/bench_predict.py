"""Prediction throughput: synapses per second read from the imagery, scored by the model, and both together with
and without I/O threads reading ahead.

Usage::

    frame = bench_predict(cfg, cfg.run_dir / "bench")   # also bench_predict.csv and bench_predict.json there

The synapses are the configured synapse table's (every synapse, in the Z-curve order a prediction run uses); the
model is the configured architecture with random weights (scoring speed does not depend on the weights), run with
``evaluate.tta_views`` views and ``evaluate.batch_size`` cubes per batch, in bf16 on a GPU and fp32 on the CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from synhpc.atomic import write_csv, write_text
from synhpc.config import Config


def bench_predict(cfg: Config, out_dir: Path, *, n: int = 512, repeats: int = 2) -> pd.DataFrame:
    from synhpc.bench import machine_info
    from synhpc.cubes import open_reader
    from synhpc.distributed import resolve_device
    from synhpc.inference import predict_logits
    from synhpc.manifest import volume_info
    from synhpc.models import build_model
    from synhpc.predict import _blocks, place_synapses
    from synhpc.selection import select_synapses

    device = resolve_device(cfg.train.device)
    torch.set_num_threads(cfg.train.threads)
    frame, drops, _ = select_synapses(cfg.tables, cfg.predict)
    rows = place_synapses(cfg, frame, volume_info(cfg), drops).head(n)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.cubes.shape_zyx).to(device).eval()
    shape, batch, views = list(cfg.cubes.shape_zyx), cfg.evaluate.batch_size, cfg.evaluate.tta_views

    def score(cubes: np.ndarray) -> None:
        batches = (torch.from_numpy(cubes[i : i + batch])[:, None] for i in range(0, len(cubes), batch))
        predict_logits(model, batches, views=views)

    def read_only() -> None:
        reader = open_reader(cfg)
        for _ in _blocks(reader, rows, shape, cfg.predict.block_size, 0):
            pass

    cubes = open_reader(cfg).cubes(rows[["cx", "cy", "cz"]].to_numpy(np.int64), shape)[0]

    def score_only() -> None:
        for start in range(0, len(cubes), cfg.predict.block_size):
            score(cubes[start : start + cfg.predict.block_size])

    def streaming(read_ahead: int):
        def run() -> None:
            reader = open_reader(cfg)
            for _, block, _ in _blocks(reader, rows, shape, cfg.predict.block_size, read_ahead):
                score(block)

        return run

    cases = {"imagery read": read_only, "model score": score_only, "stream, no read-ahead": streaming(0),
             f"stream, read-ahead {max(1, cfg.predict.read_ahead)}": streaming(max(1, cfg.predict.read_ahead))}  # fmt: skip
    score_only()  # warm-up: kernels chosen, caches filled
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():  # in turns, so outside load hits every case alike
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            results[name].append(time.perf_counter() - start)
    table = [
        {"case": name, "synapses": len(rows), "seconds": float(np.median(t)), "synapses_per_s": len(rows) / float(np.median(t)),
         "model": cfg.model.name, "tta_views": views, "batch": batch, "block": cfg.predict.block_size, "device": str(device),
         "precision": "bf16" if device.type == "cuda" else "fp32", "imagery": cfg.imagery.url}
        for name, t in results.items()
    ]  # fmt: skip
    result = pd.DataFrame(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(result, out_dir / "bench_predict.csv")
    info: dict[str, Any] = machine_info() | {"device": str(device), "threads": cfg.train.threads}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda}
    write_text(out_dir / "bench_predict.json", json.dumps({"machine": info, "rows": json.loads(result.to_json(orient="records"))}, indent=1))
    return result

