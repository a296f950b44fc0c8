"""A deterministic synthetic MICrONS-like world: EM imagery with E/I synapses plus CAVE-schema tables.

The whole pipeline (tables -> cubes -> training -> evaluation) runs against this world on a laptop CPU. The volume
is a Neuroglancer precomputed image layer (mip 0 at 8x8x40 nm, mip 1 at 16x16x40 nm); the tables use the
``synapses_pni_2`` and ``aibs_metamodel_celltypes_v661`` schemas with positions in 4x4x40 nm units, as MICrONS does.
Beside them: ``synapse_target_predictions_ssa.csv.gz`` (id, synapse_id, tag in spine/shaft/soma per synapse) and
``truth.csv``, every presynaptic neuron's true class, whether the cell-type table lists it (orphans: not) and
whether the table names the wrong class (``label_noise``). Only tests and reports read the truth file.

Usage::

    from synhpc.config import WorldConfig
    root = build_world(WorldConfig(path="logs/world", seed=0))   # skips work when root/world.json matches

Rendering model (all geometry in physical nm, so a random 3D cleft normal crosses the 40 nm sections correctly):
the background is neuropil made of level sets of smooth random fields (dark membranes, cell-to-cell grey changes);
each synapse is a presynaptic bouton and a postsynaptic profile that meet on a flat face, with a bright cleft between
two membranes, a vesicle cloud on the presynaptic side and densities on either side. Excitatory synapses are
asymmetric (thick postsynaptic density, round ~42 nm vesicles); inhibitory ones are symmetric (thin densities on both
sides, flattened pleomorphic vesicles). ``difficulty`` pulls both classes toward each other and raises noise.

Class cues are not uniform: each neuron shows its class with its own strength (gamma-distributed around
``cue_strength``; a few neurons look ambiguous) and each synapse scatters around its neuron, so a single synapse can
look like the other class and a neuron's call firms up with more synapses, as on real data. The postsynaptic
profile follows the synapse's target: a small spine head, a gently curved shaft, or a nearly flat soma.

Every optional ingredient draws from its own random stream (label noise, cues, targets, section contrast), so two
worlds that differ only in, say, ``label_noise`` have byte-identical imagery, and two that differ only in
``cleft_tilt_deg`` or ``annotation_jitter_nm`` share every neuron, class, count and target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from scipy import ndimage

from synhpc.atomic import write_csv, write_text
from synhpc.config import WorldConfig, digest_of
from synhpc.errors import ConfigError

FORMAT_VERSION = 2
MIP0_NM = np.array([8.0, 8.0, 40.0])
TABLE_NM = np.array([4.0, 4.0, 40.0])
SYNAPSE_TABLE = "synapses_pni_2.csv.gz"
CELL_TYPE_TABLE = "aibs_metamodel_celltypes_v661.csv.gz"
TARGET_TABLE = "synapse_target_predictions_ssa.csv.gz"
TRUTH_FILE = "truth.csv"
SYNAPSE_COLUMNS = [
    "id", "valid", "pre_pt_supervoxel_id", "pre_pt_root_id", "post_pt_supervoxel_id", "post_pt_root_id", "size",
    "pre_pt_position_x", "pre_pt_position_y", "pre_pt_position_z",
    "ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z",
    "post_pt_position_x", "post_pt_position_y", "post_pt_position_z",
]  # fmt: skip
CELL_TYPE_COLUMNS = [
    "id", "valid", "target_id", "classification_system", "cell_type",
    "pt_supervoxel_id", "pt_root_id", "pt_position_x", "pt_position_y", "pt_position_z",
]  # fmt: skip
TARGET_COLUMNS = ["id", "synapse_id", "tag"]
TARGET_TAGS = ("spine", "shaft", "soma")
TRUTH_COLUMNS = [
    "pre_root_id", "true_class", "true_label", "in_cell_type_table", "table_class", "mislabelled", "n_synapses",
    "cue_strength",
]  # fmt: skip
E_TYPES = ["23P", "4P", "5P-IT", "5P-ET", "5P-NP", "6P-IT", "6P-CT"]
I_TYPES = ["BC", "BPC", "MC", "NGC"]
NONNEURON_TYPES = ["astrocyte", "microglia", "oligo", "OPC", "pericyte"]
ROOT_BASE = 864691135000000000
SUPERVOXEL_BASE = 88000000000000000

# Class parameters at difficulty 0; index 1 = excitatory, 0 = inhibitory. Thicknesses and sizes in nm, darkness in
# grey levels subtracted from cytoplasm.
_CLASS = {
    "post_thick": (15.0, 50.0),
    "post_dark": (55.0, 80.0),
    "pre_thick": (15.0, 8.0),
    "pre_dark": (55.0, 12.0),
    "ves_radius": (27.0, 21.0),  # long semi-axis
    "ves_flat": (0.5, 1.0),  # short / long semi-axis
    "ves_size_cv": (0.2, 0.05),
}
_MEMBRANE_DARK = 70.0
_CLEFT_BRIGHT = 30.0
_HALF_CLEFT = 9.0
_CYTO = 160.0
_WINDOW_NM = 360.0  # half-extent of the box a synapse is drawn in
_VES_BOX = (4, 4, 1)  # half-extent (x, y, z voxels) of the box a vesicle is drawn in
# Nm added to the postsynaptic profile's sphere radius per target (spine, shaft, soma): a spine head is small and
# round; a 0.5-1 um dendritic shaft curves gently at the scale of a synapse; a soma is nearly flat.
_POST_EXTRA_NM = np.array([0.0, 250.0, 1500.0])
# Dirichlet concentration of each neuron's target shares around its class's shares: neurons of one class differ
# in whom they contact (basket cells favour somata, Martinotti cells distal dendrites), but not wildly.
_TARGET_CONCENTRATION = 12.0
# The class-cue coordinate (+1 = excitatory, -1 = inhibitory at full strength) is clipped here, so an unusually
# strong synapse extrapolates past its class only a little.
_CUE_LIMIT = 1.5

_Num = TypeVar("_Num", float, np.ndarray)


def config_digest(cfg: WorldConfig) -> str:
    """Hash of the config and the world format as sorted JSON: the key recorded in world.json (a renderer change
    bumps FORMAT_VERSION, so old worlds are rebuilt rather than reused)."""
    return digest_of({"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg)})


@dataclass
class _Plan:
    """Everything decided before drawing: neurons, synapse geometry and style, vesicles, tables."""

    shape: np.ndarray  # x, y, z voxels
    centre_nm: np.ndarray  # (n, 3) cleft centres, x y z
    normal: np.ndarray  # (n, 3) unit cleft normals, pre -> post
    params: dict[str, np.ndarray]  # per-synapse rendering parameters
    vesicles: dict[str, np.ndarray]  # per-vesicle centre (k, 3), long semi-axis, flatness, short-axis direction, dark
    noise: float
    synapses: pd.DataFrame
    cell_types: pd.DataFrame
    targets: pd.DataFrame
    truth: pd.DataFrame
    counts: dict[str, Any]


def build_world(cfg: WorldConfig, *, progress: bool = True) -> Path:
    """Write the world under cfg.path; return that folder. Skips work when <path>/world.json already records the same config digest."""
    root = Path(cfg.path)
    digest = config_digest(cfg)
    manifest = root / "world.json"
    if _is_complete(root, digest):
        return root
    _check(cfg)
    root.mkdir(parents=True, exist_ok=True)
    # A rebuild must never leave an old manifest next to new, half-written data.
    manifest.unlink(missing_ok=True)

    plan = _make_plan(cfg)
    _write_table(plan.synapses, root / SYNAPSE_TABLE)
    _write_table(plan.cell_types, root / CELL_TYPE_TABLE)
    _write_table(plan.targets, root / TARGET_TABLE)
    write_csv(plan.truth, root / TRUTH_FILE)
    _write_em(cfg, plan, root, progress)

    record = {
        "format": "synhpc-world",
        "format_version": FORMAT_VERSION,
        "digest": digest,
        "config": dataclasses.asdict(cfg),
        "resolution_nm": {"mip0": MIP0_NM.tolist(), "mip1": [16.0, 16.0, 40.0], "table_positions": TABLE_NM.tolist()},
        "files": {
            "em": "em", "synapses": SYNAPSE_TABLE, "cell_types": CELL_TYPE_TABLE, "targets": TARGET_TABLE,
            "truth": TRUTH_FILE,
        },  # fmt: skip
        "counts": plan.counts,
    }
    write_text(manifest, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return root


def _is_complete(root: Path, digest: str) -> bool:
    manifest = root / "world.json"
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text()).get("digest")
    except (OSError, ValueError):
        return False
    needed = [root / name for name in (SYNAPSE_TABLE, CELL_TYPE_TABLE, TARGET_TABLE, TRUTH_FILE, "em/info")]
    return recorded == digest and all(p.exists() for p in needed)


def _check(cfg: WorldConfig) -> None:
    if len(cfg.shape_vx) != 3 or min(cfg.shape_vx) < 8:
        raise ConfigError("world.shape_vx must be 3 integers >= 8 (x, y, z)")
    if len(cfg.chunk_vx) != 3 or min(cfg.chunk_vx) < 1:
        raise ConfigError("world.chunk_vx must be 3 positive integers (x, y, z)")
    rates = (
        "excitatory_fraction", "unlabeled_fraction", "label_noise", "difficulty", "missing_section_rate",
        "misaligned_section_rate",
    )  # fmt: skip
    for name in rates:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"world.{name} must lie in [0, 1]")
    if cfg.orphan_min_synapses < 1:
        raise ConfigError("world.orphan_min_synapses must be >= 1")
    n_orphans = int(round(cfg.unlabeled_fraction * cfg.n_neurons))
    needed = 3 * (cfg.n_neurons - n_orphans) + cfg.orphan_min_synapses * n_orphans
    if cfg.n_neurons < 1 or cfg.n_synapses < needed:
        raise ConfigError(
            f"world.n_synapses must be at least {needed}: "
            "3 per labelled neuron plus world.orphan_min_synapses per orphan"
        )
    for name in ("cue_strength", "section_contrast"):
        if not getattr(cfg, name) > 0.0:
            raise ConfigError(f"world.{name} must be positive")
    for name in ("neuron_cue_spread", "synapse_cue_jitter", "section_contrast_jitter"):
        if getattr(cfg, name) < 0.0:
            raise ConfigError(f"world.{name} must be >= 0")
    if not 0.0 <= cfg.cleft_tilt_deg <= 90.0:
        raise ConfigError("world.cleft_tilt_deg must lie in [0, 90] (90: isotropic clefts)")
    for name in ("targets_excitatory", "targets_inhibitory"):
        shares = getattr(cfg, name)
        if len(shares) != 3 or min(shares) < 0.0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ConfigError(f"world.{name} must be 3 shares (spine, shaft, soma) >= 0 that sum to 1")


def _rng(cfg: WorldConfig, stream: int, *extra: int) -> np.random.Generator:
    """Independent streams per purpose, so drawing order in one stage never shifts another stage."""
    return np.random.default_rng([cfg.seed, stream, *extra])


# ----------------------------------------------------------------------------------------------------------- plan


def _make_plan(cfg: WorldConfig) -> _Plan:
    rng = _rng(cfg, 0)
    shape = np.array(cfg.shape_vx, dtype=np.int64)
    n_neu, n_syn = cfg.n_neurons, cfg.n_synapses

    # Neurons: which have a cell-type row, their class, and their synapse count (heavy-tailed, >= 3 each; orphans
    # >= orphan_min_synapses, so per-root accuracy on them can be measured). Orphans get both classes in the
    # configured proportion rather than by chance, so a small world still has orphans of each class.
    n_unlab = int(round(cfg.unlabeled_fraction * n_neu))
    n_lab = n_neu - n_unlab
    n_exc = int(round(cfg.excitatory_fraction * n_lab))
    neuron_exc = np.zeros(n_neu, dtype=bool)
    neuron_exc[:n_exc] = True
    neuron_exc[n_lab : n_lab + int(round(cfg.excitatory_fraction * n_unlab))] = True
    labelled = np.arange(n_neu) < n_lab
    order = rng.permutation(n_neu)
    neuron_exc, labelled = neuron_exc[order], labelled[order]
    weights = rng.lognormal(0.0, 1.3, n_neu)
    # Orphans stand for axon fragments without a soma: they miss the far heavy tail (weight capped at the 90th
    # percentile), so one orphan cannot swallow the synapses a small world needs for training.
    weights = np.where(labelled, weights, np.minimum(weights, np.exp(1.3 * 1.2816)))
    floor = np.where(labelled, 3, cfg.orphan_min_synapses)
    counts = floor + rng.multinomial(n_syn - floor.sum(), weights / weights.sum())
    root_ids = ROOT_BASE + np.sort(rng.choice(10**9, n_neu + 64, replace=False))
    pre_roots, spare_roots = rng.permutation(root_ids[:n_neu]), root_ids[n_neu:]

    # Per-neuron style: independent of class, so it confuses a model that keys on it.
    style = {
        "radius": rng.uniform(130.0, 230.0, n_neu),
        "ves_density": rng.lognormal(0.0, 0.3, n_neu),
        "dark_jitter": rng.uniform(0.85, 1.15, n_neu),
        "contrast": rng.uniform(0.8, 1.2, n_neu),
        "ves_scale": rng.uniform(0.93, 1.07, n_neu),
        "post_thick": rng.uniform(0.8, 1.2, n_neu),
    }

    syn_neuron = rng.permutation(np.repeat(np.arange(n_neu), counts))
    exc = neuron_exc[syn_neuron]
    centre = _place_centres(cfg, shape, rng)
    normal = _cleft_normals(cfg, rng, n_syn)

    cue, strength = _class_cues(cfg, neuron_exc, syn_neuron)
    cls = _class_parameters(cue)
    target = _draw_targets(cfg, neuron_exc, syn_neuron)
    radius = np.clip(style["radius"][syn_neuron] * rng.lognormal(0.0, 0.12, n_syn), 100.0, 280.0)
    contrast = style["contrast"][syn_neuron]
    dark = style["dark_jitter"][syn_neuron] * contrast
    params = {
        "radius": radius,
        "post_thick": cls["post_thick"] * style["post_thick"][syn_neuron],
        "post_dark": cls["post_dark"] * dark,
        "pre_thick": cls["pre_thick"],
        "pre_dark": cls["pre_dark"] * dark,
        "membrane_dark": _MEMBRANE_DARK * contrast,
        "cleft_bright": _CLEFT_BRIGHT * contrast * rng.uniform(0.8, 1.2, n_syn),
        "post_extra": _POST_EXTRA_NM[target],
    }
    vesicles = _place_vesicles(rng, centre, normal, radius, cls, style, syn_neuron, contrast)

    synapses = _synapse_frame(rng, cfg, shape, centre, normal, radius, syn_neuron, pre_roots, counts, labelled)
    post_pool = synapses["post_pt_root_id"].to_numpy()
    mislabelled = _mislabelled(cfg, labelled)
    table_exc = neuron_exc ^ mislabelled  # what the cell-type table claims
    cell_types = _cell_type_frame(rng, shape, pre_roots, labelled, table_exc, spare_roots, post_pool, n_neu)
    targets = _target_frame(cfg, synapses["id"].to_numpy(), target)
    truth = _truth_frame(pre_roots, neuron_exc, labelled, table_exc, mislabelled, counts, strength)

    # Counts by class follow the cell-type table (what a pipeline reads); truth.csv holds the true classes.
    lab_syn = labelled[syn_neuron]
    table_syn = table_exc[syn_neuron]
    summary = {
        "neurons": {
            "excitatory": int((labelled & table_exc).sum()),
            "inhibitory": int((labelled & ~table_exc).sum()),
            "unlabeled": int((~labelled).sum()),
            "mislabelled": int(mislabelled.sum()),
        },
        "synapses": {
            "total": n_syn,
            "excitatory": int((lab_syn & table_syn).sum()),
            "inhibitory": int((lab_syn & ~table_syn).sum()),
            "unlabeled": int((~lab_syn).sum()),
            "mislabelled": int(mislabelled[syn_neuron].sum()),
            "invalid": int((~synapses["valid"]).sum()),
            "autapses": int((synapses["pre_pt_root_id"] == synapses["post_pt_root_id"]).sum()),
            "vesicles": int(len(vesicles["long"])),
        },
        "cell_type_rows": {
            k: int(v) for k, v in cell_types["classification_system"].value_counts().sort_index().items()
        },
        "targets": {
            cls_name: {tag: int(((target == t) & (exc == is_exc)).sum()) for t, tag in enumerate(TARGET_TAGS)}
            for cls_name, is_exc in (("excitatory", True), ("inhibitory", False))
        },
    }
    noise = 9.0 + 14.0 * cfg.difficulty
    return _Plan(shape, centre, normal, params, vesicles, noise, synapses, cell_types, targets, truth, summary)


def _cleft_normals(cfg: WorldConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit cleft normals, uniform over the band of the sphere whose elevation out of the section plane is at most
    cleft_tilt_deg (90: the whole sphere, isotropic). The same draws serve every tilt, so changing the tilt changes
    nothing else in the world."""
    u = rng.random((n, 2))
    nz = (2.0 * u[:, 0] - 1.0) * np.sin(np.radians(cfg.cleft_tilt_deg))
    phi = 2.0 * np.pi * u[:, 1]
    r = np.sqrt(1.0 - nz * nz)
    return np.stack([r * np.cos(phi), r * np.sin(phi), nz], axis=1)


