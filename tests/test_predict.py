"""`synhpc predict`: a trained model labels any selection of synapses straight from the imagery, in parts that
reruns skip, with the same logits evaluation gets from the shards, and one call per presynaptic root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synhpc.cli import main
from synhpc.config import load_config
from synhpc.errors import ConfigError, DataError

ENV = os.environ | {"PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def trained(extracted_run, tmp_path_factory) -> tuple[Path, list[str]]:
    """A trained and evaluated copy of the session's run (its model card has tau and a temperature)."""
    from synhpc.evaluation import evaluate
    from synhpc.training import train

    base, args = extracted_run
    root = tmp_path_factory.mktemp("predict")
    shutil.copytree(base, root / "model", ignore=shutil.ignore_patterns("jobs"))
    cfg = load_config("configs/demo.yaml", [*args, f"run.root={root}", "run.name=model", "train.epochs=2", "evaluate.bootstrap=0", "evaluate.splits=[train, val, test]"])
    train(cfg, progress=False)
    evaluate(cfg)
    return root / "model", [*args, f"run.root={root}", "execution.executor=debug", "predict.part_size=64"]


def _predict(args: list[str], name: str, *extra: str):
    from slurm.launch import run_prediction

    cfg = load_config("configs/demo.yaml", [*args, f"run.name={name}", *extra])
    cfg.predict.model = str(Path(cfg.run.root) / "model")
    run_prediction(cfg, progress=False)
    return cfg


def _parts(run: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run / "parts").glob("part-*.parquet"))], ignore_index=True)


def test_predictions_match_evaluation_and_roots_add_up(trained):
    model_dir, args = trained
    cfg = _predict(args, "everything")
    run = cfg.run_dir
    parts = _parts(run)
    assert list(parts.columns) == ["id", "pre_pt_root_id", "post_pt_root_id", "ctr_pt_position_x", "ctr_pt_position_y", "ctr_pt_position_z",
                                   "size", "logit", "probability", "prediction"]  # fmt: skip
    # Every labelled synapse the model was evaluated on gets the logit evaluation got from the shards.
    evaluated = pd.read_csv(model_dir / "predictions.csv", float_precision="round_trip").set_index("synapse_id")
    both = parts.set_index("id").join(evaluated[["logit", "probability"]], rsuffix="_eval", how="inner")
    assert len(both) == len(evaluated)
    np.testing.assert_allclose(both["logit"], both["logit_eval"], rtol=0, atol=1e-5)
    card = json.loads((model_dir / "model.json").read_text())
    temperature, tau = card["decision"]["temperature"], card["decision"]["tau"]
    np.testing.assert_allclose(parts["probability"], 1 / (1 + np.exp(-parts["logit"] / temperature)))
    assert (parts["prediction"] == (1 / (1 + np.exp(-parts["logit"])) >= tau)).all()
    # Per root: n, summed calibrated log-odds, and both probabilities from them.
    roots = pd.read_csv(run / "roots.csv")
    z = (parts["logit"] / temperature).groupby(parts["pre_pt_root_id"])
    np.testing.assert_array_equal(roots["n_synapses"], z.size().loc[roots["pre_root_id"]].to_numpy())
    np.testing.assert_allclose(roots["sum_log_odds"], z.sum().loc[roots["pre_root_id"]].to_numpy())
    prior = card["decision"]["prior_excitatory"]
    lp = np.log(prior / (1 - prior))
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(roots["p_independent"], 1 / (1 + np.exp(-(roots["sum_log_odds"] - (roots["n_synapses"] - 1) * lp))), atol=1e-12)
        np.testing.assert_allclose(roots["p_mean"], 1 / (1 + np.exp(-roots["mean_log_odds"])), atol=1e-12)
    expected_call = np.where(roots["p_independent"] >= 0.95, "excitatory", np.where(roots["p_independent"] <= 0.05, "inhibitory", "undetermined"))
    assert (roots["call"] == expected_call).all()


