"""A non-editable install (what the Apptainer image gets) carries everything a job needs: the CLI, the batch jobs, the
cluster layer and the shipped cluster profiles and sbatch templates.

The wheel is installed without dependencies into a fresh virtual environment; the test environment's own
site-packages supply torch and the rest through PYTHONPATH (which, unlike a site directory, does not run the
editable install's path hook), and every command runs outside the repository so nothing can come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "logs", "build", "*.egg-info", "__pycache__", ".*cache"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("synhpc-*.whl")
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, env=env, cwd=tmp)
    target = Path(site.stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return tmp, env | {"PYTHONPATH": f"{target}{os.pathsep}{env['PYTHONPATH']}"}


def run(installed, *code_or_args: str) -> subprocess.CompletedProcess:
    tmp, env = installed
    return subprocess.run([str(tmp / "venv" / "bin" / "python"), *code_or_args], capture_output=True, text=True, env=env, cwd=tmp, timeout=120)


def test_cli_help_from_the_wheel(installed):
    proc = run(installed, "-m", "synhpc", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "submit" in proc.stdout and "status" in proc.stdout


def test_profiles_templates_and_jobs_ship_with_the_wheel(installed):
    tmp, _ = installed
    code = (
        "import synhpc, slurm.profile, jobs.train, jobs.extract\n"
        "from pathlib import Path\n"
        "profile = slurm.profile.load_profile('hyak', ['account=mylab'])\n"
        "print(profile.partition, profile.train.gpus_per_node)\n"
        "print(Path(synhpc.__file__).resolve().parent.parent)\n"
        "print(sorted(p.name for p in (Path(slurm.profile.__file__).parent / 'templates').glob('*.sbatch')))\n"
        "print(sorted(slurm.profile.available_profiles()))\n"
    )
    proc = run(installed, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    partition, location, templates, profiles = proc.stdout.strip().splitlines()
    assert partition == "ckpt-all 1"
    assert Path(location) != REPO and str(tmp) in location  # imported from the install, not the checkout
    assert templates == "['evaluate.sbatch', 'extract_array.sbatch', 'train_ddp.sbatch']"
    assert profiles == "['hyak', 'local']"
