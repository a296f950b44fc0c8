"""Label efficiency (``synhpc bench labels``): test balanced accuracy and ROC-AUC against the number of labelled
training neurons, from scratch and from the contrastively pretrained backbone.

For every fraction in ``labels.fractions`` (5%, 10%, 25%, 50%, 100% by default), every repeat (a new neuron draw,
``labels.seed + r``; the full set is drawn once) and every arm in ``labels.arms`` -- ``scratch`` (random init),
``finetune`` (``model.init`` = the run's pretrained backbone, every weight trains), ``probe`` (the backbone frozen, a
linear head) -- one training run is made under ``<run>/bench/labels/<arm>-f<fraction x 1000>-r<repeat>-<digest>/``
(the digest is the run's training digest, which covers the recipe, the budget and the backbone's sha256, so a changed
config or a new pretraining never reads back an old run) on the run's own shards (linked, not copied), with ``labels.fraction`` choosing the training neurons per class
(:mod:`synhpc.label_budget`), then evaluated as any run: threshold on the fixed validation split, metrics and
neuron-resampled 95% CIs on the fixed test split. With ``labels.equal_steps`` a run on fewer labels gets more epochs,
so every fraction takes (at least) the optimizer steps of the full set: fewer labels, not less training.

The model, recipe and pretraining are the config's (``model``, ``train``, ``augment``, ``pretrain``), read when the
bench runs. Pretraining (``synhpc pretrain``'s ``<run>/pretrain``) and extraction are run first when missing; runs
already evaluated are read back, so a killed sweep resumes where it stopped.

Writes ``<run>/bench/bench_labels.csv`` (one row per run and level: synapse and neuron, test split),
``bench_labels.json`` (the settings, the pretraining, the rows and the goal check at 10%) and ``bench_labels.png``.

Usage::

    frame = bench_labels(cfg, RunDir(cfg.run_dir).bench)
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_csv, write_text
from synhpc.config import Config
from synhpc.errors import ConfigError
from synhpc.label_budget import neuron_subset
from synhpc.rundir import RunDir

COLUMNS = [
    "arm", "fraction", "repeat", "labels_seed", "train_neurons", "train_neurons_e", "train_neurons_i", "train_synapses",
    "epochs", "steps", "best_epoch", "level", "n", "balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi",
    "roc_auc", "roc_auc_lo", "roc_auc_hi", "val_balanced_accuracy", "seconds", "run",
]  # fmt: skip
GOAL_FRACTION = 0.1
ARM_STYLE = {"scratch": ("tab:gray", "o", "from scratch"), "finetune": ("tab:blue", "s", "pretrained, fine-tuned"), "probe": ("tab:orange", "^", "pretrained, linear probe")}


def link_data(base: RunDir, target: RunDir) -> None:
    """Give ``target`` the base run's cubes (a symlink to its verified shards and index) and copies of its manifest
    and provenance: what training and evaluation read of a run's data."""
    target.path.mkdir(parents=True, exist_ok=True)
    if not target.cubes.exists():
        os.symlink(base.cubes.resolve(), target.cubes, target_is_directory=True)
    for source, dest in ((base.manifest, target.manifest), (base.provenance, target.provenance)):
        if not dest.is_file():
            shutil.copy(source, dest)


def run_config(cfg: Config, run: RunDir, arm: str, fraction: float, repeat: int, epochs: int, backbone: Path | None, backbone_sha: str = "") -> Config:
    """The config of one sweep run: the bench config with the arm's init, the budget and the epochs, in a folder
    named after them and the training digest (as :class:`synhpc.training.Trainer` computes it)."""
    from synhpc.training import trainer_digest

    out = copy.deepcopy(cfg)
    out.labels.fraction, out.labels.seed = float(fraction), cfg.labels.seed + repeat
    out.model.init = str(backbone) if arm != "scratch" else ""
    out.model.freeze = arm == "probe"
    out.train.epochs = epochs
    out.evaluate.baselines, out.evaluate.inspect = False, 0  # the model's own rows are what the sweep compares
    digest = trainer_digest(out, backbone_sha if arm != "scratch" else "")
    out.run.root, out.run.name = str(run.label_sweep), f"{arm}-f{round(fraction * 1000):04d}-r{repeat}-{digest[:8]}"
    return out


