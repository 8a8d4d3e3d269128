"""Tests for the privacy report's figures: valid PNGs, edge cases, input errors, no pyplot state."""

import sys

import numpy as np
import pytest
from PIL import Image

from fedjax_med.reporting import plots

POINTS = [
    {"name": "eps=1", "epsilon": 1.0, "value": 0.70, "group": "DP-SGD"},
    {"name": "eps=8", "epsilon": 8.0, "value": 0.80, "group": "DP-SGD"},
    {"name": "eps=2", "epsilon": 2.0, "value": 0.65, "group": "DP-FedAvg"},
    {"name": "SGD", "epsilon": None, "value": 0.86, "group": "DP-SGD"},
]
CURVE = {"name": "LiRA", "fpr": [0.0, 0.0, 0.01, 0.3, 1.0], "tpr": [0.0, 0.1, 0.2, 0.6, 1.0]}
AUDIT_ROWS = [
    {"name": "sigma=1", "accountant_epsilon": 4.2, "audit_epsilon": 1.3},
    {"name": "no noise", "accountant_epsilon": float("inf"), "audit_epsilon": 6.0},
    {"name": "broken", "accountant_epsilon": 1.0, "audit_epsilon": 2.5},
]


def _gallery_rows():
    rng = np.random.default_rng(0)
    gray = rng.uniform(size=(3, 8, 8, 1))
    rgb = rng.uniform(-0.5, 1.5, size=(1, 8, 8, 3))  # out of range: must be clipped, not fail
    return [
        {"name": "FedAvg", "originals": gray, "reconstructions": gray[::-1], "psnr": 12.5},
        {"name": "DP-FedAvg", "originals": gray[:2], "reconstructions": None, "psnr": None},
        {"name": "RGB", "originals": rgb, "reconstructions": rgb, "psnr": float("inf")},
    ]


def _assert_png(path, out):
    assert out == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200


def test_utility_vs_epsilon(tmp_path):
    path = tmp_path / "utility.png"
    _assert_png(path, plots.utility_vs_epsilon(path, POINTS, metric="AUROC", chance=0.5))


def test_utility_vs_epsilon_without_private_points(tmp_path):
    points = [p for p in POINTS if p["epsilon"] is None]
    points.append({"name": "no noise", "epsilon": float("inf"), "value": 0.9, "group": "x"})
    path = tmp_path / "sub" / "utility.png"  # missing folders are created
    _assert_png(path, plots.utility_vs_epsilon(path, points))


def test_roc_curves_with_zero_rates(tmp_path):
    curves = [
        {**CURVE, "auc": 0.73},
        {"name": "chance", "fpr": np.array([0.0, 1.0]), "tpr": np.array([0.0, 1.0]), "auc": None},
    ]
    path = tmp_path / "roc.png"
    _assert_png(path, plots.roc_curves(path, curves))


def test_audit_vs_accountant_with_infinite_epsilon(tmp_path):
    path = tmp_path / "audit.png"
    _assert_png(path, plots.audit_vs_accountant(path, AUDIT_ROWS))


def test_reconstruction_gallery_mixed_rows(tmp_path):
    path = tmp_path / "gallery.png"
    _assert_png(path, plots.reconstruction_gallery(path, _gallery_rows()))


def test_no_pyplot_figures_leak(tmp_path):
    from matplotlib import pyplot

    plots.utility_vs_epsilon(tmp_path / "a.png", POINTS)
    plots.audit_vs_accountant(tmp_path / "b.png", AUDIT_ROWS)
    assert pyplot.get_fignums() == []


@pytest.mark.parametrize(
    "points, match",
    [
        ([], "points must be a non-empty list"),
        ([{"name": "a", "epsilon": 1.0, "value": 0.5}], r"points\[0\] is missing \['group'\]"),
        ([{**POINTS[0], "epsilon": 0.0}], r"points\[0\]\['epsilon'\]"),
        ([{**POINTS[0], "epsilon": "x"}], r"points\[0\]\['epsilon'\]"),
        ([POINTS[0], {**POINTS[1], "value": float("nan")}], r"points\[1\]\['value'\]"),
    ],
)
def test_utility_vs_epsilon_errors(tmp_path, points, match):
    with pytest.raises(ValueError, match=match):
        plots.utility_vs_epsilon(tmp_path / "x.png", points)


