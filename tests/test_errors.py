"""The error surface: every bad input a user can cause ends as one line naming the file, key or row, a non-zero exit
and nothing half-written, never a traceback.

Each case runs the real command line (``synhpc.cli.main``) against a copy of an extracted run; an exception escaping
``main`` would be a traceback and fails the test. The run folder is compared before and after: a failed command
must not have changed any file in it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import pandas as pd
import pytest

from synhpc.cli import main

ENV = os.environ | {"PYTHONUNBUFFERED": "1"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: equal snapshots mean nothing was written. The checksum
    cache (``cubes/verified.json``) and the trainer lock are left out: neither is an output."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("verified.json", "train.lock"))
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture()
def run(extracted_run, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the session's extracted run (run.root = tmp_path, run.name = base)."""
    base, args = extracted_run
    shutil.copytree(base, tmp_path / "base", ignore=shutil.ignore_patterns("jobs"))
    return tmp_path / "base", [*args, f"run.root={tmp_path}"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


PROGRESS_BAR = re.compile(r"^\w+:\s+\d+%\|")


def assert_one_line(code: int, err: str, *needles: str) -> None:
    """Exit status non-zero and exactly one error line (progress-bar refreshes, which a terminal overwrites, aside)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert code != 0, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ configs

CONFIG_CASES = {
    "unknown key": (["train.epoch=3"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "zero learning rate": (["train.lr=0"], "train.lr must be > 0"),
    "NaN learning rate": (["train.lr=.nan"], "train.lr must be a finite number"),
    "infinite weight decay": (["train.weight_decay=.inf"], "train.weight_decay must be a finite number"),
    "zero batch": (["train.batch_size=0"], "train.batch_size must be >= 1"),
    "zero eval batch": (["evaluate.batch_size=0"], "evaluate.batch_size must be >= 1"),
    "dropout one": (["model.dropout=1.0"], "model.dropout must lie in [0, 1)"),
    "zero width": (["model.width=0"], "model.width must be >= 1"),
    "negative workers": (["train.num_workers=-1"], "train.num_workers must be >= 0"),
    "zero threads": (["train.threads=0"], "train.threads must be >= 1"),
    "smoothing half": (["train.label_smoothing=0.5"], "train.label_smoothing must lie in [0, 0.5)"),
    "probability above one": (["augment.missing_p=1.5"], "augment.missing_p must lie in [0, 1]"),
    "run name leaves the root": (["run.name=.."], "run.name must be a plain folder name inside run.root"),
    "absolute run name": (["run.name=/etc"], "run.name must be a plain folder name inside run.root"),
    "wrong type": (["train.epochs=three"], "train.epochs must be an integer"),
    "bad value yaml": (["train.epochs=[1"], "value is not valid YAML"),
    "unknown model": (["model.name=resnet3000"], "model.name: unknown model 'resnet3000'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values(run, capsys, case):
    folder, args = run
    before = snapshot(folder)
    extra, needle = CONFIG_CASES[case]
    assert_one_line(*cli(capsys, "train", "-c", "configs/demo.yaml", *args, *extra), needle)
    assert snapshot(folder) == before


def test_config_files_that_are_not_configs(tmp_path, capsys):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    assert_one_line(*cli(capsys, "plan", "-c", str(binary)), "latin1.yaml: not UTF-8 text (byte 0xe9")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [\n")
    assert_one_line(*cli(capsys, "plan", "-c", str(broken)), "broken.yaml: line", "is not valid YAML")
    assert_one_line(*cli(capsys, "plan", "-c", str(tmp_path / "absent.yaml")), "config file not found")
    assert_one_line(*cli(capsys, "plan", "-c", str(tmp_path)), "is a folder, not a config file")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert_one_line(*cli(capsys, "plan", "-c", str(listed)), "top level must be a mapping")


# ------------------------------------------------------------------------------------------------ runs and shards


def _index_rebuilt(folder: Path) -> None:
    """What a user who 'fixes' the index by hand gets: checksums of the files as they are now."""
    from jobs.index import index_job

    index_job(str(folder))


def _flip_label(folder: Path) -> None:
    shard = folder / "cubes" / "shard-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["label"][3] = 1 - f["label"][3]


def _flip_label_and_reindex(folder: Path) -> None:
    _flip_label(folder)
    index = json.loads((folder / "cubes" / "index.json").read_text())
    from synhpc.shards import file_sha256

    for entry in index["shards"]:
        path = folder / "cubes" / entry["file"]
        entry["sha256"], entry["bytes"] = file_sha256(path), path.stat().st_size
    (folder / "cubes" / "index.json").write_text(json.dumps(index))


def _truncate_shard(folder: Path) -> None:
    shard = folder / "cubes" / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:2000])


def _corrupt_cube_bytes(folder: Path) -> None:
    shard = folder / "cubes" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _remove_shard(folder: Path) -> None:
    (folder / "cubes" / "shard-00003.h5").unlink()


def _foreign_shard(folder: Path, extracted_args: list[str], tmp: Path) -> None:
    """A shard of another extraction (other split seed) copied over one of ours."""
    from slurm.launch import run_extraction
    from synhpc.config import load_config

    other = load_config("configs/demo.yaml", [*extracted_args, f"run.root={tmp / 'other'}", "split.seed=7", "execution.executor=debug"])
    run_extraction(other, progress=False)
    shutil.copy(other.run_dir / "cubes" / "shard-00000.h5", folder / "cubes" / "shard-00000.h5")


def _damage_index(folder: Path) -> None:
    (folder / "cubes" / "index.json").write_text("{")


def _drop_index(folder: Path) -> None:
    (folder / "cubes" / "index.json").unlink()


SHARD_CASES: dict[str, tuple[Callable[..., None], str]] = {
    "flipped label byte": (_flip_label, "shard-00001.h5: content does not match its sha256 in index.json"),
    "flipped label, index rebuilt by hand": (_flip_label_and_reindex, "shard-00001.h5: row 3 has label"),
    "truncated shard": (_truncate_shard, "shard-00002.h5: 2000 bytes, but index.json recorded"),
    "corrupt cube bytes": (_corrupt_cube_bytes, "shard-00000.h5: content does not match its sha256"),
    "missing shard": (_remove_shard, "shard-00003.h5: shard listed in index.json is missing"),
    "foreign shard": (_foreign_shard, "shard-00000.h5: content does not match its sha256"),
    "damaged index": (_damage_index, "index.json: unreadable shard index"),
    "no index": (_drop_index, "index.json: no shard index; run `synhpc extract` first"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_bad_shards_are_refused_before_use(run, extracted_run, tmp_path, capsys, case, stage):
    folder, args = run
    damage, needle = SHARD_CASES[case]
    damage(*(folder, extracted_run[1], tmp_path) if damage is _foreign_shard else (folder,))
    before = snapshot(folder)
    assert_one_line(*cli(capsys, stage, "-c", "configs/demo.yaml", *args), needle)
    assert snapshot(folder) == before


def test_foreign_shard_with_rebuilt_index_is_refused(run, extracted_run, tmp_path, capsys):
    folder, args = run
    _foreign_shard(folder, extracted_run[1], tmp_path)
    from synhpc.errors import DataError

    with pytest.raises(DataError, match="1 shard\\(s\\) missing, incomplete or from another extraction: shard-00000.h5"):
        _index_rebuilt(folder)


def test_train_refuses_a_config_that_contradicts_the_extraction(run, capsys):
    folder, args = run
    before = snapshot(folder)
    code, err = cli(capsys, "train", "-c", "configs/demo.yaml", *args, "cubes.shape_zyx=[16, 48, 48]")
    assert_one_line(code, err, "was extracted with cubes.shape_zyx = [8, 24, 24], this config has [16, 48, 48]")
    code, err = cli(capsys, "train", "-c", "configs/demo.yaml", *args, "imagery.mip=1")
    assert_one_line(code, err, "was extracted with imagery.mip = 0, this config has 1")
    assert snapshot(folder) == before  # config.yaml in particular is not rewritten


def test_stages_before_their_inputs_exist(tmp_path, capsys, extracted_run):
    _, args = extracted_run
    fresh = [*args, f"run.root={tmp_path}", "run.name=fresh"]
    assert_one_line(*cli(capsys, "train", "-c", "configs/demo.yaml", *fresh), "fresh: no extracted cubes; run `synhpc extract`")
    assert_one_line(*cli(capsys, "evaluate", "-c", "configs/demo.yaml", *fresh), "fresh/cubes/index.json: no shard index")
    assert not (tmp_path / "fresh").exists()


def test_gpu_asked_for_but_unusable(run, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    folder, args = run
    before = snapshot(folder)
    assert_one_line(*cli(capsys, "train", "-c", "configs/demo.yaml", *args, "train.device=cuda"), "train.device is cuda, but torch cannot use CUDA")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert_one_line(*cli(capsys, "train", "-c", "configs/demo.yaml", *args), "this job was given GPUs (SLURM_JOB_GPUS=0), but torch cannot use CUDA")
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------------------------ status and gather


def test_status_of_what_is_not_a_run(tmp_path, capsys):
    assert_one_line(*cli(capsys, "status", str(tmp_path / "nowhere")), "nowhere: no such run folder")
    assert_one_line(*cli(capsys, "status", str(tmp_path)), "not a synhpc run folder (no config.yaml)")


def test_status_with_damaged_records(run, capsys):
    folder, _ = run
    (folder / "jobs.csv").write_text("this,is\nnot,a job record\n")
    assert_one_line(*cli(capsys, "status", str(folder)), "jobs.csv: columns")
    (folder / "jobs.csv").unlink()
    (folder / "progress.json").write_text("[1, 2")
    assert_one_line(*cli(capsys, "status", str(folder)), "progress.json: unreadable training progress record")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("run,model\nx,y\n", "lacks column 'level'"),
        ("\x00\x01\x02 binary", "lacks column 'run'"),
    ],
    ids=["missing columns", "garbage"],
)
def test_gather_names_a_malformed_summary(tmp_path, capsys, text, needle):
    from synhpc.gather import SUMMARY_COLUMNS

    good = tmp_path / "good"
    good.mkdir()
    pd.DataFrame([dict.fromkeys(SUMMARY_COLUMNS, 1)]).to_csv(good / "summary.csv", index=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.csv").write_text(text)
    assert_one_line(*cli(capsys, "gather", f"run.root={tmp_path}"), "bad/summary.csv", needle)
    assert not (tmp_path / "summary.csv").exists()
    extra = pd.DataFrame([dict.fromkeys([*SUMMARY_COLUMNS, "surprise"], 1)])
    extra.to_csv(bad / "summary.csv", index=False)
    assert_one_line(*cli(capsys, "gather", f"run.root={tmp_path}"), "bad/summary.csv: has unexpected column 'surprise'")


# ------------------------------------------------------------------------------------------------ disks


def test_read_only_run_folder(run, capsys, monkeypatch):
    """A read-only file system (EROFS): one line naming the file, nothing renamed into place."""
    import synhpc.atomic

    folder, args = run
    before = snapshot(folder)

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(synhpc.atomic.os, "replace", refuse)
    code, err = cli(capsys, "train", "-c", "configs/demo.yaml", *args)
    assert_one_line(code, err, "Read-only file system (read-only file system; point run.root at a writable folder)")
    monkeypatch.undo()
    assert snapshot(folder) == before  # in particular no temp file is left behind


def test_full_disk_during_training(run):
    """Files may not grow past 64 KiB (RLIMIT_FSIZE, as a full disk): the first checkpoint cannot be written. One line,
    exit 2, and no checkpoint, best.pt or temp file is left behind."""
    folder, args = run

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "synhpc", "train", "-c", "configs/demo.yaml", *args, "train.checkpoint_every=1", "model.width=16"],
        capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "ckpt-00000001.pt" in lines[0] and ("File too large" in lines[0] or "disk is full" in lines[0]), lines[0]
    assert not list((folder / "checkpoints").glob("*")) if (folder / "checkpoints").exists() else True
    assert not (folder / "best.pt").exists()


# ------------------------------------------------------------------------------------------------ one trainer per run


def test_second_trainer_is_refused_and_a_dead_holder_does_not_block(run, capsys):
    folder, args = run
    from synhpc.rundir import RunDir

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from synhpc.rundir import RunDir\n"
         f"with RunDir({str(folder)!r}).train_lock():\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(capsys, "train", "-c", "configs/demo.yaml", *args)
        assert_one_line(code, err, "train.lock: another trainer is running on this run folder (host=", f"pid={holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file is still there; its lock died with it.
    assert (folder / "train.lock").is_file()
    with RunDir(folder).train_lock():
        pass


def test_one_line_from_a_failed_extraction_task(extracted_run, tmp_path, capsys):
    """A task that fails (here: the imagery vanished after planning) reports its own cause, then the log path."""
    _, args = extracted_run
    world = Path(next(a.split("=", 1)[1] for a in args if a.startswith("imagery.url=")).removeprefix("file://"))
    em = tmp_path / "em"
    shutil.copytree(world, em)
    run_args = [*args, f"run.root={tmp_path}", "run.name=vanish", f"imagery.url=file://{em}", "imagery.fill_missing=false"]
    assert main(["prepare", "-c", "configs/demo.yaml", *run_args]) == 0
    for chunk in em.glob("8_8_40/*"):
        chunk.unlink()
    capsys.readouterr()
    code, err = cli(capsys, "extract", "-c", "configs/demo.yaml", *run_args, "execution.executor=local")
    assert_one_line(code, err, "shard-0000", "missing", "log:")
    assert not list((tmp_path / "vanish" / "cubes").glob("shard-*.h5"))
