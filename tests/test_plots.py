import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba

from synhpc import plots
from synhpc.calibration import apply_temperature
from synhpc.metrics import sigmoid
from synhpc.neuron_curve import BASE_COLUMNS, accuracy_vs_synapses


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


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions build, kept open for inspection instead of written."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    yield figures
    for fig in figures:
        plots.plt.close(fig)


def test_roc_curve_steps_once_per_distinct_score(captured):
    pred = pd.DataFrame({"split": "test", "label": [1, 0, 1, 0], "probability": [0.9, 0.5, 0.5, 0.1]})
    plots.roc_curve(pred, "unused.png")
    line = captured[0].axes[0].lines[0]
    # Thresholds 0.9, 0.5 (one tie step: one positive and one negative together), 0.1.
    np.testing.assert_allclose(line.get_xdata(), [0, 0, 0.5, 1])
    np.testing.assert_allclose(line.get_ydata(), [0, 0.5, 1, 1])


def test_accuracy_plot_draws_bands_and_marks_low_support(captured):
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(1, 2, 5, 10, 20, 50), n_draws=3, n_boot=50)
    assert curve["low_support"].any() and not curve["low_support"].all()
    plots.accuracy_vs_synapses(curve, "unused.png")
    ax = captured[0].axes[0]
    # Per split: a shaded band (mean logit) and error bars (majority vote).
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    assert len(ax.containers) == 2
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    low_ks = sorted(curve.loc[curve["low_support"] & curve["accuracy_mean_logit"].notna(), "k"].unique())
    assert sorted({int(k) for line in hollow for k in line.get_xdata()}) == low_ks
    filled = [line for line in ax.lines if line.get_marker() in ("o", "s") and line.get_markerfacecolor() != "none"]
    assert all(to_rgba(line.get_markerfacecolor())[3] == 1 for line in filled)
    assert any("< 5 neurons" in t.get_text() for t in ax.get_legend().get_texts())


def test_accuracy_plot_reads_a_curve_without_bands(tmp_path):
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(1, 5, 20), n_draws=2, n_boot=0)[BASE_COLUMNS]
    path = tmp_path / "old.png"
    plots.accuracy_vs_synapses(curve, path)
    assert _png_ok(path)


def test_reliability_diagram(tmp_path, captured):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 2000)
    y = (rng.random(2000) < sigmoid(z / 2)).astype(int)
    plots.reliability_diagram(y, sigmoid(z), sigmoid(apply_temperature(z, 2.0)), "unused.png", temperature=2.0)
    plots.reliability_diagram(y, sigmoid(z), None, "unused.png", strategy="quantile", n_bins=10)
    legend = [t.get_text() for t in captured[0].axes[0].get_legend().get_texts()]
    assert legend[0] == "perfect calibration" and legend[1].startswith("before: ECE 0.") and legend[2].startswith("after (T = 2): ECE 0.")
    assert len(captured[1].axes[0].get_legend().get_texts()) == 2
    diagonal = captured[0].axes[0].lines[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    # Counts underneath, one step curve per probability set.
    assert len(captured[0].axes[1].patches) == 2


def test_reliability_png(tmp_path):
    path = tmp_path / "reliability.png"
    plots.reliability_diagram(np.array([0, 1, 1, 0]), np.array([0.1, 0.6, 0.9, 0.4]), np.array([0.2, 0.6, 0.8, 0.4]), path, temperature=1.3)
    assert _png_ok(path)
