"""Every zoo model as a feature extractor (cube -> (B, D)) and a classifier head ((B, D) -> (B,) logits): what
contrastive pretraining trains, what ``model.init`` loads, what ``model.freeze`` freezes and what
``predict.embeddings`` writes.

The split copies nothing: both halves hold the model's own modules, so training a half trains the model, and each
backbone tensor keeps the model's own state-dict key. A backbone file is therefore a slice of a model's state dict and
loads into a freshly built model of the same name and width with ``load_state_dict(strict=False)``; the keys it must
leave out are exactly the head's.

The head is the model's last ``nn.Linear`` with the dropout before it and whatever reshapes after it; pooling and
flattening before it belong to the backbone. So ``head(backbone(x))`` runs the very operations of ``model(x)``
(tests/test_pretrain.py checks it for every zoo model).

Usage::

    split = split_model(model)                 # Split(backbone, head, dim, head_keys)
    features = split.backbone(x)               # (B, D)
    logits = split.head(features)              # == model(x)
    record = load_backbone(model, "logs/demo/pretrain", expect="small3d", freeze=True)   # model.init / model.freeze
    emb = embed_batches(model, batches, views=8)   # (N, D) float32, averaged over the TTA views
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synhpc.errors import ConfigError, DataError

BACKBONE_FORMAT = "synhpc-backbone"
BACKBONE_FORMAT_VERSION = 1
BACKBONE_FILE = "backbone.pt"


@dataclass(frozen=True)
class Split:
    """``backbone`` maps (B, 1, Z, Y, X) to (B, ``dim``); ``head`` maps that to (B,) logits; ``head_keys`` are the
    model's state-dict keys that belong to the head (everything else is the backbone's)."""

    backbone: nn.Module
    head: nn.Module
    dim: int
    head_keys: frozenset[str]

    def backbone_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The backbone's tensors under the model's own keys, detached on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in self.head_keys}


class _Head(nn.Module):
    """Dropout, the last Linear, and what followed it in the model; always returns (B,)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return y.reshape(y.shape[0])


class _Tail(nn.Module):
    """What the model does between its last feature map and the head (pooling, flattening), then flatten to (B, D)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(x), 1)


class _FeaturesBackbone(nn.Module):
    """``features`` then the tail: the ``head(features(x))`` models (small3d, cnn2d)."""

    def __init__(self, features: nn.Module, tail: _Tail):
        super().__init__()
        self.features, self.tail = features, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.features(x))


class _VideoResNetBackbone(nn.Module):
    """torchvision's VideoResNet forward up to (and including) the average pool."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = model.stem, model.layer1, model.layer2, model.layer3, model.layer4
        self.avgpool = model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return torch.flatten(self.avgpool(x), 1)


class _ResNet2DBackbone(nn.Module):
    """torchvision's 2D ResNet forward up to (and including) the average pool."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4
        self.avgpool = model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class _UNetBackbone(nn.Module):
    """The U-Net encoder's levels and poolings, then the tail."""

    def __init__(self, model: nn.Module, tail: _Tail):
        super().__init__()
        self.levels, self.pools, self.tail = model.levels, model.pools, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from synhpc.models.unet3d import encode

        return self.tail(encode(self.levels, self.pools, x))


class _PlanarBackbone(nn.Module):
    """The centre section(s) of a cube through a 2D backbone."""

    def __init__(self, inner: nn.Module, mode: str):
        super().__init__()
        self.inner, self.mode = inner, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from synhpc.models.planar import sections

        return self.inner(sections(x, self.mode).contiguous())


def _split_sequential_head(head: nn.Sequential, where: str) -> tuple[_Tail, _Head, int]:
    """(backbone tail, classifier, feature dim) of a Sequential head, split at its last Linear."""
    linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{where}: the model's head has no Linear layer to split at")
    j = linears[-1]
    before = list(head)[:j]
    # Dropout is the head's (a linear probe keeps it); pooling, flattening or hidden layers are the backbone's.
    tail = [m for m in before if not isinstance(m, nn.Dropout)]
    drop = [m for m in before if isinstance(m, nn.Dropout)]
    return _Tail(tail), _Head([*drop, head[j], *list(head)[j + 1 :]]), int(head[j].in_features)


def _parts(model: nn.Module) -> tuple[nn.Module, _Head, int]:
    from synhpc.models.planar import PlanarClassifier

    name = type(model).__name__
    if isinstance(model, PlanarClassifier):
        inner, head, dim = _parts(model.backbone)
        return _PlanarBackbone(inner, model.mode), head, dim
    if all(hasattr(model, n) for n in ("stem", "layer4", "avgpool")) and isinstance(getattr(model, "fc", None), nn.Sequential):
        _, head, dim = _split_sequential_head(model.fc, name)
        return _VideoResNetBackbone(model), head, dim
    if all(hasattr(model, n) for n in ("conv1", "bn1", "layer4", "avgpool")) and isinstance(getattr(model, "fc", None), nn.Sequential):
        _, head, dim = _split_sequential_head(model.fc, name)
        return _ResNet2DBackbone(model), head, dim
    if isinstance(getattr(model, "levels", None), nn.ModuleList) and isinstance(getattr(model, "head", None), nn.Sequential):
        tail, head, dim = _split_sequential_head(model.head, name)
        return _UNetBackbone(model, tail), head, dim
    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None), nn.Sequential):
        tail, head, dim = _split_sequential_head(model.head, name)
        return _FeaturesBackbone(model.features, tail), head, dim
    raise ConfigError(f"model {name} has no backbone/head split (known: head(features(x)) models, video and 2D ResNets, the U-Net encoder, planar wrappers)")


