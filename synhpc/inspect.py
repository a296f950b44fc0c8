"""Look at what the model does: the test roots it is least sure about and the test synapses it gets most confidently
wrong, as Neuroglancer states (imagery + point annotations), clickable links and galleries of centre sections.

Usage::

    write_inspection(cfg, run, data, pred, tau)   # <run>/inspect/{uncertain_roots,confident_errors}.{csv,json,png}, links.txt

Points are placed at the cube centres, in voxels of the imagery mip the model reads, so the state opens on exactly
the cube the model saw.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_csv, write_text
from synhpc.config import Config
from synhpc.rundir import RunDir


def uncertain_roots(pred: pd.DataFrame, tau: float, n: int) -> pd.DataFrame:
    """The ``n`` test roots whose mean synapse probability lies closest to ``tau``, with their synapses."""
    test = pred[pred["split"] == "test"]
    roots = test.groupby("pre_root_id").agg(label=("label", "first"), probability=("probability", "mean"), n_synapses=("probability", "size"))
    roots["distance"] = (roots["probability"] - tau).abs()
    chosen = roots.sort_values(["distance", "n_synapses"], ascending=[True, False]).head(n)
    return test[test["pre_root_id"].isin(chosen.index)].merge(chosen[["distance"]], left_on="pre_root_id", right_index=True).sort_values(["distance", "synapse_id"])


def confident_errors(pred: pd.DataFrame, tau: float, n: int) -> pd.DataFrame:
    """The ``n`` wrongly called test synapses whose probability lies furthest from ``tau``."""
    test = pred[pred["split"] == "test"]
    wrong = test[(test["probability"] >= tau).astype(int) != test["label"]].copy()
    wrong["distance"] = (wrong["probability"] - tau).abs()
    return wrong.sort_values(["distance", "synapse_id"], ascending=[False, True]).head(n)


def neuroglancer_state(cfg: Config, resolution_nm: list[float], rows: pd.DataFrame, centers: np.ndarray, name: str) -> dict[str, Any]:
    """A Neuroglancer state: the EM layer and one point annotation per row, described by id, label and probability."""
    dims = {axis: [float(r) * 1e-9, "m"] for axis, r in zip("xyz", resolution_nm)}
    # Neuroglancer opens http(s)/gs sources; a local file:// volume shows the annotations only (serve it to see EM).
    source = cfg.imagery.url if cfg.imagery.url.startswith("precomputed://") else f"precomputed://{cfg.imagery.url}"
    names = {1: "excitatory", 0: "inhibitory"}
    annotations = [
        {
            "type": "point",
            "id": str(int(row.synapse_id)),
            "point": [float(v) for v in center],
            "description": f"synapse {int(row.synapse_id)} of root {int(row.pre_root_id)}: {names[int(row.label)]}, P(excitatory) {row.probability:.3f}",
        }
        for row, center in zip(rows.itertuples(), centers)
    ]
    return {
        "dimensions": dims,
        "position": [float(v) for v in centers[0]] if len(centers) else [0.0, 0.0, 0.0],
        "crossSectionScale": 1.0,
        "layout": "xy",
        "layers": [
            {"type": "image", "name": "em", "source": {"url": source, "subsources": {"default": True}}, "tab": "source"},
            {"type": "annotation", "name": name, "source": {"url": "local://annotations"}, "annotations": annotations, "tab": "annotations"},
        ],
        "selectedLayer": {"layer": name, "visible": True},
    }


def neuroglancer_link(viewer: str, state: dict[str, Any]) -> str:
    return f"{viewer.rstrip('/')}/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")


def write_inspection(cfg: Config, run: RunDir, data, pred: pd.DataFrame, tau: float) -> None:
    """The inspection outputs of one evaluated run; nothing when ``evaluate.inspect`` is 0 or test has no errors."""
    n = cfg.evaluate.inspect
    if n <= 0:
        return
    from synhpc import plots

    run.inspect.mkdir(parents=True, exist_ok=True)
    row_of = {int(s): i for i, s in enumerate(data.rows["synapse_id"])}
    resolution = _resolution(run)
    links = []
    for name, rows in (("uncertain_roots", uncertain_roots(pred, tau, n)), ("confident_errors", confident_errors(pred, tau, n))):
        index = np.array([row_of[int(s)] for s in rows["synapse_id"]], dtype=np.int64)
        centers = data.rows["center_vx"][index] if len(index) else np.zeros((0, 3), dtype=np.int64)
        table = rows.assign(center_x=centers[:, 0], center_y=centers[:, 1], center_z=centers[:, 2]) if len(rows) else rows
        write_csv(table.drop(columns=["distance"], errors="ignore"), run.inspect / f"{name}.csv")
        state = neuroglancer_state(cfg, resolution, rows, centers, name)
        write_text(run.inspect / f"{name}.json", json.dumps(state, indent=1))
        links.append(f"{name}: {neuroglancer_link(cfg.evaluate.neuroglancer, state)}")
        # One tile per synapse (a root's first few): the centre section the cube is cut around.
        tiles = rows.groupby("pre_root_id").head(3) if name == "uncertain_roots" else rows
        keep = np.array([row_of[int(s)] for s in tiles["synapse_id"]], dtype=np.int64)
        cubes = [data.cube(int(i)) for i in keep]
        sections = [cube[cube.shape[0] // 2] for cube in cubes]
        titles = [f"{int(r.synapse_id)}\n{'E' if r.label else 'I'} p={r.probability:.2f}" for r in tiles.itertuples()]
        plots.section_gallery(sections, titles, run.inspect / f"{name}.png", title=name.replace("_", " "))
    write_text(run.inspect / "links.txt", "\n".join(links) + "\n")


def _resolution(run: RunDir) -> list[float]:
    from synhpc.manifest import read_provenance

    return [float(v) for v in read_provenance(run).get("volume", {}).get("resolution_nm", [1.0, 1.0, 1.0])]
