"""Apptainer helpers: the command prefix submitit uses as ``slurm_python``, and a linter for our definition file.

Usage::

    from slurm.container import container_python, lint_definition
    executor.update_parameters(slurm_python=container_python("/gscratch/lab/containers/synhpc.sif", ["/gscratch"]))
    problems = lint_definition(Path("containers/synhpc.def"))

From a shell: ``python -m slurm.container containers/synhpc.def`` prints the problems and exits 1 if there are any.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["container_python", "lint_definition"]

# Apptainer's bind spec is src[:dst[:opts]]; these are the options it accepts in the third field.
_BIND_OPTIONS = frozenset({"ro", "rw"})

# torch 2.9.0 disables cuDNN for Conv3d under AMP (~4x slower, more memory). torchvision 0.24.0 requires exactly
# torch 2.9.0, so pinning it drags 2.9.0 in just the same. `(py)?torch` also catches conda's `pytorch=2.9.0`.
_TORCH_290_PIN = re.compile(r"(?<![\w.-])(?:py)?torch\s*(?:===?|~=|=)\s*2\.9(?:\.0)?(?![\d.])", re.IGNORECASE)
_TORCHVISION_0240_PIN = re.compile(r"(?<![\w.-])torchvision\s*(?:===?|~=|=)\s*0\.24(?:\.0)?(?![\d.])", re.IGNORECASE)
_TORCH_290_TAG = re.compile(r"^2\.9\.0(?![\d.])")

# Each of these strips SLURM_* and SUBMITIT_* from the job, so submitit cannot find its task or folder.
_CLEANENV = re.compile(r"--cleanenv\b|\b(?:APPTAINER|SINGULARITY)_CLEANENV\b")

_HEADER = re.compile(r"^\s*([A-Za-z]+)\s*:\s*(.*?)\s*$")


def _check_bind(bind: str) -> str:
    """Return ``bind`` if it is a valid Apptainer bind spec, else raise a one-line ValueError.

    Usage: ``_check_bind("/gscratch/lab:/data:ro")``
    """
    if not isinstance(bind, str) or not bind:
        raise ValueError(f"bind must be a non-empty string, got {bind!r}")
    # Binds are joined with commas on the command line, so a comma would silently split one path into two.
    if "," in bind:
        raise ValueError(f"bind {bind!r} contains a comma; Apptainer would read it as two binds")
    if any(ch in bind for ch in "\n\r\0"):
        raise ValueError(f"bind {bind!r} contains a control character")
    parts = bind.split(":")
    if len(parts) > 3:
        raise ValueError(f"bind {bind!r} has more than src:dst:opts fields")
    src, dst, opts = (parts + [None, None])[:3]
    if not src or not src.startswith("/"):
        raise ValueError(f"bind {bind!r}: source {src!r} must be an absolute path")
    if dst is not None and not dst.startswith("/"):
        raise ValueError(f"bind {bind!r}: destination {dst!r} must be an absolute path")
    if opts is not None and opts not in _BIND_OPTIONS:
        raise ValueError(f"bind {bind!r}: option {opts!r} must be one of {sorted(_BIND_OPTIONS)}")
    return bind


def container_python(image: str, binds: Sequence[str] = (), *, nv: bool = True, python: str = "python") -> str:
    """Build the interpreter command that runs inside the image, for submitit's ``slurm_python``.

    Usage: ``container_python("/gscratch/lab/containers/synhpc.sif", ["/gscratch", "/tmp"])``
    -> ``'apptainer exec --nv --bind /gscratch,/tmp /gscratch/lab/containers/synhpc.sif python'``

    Never adds --cleanenv: it strips SLURM_* and SUBMITIT_*, which the job needs to find its task. Binds may be
    ``src`` or ``src:dst`` (``:ro``/``:rw`` allowed), absolute, without commas; empty binds give no ``--bind``.
    ``python`` may carry arguments (``"python -X faulthandler"``); each word is shell-quoted.
    Raises ValueError (one line, naming the bad value) for a bad image path, bind or interpreter.
    """
    image = str(image)
    if not image.endswith(".sif") or image == ".sif" or any(ch in image for ch in "\n\r\0"):
        raise ValueError(f"image must be a path to a .sif file, got {image!r}")
    # A bare string would be iterated character by character and fail with a confusing message.
    if isinstance(binds, str):
        raise ValueError(f"binds must be a sequence of paths, not the string {binds!r}")
    checked = [_check_bind(b) for b in binds]
    try:
        python_words = shlex.split(python)
    except ValueError as err:
        raise ValueError(f"python {python!r} is not a valid shell word list: {err}") from None
    if not python_words:
        raise ValueError(f"python must name an interpreter, got {python!r}")

    words = ["apptainer", "exec"]
    if nv:
        words.append("--nv")
    if checked:
        words += ["--bind", ",".join(checked)]
    words.append(image)
    words += python_words
    # submitit pastes slurm_python into the sbatch script as shell text, so every word is quoted here.
    return shlex.join(words)


def _header(lines: list[str]) -> dict[str, tuple[int, str]]:
    """Read ``Key: value`` header lines (before the first ``%section``) as {lowercase key: (line number, value)}."""
    found: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("%"):
            break
        if not stripped or stripped.startswith("#"):
            continue
        match = _HEADER.match(line.split("#", 1)[0])
        if match:
            found.setdefault(match.group(1).lower(), (number, match.group(2)))
    return found


def _image_problems(image: str) -> list[str]:
    """Problems with a base image reference: no tag, ``latest``, or a torch 2.9.0 image."""
    problems: list[str] = []
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repo_last, _, tag = last.partition(":")
    if tag == "latest":
        problems.append(f"base image {image!r} uses the 'latest' tag; pin an explicit version")
    elif not tag and not digest:
        problems.append(f"base image {image!r} has no tag; pin an explicit version (never 'latest')")
    if "torch" in repo_last.lower() and _TORCH_290_TAG.match(tag):
        problems.append(
            f"base image {image!r} ships torch 2.9.0, where cuDNN is disabled for Conv3d under AMP; use another version"
        )
    return problems


def lint_definition(path: Path) -> list[str]:
    """Check an Apptainer definition file and return human-readable problems (empty when it is fine).

    Usage: ``assert not lint_definition(Path("containers/synhpc.def"))``

    Checks: the file exists and spython can parse it; ``Bootstrap: docker``; a ``From:`` image with an explicit
    tag other than ``latest``; no torch 2.9.0 (base tag or pip/conda pins, torchvision 0.24.0 included); a
    non-empty ``%test`` and ``%runscript``; no ``--cleanenv`` (or ``*_CLEANENV``) outside comment lines.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: definition file not found"]
    # Imported here so that container_python works in environments without spython (the login-node venv).
    from spython.main.parse.parsers import SingularityParser

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    problems: list[str] = []

    header = _header(lines)
    if "bootstrap" not in header:
        problems.append("missing 'Bootstrap: docker' header")
    elif header["bootstrap"][1].lower() != "docker":
        number, value = header["bootstrap"]
        problems.append(f"line {number}: Bootstrap is {value!r}, expected 'docker'")

    recipe = None
    try:
        recipe = SingularityParser(str(path)).recipe["spython-base"]
    except SystemExit:
        # spython exits the interpreter on a file it cannot find (e.g. removed since the check above).
        problems.append(f"{path}: spython could not open the definition file")
    except NotImplementedError as err:
        if not any("Bootstrap" in p for p in problems):
            problems.append(f"spython rejected the definition: {err}")
    except Exception as err:  # noqa: BLE001 - any parser failure is a problem to report, not a crash
        problems.append(f"spython could not parse the definition: {type(err).__name__}: {err}")

    # The raw header keeps the tag's case; spython lowercases it.
    image = header["from"][1] if "from" in header else (recipe.fromHeader if recipe is not None else None)
    if not image:
        problems.append("missing 'From:' base image")
    else:
        problems += _image_problems(image)

    if recipe is not None:
        for line in recipe.install:
            if line.lstrip().startswith("#"):
                continue
            if _TORCH_290_PIN.search(line):
                problems.append(f"installs torch 2.9.0 (cuDNN disabled for Conv3d under AMP): {line.strip()}")
            elif _TORCHVISION_0240_PIN.search(line):
                problems.append(f"installs torchvision 0.24.0, which requires torch 2.9.0: {line.strip()}")
        if not recipe.test:
            problems.append("missing or empty %test section (Apptainer runs it at build time to catch a broken image)")
        if not recipe.cmd:
            problems.append("missing or empty %runscript section")

    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("#"):
            continue
        if _CLEANENV.search(line):
            problems.append(f"line {number}: --cleanenv strips SLURM_* and SUBMITIT_*; never use it: {line.strip()}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Lint definition files given on the command line; exit status 1 if any has problems.

    Usage: ``python -m slurm.container containers/synhpc.def``
    """
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths or paths[0] in ("-h", "--help"):
        print("usage: python -m slurm.container DEFINITION [DEFINITION ...]", file=sys.stderr)
        return 0 if paths else 2
    status = 0
    for name in paths:
        problems = lint_definition(Path(name))
        for problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
        if problems:
            status = 1
        else:
            print(f"{name}: ok")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
