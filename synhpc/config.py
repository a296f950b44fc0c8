"""Typed, validated configuration loaded from YAML with ``dotted.key=value`` overrides.

Usage::

    cfg = load_config("configs/demo.yaml", ["train.epochs=2", "run.name=try1"])
    cfg.run_dir  # Path("logs/try1")

Every section is a dataclass; unknown keys and wrong types raise a one-line :class:`ConfigError` that names the
file and the key (and the closest valid key for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from synhpc.atomic import write_text
from synhpc.errors import ConfigError


@dataclass
class RunConfig:
    """Where a run's folder is: ``<run.root>/<run.name>/``."""

    name: str = "demo"  # the run's folder name: a plain name, inside run.root
    root: str = "logs"  # folder of all runs; gather writes <run.root>/summary.csv (on Hyak: /gscratch/<lab>/...)
    seed: int = 0  # seed of the bootstrap confidence intervals and the neuron curve's draws


@dataclass
class WorldConfig:
    """The synthetic MICrONS-like world: a precomputed EM volume (8x8x40 nm mip 0) and CAVE-schema tables, plus
    ``truth.csv`` (every presynaptic neuron's true class) and a spine/shaft/soma target table.

    Variants are plain overrides of these keys. "Steep clefts, low jitter" (the cleft readable within one section):
    ``world.cleft_tilt_deg=15 world.annotation_jitter_nm=[10,10,0]``; fainter cues: ``world.cue_strength=0.7``;
    uneven sections: ``world.section_contrast_jitter=0.15``; noisy cell-type table: ``world.label_noise=0.1``.
    """

    path: str = "logs/world"  # folder of the world (rebuilt only when these settings change)
    seed: int = 0  # everything in the world is a function of this seed
    shape_vx: list[int] = field(default_factory=lambda: [768, 768, 96])  # x, y, z voxels at mip 0 (8x8x40 nm)
    chunk_vx: list[int] = field(default_factory=lambda: [64, 64, 16])  # precomputed chunk size
    n_neurons: int = 120  # presynaptic neurons
    n_synapses: int = 2000  # synapses (a few neurons own most: heavy-tailed)
    excitatory_fraction: float = 0.55  # share of excitatory neurons
    unlabeled_fraction: float = 0.05  # presynaptic neurons left out of the cell-type table (orphans)
    orphan_min_synapses: int = 3  # each orphan gets at least this many synapses (labelled neurons at least 3)
    label_noise: float = 0.0  # fraction of labelled neurons whose cell-type row names the other class
    difficulty: float = 0.3  # in [0, 1]: pulls the classes' ultrastructure toward each other and raises noise
    # Class cues: each neuron shows its class with a strength drawn around cue_strength (coefficient of variation
    # neuron_cue_spread; some neurons look ambiguous) and each synapse scatters around its neuron's strength
    # (sd synapse_cue_jitter, in units of the E/I gap), so neurons of one class overlap.
    cue_strength: float = 1.0
    neuron_cue_spread: float = 0.5
    synapse_cue_jitter: float = 0.4
    missing_section_rate: float = 0.01  # sections lost (black or grey), as in serial-section EM
    misaligned_section_rate: float = 0.02  # sections shifted a few voxels
    # How far a table's synapse points sit from the true cleft centre (uniform, +-x, y, z nm): annotations are not
    # exact, and in z a few 40 nm sections off is common, so one section through the table point can miss the cleft.
    annotation_jitter_nm: list[float] = field(default_factory=lambda: [40.0, 40.0, 160.0])
    # Largest angle between a cleft's normal and the section plane: 90 = isotropic clefts; small = steep clefts
    # (standing across the sections), so any section through one shows its whole profile: both membranes, the
    # cleft and the densities side by side.
    cleft_tilt_deg: float = 90.0
    section_contrast: float = 1.0  # scales every structure's contrast against the cytoplasm
    section_contrast_jitter: float = 0.0  # sd of a per-section log factor on that contrast
    # Postsynaptic target compartment shares (spine, shaft, soma) by presynaptic class.
    targets_excitatory: list[float] = field(default_factory=lambda: [0.80, 0.18, 0.02])
    targets_inhibitory: list[float] = field(default_factory=lambda: [0.25, 0.55, 0.20])
    layout: Literal["dense", "sparse"] = "dense"  # synapses clustered (dense) or spread evenly (sparse)


