import json

from synhpc.bench_train import bench_train
from synhpc.config import load_config


def test_bench_train_writes_rows_per_variant_and_loader(tmp_path):
    cfg = load_config("configs/demo.yaml", ["cubes.shape_zyx=[4, 16, 16]", "model.width=4"])
    frame = bench_train(cfg, tmp_path, models=("small3d",), steps=1, warmup=0)
    train = frame[frame["kind"] == "train"]
    assert list(zip(train["precision"], train["channels_last_3d"])) == [("fp32", False), ("bf16", False), ("bf16", True)]
    assert (train["samples_per_s"] > 0).all() and train["speedup_vs_fp32"].iloc[0] == 1.0
    loader = frame[frame["kind"] == "loader"]
    assert len(loader) == 1 and loader["cubes_per_s_per_worker"].iloc[0] > 0
    saved = json.loads((tmp_path / "bench_train.json").read_text())
    assert saved["machine"]["device"] == "cpu" and len(saved["rows"]) == 4
