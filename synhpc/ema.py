"""Exponential moving average of model weights, for evaluation with smoother weights than the last step's.

The decay warms up as ``min(decay, (1 + t) / (10 + t))`` (t = updates so far), so early averages are not dominated
by the random initial weights. Buffers (BatchNorm running statistics, counters) are copied, not averaged: they are
already running averages, of the weights that produced them.

Usage::

    ema = EMA(model, decay=0.999)
    ...; optimizer.step(); ema.update(model)
    ema.copy_to(eval_model)              # or keep ema.state_dict() in the checkpoint
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """Shadow copies of ``model``'s parameters and buffers (on the model's device, detached)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def decay_at(self, t: int) -> float:
        """The decay used by update number ``t`` (counting from 0)."""
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d shadow + (1 - d) weights for floating parameters; everything else copied."""
        d = self.decay_at(self.num_updates)
        for name, p in model.named_parameters():
            shadow = self.params[name]
            if shadow.is_floating_point():
                shadow.lerp_(p.detach().to(shadow.dtype), 1.0 - d)
            else:
                shadow.copy_(p.detach())
        for name, b in model.named_buffers():
            self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name])
        for name, b in model.named_buffers():
            b.copy_(self.buffers[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "params": dict(self.params), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = (set(self.params) - set(state["params"])) | (set(self.buffers) - set(state["buffers"]))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} entries, e.g. {sorted(missing)[0]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for name, shadow in self.params.items():
                shadow.copy_(state["params"][name])
            for name, shadow in self.buffers.items():
                shadow.copy_(state["buffers"][name])