@dataclass
class TablesConfig:
    """Where synapse and cell-type tables come from, and in what units their positions are."""

    source: Literal["files", "cave"] = "files"  # static dumps / files, or CAVE through caveclient (token needed)
    synapses: str = "logs/world/synapses_pni_2.csv.gz"  # synapse table: csv(.gz) with or without header, parquet, feather, URL
    cell_types: str = "logs/world/aibs_metamodel_celltypes_v661.csv.gz"  # cell-type table (same formats)
    cell_type_table: str = "aibs_metamodel_celltypes_v661"  # which vocabulary reads it (synhpc/data/vocabularies.yaml)
    synapse_table: str = "synapses_pni_2"  # CAVE table name (cave source)
    position: Literal["pre_pt_position", "ctr_pt_position", "post_pt_position"] = "ctr_pt_position"  # cube centre
    position_resolution_nm: list[float] = field(default_factory=lambda: [4.0, 4.0, 40.0])  # units of the positions
    materialization_version: int = 0  # pinned CAVE/dump version, recorded in every shard (0: none)
    datastack: str = ""  # CAVE datastack (e.g. minnie65_public)
    server_address: str = ""  # CAVE server ("" = caveclient's default)
    min_size: int = 0  # drop synapses smaller than this (table units)
    drop_autapses: bool = True  # drop synapses whose pre- and postsynaptic roots are the same
    pre_root_ids: list[int] = field(default_factory=list)  # keep only these presynaptic roots (empty: all labelled)
    # Header sidecars of headerless dumps (one `column_name,data_type` row per column). "" = `<name>_header.csv`
    # beside the data file, used when it exists (the public minnie65 dumps ship one per table).
    synapses_header: str = ""
    cell_types_header: str = ""
    # Postsynaptic target compartment per synapse (a synapse_target_predictions_ssa-like table); "" = none.
    targets: str = ""
    targets_header: str = ""
    # Remote tables are downloaded here once (resumable); labelled synapse subsets are cached here as parquet.
    cache_dir: str = "logs/cache/tables"
    # Synapse tables smaller than this are scanned on every load instead of cached (cheaper than the cache file).
    subset_cache_min_mb: float = 64.0


@dataclass
class ImageryConfig:
    """The EM volume cubes are cut from (Neuroglancer precomputed, read with cloud-volume's decoders)."""

    url: str = "file://logs/world/em"  # file://, http(s)://, gs://, s3:// or precomputed://...; sharded or not, raw or JPEG
    mip: int = 0  # resolution level (minnie65: mip 0 = 8x8x40 nm)
    fill_missing: bool = True  # missing chunks read as zeros and are counted; false: a missing chunk is an error
    threads: int = 4  # parallel chunk reads per task
    retries: int = 4  # retries of a transient read failure (5xx, reset, timeout), with exponential backoff


@dataclass
class CubesConfig:
    """The cubes cut around each synapse and the HDF5 shards that hold them."""

    shape_zyx: list[int] = field(default_factory=lambda: [16, 48, 48])  # z, y, x voxels at imagery.mip
    shard_size: int = 256  # cubes per shard (one extraction task writes one shard)
    compression: Literal["none", "zstd", "lz4", "blosc", "lzf", "gzip"] = "none"  # HDF5 filter of the cube dataset


