import numpy as np
import pandas as pd

from synhpc import plots
from synhpc.neuron_curve import accuracy_vs_synapses


def _pred(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("val", "test"):
        for root in range(12):
            label = root % 2
            n = int(rng.integers(1, 30))
            logits = rng.normal(1.0 if label else -1.0, 1.5, n)
            rows += [(split, f"{split}{root}", label, x) for x in logits]
    pred = pd.DataFrame(rows, columns=["split", "pre_root_id", "label", "logit"])
    pred["probability"] = 1 / (1 + np.exp(-pred["logit"]))
    return pred


def _png_ok(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_curve_png(tmp_path):
    path = tmp_path / "roc.png"
    plots.roc_curve(_pred(), path)
    assert _png_ok(path)
    assert not list(tmp_path.glob(".*tmp*"))


def test_accuracy_vs_synapses_png(tmp_path):
    path = tmp_path / "neuron_accuracy.png"
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(1, 2, 5, 10, 20, 50), n_draws=3)
    plots.accuracy_vs_synapses(curve, path)
    assert _png_ok(path)


def test_roc_points_hand_case():
    fpr, tpr = plots._roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.5, 0.5, 0.1]))
    # Thresholds 0.9, 0.5 (one tie step: one positive and one negative together), 0.1.
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
