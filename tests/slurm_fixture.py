"""The `slurm_cluster` pytest fixture: a SLURM cluster for tests marked ``@pytest.mark.slurm``.

Import it from ``tests/conftest.py`` (``from slurm_fixture import slurm_cluster  # noqa: F401``).

Which cluster the session gets:

1. ``sbatch`` is on PATH and ``sinfo`` answers: the cluster that is already running (e.g. after ``make slurm-up`` or
   ``bash slurm/cluster.sh up``, or a real one). It is left alone at the end.
2. Otherwise, when ``CI=true``: ``bash slurm/cluster.sh up`` (installs the Debian packages when they are missing; needs
   root). The fixture takes that cluster down again at the end of the session, because it started it, unless
   ``SYNHPC_SLURM_KEEP=1``. If it cannot be started the tests *fail* (CI should not silently skip them).
3. Otherwise the tests are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "cluster.sh"
UP_TIMEOUT_S = 900  # includes apt-get install on a bare CI machine


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


MARKER = "synhpc-slurm-cluster"  # first line of the slurm.conf that slurm/cluster.sh renders


def _local_controller_down() -> bool:
    """True when the config in use is slurm/cluster.sh's and its slurmctld is not running.

    Saves the ~9 s `sinfo` spends retrying a controller that is not there."""
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    try:
        text = conf.read_text()
    except OSError:
        return False
    m = re.search(r"^SlurmctldPidFile=(\S+)", text, re.MULTILINE)
    if MARKER not in text or not m:
        return False
    try:
        pid = int(Path(m.group(1)).read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return True
    comm, _, rest = stat.partition(") ")
    return not comm.endswith("(slurmctld") or rest[:1] in ("Z", "X")


def sinfo_answers(timeout: float = 20) -> bool:
    """True when `sbatch` is on PATH and `sinfo` reaches a controller."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    if _local_controller_down():
        return False
    try:
        return _run(["sinfo", "-h"], timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def scontrol_config() -> dict[str, str]:
    """`scontrol show config` as a dict (keys as SLURM prints them, e.g. "MaxArraySize")."""
    proc = _run(["scontrol", "show", "config"])
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol show config failed: {proc.stderr.strip()}")
    config: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+)\s+=\s?(.*)$", line)
        if m:
            config.setdefault(m.group(1), m.group(2).strip())
    return config


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it; submitit does not split larger arrays)."""
    return int(scontrol_config()["MaxArraySize"])


@dataclass(frozen=True)
class SlurmCluster:
    repo_root: Path
    started_by_fixture: bool
    partition: str = "debug"

    def max_array_size(self) -> int:
        return max_array_size()

    def config(self) -> dict[str, str]:
        return scontrol_config()

    def sacct_states(self, job_id: str) -> dict[str, str]:
        """{JobID: State} of a job (or of every task of an array job), allocations only (`sacct -X`)."""
        proc = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State"])
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid.strip()] = state.strip().split()[0] if state.strip() else ""
        return states


def _cluster_script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if sinfo_answers():
        yield SlurmCluster(repo_root=REPO_ROOT, started_by_fixture=False)
        return
    if os.environ.get("CI", "").lower() != "true":
        if shutil.which("sbatch") is None:
            pytest.skip("SLURM not available: sbatch not found (run `make slurm-up` or set CI=true)")
        pytest.skip("SLURM not available: sinfo does not answer (run `make slurm-up` or set CI=true)")

    proc = _cluster_script("up")
    if proc.returncode != 0 or not sinfo_answers():
        pytest.fail(
            f"CI=true but `bash slurm/cluster.sh up` failed (rc {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    try:
        yield SlurmCluster(repo_root=REPO_ROOT, started_by_fixture=True)
    finally:
        if os.environ.get("SYNHPC_SLURM_KEEP", "") not in ("1", "true", "yes"):
            _cluster_script("down")