@dataclass
class SplitConfig:
    """Neuron-disjoint train/val/test: every presynaptic neuron's synapses go to one split."""

    # Per class (excitatory and inhibitory separately), the share of neurons AND the share of synapses each split
    # gets, as (train, val, test); both are met within split.tolerance or the plan stops naming the class.
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    seed: int = 0  # which of the valid splits is drawn
    max_per_neuron: int = 0  # cap each presynaptic neuron's synapses (seeded subsample); 0 = keep all
    spatial_block_um: float = 0.0  # > 0: drop synapses that share a block of this edge with another split's
    balance_classes: bool = False  # subsample the majority class in each split to the minority's count
    # Per class, every split's share of neurons and of synapses must lie within this of its fraction (or of 1/folds).
    tolerance: float = 0.05
    folds: int = 0  # >= 3: k-fold cross-validation by neuron (fractions unused); 0: one split by fractions
    fold: int = 0  # with folds: the test fold; val is fold (fold + 1) % folds, train the rest


@dataclass
class AugmentConfig:
    """Which augmentations run during training and how strongly (probabilities are per cube or per section);
    see :mod:`synhpc.augment`."""

    enabled: bool = True  # false: no augmentation at all
    flip_rot90: bool = True  # the 8 in-plane flips and quarter turns (z is never flipped)
    elastic_p: float = 0.0  # probability of a smooth elastic deformation
    elastic_sigma: float = 2.0  # its displacement, in voxels
    elastic_spacing: int = 16  # its control-point spacing, in voxels
    elastic_per_section: bool = True  # one field per section (serial sections deform independently)
    misalign_p: float = 0.03  # per section: shifted in x/y, as a misaligned section
    misalign_max_shift: int = 4  # largest shift, in voxels
    missing_p: float = 0.01  # per section: replaced, as a lost section
    missing_fill: Literal["zero", "mean", "mixed"] = "mixed"  # what a lost section reads as
    intensity_p: float = 0.8  # per cube: gamma, contrast and brightness jitter
    # nnU-Net draws noise for 10% of samples; noise is the dearest step on a CPU (a normal draw per voxel).
    noise_p: float = 0.25
    gamma: float = 0.3  # gamma jitter (log scale)
    contrast: float = 0.2  # contrast jitter (relative)
    brightness: float = 0.1  # brightness jitter (fraction of the range)
    noise: float = 0.03  # Gaussian noise sd (fraction of the range)
    mix: Literal["none", "mixup", "cutmix"] = "none"  # MixUp or CutMix-3D between cubes of a batch
    mix_alpha: float = 0.4  # Beta(alpha, alpha) mixing weights


@dataclass
class ExecutionConfig:
    """Where ``synhpc extract`` runs its shard tasks. SLURM resources are not set here but in the cluster profile
    (``slurm/profiles/<profile>.yaml``, stage ``extract``), the one place that decides them."""

    executor: Literal["local", "debug", "slurm"] = "local"  # local subprocesses, this process (pdb), or a SLURM array
    workers: int = 2  # local: subprocesses at once
    profile: str = "local"  # slurm: the cluster profile whose extract resources the array gets


@dataclass
class ModelConfig:
    """The classifier (``synhpc.models``): one of the zoo's names, built for ``cubes.shape_zyx``."""

    name: str = "small3d"  # small3d (the default 3D CNN) or a zoo model: cnn2d (centre section), 3D/2D ResNets (`synhpc.models.REGISTRY`)
    width: int = 16  # channels of the first stage of small3d and cnn2d (later stages 2x and 4x)
    dropout: float = 0.1  # dropout before the linear head
    # Local torchvision-format weights (e.g. ImageNet or Kinetics) for the zoo's resnets; never downloaded at run time.
    pretrained: str = ""
    # A pretrained backbone to start from (``synhpc pretrain``): its run folder, its backbone.pt or a pretraining
    # checkpoint. The head starts fresh; "" = train from model.pretrained or from scratch.
    init: str = ""
    freeze: bool = False  # with model.init: train only the head (a linear probe); false fine-tunes everything
    init_lr_scale: float = 1.0  # with model.init: the backbone's learning rate as a share of train.lr (the head's is train.lr)


