"""Cube datasets over HDF5 shards.

Shards are opened lazily inside each process (never before a DataLoader forks), because an h5py handle shared
across fork is unsafe.

Usage::

    data = ShardSet(run_dir / "cubes")
    train = CubeDataset(data, data.indices(split=0))
    cube, label, i = train[0]      # uint8 tensor (1, Z, Y, X), float label, global row
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from synhpc.errors import DataError
from synhpc.shards import read_index, read_rows

SPLITS = {"train": 0, "val": 1, "test": 2}


class ShardSet:
    """All indexed shards of a run: per-row metadata in memory, cubes read on demand."""

    def __init__(self, cubes_dir: Path):
        self.cubes_dir = Path(cubes_dir)
        self.files = [self.cubes_dir / entry["file"] for entry in read_index(self.cubes_dir)["shards"]]
        self.rows = read_rows(self.cubes_dir)
        self._handles: dict[int, h5py.File] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows["label"])

    def indices(self, split: int) -> np.ndarray:
        found = np.flatnonzero(self.rows["split"] == split)
        if len(found) == 0:
            name = [k for k, v in SPLITS.items() if v == split][0]
            raise DataError(f"{self.cubes_dir}: the {name} split is empty")
        return found

    def cube(self, i: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        shard = int(self.rows["shard"][i])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = h5py.File(self.files[shard], "r")
        return handle["cube"][int(self.rows["row"][i])]

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
