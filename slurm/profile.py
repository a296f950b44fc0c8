"""Cluster profiles: where and with what resources each pipeline stage runs on SLURM.

A profile is YAML data (``slurm/profiles/<name>.yaml``) read into the typed :class:`Profile`; it can be overridden
with ``dotted.key=value`` exactly like the run config, and an unknown key is a one-line :class:`ConfigError` that
names it.

Usage::

    profile = load_profile("hyak", ["account=mylab", "train.gpus_per_node=2"])
    check_submittable(profile)           # account set, no <placeholder> left in a path
    executor = submitit.AutoExecutor(folder, cluster="slurm", **executor_options(profile, "train"))
    executor.update_parameters(**stage_parameters(profile, "train", dependency="afterok:123"))
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from synhpc.config import from_dict, parse_override, set_dotted
from synhpc.errors import ConfigError
from synhpc.rundir import JOB_STAGES, RunDir

# Shipped inside the package (package data), so `--profile hyak` works from a non-editable install too.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
# `<lab>`-style markers in the shipped hyak.yaml: a value that still holds one was never set by the user.
_PLACEHOLDER = re.compile(r"<[A-Za-z_][A-Za-z0-9_-]*>")


@dataclass
class StageResources:
    """What one stage's job asks SLURM for. ``partition`` empty = the profile's partition."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 1.0
    time_min: int = 60
    array_parallelism: int = 16
    partition: str = ""
    setup: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    """Shared-storage locations. Empty = keep the run config's ``run.root`` / use ``<run>/jobs`` / no cache env."""

    run_root: str = ""
    jobs: str = ""
    cache: str = ""


@dataclass
class ContainerConfig:
    image: str = ""
    binds: list[str] = field(default_factory=list)
    nv: bool = True


@dataclass
class Profile:
    name: str = "local"
    partition: str = "debug"
    account: str = ""
    account_required: bool = False
    qos: str = ""
    requeue: bool = True
    # The signal submitit treats as "checkpoint and requeue" (SUBMITIT_PREEMPT_SIGNAL); SLURM sends it
    # signal_delay_s before the time limit. TERM also makes submitit requeue on a preemption's SIGTERM.
    preempt_signal: Literal["USR2", "USR1", "TERM"] = "USR2"
    signal_delay_s: int = 120
    max_timeouts: int = 3
    # Lines run in every job's batch script before srun (module loads, exports); env entries are KEY=VALUE.
    setup: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    paths: PathsConfig = field(default_factory=PathsConfig)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    extract: StageResources = field(default_factory=StageResources)
    index: StageResources = field(default_factory=StageResources)
    train: StageResources = field(default_factory=StageResources)
    evaluate: StageResources = field(default_factory=StageResources)
    gather: StageResources = field(default_factory=StageResources)
    predict: StageResources = field(default_factory=StageResources)
    roots: StageResources = field(default_factory=StageResources)
    pretrain: StageResources = field(default_factory=StageResources)

    def stage(self, name: str) -> StageResources:
        if name not in JOB_STAGES:
            raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(JOB_STAGES)})")
        return getattr(self, name)


