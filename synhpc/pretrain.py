"""Contrastive pretraining (``synhpc pretrain``): SimCLR's NT-Xent on two augmented, centre-cropped views of every cube
of a selection of synapses -- unlabelled axons included -- for any zoo model's backbone, with the training stage's
guarantees: periodic atomic checkpoints, resume-on-start bit-identical to an uninterrupted run, DDP (negatives from
every rank), bf16/fp16 autocast, channels_last_3d and a non-finite-gradient guard.

Data. The selection (``pretrain``'s keys, as ``predict``'s: roots, ids, a bounding box, labelled or not; by default
every synapse of the table, minus the run's validation and test neurons) is cut once into HDF5 shards, not streamed:
pretraining reads every cube tens of times, and a cube read from a shard costs ~0.1 ms against milliseconds (JPEG
chunks over the network) from the imagery, so the imagery is read once and the shards keep the epochs cheap, seeded
and exactly resumable. The shards live in a run folder of their own, ``<run>/pretrain/``, with the labelled
pipeline's contract and names -- ``synapses.csv``, ``provenance.json``, ``cubes/shard-*.h5``, ``cubes/index.json``
-- except that ``label`` is -1 where the presynaptic root has no cell type and ``split`` is -1 (none). So the
extraction and index jobs cut and verify them unchanged (``jobs.extract``/``jobs.index`` on ``<run>/pretrain``),
:class:`synhpc.datasets.ShardSet` checks every row against that manifest, and the labelled run's own manifest, shards
and verification are never touched.

Outputs in ``<run>/pretrain/``: ``checkpoints/``, ``progress.json`` (as training's, so ``status`` reads it),
``pretrain_log.csv``, and when every epoch is done ``backbone.pt`` (the backbone's tensors under the model's own
state-dict keys: :mod:`synhpc.models.backbone`) and ``pretrain.json``. ``train`` starts from it with
``model.init=<run>/pretrain``.

Usage::

    result = run_pretraining(cfg)       # select, cut missing shards, index, pretrain (resumes); -> backbone.pt
    pretrain(load_run_config(RunDir(cfg.run_dir).pretrain))   # the batch job's part, on shards already cut
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch

from synhpc import __version__
from synhpc.atomic import write_csv, write_text
from synhpc.config import Config, PredictConfig, architecture, digest_of, pretrain_augment, save_config
from synhpc.errors import DataError
from synhpc.rundir import RunDir, TrainProgress

# Columns of pretrain_log.csv that measure the machine, not the pretraining: they differ between identical runs.
MEASURED_COLUMNS = ["samples_per_s", "data_wait_fraction"]
NEIGHBOURS = 10  # k of the labelled-embedding neighbour vote logged per epoch
SELECTION_KEYS = ("pre_root_ids", "pre_root_ids_file", "synapse_ids_file", "bbox", "labelled", "max_synapses", "exclude_heldout")
# Keys of the pretrain section that change neither the cubes nor the trajectory.
NOT_RECIPE = ("checkpoint_every", "monitor")


# ------------------------------------------------------------------------------------------------------ the data


def pretrain_config(cfg: Config) -> Config:
    """The config of ``<run>/pretrain/``: everything as ``cfg``, with the run folder pointing there, so the
    extraction and index jobs (which read a run folder's ``config.yaml``) work on it unchanged."""
    out = copy.deepcopy(cfg)
    out.run.root, out.run.name = str(cfg.run_dir), "pretrain"
    return out


def selection(cfg: Config) -> PredictConfig:
    """The pretrain selection as the prediction selection :func:`synhpc.selection.select_synapses` reads."""
    pt = cfg.pretrain
    return PredictConfig(pre_root_ids=list(pt.pre_root_ids), pre_root_ids_file=pt.pre_root_ids_file, synapse_ids_file=pt.synapse_ids_file, bbox=list(pt.bbox), labelled=pt.labelled)


def data_digest(cfg: Config) -> str:
    """What decides the pretraining cubes: tables, imagery, cube shape and shard size, the selection, and (when
    held-out neurons are left out) the labelled run's split."""
    from synhpc.manifest import extraction_content

    content = extraction_content(cfg)
    data = cfg.to_dict()["pretrain"]
    keyed = {s: content[s] for s in ("tables", "imagery", "cubes")} | {"selection": {k: data[k] for k in SELECTION_KEYS}}
    if cfg.pretrain.exclude_heldout:
        keyed["heldout_split"] = content["split"]
    return digest_of({"pretraining_data": keyed})


def heldout_roots(cfg: Config) -> tuple[np.ndarray, str]:
    """Presynaptic roots of the run's validation and test splits, and the labelled extraction they come from: the
    run's manifest when it has one (checked against ``cfg``), else the split ``cfg`` would make (nothing written)."""
    from synhpc.manifest import check_same_extraction, plan_manifest, read_manifest, read_provenance
    from synhpc.splits import SPLITS

    run = RunDir(cfg.run_dir)
    if run.manifest.is_file() and run.provenance.is_file():
        check_same_extraction(cfg, run)
        manifest, digest = read_manifest(run), read_provenance(run).get("extraction_digest", "")
    else:
        manifest, _, provenance, _ = plan_manifest(cfg)
        digest = provenance["extraction_digest"]
    held = manifest["split"].isin([SPLITS["val"], SPLITS["test"]])
    return np.unique(manifest.loc[held, "pre_root_id"].to_numpy(np.int64)), digest


def plan_pretraining_data(cfg: Config) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """The pretraining manifest (selection -> held-out roots removed -> subsample -> voxel centres in Z-curve order
    -> shard and row), the drops by reason, and the provenance record."""
    from synhpc.manifest import volume_info
    from synhpc.predict import place_synapses
    from synhpc.selection import select_synapses

    pt = cfg.pretrain
    frame, drops, tables = select_synapses(cfg.tables, selection(cfg))
    heldout: dict[str, Any] = {"excluded": False}
    if pt.exclude_heldout:
        roots, labelled_digest = heldout_roots(cfg)
        out = frame["pre_root_id"].isin(roots).to_numpy()
        drops["synapse_pre_root_held_out"] = int(out.sum())
        frame = frame[~out].reset_index(drop=True)
        heldout = {"excluded": True, "run": str(cfg.run_dir), "roots": len(roots), "extraction_digest": labelled_digest}
    if pt.max_synapses and len(frame) > pt.max_synapses:
        keep = np.sort(np.random.default_rng([pt.seed, 7]).choice(len(frame), pt.max_synapses, replace=False))
        drops["synapse_not_subsampled"] = len(frame) - len(keep)
        frame = frame.iloc[keep].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{cfg.tables.synapses}: the pretraining selection is empty (drops: {drops}); check the pretrain section")
    volume = volume_info(cfg)
    frame = place_synapses(cfg, frame, volume, drops)
    frame["label"] = frame["label"].fillna(-1).astype(np.int8)  # -1: the presynaptic root has no cell type
    frame["split"] = np.int8(-1)
    position = np.arange(len(frame))
    frame["shard"] = position // cfg.cubes.shard_size
    frame["row"] = position % cfg.cubes.shard_size
    labelled = frame["label"].to_numpy() >= 0
    provenance = {
        "kind": "pretraining", "extraction_digest": data_digest(cfg), "synhpc_version": __version__, "tables": tables,
        "imagery_url": cfg.imagery.url, "mip": cfg.imagery.mip, "volume": volume, "selection": {k: cfg.to_dict()["pretrain"][k] for k in SELECTION_KEYS},
        "heldout": heldout,
        "counts": {"synapses": len(frame), "labelled_synapses": int(labelled.sum()), "unlabelled_synapses": int((~labelled).sum()),
                   "roots": int(frame["pre_root_id"].nunique()), "unlabelled_roots": int(frame.loc[~labelled, "pre_root_id"].nunique())},
    }  # fmt: skip
    return frame, drops, provenance


def prepare_pretraining(cfg: Config) -> tuple[dict[int, int], str]:
    """Plan the pretraining cubes and write ``<run>/pretrain/`` (manifest, drops, provenance last, config.yaml) unless
    the same selection is there; return the shard sizes and the data digest. Another selection there is refused."""
    from synhpc.cubes import shard_sizes
    from synhpc.manifest import read_manifest, read_provenance

    pcfg = pretrain_config(cfg)
    prun = RunDir(pcfg.run_dir)
    digest = data_digest(cfg)
    if prun.provenance.is_file():
        if read_provenance(prun).get("extraction_digest") != digest:
            raise DataError(f"{prun.path}: holds pretraining cubes of another selection, tables, imagery or cube shape; use a new run.name")
        manifest = read_manifest(prun)
    else:
        manifest, drops, provenance = plan_pretraining_data(cfg)
        prun.path.mkdir(parents=True, exist_ok=True)
        write_csv(pd.DataFrame({"reason": list(drops), "rows": list(drops.values())}), prun.drops)
        write_csv(manifest, prun.manifest)
        write_text(prun.provenance, json.dumps(provenance, indent=1, default=str))  # last: it says "planned"
    save_config(pcfg, prun.config)
    return shard_sizes(manifest), digest


def extract_pretraining_data(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Prepare ``<run>/pretrain/``, cut its missing shards with the extraction jobs (``execution.executor``) and
    index them; complete shards are skipped, so this resumes."""
    from slurm.launch import cut_missing_shards
    from synhpc.shards import build_index

    start = time.perf_counter()
    sizes, digest = prepare_pretraining(cfg)
    pcfg = pretrain_config(cfg)
    prun = RunDir(pcfg.run_dir)
    if sum(sizes.values()) < cfg.pretrain.batch_size:  # refused before any cube is cut
        raise DataError(f"{prun.path}: {sum(sizes.values())} pretraining cubes, fewer than one global batch ({cfg.pretrain.batch_size}); lower pretrain.batch_size")
    missing = cut_missing_shards(pcfg, prun, sizes, digest, progress=progress)
    if missing or not prun.index.is_file():
        build_index(prun, sizes, digest)
    return {"cubes": sum(sizes.values()), "shards": len(sizes), "cut_now": len(missing), "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------------ the state


def pretrain_digest(cfg: Config, data: str) -> str:
    """What a pretraining checkpoint must agree with to be resumed: architecture, recipe, views and data."""
    model = architecture(cfg.model)
    recipe = {k: v for k, v in cfg.to_dict()["pretrain"].items() if k not in (*SELECTION_KEYS, *NOT_RECIPE, "augment")}
    views = dataclasses.asdict(pretrain_augment(cfg))
    return digest_of({"model": model, "pretrain": recipe, "views": views, "cube_shape_zyx": cfg.cubes.shape_zyx, "data": data})


class Pretrainer:
    """The state of one pretraining run (model, projection head, optimizer, scaler, RNG, step, history) and the
    steps that move it, as :class:`synhpc.training.Trainer` is for training.

    One step takes ``pretrain.batch_size`` cubes per rank, draws two views of each from generators seeded by
    (seed, step, view), and takes one AdamW step on NT-Xent; there is no accumulation (it would not add negatives).

    Usage::

        p = Pretrainer(cfg, per_epoch=30, info=init_from_env(), data_digest=digest)
        loss = p.train_step(cubes_uint8)
        p.load_state_dict(torch.load(ckpt, weights_only=True))
    """

    def __init__(self, cfg: Config, *, per_epoch: int, info: Any, data_digest: str):
        from synhpc.contrastive import ContrastiveNet, ProjectionHead
        from synhpc.models import build_model
        from synhpc.models.backbone import split_model

        pc = cfg.pretrain
        self.cfg, self.info, self.device = cfg, info, info.device
        self.layout = torch.channels_last_3d if pc.channels_last else torch.contiguous_format
        self.augment = pretrain_augment(cfg)
        torch.manual_seed(pc.seed)
        # The whole classifier is built (so its state-dict keys name the backbone's tensors); its head never trains.
        self.model = build_model(cfg.model, cfg.cubes.shape_zyx)
        self.split = split_model(self.model)
        self.projector = ProjectionHead(self.split.dim, pc.projection_hidden, pc.projection_dim)
        self.net = ContrastiveNet(self.split.backbone, self.projector).to(self.device, memory_format=self.layout)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=pc.precision == "fp16")
        self.per_epoch, self.total = per_epoch, per_epoch * pc.epochs
        self.digest = pretrain_digest(cfg, data_digest)
        self.step, self.history, self.skipped = 0, [], 0
        self.epoch_stats = {"loss": 0.0, "top1": 0.0, "n": 0}
        self.ddp: torch.nn.Module = self.net

    def wrap_distributed(self) -> None:
        """DDP after loading: it broadcasts rank 0's weights at construction, and every rank loaded the same file."""
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "projector": self.projector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "history": self.history,
            "skipped_steps": self.skipped,
            "epoch_stats": self.epoch_stats,
            "digest": self.digest,
            # What models.backbone.read_backbone needs to take a backbone out of a checkpoint.
            "head_keys": sorted(self.split.head_keys),
            "model_config": architecture(self.cfg.model),
            "cube_shape_zyx": list(self.cfg.cubes.shape_zyx),
            "pretrain_digest": self.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history, self.skipped = state["step"], state["history"], state["skipped_steps"]
        self.epoch_stats = state["epoch_stats"]

    def train_step(self, cubes: torch.Tensor) -> float:
        """One step on a uint8 batch (B, 1, Z, Y, X): two views, forward, NT-Xent, backward, update. Returns the loss."""
        from synhpc.contrastive import contrastive_view, nt_xent, view_seed
        from synhpc.inference import normalize
        from synhpc.training import autocast, grads_finite, warmup_cosine

        pc = self.cfg.pretrain
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_cosine(pc.lr, pc.warmup_steps, self.step, self.total)
        cubes = cubes.to(self.device, non_blocking=True)
        views = [contrastive_view(cubes, pc, self.augment, torch.Generator().manual_seed(view_seed(pc.seed, self.step, v))) for v in (0, 1)]
        x = normalize(torch.cat(views)).contiguous(memory_format=self.layout)
        with autocast(pc.precision, self.device):
            z = self.ddp(x)
        z1, z2 = z.float().chunk(2)
        loss, top1 = nt_xent(z1, z2, pc.temperature)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if grads_finite(self.net):
            self.scaler.step(self.optimizer)
        else:
            self.skipped += 1  # oneDNN's bf16 Conv3d weight gradient is sometimes inf on CPUs; one step costs little
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = float(loss.detach())
        s = self.epoch_stats
        self.epoch_stats = {"loss": s["loss"] + value, "top1": s["top1"] + float(top1), "n": s["n"] + 1}
        return value

    def at_epoch_end(self) -> bool:
        """True after an epoch's last step (checkpointed after the epoch's bookkeeping, never before it)."""
        return self.step % self.per_epoch == 0

    def run_epoch(self, data: Any, *, on_step: Any) -> dict[str, Any]:
        """The rest of the current epoch (from a resumed step if need be); ``on_step`` runs after every step and
        returns True to stop (a checkpoint was written). Each epoch visits a seeded permutation of every cube, the
        last incomplete global batch left out (a batch of one would have no negatives)."""
        from torch.utils.data import DataLoader

        from synhpc.datasets import CubeDataset
        from synhpc.inference import private_generator

        batch, world, rank = self.cfg.pretrain.batch_size, self.info.world_size, self.info.rank
        epoch, first = divmod(self.step, self.per_epoch)
        order = np.random.default_rng([self.cfg.pretrain.seed, epoch]).permutation(len(data))
        positions = [list(range((b * world + rank) * batch, (b * world + rank + 1) * batch)) for b in range(first, self.per_epoch)]
        loader = DataLoader(CubeDataset(data, order), batch_sampler=positions, num_workers=self.cfg.train.num_workers, generator=private_generator())
        self.net.train()
        if first == 0:
            self.epoch_stats = {"loss": 0.0, "top1": 0.0, "n": 0}
        seen, wait, started = 0, 0.0, time.perf_counter()
        fetched = time.perf_counter()
        for cubes, _, _ in loader:
            wait += time.perf_counter() - fetched
            self.train_step(cubes)
            seen += len(cubes)
            if on_step():
                return {"seen": seen, "seconds": time.perf_counter() - started, "wait": wait, "stopped": True}
            fetched = time.perf_counter()
        return {"seen": seen, "seconds": time.perf_counter() - started, "wait": wait, "stopped": False}

    @torch.no_grad()
    def neighbour_accuracy(self, data: Any, rows: np.ndarray) -> float:
        """Balanced accuracy of a k-nearest-neighbour vote (cosine, k = 10) among the backbone features of labelled
        cubes, each voted on only by cubes of *other* presynaptic neurons: how well the features separate the
        classes without a label in training. Logged, never used to steer or select anything."""
        from torch.utils.data import DataLoader

        from synhpc.datasets import CubeDataset
        from synhpc.inference import normalize, private_generator
        from synhpc.metrics import binary_metrics

        labels = data.rows["label"][rows].astype(np.int64)
        roots = data.rows["pre_root_id"][rows]
        if len(rows) < 2 or len(np.unique(labels)) < 2:
            return math.nan
        self.net.eval()
        loader = DataLoader(CubeDataset(data, rows), batch_size=self.cfg.evaluate.batch_size, shuffle=False, generator=private_generator())
        feats = torch.cat([self.split.backbone(normalize(c.to(self.device))).float().cpu() for c, _, _ in loader])
        self.net.train()
        f = torch.nn.functional.normalize(feats, dim=1)
        sim = f @ f.T
        sim[torch.from_numpy(roots[:, None] == roots[None, :])] = -math.inf
        k = min(NEIGHBOURS, int((roots[:, None] != roots[None, :]).sum(1).min()))
        if k < 1:
            return math.nan
        nearest = sim.topk(k, dim=1).indices.numpy()
        vote = labels[nearest].mean(axis=1)
        return float(binary_metrics(labels, vote, 0.5)["balanced_accuracy"])

    def progress(self) -> TrainProgress:
        pc = self.cfg.pretrain
        return TrainProgress(
            planned_steps=self.total, done_steps=self.step, steps_per_epoch=self.per_epoch, epochs=pc.epochs,
            world_size=self.info.world_size, batch_size=pc.batch_size, training_digest=self.digest, updated_at=time.time(),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the loop


def pretrain(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Pretrain (or resume pretraining) on the cut shards of the pretraining run folder ``cfg.run_dir``
    (``<run>/pretrain``; ``cfg`` is its ``config.yaml``). Rank 0 holds its lock and writes checkpoints, the log,
    the progress record, and at the end ``backbone.pt`` and ``pretrain.json``."""
    from synhpc.checkpoint import load_latest
    from synhpc.datasets import ShardSet
    from synhpc.distributed import init_from_env
    from synhpc.manifest import read_provenance

    torch.set_num_threads(cfg.train.threads)
    run = RunDir(cfg.run_dir)
    info = init_from_env(cfg.train.device)
    data = ShardSet(run)
    per_rank = cfg.pretrain.batch_size * info.world_size
    per_epoch = len(data) // per_rank
    if per_epoch == 0:
        raise DataError(f"{run.path}: {len(data)} pretraining cubes, fewer than one global batch ({cfg.pretrain.batch_size} x {info.world_size} ranks); lower pretrain.batch_size")
    lock = run.train_lock() if info.is_main else nullcontext()
    with lock:
        trainer = Pretrainer(cfg, per_epoch=per_epoch, info=info, data_digest=read_provenance(run)["extraction_digest"])
        state, path = load_latest(run.checkpoints)
        if state is not None:
            if state.get("digest") != trainer.digest:
                raise DataError(f"{path}: checkpoint was written by a different model or pretraining config; use a new run.name")
            trainer.load_state_dict(state)
            print(f"resuming from {path} at step {trainer.step}", flush=True)
        trainer.wrap_distributed()
        return _loop(cfg, run, trainer, data, progress)


def _monitor_rows(data: Any, n: int) -> np.ndarray:
    labelled = np.flatnonzero(data.rows["label"] >= 0)
    if n == 0 or len(labelled) == 0:
        return labelled[:0]
    return labelled[:: max(1, len(labelled) // n)][:n]


def _loop(cfg: Config, run: RunDir, trainer: Pretrainer, data: Any, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from synhpc.distributed import any_rank, broadcast_from_main, cleanup
    from synhpc.preemption import StopFlag
    from synhpc.training import leave_together

    info, pc = trainer.info, cfg.pretrain
    monitor = _monitor_rows(data, pc.monitor)
    bar = tqdm(total=trainer.total, initial=trainer.step, unit="step", desc="pretrain", disable=not progress)
    log = info.is_main and not progress and cfg.train.log_every > 0
    if info.is_main and not progress:
        print(f"pretrain: {cfg.model.name} on {trainer.device}, {info.world_size} rank(s), {len(data)} cubes, step {trainer.step}/{trainer.total}", flush=True)
    with bar, StopFlag() as stop:

        def on_step() -> bool:
            bar.update(1)
            if log and trainer.step % cfg.train.log_every == 0:
                s = trainer.epoch_stats
                print(f"step {trainer.step}/{trainer.total} loss {s['loss'] / max(1, s['n']):.4f}", flush=True)
            if trainer.at_epoch_end():
                return False  # the epoch's bookkeeping comes first; the stop is honoured right after it
            stopping = any_rank(stop.requested, info)
            if trainer.step % pc.checkpoint_every == 0 or stopping:
                _checkpoint(run, trainer)
            return stopping

        while trainer.step < trainer.total:
            epoch = trainer.step // trainer.per_epoch
            done = trainer.run_epoch(data, on_step=on_step)
            if done["stopped"]:
                bar.close()
                leave_together(stop, info)
            # Ranks hold their own BatchNorm statistics; rank 0's go to all, so every rank checkpoints one network.
            broadcast_from_main(list(trainer.net.buffers()), info)
            s = trainer.epoch_stats
            row = {
                "epoch": epoch,
                "step": trainer.step,
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "loss": s["loss"] / s["n"] if s["n"] else math.nan,
                "contrastive_top1": s["top1"] / s["n"] if s["n"] else math.nan,
                "knn_balanced_accuracy": trainer.neighbour_accuracy(data, monitor) if info.is_main and len(monitor) else math.nan,
                "samples_per_s": done["seen"] / done["seconds"] if done["seconds"] > 0 else math.nan,
                "data_wait_fraction": done["wait"] / done["seconds"] if done["seconds"] > 0 else math.nan,
                "skipped_steps": trainer.skipped,
            }
            trainer.history = [*trainer.history, row]
            _checkpoint(run, trainer)
            if info.is_main:
                write_csv(pd.DataFrame(trainer.history), run.pretrain_log)
                if not progress:
                    print(f"epoch {epoch + 1}/{pc.epochs} loss {row['loss']:.4f} top1 {row['contrastive_top1']:.3f} knn {row['knn_balanced_accuracy']:.3f}", flush=True)
            bar.set_postfix(loss=f"{row['loss']:.3f}", knn=f"{row['knn_balanced_accuracy']:.3f}")
            if any_rank(stop.requested, info):
                bar.close()
                leave_together(stop, info)
    if info.is_main:
        _finish(cfg, run, trainer)
    cleanup(info)
    from synhpc.training import weights_digest

    last = trainer.history[-1] if trainer.history else {}
    return {
        "steps": trainer.step, "loss": last.get("loss", math.nan), "knn_balanced_accuracy": last.get("knn_balanced_accuracy", math.nan),
        "skipped_steps": trainer.skipped, "weights_sha256": weights_digest(trainer.net), "backbone": str(run.backbone),
    }  # fmt: skip


def _checkpoint(run: RunDir, trainer: Pretrainer) -> None:
    from synhpc.checkpoint import save_checkpoint

    if trainer.info.is_main:
        save_checkpoint(run.checkpoints, trainer.step, trainer.state_dict())
        run.write_progress(trainer.progress())


def _finish(cfg: Config, run: RunDir, trainer: Pretrainer) -> None:
    """``backbone.pt`` (the backbone's tensors under the model's keys) and then ``pretrain.json``, which names it."""
    from synhpc.checkpoint import atomic_save
    from synhpc.manifest import read_provenance
    from synhpc.models.backbone import BACKBONE_FORMAT, BACKBONE_FORMAT_VERSION
    from synhpc.shards import file_sha256

    model = architecture(cfg.model)
    if run.pretrain_record.is_file() and run.backbone.is_file():
        record = json.loads(run.pretrain_record.read_text())
        if record.get("pretrain_digest") == trainer.digest and record.get("step") == trainer.step:
            return  # a finished run started again: the files are already these
    atomic_save({
        "format": BACKBONE_FORMAT, "format_version": BACKBONE_FORMAT_VERSION, "model_config": model,
        "cube_shape_zyx": list(cfg.cubes.shape_zyx), "feature_dim": trainer.split.dim,
        "weights": trainer.split.backbone_state(trainer.model), "pretrain_digest": trainer.digest, "step": trainer.step,
    }, run.backbone)  # fmt: skip
    provenance = read_provenance(run)
    record = {
        "format": "synhpc-pretraining", "synhpc_version": __version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "backbone": {"file": run.backbone.name, "sha256": file_sha256(run.backbone), "feature_dim": trainer.split.dim},
        "model": model, "cube_shape_zyx": list(cfg.cubes.shape_zyx), "pretrain_digest": trainer.digest, "step": trainer.step,
        "recipe": cfg.to_dict()["pretrain"], "views": dataclasses.asdict(pretrain_augment(cfg)),
        "data": {k: provenance.get(k) for k in ("extraction_digest", "selection", "heldout", "counts", "imagery_url", "mip")},
        "world_size": trainer.info.world_size, "skipped_steps": trainer.skipped, "last_epoch": trainer.history[-1] if trainer.history else None,
    }  # fmt: skip
    write_text(run.pretrain_record, json.dumps(record, indent=1, default=float))


def pretraining_done(run: RunDir) -> bool:
    """``run`` (a pretraining folder) has its backbone and every planned step ran."""
    progress = run.read_progress()
    return run.backbone.is_file() and run.pretrain_record.is_file() and progress is not None and progress.finished


def run_pretraining(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """``synhpc pretrain``: check the model, cut the pretraining cubes (missing shards only), then pretrain in this
    process (resuming from the newest checkpoint). Returns the data and training summaries."""
    from synhpc.distributed import resolve_device
    from synhpc.models import build_model
    from synhpc.models.backbone import split_model

    split_model(build_model(cfg.model, cfg.cubes.shape_zyx))  # an unsplittable or too-small model fails first
    resolve_device(cfg.train.device)
    cut = extract_pretraining_data(cfg, progress=progress)
    result = pretrain(pretrain_config(cfg), progress=progress)
    return {"data": cut, **result}