def _class_cues(cfg: WorldConfig, neuron_exc: np.ndarray, syn_neuron: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cue coordinate per synapse: +1 looks fully excitatory, -1 fully inhibitory; cue strength per neuron).

    A neuron's strength is gamma-distributed with mean 1 and coefficient of variation neuron_cue_spread, so a few
    neurons show their class faintly; each synapse adds normal jitter (sd synapse_cue_jitter). Everything is scaled
    by cue_strength and pulled toward the middle by difficulty (at difficulty 1 the classes sit 4% of the gap apart).
    """
    n = len(neuron_exc)
    cv = cfg.neuron_cue_spread
    strength = _rng(cfg, 5).gamma(1.0 / cv**2, cv**2, n) if cv > 0 else np.ones(n)
    jitter = _rng(cfg, 5, 1).standard_normal(len(syn_neuron)) * cfg.synapse_cue_jitter
    sign = np.where(neuron_exc, 1.0, -1.0)
    gap = cfg.cue_strength * (1.0 - 0.96 * cfg.difficulty)
    cue = np.clip(gap * (sign[syn_neuron] * strength[syn_neuron] + jitter), -_CUE_LIMIT, _CUE_LIMIT)
    return cue, strength


def _class_parameters(cue: np.ndarray) -> dict[str, np.ndarray]:
    """Per-synapse class parameters: the midpoint between the classes moved cue/2 of the gap toward excitatory."""
    cls = {k: (i + e) / 2.0 + cue / 2.0 * (e - i) for k, (i, e) in _CLASS.items()}
    # Past +-1 the line extrapolates; keep every quantity physical.
    lows = {"post_thick": 4.0, "pre_thick": 4.0, "post_dark": 5.0, "pre_dark": 5.0, "ves_radius": 14.0}
    for name, low in lows.items():
        cls[name] = np.maximum(cls[name], low)
    cls["ves_flat"] = np.clip(cls["ves_flat"], 0.3, 1.0)
    cls["ves_size_cv"] = np.maximum(cls["ves_size_cv"], 0.02)
    return cls


def _draw_targets(cfg: WorldConfig, neuron_exc: np.ndarray, syn_neuron: np.ndarray) -> np.ndarray:
    """Target index (into TARGET_TAGS) per synapse, from per-neuron shares drawn around the neuron's true class's
    shares (the biology follows the true class, not the cell-type table)."""
    rng = _rng(cfg, 6)
    mean = np.where(neuron_exc[:, None], cfg.targets_excitatory, cfg.targets_inhibitory)
    shares = rng.gamma(mean * _TARGET_CONCENTRATION + 1e-9)
    shares /= shares.sum(axis=1, keepdims=True)
    cum = np.cumsum(shares, axis=1)[syn_neuron]
    u = rng.random(len(syn_neuron))
    return (u[:, None] >= cum[:, :2]).sum(axis=1)


def _mislabelled(cfg: WorldConfig, labelled: np.ndarray) -> np.ndarray:
    """label_noise of the labelled neurons, chosen at random, get the other class in the cell-type table."""
    rng = _rng(cfg, 4)
    idx = np.flatnonzero(labelled)
    out = np.zeros(len(labelled), dtype=bool)
    out[rng.choice(idx, int(round(cfg.label_noise * len(idx))), replace=False)] = True
    return out


def _target_frame(cfg: WorldConfig, synapse_ids: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """A synapse_target_predictions_ssa-like table: its own row id, the synapse's id, and the compartment tag."""
    ids = 10**8 + np.sort(_rng(cfg, 6, 1).choice(9 * 10**8, len(synapse_ids), replace=False))
    return pd.DataFrame({"id": ids, "synapse_id": synapse_ids, "tag": np.asarray(TARGET_TAGS)[target]})[TARGET_COLUMNS]