def split_model(model: nn.Module) -> Split:
    """The model's feature extractor and classifier head, sharing the model's modules (see the module doc)."""
    backbone, head, dim = _parts(model)
    head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]}
    keys = frozenset(k for k, t in model.state_dict(keep_vars=True).items() if id(t) in head_tensors)
    return Split(backbone, head, dim, keys)


# ------------------------------------------------------------------------------------------------ freezing


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    # Runs before every forward: whatever train() set, frozen layers normalise with their running statistics and
    # never update them, so a linear probe leaves every backbone tensor as it was loaded.
    module.training = False


def freeze_backbone(model: nn.Module, split: Split | None = None) -> Split:
    """No gradients for the backbone and its BatchNorm statistics held: only the head trains (a linear probe)."""
    split = split or split_model(model)
    for p in split.backbone.parameters():
        p.requires_grad_(False)
    for m in split.backbone.modules():
        m.register_forward_pre_hook(_stay_in_eval)
    return split


# ------------------------------------------------------------------------------------------------ files


def resolve_backbone(source: str | Path) -> Path:
    """``model.init`` as a file: a pretraining run folder (its ``backbone.pt``), a run folder that holds one under
    ``pretrain/``, a ``backbone.pt``, or a pretraining checkpoint (``checkpoints/ckpt-*.pt``)."""
    from synhpc.rundir import RunDir

    path = Path(source)
    if path.is_dir():
        for candidate in (RunDir(path).backbone, RunDir(path).pretrain.backbone):
            if candidate.is_file():
                return candidate
        raise DataError(f"model.init: {path} holds no {BACKBONE_FILE} (has `synhpc pretrain` finished there?)")
    if not path.is_file():
        raise DataError(f"model.init: {path} not found (a pretraining run folder, its {BACKBONE_FILE} or a pretraining checkpoint)")
    return path


def read_backbone(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(backbone tensors keyed like the model, what the file says about them, the file) for ``model.init``."""
    path = resolve_backbone(source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not a backbone file"
        raise DataError(f"model.init: {path} is not a readable backbone ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and state.get("format") == BACKBONE_FORMAT:
        weights = state["weights"]
    elif isinstance(state, dict) and {"model", "head_keys", "model_config"} <= set(state):
        # A pretraining checkpoint: the whole model (its unused head included) minus the head's keys.
        head = set(state["head_keys"])
        weights = {k: v for k, v in state["model"].items() if k not in head}
    else:
        raise DataError(f"model.init: {path} is neither a {BACKBONE_FILE} nor a pretraining checkpoint")
    meta = {k: state.get(k) for k in ("model_config", "cube_shape_zyx", "pretrain_digest", "step", "feature_dim")}
    return weights, meta, path


def load_backbone(model: nn.Module, source: str | Path, *, expect: str, freeze: bool = False) -> dict[str, Any]:
    """Load a pretrained backbone into ``model`` (a fresh ``expect`` model): every backbone tensor replaced, the head
    left as built; with ``freeze`` the backbone stops learning. Returns what the model card records of it.

    A backbone of another architecture or width, or a file that is not one, is a one-line DataError naming it.
    """
    from synhpc.shards import file_sha256

    weights, meta, path = read_backbone(source)
    pretrained = (meta.get("model_config") or {}).get("name")
    if pretrained != expect:
        raise DataError(f"model.init: {path} holds a {pretrained} backbone, but model.name is {expect}")
    split = split_model(model)
    own = model.state_dict()
    wanted = [k for k in own if k not in split.head_keys]
    missing = [k for k in wanted if k not in weights]
    foreign = [k for k in weights if k not in own or k in split.head_keys]
    wrong = [k for k in weights if k in own and k not in split.head_keys and weights[k].shape != own[k].shape]
    if missing or foreign or wrong:
        if wrong:
            detail = f"shape of {wrong[0]} {list(weights[wrong[0]].shape)} vs {list(own[wrong[0]].shape)}"
        else:
            detail = f"missing {missing[0]}" if missing else f"unexpected {foreign[0]}"
        raise DataError(f"model.init: {path} does not fit this {expect} model ({detail}; check model.width)")
    model.load_state_dict(weights, strict=False)
    if freeze:
        freeze_backbone(model, split)
    return {
        "source": str(source),
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "freeze": bool(freeze),
        "pretrain_digest": meta.get("pretrain_digest"),
        "pretrain_step": meta.get("step"),
        "pretrain_cube_shape_zyx": meta.get("cube_shape_zyx"),
    }


# ------------------------------------------------------------------------------------------------ embeddings


def embed_batches(model: nn.Module, batches: Iterable[torch.Tensor], views: int = 1) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 cube batches, in eval mode, averaged over ``views`` dihedral views
    (the views test-time augmentation averages logits over), so an embedding does not depend on the section's
    orientation."""
    from synhpc.inference import predict_logits

    model.eval()
    # The same view-averaged forward pass that scores synapses, stopped at the backbone.
    return predict_logits(split_model(model).backbone, batches, views=views)
