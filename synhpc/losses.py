"""Losses for the binary excitatory (1) / inhibitory (0) task; all accept soft targets (MixUp, CutMix, smoothing).

Usage::

    loss_fn = balanced_bce(n_neg / n_pos)
    loss = loss_fn(logits, soft_targets(targets, 0.1))
    loss = focal_loss(logits, targets, gamma=2.0, alpha=0.25)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def balanced_bce(pos_weight: float | torch.Tensor) -> LossFn:
    """Binary cross-entropy with the positive term weighted by ``pos_weight`` (use n_neg / n_pos).

    With that weight both classes contribute equally in expectation, whatever their synapse counts.
    """
    weight = torch.as_tensor(pos_weight, dtype=torch.float32)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight.to(logits.device))

    return loss


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): alpha_t (1 - p_t)^gamma BCE, with p_t and alpha_t interpolated for soft targets.

    ``alpha`` weighs the positive class, 1 - ``alpha`` the negative; gamma = 0 and alpha = 0.5 give 0.5 x BCE.
    """
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    # gamma == 0 would make 0**0 appear where p_t == 1; torch's pow gives 1 there, which is what BCE needs.
    loss = alpha_t * (1 - p_t).pow(gamma) * bce
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def soft_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing for two classes: 1 -> 1 - s/2 and 0 -> s/2 (soft targets are shrunk toward 0.5 likewise)."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must lie in [0, 1], got {smoothing}")
    return targets.float() * (1 - smoothing) + 0.5 * smoothing
