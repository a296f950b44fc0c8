"""Cube datasets over a run's HDF5 shards, verified against the run's index and manifest before first use.

Shards are opened lazily inside each process (never before a DataLoader forks), because an h5py handle shared
across fork is unsafe.

Usage::

    data = ShardSet(RunDir("logs/demo"))          # checks checksums, digest, ids, labels and splits
    train = CubeDataset(data, data.indices(SPLITS["train"]))
    cube, label, i = train[0]      # uint8 tensor (1, Z, Y, X), float label, global row
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from synhpc.errors import DataError
from synhpc.rundir import RunDir
from synhpc.shards import open_shard, read_index, verified_rows
from synhpc.splits import SPLITS


class ShardSet:
    """All indexed shards of a run: per-row metadata in memory (verified), cubes read on demand."""

    def __init__(self, run: RunDir):
        self.run = RunDir(run)
        self.files = [self.run.cubes / entry["file"] for entry in read_index(self.run)["shards"]]
        self.rows = verified_rows(self.run)
        self._handles: dict[int, h5py.File] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows["label"])

    def indices(self, split: int) -> np.ndarray:
        found = np.flatnonzero(self.rows["split"] == split)
        if len(found) == 0:
            name = [k for k, v in SPLITS.items() if v == split][0]
            raise DataError(f"{self.run.cubes}: the {name} split is empty")
        return found

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Synapses and presynaptic neurons per split and class: what a model card records of its data."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for name, code in SPLITS.items():
            out[name] = {}
            for value, cls in ((1, "excitatory"), (0, "inhibitory")):
                mask = (self.rows["split"] == code) & (self.rows["label"] == value)
                out[name][cls] = {"synapses": int(mask.sum()), "neurons": int(len(np.unique(self.rows["pre_root_id"][mask])))}
        return out

    def cube(self, i: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        shard = int(self.rows["shard"][i])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open_shard(self.files[shard])
        try:
            return handle["cube"][int(self.rows["row"][i])]
        except OSError as exc:  # a failed Fletcher-32 check or a damaged chunk
            raise DataError(f"{self.files[shard]}: row {int(self.rows['row'][i])} unreadable ({str(exc).splitlines()[0]})") from None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, -1
        return state


class CubeDataset(Dataset):
    def __init__(self, data: ShardSet, indices: np.ndarray):
        self.data, self.indices = data, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = int(self.indices[k])
        cube = torch.from_numpy(self.data.cube(i))[None]
        return cube, torch.tensor(float(self.data.rows["label"][i])), i
