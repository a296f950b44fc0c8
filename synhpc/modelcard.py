"""The model card: ``model.json`` beside ``best.pt``, with everything inference needs and a reader needs to trust the
weights, so evaluation and prediction load a model from the card and the weights alone (no training config).

Training writes the card whenever ``best.pt`` changes; evaluation adds the decision threshold, the calibration
temperature and the validation metrics. Inference refuses a card whose cube shape, mip or voxel size differ from the
run it is asked to score.

Usage::

    write_card(run, card_from_training(cfg, ...))
    model, card = load_model("logs/demo")                 # a run folder, a model.json, or its best.pt
    check_compatible(card, cfg)                           # one-line error when cube/imagery settings differ
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from synhpc import __version__
from synhpc.atomic import write_text
from synhpc.config import Config, ModelConfig
from synhpc.errors import ConfigError, DataError
from synhpc.rundir import RunDir, read_json

FORMAT = "synhpc-model-card"
FORMAT_VERSION = 1
LABELS = {"1": "excitatory", "0": "inhibitory"}


def card_from_training(cfg: Config, *, epoch: int, step: int, training_digest: str, weights_sha256: str,
                       provenance: dict[str, Any], counts: dict[str, Any], validation: dict[str, float], ema: bool,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of a model trained under ``cfg``: architecture, input contract, data provenance, validation.

    ``extra``: sections only some models have, e.g. ``pretraining`` (the backbone ``model.init`` loaded: path,
    sha256, pretraining digest, whether it was frozen) and ``label_budget`` (fraction, seed, neurons and
    synapses kept per class)."""
    from synhpc.inference import INTENSITY_OFFSET, INTENSITY_SCALE
    from synhpc.tables import vocabularies

    model = cfg.to_dict()["model"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "synhpc_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights": {"file": RunDir(cfg.run_dir).best.name, "sha256": weights_sha256, "ema": ema, "epoch": epoch, "step": step},
        "model": model,
        "input": {
            "cube_shape_zyx": list(cfg.cubes.shape_zyx),
            "dtype": "uint8",
            "layout": "N, 1, Z, Y, X",
            "normalization": {"kind": "affine", "formula": "(v - offset) / scale", "offset": INTENSITY_OFFSET, "scale": INTENSITY_SCALE},
        },
        "imagery": {"url": cfg.imagery.url, "mip": cfg.imagery.mip, "resolution_nm": provenance.get("volume", {}).get("resolution_nm")},
        "labels": {"positive": "excitatory", "values": LABELS, "of": "the presynaptic cell"},
        "data": {
            "run": cfg.run.name,
            "tables": {
                "source": cfg.tables.source,
                "synapse_table": cfg.tables.synapse_table,
                "cell_type_table": cfg.tables.cell_type_table,
                "vocabulary": vocabularies().get(cfg.tables.cell_type_table),
                "position": cfg.tables.position,
                "position_resolution_nm": list(cfg.tables.position_resolution_nm),
                "materialization_version": cfg.tables.materialization_version,
            },
            "extraction_digest": provenance.get("extraction_digest"),
            "split": cfg.to_dict()["split"],
            "counts": counts,
        },
        "training": {"training_digest": training_digest, "precision": cfg.train.precision, "epochs": cfg.train.epochs,
                     "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "init": getattr(cfg.model, "init", "") or ""},
        "decision": {"tau": None, "threshold_metric": cfg.evaluate.threshold_metric, "temperature": None, "tta_views": cfg.evaluate.tta_views},
        "validation": validation,
        **(extra or {}),
    }


def write_card(run: RunDir, card: dict[str, Any]) -> None:
    write_text(run.model_card, json.dumps(card, indent=1, default=float))


def card_path(where: str | Path) -> Path:
    """``where`` as a model card path: a run folder, a ``model.json``, or the ``best.pt`` beside one."""
    where = Path(where)
    if where.is_dir():
        return RunDir(where).model_card
    if where.suffix == ".pt":
        return where.with_name("model.json")
    return where


def read_card(where: str | Path) -> tuple[dict[str, Any], Path]:
    """(card, weights path) for a run folder, card or weights file; one-line errors for what is missing or foreign."""
    path = card_path(where)
    if not path.is_file():
        raise DataError(f"{path}: no model card; train a model first (`synhpc train`) or pass --model a run folder holding model.json")
    card = read_json(path, "model card")
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise DataError(f"{path}: not a synhpc model card")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path}: model card format {card['format_version']} is newer than this synhpc understands ({FORMAT_VERSION})")
    weights = path.with_name(card["weights"]["file"])
    if not weights.is_file():
        raise DataError(f"{weights}: the weights named by {path.name} are missing")
    return card, weights


def model_config(card: dict[str, Any]) -> ModelConfig:
    """The architecture from a card; ``pretrained``/``init`` are cleared because the weights already hold them."""
    from synhpc.config import from_dict

    data = {k: v for k, v in card["model"].items() if k not in ("pretrained", "init")}
    return from_dict(ModelConfig, data, "model.", "model card")


def load_model(where: str | Path, device: Any = None) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode on ``device``, card) from a model card and its weights alone."""
    import torch

    from synhpc.models import build_model
    from synhpc.shards import file_sha256

    card, weights = read_card(where)
    if file_sha256(weights) != card["weights"]["sha256"]:
        raise DataError(f"{weights}: does not match the sha256 in its model card (replaced or damaged)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise DataError(f"{weights}: not a readable synhpc model ({exc.__class__.__name__})") from None
    model = build_model(model_config(card), card["input"]["cube_shape_zyx"])
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise DataError(f"{weights}: weights do not fit the architecture in its model card ({str(exc).splitlines()[0][:120]})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), card


def check_compatible(card: dict[str, Any], cfg: Config, resolution_nm: list[float] | None = None, source: str = "model card") -> None:
    """One-line ConfigError when the cubes ``cfg`` would cut differ from what the model was trained on."""
    want = card["input"]["cube_shape_zyx"]
    if list(cfg.cubes.shape_zyx) != list(want):
        raise ConfigError(f"{source}: the model takes cubes.shape_zyx {want}, this config cuts {list(cfg.cubes.shape_zyx)}")
    if int(cfg.imagery.mip) != int(card["imagery"]["mip"]):
        raise ConfigError(f"{source}: the model was trained at imagery.mip {card['imagery']['mip']}, this config reads mip {cfg.imagery.mip}")
    trained = card["imagery"].get("resolution_nm")
    if resolution_nm is not None and trained is not None and [float(v) for v in trained] != [float(v) for v in resolution_nm]:
        raise ConfigError(f"{source}: the model was trained on {trained} nm voxels, this imagery has {list(resolution_nm)} nm at mip {cfg.imagery.mip}")