def test_utility_vs_epsilon_chance_error(tmp_path):
    with pytest.raises(ValueError, match="chance"):
        plots.utility_vs_epsilon(tmp_path / "x.png", POINTS, chance=float("inf"))


@pytest.mark.parametrize(
    "curve, match",
    [
        ({**CURVE, "auc": 0.7, "tpr": [0.0, 1.0]}, "same length"),
        ({**CURVE, "auc": 0.7, "fpr": [], "tpr": []}, "non-empty"),
        ({**CURVE, "auc": 0.7, "fpr": [0.0, 0.0, 0.01, 0.3, 1.5]}, r"\['fpr'\] must lie in"),
        ({**CURVE, "auc": "high"}, r"\['auc'\]"),
    ],
)
def test_roc_curves_errors(tmp_path, curve, match):
    with pytest.raises(ValueError, match=match):
        plots.roc_curves(tmp_path / "x.png", [curve])


@pytest.mark.parametrize(
    "row, match",
    [
        ({**AUDIT_ROWS[0], "accountant_epsilon": -1.0}, "accountant_epsilon"),
        ({**AUDIT_ROWS[0], "accountant_epsilon": float("nan")}, "accountant_epsilon"),
        ({**AUDIT_ROWS[0], "audit_epsilon": float("inf")}, "audit_epsilon"),
        ({**AUDIT_ROWS[0], "audit_epsilon": -0.5}, "audit_epsilon"),
    ],
)
def test_audit_vs_accountant_errors(tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        plots.audit_vs_accountant(tmp_path / "x.png", [row])
    with pytest.raises(ValueError, match="rows must be a non-empty list"):
        plots.audit_vs_accountant(tmp_path / "x.png", [])


def test_reconstruction_gallery_errors(tmp_path):
    row = _gallery_rows()[0]
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"rows\[0\]\['reconstructions'\] has shape"):
        plots.reconstruction_gallery(out, [{**row, "reconstructions": row["originals"][:1]}])
    with pytest.raises(ValueError, match=r"rows\[0\]\['originals'\]"):
        plots.reconstruction_gallery(out, [{**row, "originals": np.zeros((8, 8, 1))}])
    with pytest.raises(ValueError, match=r"rows\[0\]\['originals'\]"):
        plots.reconstruction_gallery(out, [{**row, "originals": np.zeros((2, 8, 8, 2))}])
    with pytest.raises(ValueError, match="value_range"):
        plots.reconstruction_gallery(out, [row], value_range=(1.0, 0.0))


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fedjax_med\[report\]"):
        plots.audit_vs_accountant(tmp_path / "x.png", AUDIT_ROWS)


def test_sample_grid_leaves_a_missing_class_blank(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(6, 8, 8, 3))
    labels, sites = np.array([0, 0, 1, 0, 0, 0]), np.array([0, 0, 0, 1, 1, 1])  # site b: no "1"
    out = plots.sample_grid(
        tmp_path / "g.png", images, labels, sites, site_names=["a", "b"], class_names=["0", "1"]
    )
    assert Image.open(out).format == "PNG"
    multi = np.array([[1, 1], [0, 1], [1, 0], [1, 0], [0, 0], [1, 1]])
    assert plots.sample_grid(
        tmp_path / "m.png", images, multi, sites, site_names=["a", "b"], class_names=["x", "y"]
    )
    with pytest.raises(ValueError, match="one row per image, got 6, 5 and 6"):
        plots.sample_grid(tmp_path / "e.png", images, labels[:5], sites, site_names=["a", "b"],
                          class_names=["0", "1"])