def test_selections_combine(trained):
    _, args = trained
    everything = _parts(_predict(args, "all-again").run_dir)
    roots = sorted(everything["pre_pt_root_id"].unique())[:3]
    by_root = _parts(_predict(args, "by-root", f"predict.pre_root_ids=[{', '.join(map(str, roots))}]").run_dir)
    assert set(by_root["pre_pt_root_id"]) == set(roots) and len(by_root) == int(everything["pre_pt_root_id"].isin(roots).sum())
    x0, x1 = float(everything["ctr_pt_position_x"].quantile(0.25)), float(everything["ctr_pt_position_x"].quantile(0.75))
    box = _parts(_predict(args, "by-box", f"predict.bbox=[{x0}, 0, 0, {x1}, 1000000, 1000000]").run_dir)
    assert set(box["id"]) == set(everything.loc[(everything["ctr_pt_position_x"] >= x0) & (everything["ctr_pt_position_x"] < x1), "id"])


def test_ids_from_files(trained, tmp_path):
    _, args = trained
    everything = _parts(_predict(args, "all-for-files").run_dir)
    ids = everything["id"].iloc[::7]
    (tmp_path / "ids.txt").write_text("# synapses to label\n" + "\n".join(map(str, ids)) + "\n")
    listed = _parts(_predict(args, "by-ids", f"predict.synapse_ids_file={tmp_path / 'ids.txt'}").run_dir)
    assert sorted(listed["id"]) == sorted(ids)
    pd.DataFrame({"pt_root_id": everything["pre_pt_root_id"].unique()[:2]}).to_csv(tmp_path / "roots.csv", index=False)
    from_table = _parts(_predict(args, "by-root-file", f"predict.pre_root_ids_file={tmp_path / 'roots.csv'}").run_dir)
    assert set(from_table["pre_pt_root_id"]) == set(everything["pre_pt_root_id"].unique()[:2])


# A prediction task that SIGKILLs itself at its n-th write event (a parquet or temp file written, a rename), so every
# kill lands mid-run however loaded the machine is.
KILLED_TASK = """
import os, signal, sys
counted = [0]
kill_at = int(sys.argv[2])
def counted_call(fn):
    def wrapper(*args, **kwargs):
        counted[0] += 1
        if counted[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper
import pyarrow.parquet as pq
pq.write_table = counted_call(pq.write_table)
os.replace = counted_call(os.replace)
from jobs.predict import predict_job
from synhpc.predict import read_plan, part_sizes
from synhpc.rundir import RunDir
run = RunDir(sys.argv[1])
predict_job(sys.argv[1], sorted(part_sizes(read_plan(run))))
"""