def _rows(run: RunDir, model: str) -> list[dict[str, Any]]:
    summary = pd.read_csv(run.summary)
    mine = summary[summary["model"] == model]
    val = mine[(mine["level"] == "synapse") & (mine["split"] == "val")]["balanced_accuracy"]
    card = json.loads(run.model_card.read_text())
    steps = int(pd.read_csv(run.train_log)["step"].iloc[-1])
    out = []
    for _, row in mine[mine["split"] == "test"].iterrows():
        out.append({
            "level": row["level"], "n": int(row["n"]), "best_epoch": int(card["weights"]["epoch"]), "steps": steps,
            "val_balanced_accuracy": float(val.iloc[0]) if len(val) else math.nan,
            **{k: float(row[k]) for k in ("balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi", "roc_auc", "roc_auc_lo", "roc_auc_hi")},
        })  # fmt: skip
    return out


def bench_labels(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """Run (or resume) the sweep and write its CSV, JSON and plot into ``out_dir``; returns the CSV's frame."""
    from slurm.launch import run_extraction
    from synhpc.evaluation import evaluate
    from synhpc.manifest import read_manifest
    from synhpc.shards import file_sha256
    from synhpc.splits import SPLITS
    from synhpc.training import train

    lb = cfg.labels
    if cfg.split.folds:
        raise ConfigError("bench labels runs on one split (split.folds = 0)")
    run = RunDir(cfg.run_dir)
    if not run.index.is_file():
        run_extraction(cfg, progress=False)
    backbone, pretraining, backbone_sha = None, None, ""
    if any(arm != "scratch" for arm in lb.arms):
        from synhpc.pretrain import run_pretraining

        started = time.perf_counter()
        result = run_pretraining(cfg, progress=False)
        backbone = run.pretrain.backbone
        backbone_sha = file_sha256(backbone)
        record = json.loads(run.pretrain.pretrain_record.read_text())
        pretraining = {"backbone": str(backbone), "sha256": backbone_sha, "pretrain_digest": record["pretrain_digest"], "steps": result["steps"],
                       "cubes": record["data"]["counts"], "final_epoch": record["last_epoch"], "seconds_this_call": time.perf_counter() - started}  # fmt: skip
    manifest = read_manifest(run)
    train_rows = manifest[manifest["split"] == SPLITS["train"]]
    roots, labels = train_rows["pre_root_id"].to_numpy(), train_rows["label"].to_numpy()
    batch = cfg.train.batch_size
    full_steps = math.ceil(len(train_rows) / batch) * cfg.train.epochs
    rows: list[dict[str, Any]] = []
    for repeat in range(lb.repeats):
        for fraction in sorted(set(lb.fractions)):
            if fraction >= 1.0 and repeat > 0:
                continue  # every draw of all neurons is the same run
            keep = neuron_subset(roots, labels, fraction, lb.seed + repeat) if fraction < 1.0 else np.ones(len(roots), dtype=bool)
            kept_roots, kept_labels = roots[keep], labels[keep]
            epochs = max(cfg.train.epochs, math.ceil(full_steps / math.ceil(keep.sum() / batch))) if lb.equal_steps else cfg.train.epochs
            for arm in lb.arms:
                rcfg = run_config(cfg, run, arm, fraction, repeat, epochs, backbone, backbone_sha)
                rdir = RunDir(rcfg.run_dir)
                started = time.perf_counter()
                if not rdir.evaluation_current():
                    link_data(run, rdir)
                    print(f"bench labels: {rdir.name}: {int(keep.sum())} synapses of {len(np.unique(kept_roots))} neurons, {epochs} epochs", flush=True)
                    train(rcfg, progress=False)
                    evaluate(rcfg)
                common = {
                    "arm": arm, "fraction": fraction, "repeat": repeat, "labels_seed": rcfg.labels.seed,
                    "train_neurons": int(len(np.unique(kept_roots))), "train_neurons_e": int(len(np.unique(kept_roots[kept_labels == 1]))),
                    "train_neurons_i": int(len(np.unique(kept_roots[kept_labels == 0]))), "train_synapses": int(keep.sum()),
                    "epochs": epochs, "seconds": time.perf_counter() - started, "run": rdir.name,
                }  # fmt: skip
                rows += [common | r for r in _rows(rdir, cfg.model.name)]
    frame = pd.DataFrame(rows)[COLUMNS]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(frame, out_dir / "bench_labels.csv")
    info = {
        "model": cfg.to_dict()["model"], "train": cfg.to_dict()["train"], "labels": cfg.to_dict()["labels"], "full_set_steps": full_steps,
        "pretraining": pretraining, "goal": goal_check(frame), "rows": frame.to_dict(orient="records"),
    }  # fmt: skip
    write_text(out_dir / "bench_labels.json", json.dumps(info, indent=1, default=float))
    plot(frame, out_dir / "bench_labels.png", title=f"{cfg.model.name}, {cfg.run.name}: test split")
    print(f"bench labels: plot {out_dir / 'bench_labels.png'}")
    return frame


def goal_check(frame: pd.DataFrame) -> dict[str, Any]:
    """At 10% of the training neurons (synapse level, test, mean over repeats): the pretrained arms against scratch
    at 10% (goal: +0.05 balanced accuracy) and against scratch on every neuron (goal: within 0.03)."""
    syn = frame[frame["level"] == "synapse"]
    mean = syn.groupby(["arm", "fraction"])["balanced_accuracy"].mean()
    out: dict[str, Any] = {}
    if ("scratch", GOAL_FRACTION) not in mean or ("scratch", 1.0) not in mean:
        return out
    scratch_low, scratch_all = float(mean[("scratch", GOAL_FRACTION)]), float(mean[("scratch", 1.0)])
    for arm in ("finetune", "probe"):
        if (arm, GOAL_FRACTION) in mean:
            ba = float(mean[(arm, GOAL_FRACTION)])
            out[arm] = {
                "balanced_accuracy_at_10pct": ba, "scratch_at_10pct": scratch_low, "scratch_at_100pct": scratch_all,
                "gain_over_scratch_at_10pct": ba - scratch_low, "gap_to_scratch_at_100pct": scratch_all - ba,
                "meets_gain_0.05": ba >= scratch_low + 0.05, "meets_within_0.03_of_all": ba >= scratch_all - 0.03,
            }  # fmt: skip
    return out


def plot(frame: pd.DataFrame, path: Path, title: str = "") -> None:
    """Balanced accuracy and ROC-AUC (columns) at synapse and neuron level (rows) against labelled training neurons,
    one line per arm (mean over repeats) with the 95% CIs over test neurons as error bars."""
    import matplotlib.pyplot as plt

    from synhpc.plots import save_figure  # (sets the display-free backend first)

    levels = [lv for lv in ("synapse", "neuron") if lv in set(frame["level"])]
    fig, axes = plt.subplots(len(levels), 2, figsize=(10, 3.8 * len(levels)), squeeze=False)
    for r, level in enumerate(levels):
        part = frame[frame["level"] == level]
        for c, metric in enumerate(("balanced_accuracy", "roc_auc")):
            ax = axes[r][c]
            for arm, group in part.groupby("arm", sort=False):
                color, marker, label = ARM_STYLE.get(arm, ("k", "o", arm))
                g = group.groupby("train_neurons")[[metric, f"{metric}_lo", f"{metric}_hi"]].mean().reset_index()
                x = g["train_neurons"].to_numpy()
                y = g[metric].to_numpy()
                err = np.vstack([y - g[f"{metric}_lo"].to_numpy(), g[f"{metric}_hi"].to_numpy() - y]).clip(min=0)
                ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, lw=1.5, label=label)
            ax.set_xscale("log")
            ticks = sorted(set(part["train_neurons"]))
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("labelled training neurons")
            ax.set_ylabel(f"test {metric.replace('_', ' ')} ({level})")
            ax.set_ylim(0.4, 1.01)
            ax.axhline(0.5, color="k", lw=0.5, ls=":")
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
