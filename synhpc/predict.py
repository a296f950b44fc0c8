"""Prediction: label synapses the model has never seen, most of them on axons that have no cell type, from the
imagery straight into the model, in parts that array tasks run and reruns skip, then one call per presynaptic root.

Usage::

    plan = plan_prediction(cfg)                 # select, place, split into parts; writes predict_plan.parquet
    predict_part(run, part)                     # one array task: cut, score, write parts/part-00007.parquet
    roots = aggregate_roots(run)                # roots.csv: per-root evidence, P(excitatory) two ways, the call

Cubes are cut from the imagery inside each task and scored at once; I/O threads read the next blocks while the model
scores the current one, and cubes are kept (as HDF5 shards) only with ``predict.keep_cubes`` -- a whole-volume run
over 337 M synapses must not need ~20 TB of shards.

Each part is a parquet file with CAVE's column names (``id, pre_pt_root_id, post_pt_root_id,
<position>_x/_y/_z, size``) plus ``logit`` (the model's mean logit over the test-time views), ``probability``
(calibrated P(excitatory): ``sigmoid(logit / T)`` with the temperature T fitted on validation) and ``prediction``
(1 excitatory, 0 inhibitory, at the threshold chosen on validation). Parts are written whole and carry the
prediction digest; a rerun skips every part already there with the same digest, so a run killed anywhere and rerun
ends with the same files.

Per root (``roots.csv``): with z_i = logit_i / T the calibrated log-odds of synapse i and pi the excitatory share
the calibration saw (validation), ``p_independent = sigmoid(sum_i (z_i - logit(pi)) + logit(pi))`` is P(excitatory)
if every synapse were independent evidence given the root's class (naive Bayes; errors of one axon's synapses are
correlated, so it is overconfident on long axons); ``p_mean = sigmoid(mean_i z_i)`` is the conservative variant that
weighs the whole axon like one synapse. The call is ``excitatory`` when the chosen P >= ``predict.confidence``,
``inhibitory`` when P <= 1 - confidence, else ``undetermined``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from synhpc import __version__
from synhpc.atomic import write_csv, write_text
from synhpc.config import Config, digest_of, save_config
from synhpc.errors import ConfigError, DataError
from synhpc.geometry import to_voxels
from synhpc.rundir import RunDir, read_json

PART_COLUMNS_FIXED = ["id", "pre_pt_root_id", "post_pt_root_id"]
ROOT_COLUMNS = ["pre_root_id", "n_synapses", "sum_log_odds", "mean_log_odds", "p_independent", "p_mean", "call"]
CALLS = ("excitatory", "inhibitory", "undetermined")


# ------------------------------------------------------------------------------------------------------ plan


def position_columns(cfg: Config) -> list[str]:
    return [f"{cfg.tables.position}_{axis}" for axis in "xyz"]


def prediction_digest(cfg: Config, card: dict[str, Any]) -> str:
    """What decides every number a prediction run writes: the selection and tables, the imagery, the cube shape, the
    model's weights and decision, and the part size (which synapse lands in which file)."""
    data = cfg.to_dict()
    selection = {k: v for k, v in data["predict"].items() if k not in ("read_ahead", "block_size", "keep_cubes", "model")}
    if not selection.get("embeddings"):
        selection.pop("embeddings", None)  # runs without embeddings keep the digest they always had
    imagery = {k: v for k, v in data["imagery"].items() if k not in ("threads", "retries")}
    keyed = {
        "predict": selection, "tables": {k: v for k, v in data["tables"].items() if k != "cache_dir"}, "imagery": imagery,
        "cube_shape_zyx": data["cubes"]["shape_zyx"], "weights": card["weights"]["sha256"], "decision": card["decision"],
        "tta_views": data["evaluate"]["tta_views"],
    }  # fmt: skip
    return digest_of(keyed)