def profile_path(name: str) -> Path:
    """``local`` -> slurm/profiles/local.yaml; a value with a slash or .yaml suffix is a path."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name)
    return PROFILE_DIR / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read profile ``name`` (or a YAML path), apply ``dotted.key=value`` overrides and validate.

    Usage: ``load_profile("hyak", ["account=mylab"])``
    """
    path = profile_path(name)
    if not path.is_file():
        raise ConfigError(f"profile '{name}' not found ({path}); available: {', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    source = f"profile {path.name}"
    profile = from_dict(Profile, data, "", source)
    if overrides:
        import dataclasses

        merged = dataclasses.asdict(profile)
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(merged, key, value)
        profile = from_dict(Profile, merged, "", f"profile {path.name} override")
    _validate(profile)
    return profile


def _validate(profile: Profile) -> None:
    for stage in JOB_STAGES:
        res = profile.stage(stage)
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(res, key) < 1:
                raise ConfigError(f"profile {profile.name}: {stage}.{key} must be >= 1")
        if res.gpus_per_node < 0 or res.mem_gb <= 0:
            raise ConfigError(f"profile {profile.name}: {stage}.gpus_per_node must be >= 0 and {stage}.mem_gb > 0")
        # submitit counts every USR2 as a timeout when the limit is <= 10 min, which exhausts requeues.
        if profile.requeue and res.time_min <= 10:
            raise ConfigError(f"profile {profile.name}: {stage}.time_min must be > 10 (submitit treats every signal as a timeout below that)")
    for entry in profile.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", entry):
            raise ConfigError(f"profile {profile.name}: env entry '{entry}' must look like KEY=VALUE")


def _placeholders(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose string value still holds a ``<placeholder>``."""
    import dataclasses

    found: list[str] = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            found += _placeholders(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _placeholders(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(obj, str) and _PLACEHOLDER.search(obj):
        found.append(prefix[:-1])
    return found


def check_submittable(profile: Profile) -> None:
    """Raise a one-line ConfigError when the profile cannot be used to submit yet.

    Usage: ``check_submittable(load_profile("hyak"))`` -> ConfigError: profile hyak: account is not set ...
    """
    if profile.account_required and not profile.account.strip():
        raise ConfigError(
            f"profile {profile.name}: account is not set; pass profile.account=<your account> (see `hyakalloc`) "
            f"or edit {profile_path(profile.name)}"
        )
    left = _placeholders(profile)
    if left:
        raise ConfigError(f"profile {profile.name}: set {', '.join(left)} (still holds a <placeholder>)")


def job_env(profile: Profile) -> dict[str, str]:
    """Environment every job gets: the profile's env entries, cache folders and the preemption signal."""
    env: dict[str, str] = {}
    if profile.paths.cache:
        cache = profile.paths.cache
        # Every tool that caches downloads: torch hub weights, cloud-volume chunks, matplotlib, pip, XDG users.
        env |= {
            "XDG_CACHE_HOME": cache,
            "TORCH_HOME": f"{cache}/torch",
            "CLOUD_VOLUME_CACHE_DIR": f"{cache}/cloudvolume",
            "MPLCONFIGDIR": f"{cache}/matplotlib",
        }
    if profile.preempt_signal != "USR2":
        env["SUBMITIT_PREEMPT_SIGNAL"] = profile.preempt_signal
    for entry in profile.env:
        key, _, value = entry.partition("=")
        env[key] = value
    return env


def stage_parameters(profile: Profile, stage: str, *, dependency: str = "", name: str = "") -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for ``stage`` (AutoExecutor names; sbatch extras under
    ``slurm_additional_parameters``).

    Usage: ``executor.update_parameters(**stage_parameters(profile, "train", dependency="afterok:12"))``
    """
    res = profile.stage(stage)
    params: dict[str, Any] = {
        "name": name or f"synhpc-{stage}",
        "timeout_min": res.time_min,
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb,
        "slurm_partition": res.partition or profile.partition,
        "slurm_array_parallelism": res.array_parallelism,
        "slurm_signal_delay_s": profile.signal_delay_s,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if profile.account:
        params["slurm_account"] = profile.account
    if profile.qos:
        params["slurm_qos"] = profile.qos
    extra: dict[str, Any] = {}
    if profile.requeue:
        extra["requeue"] = True
    if profile.preempt_signal != "USR2":
        # submitit writes --signal from SUBMITIT_PREEMPT_SIGNAL as read when *this* process imported it.
        extra["signal"] = f"{profile.preempt_signal}@{profile.signal_delay_s}"
    if dependency:
        extra["dependency"] = dependency
    if extra:
        params["slurm_additional_parameters"] = extra
    setup = [f"export {k}={shlex.quote(v)}" for k, v in job_env(profile).items()]
    if profile.paths.cache:
        setup.append(f"mkdir -p {shlex.quote(profile.paths.cache)}")
    setup += [*profile.setup, *res.setup]
    if setup:
        params["slurm_setup"] = setup
    return params


def executor_options(profile: Profile, stage: str) -> dict[str, Any]:
    """AutoExecutor constructor keywords (not update_parameters ones): the interpreter and the requeue budget.

    Usage: ``submitit.AutoExecutor(folder, cluster="slurm", **executor_options(profile, "train"))``
    """
    options: dict[str, Any] = {"slurm_max_num_timeout": profile.max_timeouts}
    if profile.container.image:
        from slurm.container import container_python

        # --nv only where the stage has GPUs: it warns (and on some nodes fails) without a driver.
        nv = profile.container.nv and profile.stage(stage).gpus_per_node > 0
        options["slurm_python"] = container_python(profile.container.image, profile.container.binds, nv=nv)
    return options


def job_folder(profile: Profile, run_dir: Path, stage: str) -> Path:
    """Where submitit keeps a stage's pickles and logs: on shared storage, so compute nodes see it."""
    if profile.paths.jobs:
        return Path(os.path.expandvars(profile.paths.jobs)) / run_dir.name / stage
    return RunDir(run_dir).job_folder(stage)