# Keys of the model section that say where training starts from, not what the network is.
START_KEYS = ("init", "freeze", "init_lr_scale")


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The model section without :data:`START_KEYS`: what a pretrained backbone, its digest and its record name."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in START_KEYS}


@dataclass
class TrainConfig:
    """Supervised training (``synhpc train``) on the train split, best epoch chosen on val; DDP across the ranks that
    SLURM or torchrun starts."""

    epochs: int = 6  # passes over the train split
    batch_size: int = 32  # cubes per rank and micro-batch
    lr: float = 3e-3  # AdamW peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 20  # optimizer steps of linear warm-up
    checkpoint_every: int = 25  # steps between atomic checkpoints (and one at every epoch end): the most a preemption loses
    num_workers: int = 0  # DataLoader worker processes per rank (0 = read shards in the training process)
    threads: int = 2  # torch CPU threads per rank
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; steps with non-finite gradients are skipped
    channels_last: bool = False  # channels_last_3d activations (helps cuDNN on GPUs; nothing on CPU)
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: as many excitatory as inhibitory draws per epoch
    loss: Literal["balanced_bce", "focal"] = "balanced_bce"  # balanced_bce: BCE weighted by the train split's class shares
    focal_gamma: float = 2.0  # focal loss: down-weighting of easy examples
    focal_alpha: float = 0.25  # focal loss: weight of the positive (excitatory) class
    label_smoothing: float = 0.0  # s: targets 1 -> 1 - s/2 and 0 -> s/2 (for label noise in the cell-type table)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float = 0.0  # 0 = no clipping
    ema_decay: float = 0.999  # 0 = no EMA; the decay warms up as min(decay, (1 + t) / (10 + t))
    seed: int = 0  # weights, epoch orders and augmentations are functions of (seed, step): reruns are identical
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when usable; a GPU job without usable CUDA stops
    log_every: int = 50  # batch jobs print a progress line every this many steps (0 = only at epoch ends)


@dataclass
class EvaluateConfig:
    """Scoring: the threshold and temperature chosen on validation, metrics on test (and the inference settings
    prediction uses too)."""

    threshold_metric: Literal["balanced_accuracy", "f1", "youden"] = "balanced_accuracy"  # what tau maximises on val
    batch_size: int = 64  # cubes per inference batch
    tta_views: Literal[1, 8, 16] = 8  # 1 = no TTA; 8 in-plane dihedral views; 16 adds a z flip
    checkpoint: str = ""  # a model to evaluate instead of the run's: a run folder, its model.json or its best.pt
    bootstrap: int = 1000  # resamples of presynaptic neurons for 95% CIs; 0 = none
    baselines: bool = True  # score the majority, leak-free connectivity and (with tables.targets) target baselines
    # Splits written to predictions.csv (val and test are always scored; add train to inspect fitting).
    splits: list[Literal["train", "val", "test"]] = field(default_factory=lambda: ["val", "test"])
    inspect: int = 8  # test roots closest to the threshold and most confident test errors shown in <run>/inspect
    neuroglancer: str = "https://neuroglancer-demo.appspot.com"  # viewer the inspection links open