def plan_prediction(cfg: Config) -> pd.DataFrame:
    """Select the synapses, place them in the imagery, order them along a Z curve and cut them into parts; write the
    plan, the provenance and the resolved config into the run folder (unless the same prediction is there)."""
    from synhpc.manifest import volume_info
    from synhpc.modelcard import check_compatible, read_card
    from synhpc.selection import select_synapses

    run = RunDir(cfg.run_dir)
    if not cfg.predict.model:
        raise ConfigError("predict.model: which model? pass --model RUN_DIR (a trained run folder or its model.json)")
    card, _ = read_card(cfg.predict.model)
    if card["decision"].get("tau") is None or card["decision"].get("temperature") is None:
        raise DataError(f"{cfg.predict.model}: the model has no threshold and temperature yet; run `synhpc evaluate` on its run first")
    check_compatible(card, cfg, source=str(cfg.predict.model))  # cube shape and mip, before any I/O
    volume = volume_info(cfg)
    check_compatible(card, cfg, volume["resolution_nm"], source=str(cfg.predict.model))
    digest = prediction_digest(cfg, card)
    if run.predict_provenance.is_file():
        recorded = read_json(run.predict_provenance, "prediction record")
        if recorded.get("digest") != digest:
            raise DataError(f"{run.path}: holds a prediction with other settings (selection, tables, imagery or model); use a new run.name")
        if run.predict_plan.is_file():
            return pd.read_parquet(run.predict_plan)
    frame, drops, provenance = select_synapses(cfg.tables, cfg.predict)
    frame = place_synapses(cfg, frame, volume, drops)
    position = np.arange(len(frame))
    frame["part"] = (position // cfg.predict.part_size).astype(np.int64)
    frame["row"] = (position % cfg.predict.part_size).astype(np.int64)
    run.path.mkdir(parents=True, exist_ok=True)
    _write_parquet(frame, run.predict_plan)
    record = {
        "digest": digest, "synhpc_version": __version__, "model": str(cfg.predict.model), "model_card": card,
        "selection": cfg.to_dict()["predict"], "tables": provenance, "imagery": {"url": cfg.imagery.url, "mip": cfg.imagery.mip, "volume": volume},
        "synapses": int(len(frame)), "parts": int(frame["part"].max()) + 1, "drops": drops,
    }  # fmt: skip
    write_text(run.predict_provenance, json.dumps(record, indent=1, default=str))
    save_config(cfg, run.config)
    return frame


def place_synapses(cfg: Config, frame: pd.DataFrame, volume: dict[str, Any], drops: dict[str, int]) -> pd.DataFrame:
    """Voxel centres (``cx, cy, cz``) at the imagery mip, synapses whose centre lies outside the imagery dropped and
    counted, the rest in Z-curve order of their chunks (neighbours share chunks, so a block reads each chunk once)."""
    from synhpc.manifest import morton_order

    centers = to_voxels(frame[["x", "y", "z"]].to_numpy(), cfg.tables.position_resolution_nm, volume["resolution_nm"])
    lo, hi = np.asarray(volume["lo"]), np.asarray(volume["hi"])
    outside = ((centers < lo) | (centers >= hi)).any(axis=1)
    drops["synapse_centre_outside_imagery"] = int(outside.sum())
    frame, centers = frame[~outside], centers[~outside]
    if frame.empty:
        raise DataError(f"{cfg.tables.synapses}: the selection holds no synapse inside the imagery (drops: {drops})")
    frame = frame.assign(cx=centers[:, 0], cy=centers[:, 1], cz=centers[:, 2])
    order = morton_order(centers // np.asarray(volume["chunk_vx"]))
    return frame.iloc[order].reset_index(drop=True)


def part_sizes(plan: pd.DataFrame) -> dict[int, int]:
    return {int(p): int(n) for p, n in plan.groupby("part").size().items()}


def read_plan(run: RunDir) -> pd.DataFrame:
    if not run.predict_plan.is_file():
        raise DataError(f"{run.predict_plan}: no prediction plan; run `synhpc predict` first")
    return pd.read_parquet(run.predict_plan)


def part_done(run: RunDir, part: int, n: int, digest: str) -> bool:
    """The part file exists whole, holds ``n`` rows and was written by this prediction (its digest)."""
    import pyarrow.parquet as pq

    path = run.part(part)
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
    except Exception:  # a foreign or damaged file: redo the part
        return False
    info = meta.metadata or {}
    return meta.num_rows == n and info.get(b"synhpc_prediction_digest", b"").decode() == digest


def missing_parts(run: RunDir, plan: pd.DataFrame, digest: str) -> list[int]:
    return [p for p, n in sorted(part_sizes(plan).items()) if not part_done(run, p, n, digest)]


# ------------------------------------------------------------------------------------------------------ one task


def _blocks(reader, rows: pd.DataFrame, shape_zyx: list[int], block: int, read_ahead: int) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """(rows, cubes, missing-chunk counts) per block, read by ``read_ahead`` I/O threads ahead of the consumer."""
    starts = list(range(0, len(rows), block))

    def read(start: int) -> tuple[np.ndarray, np.ndarray]:
        part = rows.iloc[start : start + block]
        cubes, _, missing = reader.cubes(part[["cx", "cy", "cz"]].to_numpy(np.int64), shape_zyx)
        return cubes, missing

    if read_ahead <= 0:
        for start in starts:
            cubes, missing = read(start)
            yield rows.iloc[start : start + block], cubes, missing
        return
    with ThreadPoolExecutor(read_ahead, thread_name_prefix="predict-io") as pool:
        pending: list[tuple[int, Future]] = [(s, pool.submit(read, s)) for s in starts[:read_ahead]]
        following = iter(starts[read_ahead:])
        while pending:
            start, future = pending.pop(0)
            cubes, missing = future.result()
            nxt = next(following, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield rows.iloc[start : start + block], cubes, missing


def score_rows(cfg: Config, model, card: dict[str, Any], reader, rows: pd.DataFrame, keep_cubes: bool = False, embed=None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The part's output frame (CAVE columns + logit, probability, prediction) for ``rows`` of the plan, and the cubes
    when asked to keep them. ``embed``: called with each block's cubes (uint8, N x Z x Y x X) as it is scored."""
    import torch

    from synhpc.inference import predict_logits

    decision = card["decision"]
    shape = card["input"]["cube_shape_zyx"]
    logits, kept = [], []
    for _, cubes, _ in _blocks(reader, rows, shape, cfg.predict.block_size, cfg.predict.read_ahead):
        batches = (torch.from_numpy(cubes[i : i + cfg.evaluate.batch_size])[:, None] for i in range(0, len(cubes), cfg.evaluate.batch_size))
        logits.append(predict_logits(model, batches, views=cfg.evaluate.tta_views).astype(np.float64))
        if embed is not None:
            embed(cubes)
        if keep_cubes:
            kept.append(cubes)
    logit = np.concatenate(logits) if logits else np.zeros(0)
    calibrated = logit / float(decision["temperature"])
    tau = float(decision["tau"])
    # Same decisions as evaluation: probability >= tau on the uncalibrated probability, i.e. logit >= logit(tau).
    prediction = (1.0 / (1.0 + np.exp(-logit)) >= tau).astype(np.int8)
    out = pd.DataFrame({
        "id": rows["synapse_id"].to_numpy(np.int64),
        "pre_pt_root_id": rows["pre_root_id"].to_numpy(np.int64),
        "post_pt_root_id": rows["post_root_id"].to_numpy(np.int64),
        **{name: rows[axis].to_numpy() for name, axis in zip(position_columns(cfg), "xyz")},
        "size": rows["size"].to_numpy(np.int64),
        "logit": logit,
        "probability": 1.0 / (1.0 + np.exp(-calibrated)),
        "prediction": prediction,
    })  # fmt: skip
    return out, (np.concatenate(kept) if keep_cubes and kept else None)


def predict_part(run: RunDir, part: int, *, model=None, card: dict[str, Any] | None = None, reader=None) -> int:
    """Score one part of a planned prediction run and write it whole; a finished part is left as it is. Returns the
    number of synapses in the part."""
    from synhpc.config import load_run_config
    from synhpc.cubes import open_reader
    from synhpc.distributed import resolve_device
    from synhpc.modelcard import load_model

    cfg = load_run_config(run.path)
    record = read_json(run.predict_provenance, "prediction record")
    plan = read_plan(run)
    rows = plan[plan["part"] == part].sort_values("row")
    if rows.empty:
        raise DataError(f"{run.predict_plan}: no part {part} (the plan has {int(plan['part'].max()) + 1})")
    if part_done(run, part, len(rows), record["digest"]):
        return len(rows)
    if model is None:
        import torch

        torch.set_num_threads(cfg.train.threads)
        model, card = load_model(record["model"], resolve_device(cfg.train.device))
    if card["weights"]["sha256"] != record["model_card"]["weights"]["sha256"]:
        raise DataError(f"{record['model']}: the model changed since this prediction was planned; use a new run.name")
    reader = reader or open_reader(cfg)
    embedded: list[np.ndarray] = []
    embed = None
    if cfg.predict.embeddings:
        import torch

        from synhpc.models.backbone import embed_batches

        def embed(cubes: np.ndarray) -> None:
            batches = (torch.from_numpy(cubes[i : i + cfg.evaluate.batch_size])[:, None] for i in range(0, len(cubes), cfg.evaluate.batch_size))
            embedded.append(embed_batches(model, batches, views=cfg.evaluate.tta_views))

    try:
        out, cubes = score_rows(cfg, model, card, reader, rows, keep_cubes=cfg.predict.keep_cubes, embed=embed)
    except DataError as exc:
        raise DataError(f"{run.part(part).name}: {exc}") from None
    run.parts.mkdir(parents=True, exist_ok=True)
    if cubes is not None:
        _write_part_cubes(cfg, run, part, rows, cubes, record)
    if embed is not None:
        # Before the part itself: a part on disk is what says "done", so its embeddings must already be there.
        _write_embeddings(run.part_embeddings(part), out, np.concatenate(embedded), record)
    _write_parquet(out, run.part(part), {"synhpc_prediction_digest": record["digest"], "synhpc_version": __version__})
    return len(rows)


def _write_embeddings(path, out: pd.DataFrame, embeddings: np.ndarray, record: dict[str, Any]) -> None:
    """One row per synapse of the part, in the part's order: id, pre_pt_root_id and ``embedding`` (the backbone's
    features as a fixed-size float32 list; ``np.stack(frame["embedding"])`` gives the (N, D) matrix)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    table = pa.table({
        "id": pa.array(out["id"].to_numpy(np.int64)), "pre_pt_root_id": pa.array(out["pre_pt_root_id"].to_numpy(np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1]),
    })  # fmt: skip
    meta = {"synhpc_prediction_digest": record["digest"], "synhpc_version": __version__, "weights_sha256": record["model_card"]["weights"]["sha256"],
            "embedding_dim": str(embeddings.shape[1])}  # fmt: skip
    _write_parquet(table, path, meta)


def _write_part_cubes(cfg: Config, run: RunDir, part: int, rows: pd.DataFrame, cubes: np.ndarray, record: dict[str, Any]) -> None:
    from synhpc.shards import write_shard

    label = rows["label"].fillna(-1).to_numpy(np.int8) if "label" in rows else np.full(len(rows), -1, np.int8)
    write_shard(
        run.part_cubes(part), cubes,
        {"synapse_id": rows["synapse_id"].to_numpy(), "pre_root_id": rows["pre_root_id"].to_numpy(), "post_root_id": rows["post_root_id"].to_numpy(),
         "label": label, "split": np.full(len(rows), -1, np.int8), "center_vx": rows[["cx", "cy", "cz"]].to_numpy(np.int64),
         "edge": np.zeros(len(rows), np.int8)},
        {"imagery_url": cfg.imagery.url, "mip": cfg.imagery.mip, "cube_shape_zyx": np.asarray(cfg.cubes.shape_zyx, dtype=np.int64),
         "prediction_digest": record["digest"], "synhpc_version": __version__, "part": part},
        compression=cfg.cubes.compression,
    )  # fmt: skip


def _write_parquet(frame, path, metadata: dict[str, str] | None = None) -> None:
    """A parquet file (from a DataFrame or a pyarrow Table) written whole (temp sibling, fsync, rename), with
    ``metadata`` in its footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ per root


def aggregate_roots(run: RunDir) -> pd.DataFrame:
    """``roots.csv`` from every part, read one part at a time (memory grows with roots, not synapses)."""
    cfg_record = read_json(run.predict_provenance, "prediction record")
    from synhpc.config import load_run_config

    cfg = load_run_config(run.path)
    decision = cfg_record["model_card"]["decision"]
    plan = read_plan(run)
    missing = missing_parts(run, plan, cfg_record["digest"])
    if missing:
        raise DataError(f"{run.parts}: {len(missing)} part(s) missing, e.g. {run.part(missing[0]).name}; run `synhpc predict` again")
    n: dict[int, float] = {}
    sums: dict[int, float] = {}
    temperature = float(decision["temperature"])
    for part in sorted(part_sizes(plan)):
        frame = pd.read_parquet(run.part(part), columns=["pre_pt_root_id", "logit"])
        grouped = (frame["logit"] / temperature).groupby(frame["pre_pt_root_id"]).agg(["size", "sum"])
        for root, count, total in zip(grouped.index.to_numpy(), grouped["size"].to_numpy(), grouped["sum"].to_numpy()):
            n[int(root)] = n.get(int(root), 0) + int(count)
            sums[int(root)] = sums.get(int(root), 0.0) + float(total)
    roots = pd.DataFrame({"pre_root_id": np.array(sorted(n), dtype=np.int64)})
    roots["n_synapses"] = [n[r] for r in roots["pre_root_id"]]
    roots["sum_log_odds"] = [sums[r] for r in roots["pre_root_id"]]
    roots["mean_log_odds"] = roots["sum_log_odds"] / roots["n_synapses"]
    roots = roots.assign(**root_probabilities(roots["sum_log_odds"].to_numpy(), roots["n_synapses"].to_numpy(), float(decision.get("prior_excitatory", 0.5))))
    roots["call"] = call(roots[f"p_{cfg.predict.call_from}"].to_numpy(), cfg.predict.confidence)
    write_csv(roots[ROOT_COLUMNS], run.roots)
    return roots[ROOT_COLUMNS]


def root_probabilities(sum_log_odds: np.ndarray, n: np.ndarray, prior: float) -> dict[str, np.ndarray]:
    """P(excitatory) per root from its synapses' calibrated log-odds: independent evidence (naive Bayes, relative to
    the calibration prior) and the conservative mean."""
    prior_log_odds = float(np.log(prior / (1.0 - prior))) if 0.0 < prior < 1.0 else 0.0
    independent = sum_log_odds - (n - 1) * prior_log_odds
    return {"p_independent": _sigmoid(independent), "p_mean": _sigmoid(sum_log_odds / n)}


def call(probability: np.ndarray, confidence: float) -> np.ndarray:
    out = np.full(len(probability), "undetermined", dtype=object)
    out[probability >= confidence] = "excitatory"
    out[probability <= 1.0 - confidence] = "inhibitory"
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a large negative log-odds sum overflows in float64 for long axons; clip before squashing
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -700.0, 700.0)))


def prediction_summary(run: RunDir) -> dict[str, Any]:
    """Counts for the command line: synapses, parts, roots and calls."""
    roots = pd.read_csv(run.roots)
    record = read_json(run.predict_provenance, "prediction record")
    return {"synapses": record["synapses"], "parts": record["parts"], "roots": len(roots), **{c: int((roots["call"] == c).sum()) for c in CALLS}}

