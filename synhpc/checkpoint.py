"""Atomic checkpoints and resume-from-newest-valid.

A checkpoint is written to a temporary file, fsynced and renamed, so a kill at any instant leaves either the old
or the new file, never half of one. Loading walks from newest to oldest and skips files that do not load.

Usage::

    save_checkpoint(ckpt_dir, step, state)           # ckpt-00000120.pt, keeps the newest `keep`
    state, path = load_latest(ckpt_dir)              # (None, None) when there is nothing to resume
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp sibling, fsync, rename; a failed write (full disk, quota) leaves the old file and
    raises OSError naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            try:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            except RuntimeError as exc:  # torch's writer reports a failed write (ENOSPC, EFBIG) as RuntimeError
                raise OSError(errno.ENOSPC, f"writing failed ({str(exc).splitlines()[0][:80]})", str(path)) from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    path = ckpt_dir / f"ckpt-{step:08d}.pt"
    atomic_save(state, path)
    for old in checkpoints(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest checkpoint that loads; a corrupt one is reported and the previous one used."""
    for path in checkpoints(ckpt_dir):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as exc:  # truncated or foreign file: fall back to an older checkpoint
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc.__class__.__name__)
    return None, None