@dataclass
class PredictConfig:
    """Which synapses ``synhpc predict`` labels with which model. The selections combine (a synapse must pass every
    one that is set); none set = every synapse of ``tables.synapses``."""

    model: str = ""  # a trained run folder, its model.json or its best.pt (``--model`` on the command line)
    pre_root_ids: list[int] = field(default_factory=list)  # presynaptic root ids
    pre_root_ids_file: str = ""  # a file of root ids: one per line, or a csv/parquet with a pre_root_id column
    synapse_ids_file: str = ""  # a file of synapse ids: one per line, or a csv/parquet with an id/synapse_id column
    bbox: list[float] = field(default_factory=list)  # [x0, y0, z0, x1, y1, z1] in table position units, half-open
    labelled: Literal["any", "unlabelled", "labelled"] = "any"  # whether the presynaptic root is in the cell-type table
    part_size: int = 4096  # synapses per part: one array task and one parquet file
    block_size: int = 256  # synapses cut from the imagery and scored together
    read_ahead: int = 2  # blocks that I/O threads read while the model scores the current one
    keep_cubes: bool = False  # also keep the cubes as HDF5 shards beside the parts
    confidence: float = 0.95  # per-root call: excitatory at P >= confidence, inhibitory at P <= 1 - confidence
    call_from: Literal["independent", "mean"] = "independent"  # which per-root probability the call uses
    embeddings: bool = False  # also write each synapse's backbone embedding: parts/embeddings-<part>.parquet


# What the two contrastive views change from the training augmentation: intensity on every view, more noise and more
# section defects. No elastic warps and only mild zoom: a view must keep what tells the classes apart, the
# thickness of the densities and the size and roundness of vesicles (on the demo world, warps and a 1.33x zoom left
# the backbone's features less separable, 0.69 against 0.75 neighbour balanced accuracy).
PRETRAIN_AUGMENT = [
    "intensity_p=1.0", "gamma=0.3", "contrast=0.3", "brightness=0.2", "noise_p=0.5", "noise=0.04",
    "misalign_p=0.05", "missing_p=0.02", "mix=none",
]  # fmt: skip


@dataclass
class PretrainConfig:
    """Contrastive pretraining (``synhpc pretrain``, SimCLR's NT-Xent) of the configured model's backbone on the cubes
    of a selection of synapses, unlabelled axons included, cut into ``<run>/pretrain/cubes``; the backbone lands in
    ``<run>/pretrain/backbone.pt`` for ``model.init``. Selection keys work as ``predict``'s (none set = every synapse
    of ``tables.synapses``); threads, workers, device and log lines follow ``train``."""

    pre_root_ids: list[int] = field(default_factory=list)  # presynaptic root ids
    pre_root_ids_file: str = ""  # a file of root ids: one per line, or a csv/parquet with a pre_root_id column
    synapse_ids_file: str = ""  # a file of synapse ids: one per line, or a csv/parquet with an id/synapse_id column
    bbox: list[float] = field(default_factory=list)  # [x0, y0, z0, x1, y1, z1] in table position units, half-open
    labelled: Literal["any", "unlabelled", "labelled"] = "any"  # whether the presynaptic root is in the cell-type table
    max_synapses: int = 0  # a seeded subsample of the selection (0 = all of it)
    # Leave out every synapse of this run's validation and test neurons: a backbone never sees a held-out neuron,
    # labelled or not (false: pretrain on everything, e.g. before labelling a whole volume).
    exclude_heldout: bool = True
    epochs: int = 30  # passes over the pretraining cubes
    batch_size: int = 64  # cubes per rank and step, two views each: 2 (batch x ranks) - 2 negatives per view
    lr: float = 1e-3  # AdamW peak learning rate (linear warm-up, cosine decay to 1%)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 50  # steps of linear warm-up
    temperature: float = 0.2  # NT-Xent temperature of the cosine similarities
    projection_hidden: int = 256  # hidden width of the projection MLP (backbone -> hidden -> projection_dim)
    projection_dim: int = 64  # what the loss compares; the backbone's features are what is kept
    crop_p: float = 0.5  # share of views cropped around the synapse (the cube centre) and resized back to the cube
    crop_min: float = 0.9  # smallest crop side in y and x as a fraction of the cube's (a zoom of at most 1 / crop_min)
    crop_min_z: float = 1.0  # smallest crop depth in z as a fraction of the cube's (1 = sections never resampled)
    augment: list[str] = field(default_factory=lambda: list(PRETRAIN_AUGMENT))  # key=value overrides of augment for the views
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of the forward pass (the loss is fp32)
    channels_last: bool = False  # channels_last_3d activations (helps cuDNN on GPUs; nothing on CPU)
    checkpoint_every: int = 50  # steps between periodic checkpoints (and one at every epoch end)
    monitor: int = 512  # labelled cubes whose neighbour accuracy is logged per epoch (0 = none; it never steers training)
    seed: int = 0  # weights, epoch orders and views are functions of (seed, epoch, step)


