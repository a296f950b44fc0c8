"""Prediction throughput: synapses per second read from the imagery, scored by the model, and both together with
and without I/O threads reading ahead.

Usage::

    frame = bench_predict(cfg, cfg.run_dir / "bench")   # also bench_predict.csv and bench_predict.json there

The synapses are the configured synapse table's (every synapse, in the Z-curve order a prediction run uses); the
model is the configured architecture with random weights (scoring speed does not depend on the weights), run with
``evaluate.tta_views`` views and ``evaluate.batch_size`` cubes per batch, in bf16 on a GPU and fp32 on the CPU. A
local (``file://``) volume is also served over loopback HTTP with ``http_latency_ms`` per request, with and without
read-ahead, to show what the I/O threads hide.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from synhpc.atomic import write_csv, write_text
from synhpc.config import Config


def _timed_in_turns(cases: dict[str, Any], repeats: int, device: torch.device, warmup: Any = None) -> dict[str, list[float]]:
    """Seconds of every case, run in turns so outside load hits every case alike."""
    if warmup is not None:
        warmup()  # kernels chosen, caches filled
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            results[name].append(time.perf_counter() - start)
    return results


def _row(cfg: Config, name: str, n: int, seconds: list[float], views: int, device: torch.device, url: str) -> dict[str, Any]:
    median = float(np.median(seconds))
    return {"case": name, "synapses": n, "seconds": median, "synapses_per_s": n / median, "model": cfg.model.name, "tta_views": views,
            "batch": cfg.evaluate.batch_size, "block": cfg.predict.block_size, "device": str(device),
            "precision": "bf16" if device.type == "cuda" else "fp32", "imagery": url}  # fmt: skip


def bench_predict(cfg: Config, out_dir: Path, *, n: int = 512, repeats: int = 2, http_latency_ms: float = 20.0) -> pd.DataFrame:
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

    ahead = max(1, cfg.predict.read_ahead)
    cases = {"imagery read": read_only, "model score": score_only, "stream, no read-ahead": streaming(0), f"stream, read-ahead {ahead}": streaming(ahead)}
    results = _timed_in_turns(cases, repeats, device, warmup=score_only)
    table = [_row(cfg, name, len(rows), t, views, device, cfg.imagery.url) for name, t in results.items()]
    if cfg.imagery.url.startswith("file://") and http_latency_ms > 0:
        # The same volume behind a loopback HTTP server with per-request latency, as a remote bucket: what the I/O
        # threads are for. Scored without TTA too, where reading is a larger share of the work.
        from synhpc.imagery import resolve_url
        from synhpc.replicas import LoopbackServer

        folder = Path(resolve_url(cfg.imagery.url)[len("file://") :])
        with LoopbackServer(folder.parent, latency_ms=http_latency_ms) as server:
            remote = copy.deepcopy(cfg)
            remote.imagery.url = f"{server.url}/{folder.name}"
            url = remote.imagery.url
            for tta in (views, 1):
                def stream_remote(read_ahead: int, tta: int = tta):
                    def run() -> None:
                        reader = open_reader(remote)
                        for _, block, _ in _blocks(reader, rows, shape, cfg.predict.block_size, read_ahead):
                            batches = (torch.from_numpy(block[i : i + batch])[:, None] for i in range(0, len(block), batch))
                            predict_logits(model, batches, views=tta)

                    return run

                label = f"http {http_latency_ms:g} ms, {tta} views"
                remote_cases = {f"{label}, no read-ahead": stream_remote(0), f"{label}, read-ahead {ahead}": stream_remote(ahead)}
                timed = _timed_in_turns(remote_cases, repeats, device)
                table += [_row(cfg, name, len(rows), t, tta, device, url) for name, t in timed.items()]
    result = pd.DataFrame(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(result, out_dir / "bench_predict.csv")
    info: dict[str, Any] = machine_info() | {"device": str(device), "threads": cfg.train.threads}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda}
    write_text(out_dir / "bench_predict.json", json.dumps({"machine": info, "rows": json.loads(result.to_json(orient="records"))}, indent=1))
    return result

