import subprocess
import sys

import pytest
import yaml

from synhpc.config import load_config, save_config
from synhpc.errors import ConfigError


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_shipped_configs_load():
    assert load_config("configs/microns.yaml").tables.materialization_version == 1300
    cfg = load_config("configs/demo.yaml")
    assert cfg.run.name == "demo" and cfg.cubes.shape_zyx == [16, 48, 48]
    assert cfg.tables.position_resolution_nm == [4.0, 4.0, 40.0]


def test_overrides_are_typed_yaml_values():
    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "run.name=try", "cubes.shape_zyx=[8, 32, 32]", "train.lr=1e-3"])
    assert cfg.train.epochs == 3 and cfg.run.name == "try" and cfg.cubes.shape_zyx == [8, 32, 32]
    assert cfg.train.lr == pytest.approx(1e-3) and str(cfg.run_dir) == "logs/try"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
        ("augment.enabled=3", "augment.enabled must be true or false"),
        ("train.precision=fp8", "train.precision must be one of fp32, bf16, fp16"),
        ("cubes.shape_zyx=7", "cubes.shape_zyx must be a list"),
        ("train.epochs", "must look like dotted.key=value"),
        ("split.fractions=[0.5, 0.5, 0.5]", "split.fractions must be 3 positive numbers"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/demo.yaml", [override])
    assert message in one_line(exc)


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert one_line(exc) == f"{path}: unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("world:\n  n_synapses: many\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert one_line(exc) == f"{path}: world.n_synapses must be an integer, got 'many'"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "absent.yaml")
    assert one_line(exc) == f"config file not found: {tmp_path / 'absent.yaml'}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "is not valid YAML" in one_line(exc)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 2


def test_cli_reports_config_errors_on_one_line_with_nonzero_exit():
    proc = subprocess.run([sys.executable, "-m", "synhpc", "train", "-c", "configs/demo.yaml", "train.epoch=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "synhpc train: error: override: unknown key 'train.epoch' (did you mean 'train.epochs'?)"
    assert proc.stdout == ""


def test_readme_config_reference_is_current():
    """README's reference is generated from the config classes; a new or renamed key must be regenerated into it
    (`python -m synhpc.config_reference --write README.md`)."""
    from pathlib import Path

    from synhpc.config_reference import readme_section, reference

    assert readme_section(Path("README.md").read_text()) == reference()


def test_readme_names_every_stage_and_every_key_is_documented():
    from pathlib import Path

    from synhpc.cli import STAGES
    from synhpc.config_reference import reference

    readme = Path("README.md").read_text()
    for stage in STAGES:
        assert f"synhpc {stage}" in readme, stage
    undocumented = [line.split("|")[1].strip() for line in reference().splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"config keys without a comment in synhpc/config.py: {undocumented}"