def _truth_frame(
    pre_roots: np.ndarray,
    neuron_exc: np.ndarray,
    labelled: np.ndarray,
    table_exc: np.ndarray,
    mislabelled: np.ndarray,
    counts: np.ndarray,
    strength: np.ndarray,
) -> pd.DataFrame:
    names = np.where(neuron_exc, "excitatory", "inhibitory")
    frame = pd.DataFrame(
        {
            "pre_root_id": pre_roots,
            "true_class": names,
            "true_label": neuron_exc.astype(np.int8),
            "in_cell_type_table": labelled,
            "table_class": np.where(labelled, np.where(table_exc, "excitatory", "inhibitory"), ""),
            "mislabelled": mislabelled,
            "n_synapses": counts,
            # Rounded so the file is byte-stable across platforms' float printing.
            "cue_strength": np.round(strength, 4),
        }
    )
    return frame.sort_values("pre_root_id", kind="stable").reset_index(drop=True)[TRUTH_COLUMNS]


def _place_centres(cfg: WorldConfig, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cleft centres in nm, at least a few voxels inside the volume and apart enough that synapses rarely overlap."""
    size_nm = shape * MIP0_NM
    lo = np.array([4 * 8.0, 4 * 8.0, 2 * 40.0])
    hi = size_nm - lo
    n = cfg.n_synapses
    # Small test worlds cannot hold 300 nm spacing; scale it down with the mean spacing there.
    min_dist = min(300.0, 0.75 * float(np.prod(size_nm) / n) ** (1 / 3))
    if cfg.layout == "dense":
        clusters = rng.uniform(lo, hi, (max(1, n // 30), 3))
        spread = np.array([550.0, 550.0, 400.0])
    cell = min_dist
    grid: dict[tuple[int, int, int], list[int]] = {}
    out = np.empty((n, 3))
    for k in range(n):
        for attempt in range(400):
            if cfg.layout == "dense" and attempt < 200:
                p = clusters[rng.integers(len(clusters))] + rng.normal(0.0, spread)
                if np.any(p < lo) or np.any(p > hi):
                    continue
            else:
                p = rng.uniform(lo, hi)
            key = tuple((p // cell).astype(int))
            near = [
                j
                for dx in (-1, 0, 1)
                for dy in (-1, 0, 1)
                for dz in (-1, 0, 1)
                for j in grid.get((key[0] + dx, key[1] + dy, key[2] + dz), ())
            ]
            if not near or np.min(np.linalg.norm(out[near] - p, axis=1)) >= min_dist:
                break
        else:
            raise ConfigError(f"world: cannot place {n} synapses {min_dist:.0f} nm apart; enlarge world.shape_vx")
        out[k] = p
        grid.setdefault(key, []).append(k)
    return out


def _basis(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors orthogonal to each row of ``normal`` and to each other."""
    helper = np.where(np.abs(normal[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = np.cross(normal, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(normal, e1)


def _bouton(radius: _Num) -> tuple[_Num, _Num]:
    """Presynaptic bouton: sphere radius and its centre's distance behind the cleft plane (flat face 1.1 R)."""
    r_sphere = 1.2 * radius + 70.0
    return r_sphere, np.sqrt(r_sphere**2 - (1.1 * radius) ** 2)


def _spine(radius: _Num, extra: float = 0.0) -> tuple[_Num, _Num]:
    """Postsynaptic profile: sphere radius and its centre's distance beyond the cleft plane (flat face 1.0 R);
    ``extra`` nm flatten it from a spine head toward a shaft or soma."""
    r_sphere = 1.1 * radius + 50.0 + extra
    return r_sphere, np.sqrt(r_sphere**2 - (1.0 * radius) ** 2)


def _place_vesicles(
    rng: np.random.Generator,
    centre: np.ndarray,
    normal: np.ndarray,
    radius: np.ndarray,
    cls: dict[str, np.ndarray],
    style: dict[str, np.ndarray],
    syn_neuron: np.ndarray,
    contrast: np.ndarray,
) -> dict[str, np.ndarray]:
    """Vesicle clouds on the presynaptic side, 30-300 nm behind the cleft, densest near it, non-overlapping."""
    e1, e2 = _basis(normal)
    rb, rb_off = _bouton(radius)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("centre", "long", "flat", "axis", "dark")}
    for s in range(len(centre)):
        target = int(np.clip(70.0 * style["ves_density"][syn_neuron[s]] * (radius[s] / 180.0) ** 1.5, 20, 140))
        m = 3 * target
        mean_long = cls["ves_radius"][s] * style["ves_scale"][syn_neuron[s]]
        long = mean_long * rng.lognormal(0.0, cls["ves_size_cv"][s], m)
        flat = np.clip(cls["ves_flat"][s] * rng.lognormal(0.0, 0.5 * cls["ves_size_cv"][s], m), 0.3, 1.0)
        depth = _HALF_CLEFT + 12.0 + long + np.minimum(rng.exponential(60.0, m), 260.0)
        rho = 1.05 * radius[s] * np.sqrt(rng.random(m))
        phi = rng.uniform(0.0, 2 * np.pi, m)
        local = np.stack([rho * np.cos(phi), rho * np.sin(phi), -depth], axis=1)
        inside = np.linalg.norm(local - [0.0, 0.0, -rb_off[s]], axis=1) < rb[s] - long - 8.0
        cand = np.flatnonzero(inside)
        pos = centre[s] + local[cand, :1] * e1[s] + local[cand, 1:2] * e2[s] + local[cand, 2:] * normal[s]
        long, flat = long[cand], flat[cand]
        gap = np.linalg.norm(pos[:, None] - pos[None], axis=2) - long[:, None] - long[None, :]
        clash = gap < 3.0
        free = np.ones(len(cand), dtype=bool)
        keep: list[int] = []
        for j in range(len(cand)):
            if free[j]:
                keep.append(j)
                if len(keep) == target:
                    break
                free &= ~clash[j]
        axis = rng.standard_normal((len(keep), 3))
        parts["centre"].append(pos[keep])
        parts["long"].append(long[keep])
        parts["flat"].append(flat[keep])
        parts["axis"].append(axis / np.linalg.norm(axis, axis=1, keepdims=True))
        parts["dark"].append(np.full(len(keep), 55.0 * contrast[s]) * rng.uniform(0.85, 1.15, len(keep)))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _to_table_units(p_nm: np.ndarray, shape: np.ndarray) -> np.ndarray:
    units = np.floor(p_nm / TABLE_NM).astype(np.int64)
    return np.clip(units, 0, shape * (MIP0_NM / TABLE_NM).astype(np.int64) - 1)


def _synapse_frame(
    rng: np.random.Generator,
    cfg: WorldConfig,
    shape: np.ndarray,
    centre: np.ndarray,
    normal: np.ndarray,
    radius: np.ndarray,
    syn_neuron: np.ndarray,
    pre_roots: np.ndarray,
    counts: np.ndarray,
    labelled: np.ndarray,
) -> pd.DataFrame:
    n = len(centre)
    post_pool = ROOT_BASE + 10**9 + np.sort(rng.choice(10**9, max(8, n // 5), replace=False))
    post_w = 1.0 / np.arange(1, len(post_pool) + 1) ** 0.8  # a few cells receive many inputs
    post = post_pool[rng.choice(len(post_pool), n, p=post_w / post_w.sum())]
    pre = pre_roots[syn_neuron]
    valid = np.ones(n, dtype=bool)
    # Filters get exercised on rows of well-connected labelled neurons, so every neuron keeps >= 3 usable synapses.
    spare = np.flatnonzero((counts[syn_neuron] >= 6) & labelled[syn_neuron])
    special = rng.choice(spare, min(len(spare), n // 400 + 2), replace=False)
    post[special[:1]] = pre[special[:1]]
    valid[special[1:]] = False
    area = np.pi * radius**2
    size = np.maximum(20, np.round(area * 20.0 / np.prod(TABLE_NM) * rng.lognormal(0.0, 0.25, n))).astype(np.int64)
    marked = centre + rng.uniform(-1.0, 1.0, (n, 3)) * np.asarray(cfg.annotation_jitter_nm)
    pre_pt, ctr_pt, post_pt = (_to_table_units(marked + k * 100.0 * normal, shape) for k in (-1, 0, 1))
    ids = 10**8 + np.sort(rng.choice(9 * 10**8, n, replace=False))
    frame = pd.DataFrame(
        {
            "id": ids,
            "valid": valid,
            "pre_pt_supervoxel_id": SUPERVOXEL_BASE + rng.integers(0, 10**15, n),
            "pre_pt_root_id": pre,
            "post_pt_supervoxel_id": SUPERVOXEL_BASE + rng.integers(0, 10**15, n),
            "post_pt_root_id": post,
            "size": size,
        }
    )
    for name, pts in (("pre_pt", pre_pt), ("ctr_pt", ctr_pt), ("post_pt", post_pt)):
        for axis, col in zip("xyz", pts.T):
            frame[f"{name}_position_{axis}"] = col
    return frame[SYNAPSE_COLUMNS]


def _cell_type_frame(
    rng: np.random.Generator,
    shape: np.ndarray,
    pre_roots: np.ndarray,
    labelled: np.ndarray,
    neuron_exc: np.ndarray,
    spare_roots: np.ndarray,
    post_pool: np.ndarray,
    n_neurons: int,
) -> pd.DataFrame:
    """One row per labelled presynaptic neuron, plus non-neurons and a couple of postsynaptic neurons."""
    roots = list(pre_roots[labelled])
    system = ["excitatory_neuron" if e else "inhibitory_neuron" for e in neuron_exc[labelled]]
    posts = rng.choice(np.unique(post_pool), 2, replace=False)
    roots += list(posts)
    system += ["excitatory_neuron", "inhibitory_neuron"]
    n_non = max(2, n_neurons // 30)
    roots += list(spare_roots[:n_non])
    system += ["nonneuron"] * n_non
    vocab = {"excitatory_neuron": E_TYPES, "inhibitory_neuron": I_TYPES, "nonneuron": NONNEURON_TYPES}
    # One uniform per row whatever the vocabulary's size, so flipping a row's class shifts no later draw.
    pick = rng.random(len(system))
    cell_type = [vocab[s][int(u * len(vocab[s]))] for s, u in zip(system, pick)]
    n = len(roots)
    order = rng.permutation(n)
    pos = rng.integers(0, shape * (MIP0_NM / TABLE_NM).astype(np.int64), (n, 3))
    frame = pd.DataFrame(
        {
            "id": 1000 + np.arange(n),
            "valid": True,
            "target_id": 100000 + np.sort(rng.choice(500000, n, replace=False)),
            "classification_system": np.array(system)[order],
            "cell_type": np.array(cell_type)[order],
            "pt_supervoxel_id": SUPERVOXEL_BASE + rng.integers(0, 10**15, n),
            "pt_root_id": np.array(roots, dtype=np.int64)[order],
            "pt_position_x": pos[:, 0],
            "pt_position_y": pos[:, 1],
            "pt_position_z": pos[:, 2],
        }
    )
    return frame[CELL_TYPE_COLUMNS]


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    # mtime=0 keeps the gzip header, and so the file, byte-identical across builds.
    write_csv(frame, path, compression={"method": "gzip", "mtime": 0, "compresslevel": 6})


# ------------------------------------------------------------------------------------------------------- imagery


class _Background:
    """Neuropil from smooth random fields on a 32x32x40 nm grid, upsampled per slab.

    Membranes lie on the zero set of a ~120 nm field (large profiles) and on a high level set of a ~60 nm field
    (small round profiles such as axons). Storing signed distances (field / |gradient|) keeps membranes a constant
    thickness in nm after linear upsampling.
    """

    step = 4  # mip-0 voxels per coarse cell in x and y

    def __init__(self, cfg: WorldConfig, shape: np.ndarray) -> None:
        rng = _rng(cfg, 1)
        nx, ny, nz = (int(s) for s in shape)
        self.shape = shape
        cshape = (nz, ny // self.step + 2, nx // self.step + 2)
        spacing = np.array([40.0, 32.0, 32.0])  # z, y, x nm per coarse cell
        self.sd_large = self._signed(rng.standard_normal(cshape, dtype=np.float32), 120.0, spacing, 0.0)
        self.sd_small = self._signed(rng.standard_normal(cshape, dtype=np.float32), 60.0, spacing, 0.9)
        low = rng.standard_normal((max(2, nz // 4), cshape[1] // 4 + 2, cshape[2] // 4 + 2), dtype=np.float32)
        low = ndimage.gaussian_filter(low, 2.0, mode="wrap")
        low = ndimage.zoom(low / low.std(), np.array(cshape) / np.array(low.shape), order=1)[: cshape[0]]
        # Neighbouring cells differ in grey level; the low field adds slow staining drift.
        self.cyto = (_CYTO + 10.0 * low + 7.0 * np.tanh(self.sd_large / 15.0)).astype(np.float32)
        self.ix = self._interp_index(nx)
        self.iy = self._interp_index(ny)

    @staticmethod
    def _signed(noise: np.ndarray, sigma_nm: float, spacing: np.ndarray, level: float) -> np.ndarray:
        field = ndimage.gaussian_filter(noise, sigma_nm / spacing, mode="wrap")
        field /= field.std()
        grad = np.gradient(field, *spacing)
        norm = np.sqrt(sum(g * g for g in grad)) + 1e-6
        return np.clip((field - level) / norm, -80.0, 80.0).astype(np.float32)

    def _interp_index(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = (np.arange(n) + 0.5) / self.step
        i0 = np.floor(u).astype(np.int64)
        return i0, (u - i0).astype(np.float32)

    def _up(self, coarse: np.ndarray) -> np.ndarray:
        (i0, wx), (j0, wy) = self.ix, self.iy
        a = coarse[:, :, i0] * (1 - wx) + coarse[:, :, i0 + 1] * wx
        return a[:, j0, :] * (1 - wy)[:, None] + a[:, j0 + 1, :] * wy[:, None]

    def slab(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """(cytoplasm grey, membrane darkness 0..1) for sections z0..z1, each (z, y, x) float32."""
        s = slice(z0, z1)
        large, small = self._up(self.sd_large[s]), self._up(self.sd_small[s])
        membrane = np.maximum(np.exp(-(large * large) / 40.0), np.exp(-(small * small) / 30.0))
        return self._up(self.cyto[s]), membrane


def _draw_synapse(plan: _Plan, s: int, z0: int, dark: np.ndarray, keep_bg: np.ndarray) -> None:
    """Add synapse ``s`` to the slab starting at section ``z0``: ``dark`` gains its darkness, ``keep_bg`` falls to 0
    inside the bouton and spine so background membranes do not cross them."""
    c, n = plan.centre_nm[s], plan.normal[s]
    p = {k: float(v[s]) for k, v in plan.params.items()}
    lo = np.maximum(np.floor((c - _WINDOW_NM) / MIP0_NM).astype(int), [0, 0, z0])
    top = [dark.shape[2], dark.shape[1], z0 + dark.shape[0]]
    hi = np.minimum(np.floor((c + _WINDOW_NM) / MIP0_NM).astype(int) + 1, top)
    if np.any(hi <= lo):
        return
    x, y, z = (((np.arange(lo[a], hi[a]) + 0.5) * MIP0_NM[a] - c[a]).astype(np.float32) for a in range(3))
    d = z[:, None, None] * n[2] + (y[:, None] * n[1] + x[None, :] * n[0])[None]
    p2 = (z * z)[:, None, None] + ((y * y)[:, None] + (x * x)[None, :])[None]
    r2 = p2 - d * d

    # A 40 nm section averages the layer profile over 40*|n_z| nm of depth (8*|n_xy| in-plane): widen every layer
    # by that much and lower its peak so its integral is unchanged.
    blur2 = (64.0 * (1.0 - n[2] ** 2) + 1600.0 * n[2] ** 2) / 12.0

    def layer(mu: float, sigma: float, amp: float) -> np.ndarray:
        wide2 = sigma * sigma + blur2
        return (amp * sigma / np.sqrt(wide2)) * np.exp((d - mu) ** 2 * (-0.5 / wide2))

    radius = p["radius"]
    active = np.clip((radius * radius - r2) / (2 * radius * 30.0) + 0.5, 0.0, 1.0)
    off = _HALF_CLEFT + 4.0  # membrane centre
    psd = layer(off + 2 + p["post_thick"] / 2, p["post_thick"] / 2.3, p["post_dark"])
    psd += layer(-off - 2 - p["pre_thick"] / 2, p["pre_thick"] / 2.3, p["pre_dark"])
    total = psd * active
    rb, rb_off = _bouton(radius)
    rs, rs_off = _spine(radius, p["post_extra"])
    sdf_pre = np.maximum(d + off, np.sqrt(p2 + 2 * rb_off * d + rb_off**2) - rb)
    sdf_post = np.maximum(off - d, np.sqrt(p2 - 2 * rs_off * d + rs_off**2) - rs)
    mem_w2 = 12.0 + blur2
    mem_amp = p["membrane_dark"] * np.sqrt(12.0 / mem_w2)
    total += mem_amp * (np.exp(sdf_pre * sdf_pre * (-0.5 / mem_w2)) + np.exp(sdf_post * sdf_post * (-0.5 / mem_w2)))
    face = 1.1 * radius
    face_mask = np.clip((face * face - r2) / (2 * face * 25.0) + 0.5, 0.0, 1.0)
    total -= layer(0.0, _HALF_CLEFT / 1.2, p["cleft_bright"]) * face_mask
    window = np.clip((_WINDOW_NM**2 - p2) / (2 * _WINDOW_NM * 60.0), 0.0, 1.0)
    inside = np.clip(0.5 - np.minimum(sdf_pre, sdf_post) / 8.0, 0.0, 1.0) * window
    sl = (slice(lo[2] - z0, hi[2] - z0), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    dark[sl] += total * window
    np.minimum(keep_bg[sl], 1.0 - inside, out=keep_bg[sl])


def _draw_vesicles(plan: _Plan, z0: int, z1: int, dark: np.ndarray) -> None:
    """All vesicles near sections z0..z1 at once: dark shells with slightly lighter lumens."""
    v = plan.vesicles
    kz = np.floor(v["centre"][:, 2] / MIP0_NM[2]).astype(np.int64)
    sel = np.flatnonzero((kz >= z0 - _VES_BOX[2]) & (kz < z1 + _VES_BOX[2]))
    if len(sel) == 0:
        return
    nz, ny, nx = dark.shape
    hx, hy, hz = _VES_BOX
    ox, oy, oz = np.meshgrid(np.arange(-hx, hx + 1), np.arange(-hy, hy + 1), np.arange(-hz, hz + 1), indexing="ij")
    offs = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], axis=1)  # (m, 3)
    flats, vals = [], []
    for part in np.array_split(sel, max(1, len(sel) // 4000)):
        c = v["centre"][part]
        vox = np.floor(c / MIP0_NM).astype(np.int64)[:, None, :] + offs[None]  # (k, m, 3)
        rel = ((vox + 0.5) * MIP0_NM - c[:, None, :]).astype(np.float32)
        long = v["long"][part][:, None].astype(np.float32)
        short = long * v["flat"][part][:, None].astype(np.float32)
        along = np.einsum("kmi,ki->km", rel, v["axis"][part].astype(np.float32))
        q = (np.einsum("kmi,kmi->km", rel, rel) - along**2) / long**2 + along**2 / short**2
        dist = (np.sqrt(q) - 1.0) * np.sqrt(long * short)
        # Shell ~7 nm plus the blur of a 40 nm section through a ~40 nm vesicle.
        val = v["dark"][part][:, None] * np.exp(-(dist**2) / 50.0) - 12.0 * np.clip(1.0 - q, 0.0, 1.0)
        ok = (
            (vox[..., 0] >= 0) & (vox[..., 0] < nx) & (vox[..., 1] >= 0) & (vox[..., 1] < ny)
            & (vox[..., 2] >= z0) & (vox[..., 2] < z1)
        )  # fmt: skip
        flats.append((((vox[..., 2] - z0) * ny + vox[..., 1]) * nx + vox[..., 0])[ok])
        vals.append(val[ok])
    dark += np.bincount(np.concatenate(flats), np.concatenate(vals), dark.size).reshape(dark.shape).astype(np.float32)


def _render_slab(
    cfg: WorldConfig, plan: _Plan, bg: _Background, dark: np.ndarray, keep_bg: np.ndarray, z0: int, z1: int
) -> np.ndarray:
    """Sections z0..z1 as uint8 (z, y, x), given the synapse layers already drawn for them."""
    cyto, membrane = bg.slab(z0, z1)
    _draw_vesicles(plan, z0, z1, dark)
    img = cyto - 75.0 * membrane * keep_bg - dark
    if cfg.section_contrast != 1.0 or cfg.section_contrast_jitter > 0.0:
        # Section thickness and staining vary in serial-section EM; the noise below does not scale with it.
        log_gain = [cfg.section_contrast_jitter * _rng(cfg, 7, z).standard_normal() for z in range(z0, z1)]
        gain = (cfg.section_contrast * np.exp(np.asarray(log_gain))).astype(np.float32)
        img = _CYTO + gain[:, None, None] * (img - _CYTO)
    rng = _rng(cfg, 2, z0)
    img += rng.standard_normal(img.shape, dtype=np.float32) * plan.noise
    img = ndimage.gaussian_filter1d(ndimage.gaussian_filter1d(img, 0.7, axis=1), 0.7, axis=2)
    img += rng.standard_normal(img.shape, dtype=np.float32) * (0.25 * plan.noise)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    _section_defects(cfg, out, z0)
    return out


def _section_defects(cfg: WorldConfig, slab: np.ndarray, z0: int) -> None:
    """Missing sections (black or flat grey) and misaligned ones (shifted a few voxels), as in serial-section EM."""
    for k in range(slab.shape[0]):
        rng = _rng(cfg, 3, z0 + k)
        u = rng.random()
        if u < cfg.missing_section_rate:
            slab[k] = 0 if rng.random() < 0.5 else 128
        elif u < cfg.missing_section_rate + cfg.misaligned_section_rate:
            dx, dy = rng.integers(-6, 7, 2)
            if dx == 0 and dy == 0:
                dx = 4
            section = slab[k].copy()
            slab[k] = int(_CYTO)
            ny, nx = section.shape
            slab[k, max(dy, 0) : ny + min(dy, 0), max(dx, 0) : nx + min(dx, 0)] = section[
                max(-dy, 0) : ny + min(-dy, 0), max(-dx, 0) : nx + min(-dx, 0)
            ]


def _write_em(cfg: WorldConfig, plan: _Plan, root: Path, progress: bool) -> None:
    from cloudvolume import CloudVolume

    final = root / "em"
    tmp = root / "em.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    url = "file://" + str(tmp.resolve())
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw", resolution=[8, 8, 40],
        voxel_offset=[0, 0, 0], chunk_size=list(cfg.chunk_vx), volume_size=list(cfg.shape_vx),
    )  # fmt: skip
    vol = CloudVolume(url, info=info, compress=False, progress=False)
    vol.add_scale((2, 2, 1), chunk_size=list(cfg.chunk_vx))
    vol.commit_info()
    # Uncompressed chunks: cloudfiles' gzip may stamp the time, which would break byte-identical rebuilds.
    mip0 = CloudVolume(url, mip=0, compress=False, progress=False)
    mip1 = CloudVolume(url, mip=1, compress=False, progress=False)

    bg = _Background(cfg, plan.shape)
    nx, ny, nz = (int(s) for s in plan.shape)
    step = int(cfg.chunk_vx[2])
    # Each synapse is drawn once, into the slab where its box starts; the part reaching past that slab waits in
    # the buffer's tail, which becomes the head of the next slab's buffer.
    first = np.maximum(np.floor((plan.centre_nm[:, 2] - _WINDOW_NM) / MIP0_NM[2]), 0).astype(np.int64)
    tail = int(2 * _WINDOW_NM / MIP0_NM[2]) + 2
    dark = np.zeros((step + tail, ny, nx), dtype=np.float32)
    keep_bg = np.ones_like(dark)
    starts = range(0, nz, step)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="world: em sections", unit="slab")
    for z0 in starts:
        z1 = min(z0 + step, nz)
        for s in np.flatnonzero((first >= z0) & (first < z1)):
            _draw_synapse(plan, int(s), z0, dark, keep_bg)
        slab = _render_slab(cfg, plan, bg, dark[: z1 - z0], keep_bg[: z1 - z0], z0, z1)
        dark[:tail] = dark[step:].copy()
        dark[tail:] = 0.0
        keep_bg[:tail] = keep_bg[step:].copy()
        keep_bg[tail:] = 1.0
        mip0[0:nx, 0:ny, z0:z1] = np.ascontiguousarray(slab.transpose(2, 1, 0))[..., None]
        mip1[:, :, z0:z1] = _halve_xy(slab).transpose(2, 1, 0)[..., None]
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _halve_xy(slab: np.ndarray) -> np.ndarray:
    """2x2 mean in x and y (z, y, x order); an odd edge repeats its last row/column, matching ceil-sized mip 1."""
    nz, ny, nx = slab.shape
    padded = np.pad(slab, ((0, 0), (0, ny % 2), (0, nx % 2)), mode="edge").astype(np.uint16)
    summed = padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]
    return ((summed + 2) // 4).astype(np.uint8)
