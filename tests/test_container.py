"""Tests for the Apptainer pieces: containers/synhpc.def, containers/build.sh and jobs/container.py.

Usage: python -m pytest tests/test_container.py -p no:cacheprovider

Apptainer itself is not installable here, so the definition is checked through spython and the build script with
a fake `apptainer` on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slurm.container import container_python, lint_definition

REPO = Path(__file__).resolve().parents[1]
DEFINITION = REPO / "containers" / "synhpc.def"
BUILD_SH = REPO / "containers" / "build.sh"

pytest.importorskip("spython")
from spython.main.parse.parsers import SingularityParser  # noqa: E402

BASE = "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"

# A minimal definition that lints clean; each bad case below changes one thing in it.
GOOD = """\
Bootstrap: docker
From: pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

%post
    pip install --no-cache-dir -c requirements/constraints.txt /opt/synhpc

%test
    python -c "import synhpc"

%runscript
    exec synhpc "$@"
"""


def _write(tmp_path: Path, text: str, name: str = "x.def") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _recipe(path: Path = DEFINITION):
    return SingularityParser(str(path)).recipe["spython-base"]


def _labels() -> dict[str, str]:
    return dict(line.split(None, 1) for line in _recipe().labels)


# ---------------------------------------------------------------- the committed definition


def test_committed_definition_lints_clean() -> None:
    assert lint_definition(DEFINITION) == []


def test_committed_definition_structure() -> None:
    recipe = _recipe()
    image = recipe.fromHeader
    assert image.startswith("pytorch/pytorch:2.13.0-cuda") and image.endswith("-cudnn9-runtime")
    assert recipe.test and recipe.cmd == 'exec synhpc "$@"'
    environ = set(recipe.environ)
    assert {"HDF5_USE_FILE_LOCKING=FALSE", "PYTHONUNBUFFERED=1"} <= environ
    # Thread count must come from SLURM at run time, never be hard-coded into the image.
    assert not any(re.fullmatch(r"OMP_NUM_THREADS=\d+", e) for e in environ)
    destinations = {line.split()[1] for line in recipe.files}
    for name in ("pyproject.toml", "requirements", "synhpc", "jobs", "configs"):
        assert f"/opt/synhpc/{name}" in destinations
    installs = [line for line in recipe.install if "pip install" in line and "/opt/synhpc" in line]
    assert installs and all("-c requirements/constraints.txt" in i and "--no-cache-dir" in i for i in installs)


def test_committed_definition_files_exist_in_repo() -> None:
    # A %files source that is missing in a fresh checkout fails the build only on the cluster.
    for line in _recipe().files:
        source = line.split()[0]
        assert (REPO / source).exists(), f"%files source {source} is missing from the repository"


def test_labels_match_the_project_pins() -> None:
    labels = _labels()
    assert labels["name"] == "synhpc"
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (REPO / "synhpc" / "__init__.py").read_text()).group(1)
    assert labels["version"] == version
    torch_pin = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert labels["torch_version"] == torch_pin
    assert labels["base_image"] == _recipe().fromHeader
    assert "--cleanenv" not in DEFINITION.read_text()


# ---------------------------------------------------------------- crafted bad definitions


def test_good_template_is_clean(tmp_path: Path) -> None:
    assert lint_definition(_write(tmp_path, GOOD)) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (BASE, "pytorch/pytorch:latest", "latest"),
        (BASE, "pytorch/pytorch", "no tag"),
        (BASE, "docker.io/pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime", "2.9.0"),
        ("/opt/synhpc\n", "/opt/synhpc\n    pip install torch==2.9.0 torchvision==0.24.0\n", "torch 2.9.0"),
        ("/opt/synhpc\n", "/opt/synhpc\n    pip install 'torch==2.9.0+cu128'\n", "torch 2.9.0"),
        ("/opt/synhpc\n", "/opt/synhpc\n    pip install torchvision==0.24.0\n", "torchvision 0.24.0"),
        ('%test\n    python -c "import synhpc"\n', "", "%test"),
        ('%runscript\n    exec synhpc "$@"\n', "", "%runscript"),
        ('exec synhpc "$@"', 'exec apptainer exec --cleanenv x.sif synhpc "$@"', "--cleanenv"),
        ("/opt/synhpc\n", "/opt/synhpc\n    echo 'export APPTAINER_CLEANENV=1' >> $ENVFILE\n", "cleanenv"),
        ("Bootstrap: docker", "Bootstrap: library", "Bootstrap"),
    ],
    ids=["latest", "no-tag", "torch290-tag", "torch290-pip", "torch290-local", "tv0240", "no-test", "no-runscript",
         "cleanenv", "cleanenv-var", "not-docker"],
)
def test_bad_definition_reports_problem(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    problems = lint_definition(_write(tmp_path, GOOD.replace(old, new)))
    assert problems, "expected at least one problem"
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "image",
    [
        "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime",
        "pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime",
        "nvidia/cuda:12.6.3-base-ubuntu24.04",
        "pytorch/pytorch@sha256:" + "a" * 64,
        "localhost:5000/pytorch:2.13.0",
    ],
)
def test_pinned_images_pass(tmp_path: Path, image: str) -> None:
    text = GOOD.replace(BASE, image)
    assert lint_definition(_write(tmp_path, text)) == []


def test_registry_port_is_not_a_tag(tmp_path: Path) -> None:
    text = GOOD.replace(BASE, "localhost:5000/pytorch")
    assert any("no tag" in p for p in lint_definition(_write(tmp_path, text)))


def test_other_torch_pins_pass(tmp_path: Path) -> None:
    pins = "pip install torch==2.9.1 torch==2.13.0 torchvision==0.24.1"
    text = GOOD.replace("/opt/synhpc\n", f"/opt/synhpc\n    {pins}\n")
    assert lint_definition(_write(tmp_path, text)) == []


def test_cleanenv_in_a_comment_is_allowed(tmp_path: Path) -> None:
    text = GOOD.replace("%post\n", "%post\n    # never pass --cleanenv: it strips SLURM_*\n")
    assert lint_definition(_write(tmp_path, text)) == []


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    text = "Bootstrap: docker\nFrom: ubuntu:latest\n\n%post\n    pip install torch==2.9.0\n"
    problems = " | ".join(lint_definition(_write(tmp_path, text)))
    for expected in ("latest", "torch 2.9.0", "%test", "%runscript"):
        assert expected in problems


def test_missing_definition_is_a_problem_not_an_exit(tmp_path: Path) -> None:
    problems = lint_definition(tmp_path / "nope.def")
    assert len(problems) == 1 and "not found" in problems[0]


def test_lint_cli_exit_status(tmp_path: Path) -> None:
    bad = _write(tmp_path, GOOD.replace("2.13.0-cuda12.6-cudnn9-runtime", "latest"))
    run = subprocess.run([sys.executable, "-m", "slurm.container", str(DEFINITION), str(bad)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "latest" in run.stderr and f"{DEFINITION}: ok" in run.stdout


# ---------------------------------------------------------------- container_python


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("/gscratch/lab/containers/synhpc.sif", ["/gscratch", "/tmp"]), {},
         "apptainer exec --nv --bind /gscratch,/tmp /gscratch/lab/containers/synhpc.sif python"),
        (("/gscratch/lab/synhpc.sif",), {}, "apptainer exec --nv /gscratch/lab/synhpc.sif python"),
        (("/img/synhpc.sif", ()), {"nv": False}, "apptainer exec /img/synhpc.sif python"),
        (("/img/synhpc.sif", ("/gscratch/lab:/data:ro", "/scr:/scratch")), {"python": "python3"},
         "apptainer exec --nv --bind /gscratch/lab:/data:ro,/scr:/scratch /img/synhpc.sif python3"),
        (("/my images/synhpc.sif", ["/g s"]), {"nv": False, "python": "python -X faulthandler"},
         "apptainer exec --bind '/g s' '/my images/synhpc.sif' python -X faulthandler"),
    ],
)
def test_container_python_exact(args: tuple, kwargs: dict, expected: str) -> None:
    command = container_python(*args, **kwargs)
    assert command == expected
    assert "--cleanenv" not in command


@pytest.mark.parametrize(
    ("image", "binds", "python", "named"),
    [
        ("/img/synhpc.img", (), "python", "/img/synhpc.img"),
        ("docker://pytorch/pytorch:2.13.0", (), "python", "docker://pytorch/pytorch:2.13.0"),
        ("/img/synhpc.sif", ["gscratch"], "python", "gscratch"),
        ("/img/synhpc.sif", ["/gscratch,/tmp"], "python", "/gscratch,/tmp"),
        ("/img/synhpc.sif", ["/a/b,c"], "python", "/a/b,c"),
        ("/img/synhpc.sif", ["/gscratch:data"], "python", "data"),
        ("/img/synhpc.sif", ["/gscratch:/data:rx"], "python", "rx"),
        ("/img/synhpc.sif", [""], "python", "''"),
        ("/img/synhpc.sif", "/gscratch", "python", "/gscratch"),
        ("/img/synhpc.sif", (), "", "python"),
    ],
)
def test_container_python_rejects(image: str, binds, python: str, named: str) -> None:
    with pytest.raises(ValueError) as info:
        container_python(image, binds, python=python)
    message = str(info.value)
    assert "\n" not in message and named in message


# ---------------------------------------------------------------- build.sh


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A fake `apptainer` that logs its arguments and, for `build`, writes the image it was asked for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apptainer.log"
    fake = bin_dir / "apptainer"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'if [ "$1" = build ]; then echo fake-sif > "$3"; fi\n'
        'if [ "$1" = inspect ]; then echo "name: synhpc"; fi\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir, log


def _clean_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def test_build_sh_syntax() -> None:
    subprocess.run(["bash", "-n", str(BUILD_SH)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_build_sh_shellcheck() -> None:
    run = subprocess.run(["shellcheck", str(BUILD_SH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_build_sh_help(tmp_path: Path) -> None:
    bin_dir, log = _fake_bin(tmp_path)
    run = subprocess.run(["bash", str(BUILD_SH), "--help"], env=_clean_env(tmp_path, bin_dir),
                         capture_output=True, text=True)
    assert run.returncode == 0 and "Usage" in run.stdout and "salloc" in run.stdout
    assert not log.exists()


def test_build_sh_refuses_login_node(tmp_path: Path) -> None:
    bin_dir, log = _fake_bin(tmp_path)
    run = subprocess.run(["bash", str(BUILD_SH), str(tmp_path / "dest")],
                         env=_clean_env(tmp_path, bin_dir, LAB="mylab"), capture_output=True, text=True)
    assert run.returncode != 0
    assert "salloc" in run.stderr and "login node" in run.stderr
    assert not log.exists(), "build.sh invoked apptainer outside a SLURM job"
    assert not (tmp_path / "dest").exists()


def test_build_sh_needs_a_destination(tmp_path: Path) -> None:
    bin_dir, log = _fake_bin(tmp_path)
    run = subprocess.run(["bash", str(BUILD_SH)], env=_clean_env(tmp_path, bin_dir, SLURM_JOB_ID="1"),
                         capture_output=True, text=True)
    assert run.returncode != 0 and "SYNHPC_IMAGE_DIR" in run.stderr
    assert not log.exists()


def test_build_sh_builds_locally_and_installs(tmp_path: Path) -> None:
    bin_dir, log = _fake_bin(tmp_path)
    build_tmp = tmp_path / "node-local"
    dest = tmp_path / "gscratch" / "containers"
    env = _clean_env(tmp_path, bin_dir, SLURM_JOB_ID="42", SYNHPC_IMAGE_DIR=str(dest),
                     SYNHPC_BUILD_TMP=str(build_tmp), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(BUILD_SH)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    final = dest / "synhpc.sif"
    assert final.read_text() == "fake-sif\n"
    assert run.stdout.strip().splitlines()[-1] == str(final)
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"build --fakeroot {build_tmp}/") and calls[0].endswith(" containers/synhpc.def")
    assert calls[1] == f"inspect --labels {final}"
    # The node-local build folder and any partial copy are gone afterwards.
    assert list(build_tmp.iterdir()) == []
    assert [p.name for p in dest.iterdir()] == ["synhpc.sif"]