def test_killed_anywhere_and_rerun_gives_identical_files(trained):
    from jobs.predict import predict_job, roots_job
    from synhpc.predict import part_sizes, read_plan
    from synhpc.rundir import RunDir

    _, args = trained
    reference = _predict(args, "uninterrupted").run_dir
    cfg = load_config("configs/demo.yaml", [*args, "run.name=killed"])
    cfg.predict.model = str(reference.parent / "model")
    from synhpc.predict import plan_prediction

    plan_prediction(cfg)
    run = RunDir(cfg.run_dir)
    n_parts = len(part_sizes(read_plan(run)))
    assert n_parts >= 3
    env = ENV | {"PYTHONPATH": os.pathsep.join([str(Path.cwd()), ENV.get("PYTHONPATH", "")])}
    for kill_at in (2, 2 * n_parts - 1, 1):  # at the first rename, inside the last part's write, then again once resumed
        proc = subprocess.run([sys.executable, "-c", KILLED_TASK, str(run.path), str(kill_at)], env=env, capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert not [p for p in run.parts.iterdir() if p.name.startswith("part-") and not p.name.endswith(".parquet")]
    predict_job(str(run.path), sorted(part_sizes(read_plan(run))))
    roots_job(str(run.path))
    for part in sorted(part_sizes(read_plan(run))):
        assert run.part(part).read_bytes() == (reference / "parts" / run.part(part).name).read_bytes(), part
    assert run.roots.read_bytes() == (reference / "roots.csv").read_bytes()


@pytest.fixture()
def capsys_cli(capsys):
    def call(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().err

    return call


def _one_line(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_bad_prediction_inputs_are_one_line_errors(trained, tmp_path, capsys_cli):
    model_dir, args = trained
    root = Path(load_config("configs/demo.yaml", args).run.root)
    (tmp_path / "roots.txt").write_text("864691135000000001\nnot-a-root\n")
    cases = [
        (["run.name=bad-file", f"predict.pre_root_ids_file={tmp_path / 'roots.txt'}"], "roots.txt: line 2: 'not-a-root' is not an integer id"),
        (["run.name=empty", "predict.pre_root_ids=[1, 2]"], "the prediction selection is empty"),
        (["run.name=other-shape", "cubes.shape_zyx=[16, 48, 48]"], "takes cubes.shape_zyx [8, 24, 24], this config cuts [16, 48, 48]"),
        (["run.name=other-mip", "imagery.mip=1"], "was trained at imagery.mip 0, this config reads mip 1"),
    ]
    for extra, needle in cases:
        _one_line(*capsys_cli("predict", "-c", "configs/demo.yaml", "--model", str(model_dir), *args, *extra), needle)
        assert not (root / extra[0].split("=")[1]).exists()
    _one_line(*capsys_cli("predict", "-c", "configs/demo.yaml", "--model", str(tmp_path), *args, "run.name=no-card"), "no model card")


def test_a_model_without_threshold_is_refused(trained, tmp_path):
    model_dir, args = trained
    for name in ("model.json", "best.pt"):
        shutil.copy(model_dir / name, tmp_path / name)
    card = json.loads((tmp_path / "model.json").read_text())
    card["decision"]["tau"] = None
    (tmp_path / "model.json").write_text(json.dumps(card))
    cfg = load_config("configs/demo.yaml", [*args, "run.name=untuned"])
    cfg.predict.model = str(tmp_path)
    from synhpc.predict import plan_prediction

    with pytest.raises(DataError, match="no threshold and temperature yet; run `synhpc evaluate`"):
        plan_prediction(cfg)
    cfg.predict.model = ""
    with pytest.raises(ConfigError, match="predict.model: which model"):
        plan_prediction(cfg)


def test_plan_of_a_prediction_run(trained):
    from slurm.plan import format_prediction_plan, make_prediction_plan

    _, args = trained
    cfg = load_config("configs/demo.yaml", [*args, "run.name=planned"])
    plan = make_prediction_plan(cfg, rate_cubes_per_s=100.0)
    selected = _parts(_predict(args, "planned-and-run").run_dir)
    assert plan["synapses"] == len(selected) and plan["parts"] == -(-len(selected) // 64)
    assert plan["task_hours"] == pytest.approx(len(selected) / 100.0 / 3600.0)
    # The worked example of the README: the whole minnie65 synapse table on the hyak profile.
    whole = load_config("configs/microns-dumps.yaml", ["execution.profile=hyak"])
    big = make_prediction_plan(whole, synapses=337_312_429, rate_cubes_per_s=2000.0, max_array_size=1001)
    assert big["parts"] == -(-337_312_429 // whole.predict.part_size) and len(big["arrays"]) == -(-big["parts"] // 1001)
    assert big["gpu_hours"] == pytest.approx(337_312_429 / 2000.0 / 3600.0)
    text = format_prediction_plan(big)
    assert "337,312,429" in text and "GPU-hours" in text and "sbatch --array" in text


@pytest.mark.slurm
def test_prediction_through_submit_matches_a_local_run(slurm_cluster, trained):  # noqa: F811
    import time

    from slurm.profile import load_profile
    from slurm.queue import job_states
    from slurm.submit import submit_prediction

    model_dir, args = trained
    local = _predict(args, "local-reference").run_dir
    cfg = load_config("configs/demo.yaml", [*args, "run.name=submitted", "execution.executor=slurm"])
    cfg.predict.model = str(model_dir)
    jobs = submit_prediction(cfg, load_profile("local"))
    assert list(jobs["stage"]) == ["predict", "roots"] and jobs["dependency"].iloc[1] == f"afterok:{jobs['job_id'].iloc[0]}"
    deadline = time.monotonic() + 240
    # roots.csv appears before its job has left the queue; a resubmission is only "nothing to do" once it has.
    while not ((cfg.run_dir / "roots.csv").is_file() and set(job_states(list(jobs["job_id"])).values()) <= {"COMPLETED"}):
        states = job_states(list(jobs["job_id"]))
        assert not {s for s in states.values() if s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")}, states
        assert time.monotonic() < deadline, states
        time.sleep(1)
    for path in sorted((local / "parts").glob("part-*.parquet")):
        assert (cfg.run_dir / "parts" / path.name).read_bytes() == path.read_bytes()
    assert (cfg.run_dir / "roots.csv").read_bytes() == (local / "roots.csv").read_bytes()
    assert submit_prediction(cfg, load_profile("local")).empty  # everything done: nothing to submit
