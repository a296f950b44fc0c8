"""Inference: intensity normalisation, test-time augmentation and batched logits, shared by validation during
training, evaluation and prediction, so every stage scores a cube the same way.

Usage::

    x = normalize(cubes_uint8)                                  # what the model sees, in training too
    logits = predict_logits(model, batches, views=8)            # any iterable of (B, 1, Z, Y, X) uint8 tensors
    logits = predict_rows(model, data, indices, batch_size=64)  # rows of a run's verified shards

On a GPU inference runs under bf16 autocast; on the CPU it stays fp32 so results do not depend on oneDNN's bf16
kernels (and are reproducible bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from synhpc.tta import predict_tta

# uint8 EM intensity -> (v - OFFSET) / SCALE: roughly zero-mean, unit-range floats. Recorded in every model card.
INTENSITY_OFFSET = 128.0
INTENSITY_SCALE = 64.0


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 EM intensities to roughly zero-mean unit-range floats."""
    return (batch.float() - INTENSITY_OFFSET) / INTENSITY_SCALE


def private_generator() -> torch.Generator:
    """DataLoader iterators draw a seed from the global torch RNG unless given a generator; that draw would shift
    the dropout stream of a resumed training run (its loaders are created after the checkpoint, not before)."""
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches: Iterable[torch.Tensor], views: int = 1) -> np.ndarray:
    """Logits (float32, in order) for uint8 cube batches, in eval mode, averaged over ``views`` dihedral views (or,
    given a backbone, its (N, D) features)."""
    model.eval()
    device = next(model.parameters()).device
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = []
    with cast:
        for cubes in batches:
            out.append(predict_tta(model, normalize(cubes.to(device, non_blocking=True)), views=views).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def predict_rows(model: torch.nn.Module, data, indices: np.ndarray, batch_size: int, num_workers: int = 0, views: int = 1) -> np.ndarray:
    """Logits for rows ``indices`` of a :class:`synhpc.datasets.ShardSet`, in order."""
    from synhpc.datasets import CubeDataset

    loader = DataLoader(CubeDataset(data, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=private_generator())
    return predict_logits(model, (cubes for cubes, _, _ in loader), views=views)
