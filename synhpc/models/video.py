"""torchvision's video ResNets (r2plus1d_18, r3d_18, mc3_18) as 1-channel, 1-logit synapse classifiers.

The stems stride 2 in y/x and 1 in z, which suits our anisotropic cubes (8 nm in-plane, 40 nm sections): after the
stem the voxels are 16x16x40 nm. Widths are torchvision's (pretrained weights need them), so ``ModelConfig.width``
does not apply here.

Usage::

    net = video_resnet("r3d_18", norm="group", pretrained="weights/r3d_18_kinetics.pth")
    logits = net(cubes.float())            # cubes (B, 1, Z, Y, X) -> logits (B,)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from synhpc.errors import DataError
from synhpc.models.tv_compat import import_torchvision

VIDEO_ARCHS = ("r2plus1d_18", "r3d_18", "mc3_18")
Norm = Literal["batch", "group"]

# BatchNorm statistics that a GroupNorm model has no place for; never a reason to reject a checkpoint.
_BN_ONLY = ("running_mean", "running_var", "num_batches_tracked")


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` and leaves >= 2 channels per group.

    r2plus1d has odd widths (45, 230); two channels per group keep a 1-voxel map of a single cube normalisable
    (GroupNorm refuses groups holding one value) and stop GroupNorm from degenerating into InstanceNorm.
    """
    return max([1] + [g for g in range(1, min(max_groups, channels // 2) + 1) if channels % g == 0])


def to_group_norm(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` (in place) by a GroupNorm with the same affine parameters.

    GroupNorm does not depend on the batch, so it behaves the same at batch 2 on a CPU as at batch 64 on a GPU.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            gn = nn.GroupNorm(group_count(child.num_features, max_groups), child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            to_group_norm(child, max_groups)
    return module


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d | nn.Conv3d]:
    """The dotted name and module of the first convolution (the one that sees the image channels)."""
    for name, child in module.named_modules():
        if isinstance(child, (nn.Conv2d, nn.Conv3d)):
            return name, child
    raise ValueError("model has no convolution")


def replace_first_conv(module: nn.Module, in_channels: int) -> nn.Module:
    """Give ``module``'s first convolution ``in_channels`` inputs, keeping every other hyper-parameter."""
    name, old = first_conv(module)
    cls = type(old)
    new = cls(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
    )
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    setattr(parent, name.rpartition(".")[2], new)
    return module


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise DataError(f"model.pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not a usable state dict"
        raise DataError(f"model.pretrained: {path} is not a loadable state dict ({exc.__class__.__name__})") from None
    # Training checkpoints wrap the weights; accept the common wrappers.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"model.pretrained: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(module: nn.Module, path: str, head_prefixes: tuple[str, ...] = ("fc.",)) -> nn.Module:
    """Load a local state dict into ``module``: RGB first-conv kernels are summed into one channel where the model
    takes one, the classification head (``head_prefixes``) keeps its fresh weights, anything else must match.

    Raises a one-line :class:`DataError` naming ``path`` when the file is missing or does not fit the model.
    """
    state = _read_state_dict(path)
    conv_name, conv = first_conv(module)
    key = f"{conv_name}.weight"
    if key in state and state[key].shape[1] != conv.in_channels:
        w = state[key]
        if conv.in_channels == 1:
            # Summing the colour kernels gives a grey image the response the RGB filter gave to that grey in RGB.
            state[key] = w.sum(dim=1, keepdim=True)
        else:
            raise DataError(f"model.pretrained: {path}: {key} has {w.shape[1]} input channels, the model needs {conv.in_channels}")
    own = module.state_dict()
    is_head = lambda k: k.startswith(head_prefixes)  # noqa: E731
    usable = {k: v for k, v in state.items() if k in own and not is_head(k)}
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not is_head(k) and not k.endswith(_BN_ONLY)]
    if wrong or missing or not usable:
        detail = f"shape mismatch at {wrong[0]}" if wrong else f"missing {missing[0]}" if missing else "no matching keys"
        raise DataError(f"model.pretrained: {path} does not fit this model ({detail}; {len(wrong)} mismatched, {len(missing)} missing)")
    module.load_state_dict(usable, strict=False)
    return module


def _logit_head(in_features: int, dropout: float) -> nn.Sequential:
    # Flatten(0) turns (B, 1) into (B,) inside the model, so the torchvision module itself stays the model and its
    # state-dict keys stay those of torchvision checkpoints.
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1), nn.Flatten(0))


def video_resnet(arch: str, *, norm: Norm = "batch", dropout: float = 0.0, pretrained: str = "") -> nn.Module:
    """Build ``arch`` (one of :data:`VIDEO_ARCHS`) with a 1-channel stem, a 1-logit head and ``norm`` layers.

    ``pretrained``: a local torchvision-format state dict (e.g. Kinetics-400 weights); loaded before the norm swap
    so GroupNorm variants inherit the BatchNorm affine parameters.
    """
    if arch not in VIDEO_ARCHS:
        raise ValueError(f"unknown video architecture {arch!r} (known: {', '.join(VIDEO_ARCHS)})")
    tv = import_torchvision()
    net = getattr(tv.models.video, arch)(weights=None)
    replace_first_conv(net, 1)
    if pretrained:
        load_pretrained(net, pretrained)
    net.fc = _logit_head(net.fc.in_features, dropout)
    # A near-zero head starts every sample at p = 0.5, so early balanced-BCE steps are not dominated by noise.
    nn.init.normal_(net.fc[1].weight, std=0.01)
    nn.init.zeros_(net.fc[1].bias)
    if norm == "group":
        to_group_norm(net)
    elif norm != "batch":
        raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
    return net


def stages(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The top-level feature stages of a zoo model (for hooks and layout checks), in forward order."""
    for name in ("stem", "layer1", "layer2", "layer3", "layer4", "levels", "backbone"):
        child = getattr(model, name, None)
        if isinstance(child, nn.ModuleList):
            yield from ((f"{name}.{i}", c) for i, c in enumerate(child))
        elif child is not None:
            yield name, child

