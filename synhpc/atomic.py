"""Files written whole or not at all: a temporary sibling, then ``os.replace`` (atomic on POSIX and GPFS), so a job
killed mid-write never leaves a half file under the final name.

Usage::

    write_text(run_dir / "provenance.json", json.dumps(info))
    write_csv(summary, run_dir / "summary.csv")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas stays unimported for config-only callers (login-node commands start fast)
    import pandas as pd


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(frame: pd.DataFrame, path: Path, **to_csv: object) -> None:
    """``frame.to_csv(path, index=False, **to_csv)``, atomically."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        frame.to_csv(tmp, index=False, **to_csv)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
