"""Losses (focal, balanced BCE, smoothing) and the weight EMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synhpc.ema import EMA
from synhpc.losses import balanced_bce, focal_loss, soft_targets


def test_focal_is_half_bce_at_gamma0_alpha_half():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=gen) * 3
    for targets in (torch.randint(0, 2, (64,), generator=gen).float(), torch.rand(64, generator=gen)):
        ref = F.binary_cross_entropy_with_logits(logits, targets)
        assert torch.allclose(focal_loss(logits, targets, gamma=0.0, alpha=0.5), 0.5 * ref, atol=1e-6)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([4.0, 0.1])  # both positive; the first is easy
    targets = torch.ones(2)
    per = focal_loss(logits, targets, gamma=2.0, alpha=0.5, reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert (per / bce)[0] < (per / bce)[1]


def test_balanced_bce_and_soft_targets():
    logits, targets = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    ref = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(3.0))
    assert torch.allclose(balanced_bce(3.0)(logits, targets), ref)
    assert torch.allclose(soft_targets(torch.tensor([0.0, 1.0]), 0.2), torch.tensor([0.1, 0.9]))
    with pytest.raises(ValueError):
        soft_targets(targets, 1.5)


def test_ema_warmup_values():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # t = 0: 0.1 * 0 + 0.9 * 1
    assert ema.params["weight"].item() == pytest.approx(0.9)
    ema.update(model)  # t = 1: (2/11) * 0.9 + (9/11) * 1
    assert ema.params["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11)
    assert ema.decay_at(10**6) == 0.999


def test_ema_of_constant_model_is_the_model_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # moves the running stats away from their initial values
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        ema.update(model)
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema.copy_to(other)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.allclose(a.float(), b.float()), n
    restored = EMA(other, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5 and restored.decay == 0.9