@dataclass
class LabelsConfig:
    """How many of the train split's labels training uses, and the sweep ``synhpc bench labels`` runs over that
    (from scratch and from the pretrained backbone; validation and test stay fixed)."""

    fraction: float = 1.0  # share of the train split's neurons used, per class (at least one each); 1 = all
    seed: int = 0  # which neurons: a seeded order per class whose prefixes are the subsets (5% within 10% within ...)
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0])  # bench labels: fractions swept
    # bench labels: scratch (random init), finetune (model.init, all weights train), probe (model.init, frozen backbone)
    arms: list[Literal["scratch", "finetune", "probe"]] = field(default_factory=lambda: ["scratch", "finetune"])
    repeats: int = 1  # bench labels: neuron draws per fraction below 1 (labels.seed, labels.seed + 1, ...)
    equal_steps: bool = True  # bench labels: more epochs for fewer labels, so every fraction takes as many steps as all


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    imagery: ImageryConfig = field(default_factory=ImageryConfig)
    cubes: CubesConfig = field(default_factory=CubesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """A short stable hash of the named sections (all when none), for provenance and cache keys."""
        data = self.to_dict()
        return digest_of({s: data[s] for s in sections} if sections else data)


def digest_of(data: Any) -> str:
    """A short stable hash of JSON-able data (key order does not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` converted to ``hint`` (int -> float only), or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type: {value!r}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def from_dict(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    """Build dataclass ``cls`` from nested ``data``, checking keys and types; errors name ``source`` and the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest(str(key), names, prefix)}")
        hint = hints[key]
        value = _check_value(value, hint, f"{source}: {dotted}")
        kwargs[key] = from_dict(hint, value, f"{dotted}.", source) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys under '{prefix or '.'}': {', '.join(names)})"


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.epochs", 3)`` sets ``d["train"]["epochs"] = 3``, creating sections as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is read as YAML so lists and numbers work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def read_yaml_text(path: Path) -> str:
    """A YAML file's text, or a one-line ConfigError for a missing, unreadable or non-UTF-8 file."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML; None for defaults), apply ``overrides`` and return a validated :class:`Config`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        text = read_yaml_text(p)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} is not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    cfg = from_dict(Config, data, "", source)
    if overrides:
        merged = cfg.to_dict()
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(merged, key, value)
        cfg = from_dict(Config, merged, "", "override")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    _finite_floats(cfg)

    need(len(cfg.world.shape_vx) == 3 and min(cfg.world.shape_vx) > 0, "world.shape_vx must be 3 positive integers (x, y, z)")
    need(len(cfg.world.chunk_vx) == 3 and min(cfg.world.chunk_vx) > 0, "world.chunk_vx must be 3 positive integers (x, y, z)")
    need(0.0 <= cfg.world.difficulty <= 1.0, "world.difficulty must lie in [0, 1]")
    need(
        len(cfg.tables.position_resolution_nm) == 3 and min(cfg.tables.position_resolution_nm) > 0,
        "tables.position_resolution_nm must be 3 positive numbers (x, y, z)",
    )
    need(len(cfg.cubes.shape_zyx) == 3 and min(cfg.cubes.shape_zyx) > 0, "cubes.shape_zyx must be 3 positive integers (z, y, x)")
    need(cfg.cubes.shard_size > 0, "cubes.shard_size must be positive")
    need(
        len(cfg.split.fractions) == 3 and min(cfg.split.fractions) > 0 and abs(sum(cfg.split.fractions) - 1) < 1e-6,
        "split.fractions must be 3 positive numbers (train, val, test) that sum to 1",
    )
    need(cfg.train.epochs > 0, "train.epochs must be >= 1")
    need(cfg.train.batch_size > 0, "train.batch_size must be >= 1")
    need(cfg.evaluate.batch_size > 0, "evaluate.batch_size must be >= 1")
    need(cfg.train.checkpoint_every > 0, "train.checkpoint_every must be >= 1")
    need(cfg.train.grad_accum > 0, "train.grad_accum must be >= 1")
    need(cfg.train.lr > 0, "train.lr must be > 0 (a zero learning rate trains nothing)")
    need(cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    need(cfg.train.num_workers >= 0, "train.num_workers must be >= 0")
    need(cfg.train.threads >= 1, "train.threads must be >= 1")
    need(cfg.train.log_every >= 0, "train.log_every must be >= 0")
    need(0.0 <= cfg.train.label_smoothing < 0.5, "train.label_smoothing must lie in [0, 0.5)")
    need(cfg.train.focal_gamma >= 0 and 0.0 <= cfg.train.focal_alpha <= 1.0, "train.focal_gamma must be >= 0 and train.focal_alpha in [0, 1]")
    need(cfg.train.clip_grad_norm >= 0, "train.clip_grad_norm must be >= 0 (0 = no clipping)")
    need(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay must lie in [0, 1)")
    need(cfg.model.width >= 1, "model.width must be >= 1")
    need(0.0 <= cfg.model.dropout < 1.0, "model.dropout must lie in [0, 1)")
    need(cfg.imagery.mip >= 0, "imagery.mip must be >= 0")
    need(cfg.imagery.threads >= 1 and cfg.imagery.retries >= 0, "imagery.threads must be >= 1 and imagery.retries >= 0")
    need(cfg.execution.workers >= 1, "execution.workers must be >= 1")
    need(cfg.evaluate.bootstrap >= 0, "evaluate.bootstrap must be >= 0 (0 = no confidence intervals)")
    need(cfg.evaluate.inspect >= 0, "evaluate.inspect must be >= 0 (0 = no inspection outputs)")
    pc = cfg.predict
    need(pc.part_size >= 1 and pc.block_size >= 1 and pc.read_ahead >= 0, "predict.part_size and predict.block_size must be >= 1, predict.read_ahead >= 0")
    need(0.5 < pc.confidence < 1.0, "predict.confidence must lie in (0.5, 1)")
    need(
        not pc.bbox or (len(pc.bbox) == 6 and all(a < b for a, b in zip(pc.bbox[:3], pc.bbox[3:]))),
        "predict.bbox must be [x0, y0, z0, x1, y1, z1] with x0 < x1, y0 < y1, z0 < z1",
    )
    need(cfg.split.max_per_neuron >= 0 and cfg.split.spatial_block_um >= 0, "split.max_per_neuron and split.spatial_block_um must be >= 0")
    need(0.0 < cfg.split.tolerance < 1.0, "split.tolerance must lie in (0, 1)")
    need(cfg.split.folds == 0 or cfg.split.folds >= 3, "split.folds must be 0 (one split by split.fractions) or >= 3")
    need(cfg.split.folds == 0 or 0 <= cfg.split.fold < cfg.split.folds, "split.fold must lie in [0, split.folds)")
    need({"val", "test"} <= set(cfg.evaluate.splits), "evaluate.splits must include val (the threshold is chosen there) and test")
    aug = cfg.augment
    for name in ("elastic_p", "misalign_p", "missing_p", "intensity_p", "noise_p"):
        need(0.0 <= getattr(aug, name) <= 1.0, f"augment.{name} must lie in [0, 1]")
    need(
        aug.mix_alpha > 0 and aug.elastic_spacing >= 1 and aug.misalign_max_shift >= 0,
        "augment.mix_alpha must be > 0, augment.elastic_spacing >= 1, augment.misalign_max_shift >= 0",
    )
    pt = cfg.pretrain
    need(pt.epochs >= 1 and pt.batch_size >= 2, "pretrain.epochs must be >= 1 and pretrain.batch_size >= 2 (NT-Xent needs negatives)")
    need(pt.lr > 0 and pt.weight_decay >= 0 and pt.warmup_steps >= 0, "pretrain.lr must be > 0, pretrain.weight_decay and pretrain.warmup_steps >= 0")
    need(pt.temperature > 0 and min(pt.projection_hidden, pt.projection_dim) >= 1, "pretrain.temperature must be > 0, pretrain.projection_hidden and _dim >= 1")
    need(0.0 <= pt.crop_p <= 1.0 and 0.0 < min(pt.crop_min, pt.crop_min_z) <= max(pt.crop_min, pt.crop_min_z) <= 1.0, "pretrain.crop_p must lie in [0, 1], crop_min(_z) in (0, 1]")
    need(pt.checkpoint_every >= 1 and pt.monitor >= 0 and pt.max_synapses >= 0, "pretrain.checkpoint_every must be >= 1, pretrain.monitor and pretrain.max_synapses >= 0")
    need(
        not pt.bbox or (len(pt.bbox) == 6 and all(a < b for a, b in zip(pt.bbox[:3], pt.bbox[3:]))),
        "pretrain.bbox must be [x0, y0, z0, x1, y1, z1] with x0 < x1, y0 < y1, z0 < z1",
    )
    views = pretrain_augment(cfg)
    for name in ("elastic_p", "misalign_p", "missing_p", "intensity_p", "noise_p"):
        need(0.0 <= getattr(views, name) <= 1.0, f"pretrain.augment: {name} must lie in [0, 1]")
    need(not cfg.model.freeze or bool(cfg.model.init), "model.freeze needs model.init (the pretrained backbone to freeze)")
    need(0.0 < cfg.model.init_lr_scale <= 1.0, "model.init_lr_scale must lie in (0, 1]")
    lb = cfg.labels
    need(0.0 < lb.fraction <= 1.0 and bool(lb.fractions) and all(0.0 < f <= 1.0 for f in lb.fractions), "labels.fraction and every labels.fractions entry must lie in (0, 1]")
    need(bool(lb.arms) and lb.repeats >= 1, "labels.arms must name at least one arm and labels.repeats be >= 1")
    _check_run_name(cfg.run.name)


def pretrain_augment(cfg: Config) -> AugmentConfig:
    """The augment section with ``pretrain.augment``'s ``key=value`` overrides: what contrastive views are drawn with.

    Usage: ``pretrain_augment(cfg).elastic_p``
    """
    merged = dataclasses.asdict(cfg.augment)
    for text in cfg.pretrain.augment:
        key, value = parse_override(text)
        if "." in key:
            raise ConfigError(f"pretrain.augment: '{text}' must name a key of the augment section (e.g. elastic_p=0.3)")
        merged[key] = value
    return from_dict(AugmentConfig, merged, "augment.", "pretrain.augment")


def _check_run_name(name: str) -> None:
    """run.name is one folder inside run.root: "..", a slash or an absolute path would write outside it."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise ConfigError(f"run.name must be a plain folder name inside run.root, got {name!r}")


def _finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float in the config is finite: NaN compares false with every bound, so range checks alone miss it."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(value):
            _finite_floats(value, f"{prefix}{f.name}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {value!r}")


def load_run_config(run_dir: str | os.PathLike[str]) -> Config:
    """The resolved config a run folder was prepared with (what every batch job of the run reads)."""
    from synhpc.rundir import RunDir

    path = RunDir(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{path}: no run config; is {run_dir} a synhpc run folder (prepared by `synhpc extract`)?")
    return load_config(path)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
