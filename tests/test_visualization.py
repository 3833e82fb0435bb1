"""Tests of utils.evaluation.visualization: each plot's structure, PNG output, and input errors."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle, StepPatch
from sklearn.metrics import roc_auc_score

from utils.evaluation.calibration import quantile_reliability
from utils.evaluation.visualization import (
    boxes_in_input,
    plot_confusion_matrices,
    plot_confusion_matrix,
    plot_ct_slices,
    plot_denoising_trajectory,
    plot_hu_histograms,
    plot_learning_curves,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_saliency_overlay,
    save_figure,
    slices_to_show,
)

RNG = np.random.default_rng(0)
VOLUME = RNG.random((32, 32, 16))  # (H, W, D) in [0, 1]
SALIENCY = RNG.random((4, 4, 2))  # (h, w, d)


def binary_scores(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)


def test_confusion_matrix_heatmap_shows_counts_and_row_shares():
    fig = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["Normal", "COVID-19"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # heatmap + colour bar
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["3\n75.0%", "1\n25.0%", "0\n0.0%", "4\n100.0%"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Normal", "COVID-19"]


def test_confusion_matrix_five_classes_with_an_empty_row():
    cm = np.diag([2, 3, 0, 1, 5])
    fig = plot_confusion_matrix(cm, [f"CT-{i}" for i in range(5)])
    assert len(fig.axes[0].texts) == 25 and fig.axes[0].texts[12].get_text() == "0\n0.0%"


def test_roc_curves_one_line_per_model_plus_chance():
    y, s = binary_scores()
    fig = plot_roc_curves({"ours": (y, s), "ResNet-18": (y, 1 - s), "DenseNet-121": (torch.tensor(y), torch.tensor(s))})
    ax = fig.axes[0]
    assert len(ax.lines) == 4 and len(ax.collections) == 3  # a bootstrap band per model
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("ours: AUC ") and labels[-1] == "chance"
    auc = roc_auc_score(y, 1 - s)
    assert labels[1].startswith(f"ResNet-18: AUC {auc:.3f} [")
    low, high = (float(v) for v in labels[1].split("[")[1].rstrip("]").split(", "))
    assert low <= auc <= high and high - low > 0.01  # a real interval around the estimate
    assert len({line.get_linestyle() for line in ax.lines[:3]}) == 3  # overlapping curves stay apart
    assert "COVID-19 positive" in plot_roc_curves({"ours": (y, s)}, positive_label="COVID-19").axes[0].get_ylabel()


def legend_auc_intervals(fig) -> dict[str, tuple[float, float]]:
    """Model name -> the AUC interval printed in a ROC figure's legend."""
    out = {}
    for text in (t.get_text() for t in fig.axes[0].get_legend().get_texts()):
        if ": AUC " in text:
            name, rest = text.split(": AUC ")
            out[name] = tuple(float(v) for v in rest.split("[")[1].rstrip("]").split(", "))
    return out


@pytest.mark.parametrize("seed, n_resamples", [(0, 1000), (5, 2000)])
def test_roc_legend_intervals_are_the_results_tables(seed, n_resamples, monkeypatch):
    from utils.evaluation.metrics import metrics_table
    from utils.evaluation.visualization import curves
    drawn = []
    real = curves.resample_indices
    monkeypatch.setattr(curves, "resample_indices", lambda y, n, rng, stratified: drawn.append(n) or real(y, n, rng,
                                                                                                      stratified))
    from utils.evaluation.visualization import plot_result_figures
    y, s = binary_scores(30, seed=4)
    probs = {"ours": np.stack([1 - s, s], 1), "other": np.stack([s, 1 - s], 1) * 0.5 + 0.25}
    figs = plot_result_figures(y, probs, ["Normal", "COVID-19"], seed=seed, n_resamples=n_resamples)
    table = {r["model"]: (round(r["ci_low"], 3), round(r["ci_high"], 3))
             for r in metrics_table({k: (y, p) for k, p in probs.items()}, n_resamples=n_resamples, seed=seed)
             if r["metric"] == "roc_auc"}
    assert legend_auc_intervals(figs["roc_curves"]) == table  # the same resamples, the same intervals
    legend = figs["roc_curves"].axes[0].get_legend().get_title().get_text()
    assert f"{n_resamples} resamples" in legend
    assert drawn == [n_resamples, n_resamples]  # one bootstrap per model, of the run's size


def test_roc_figure_of_many_models_bands_only_the_main_one():
    from utils.evaluation.visualization import plot_result_figures
    y, s = binary_scores(30, seed=4)
    probs = {name: np.stack([1 - s, s], 1) for name in ("ours", "a", "b")}
    ax = plot_result_figures(y, probs, ["Normal", "COVID-19"], n_resamples=1000)["roc_curves"].axes[0]
    assert len(ax.collections) == 1  # six overlapping bands read as one grey area
    assert "ours: 95% band" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend_auc_intervals(ax.figure)) == 3  # every model's interval stays in the legend
    with pytest.raises(ValueError, match="bands must be"):
        plot_roc_curves({"m": (y, s)}, bands="none")


def test_roc_band_is_the_step_curve_of_each_resample():
    from utils.evaluation.visualization.curves import _roc_band
    from sklearn.metrics import roc_curve
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.9, 0.2, 0.3])  # a tie across the classes
    grid = np.linspace(0, 1, 101)
    low, high, (auc_lo, auc_hi) = _roc_band(y, p, grid, 1000, 0)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    full = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    assert np.all(low <= full + 1e-12) and np.all(full <= high + 1e-12)  # the curve of the data lies in its band
    assert np.all(np.diff(low) >= 0) and low[0] >= 0 and high[-1] == 1.0
    assert 0 <= auc_lo < roc_auc_score(y, p) < auc_hi <= 1


def test_learning_curves_two_phases():
    history = {
        "phase 1: DCG": {"train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95], "val_auc": [0.6, 0.7, 0.72]},
        "phase 2: diffusion": {"train_loss": [0.5, 0.4], "val_loss": [0.6, 0.5]},
    }
    fig = plot_learning_curves(history, selected_epochs={"phase 1: DCG": 2})
    assert len(fig.axes) == 4
    loss1, loss2, metric1, metric2 = fig.axes[0], fig.axes[1], fig.axes[2], fig.axes[3]
    assert len(loss1.lines) == 3  # train, val, selected-epoch marker
    assert len(metric1.lines) == 2  # val_auc + marker
    assert len(loss2.lines) == 2 and not metric2.get_visible()
    np.testing.assert_array_equal(loss2.lines[0].get_xdata(), [1, 2])


@pytest.mark.parametrize("n, bins", [(200, 10), (20, 4)])
def test_reliability_diagram_quantile_bins_with_counts(n, bins):
    y, s = binary_scores(n)
    probs = np.stack([1 - s, s], axis=1)
    curve = quantile_reliability(y, probs, n_bins=10)
    assert len(curve["count"]) == bins and curve["count"].sum() == n  # 20 predictions: 4 bins of 5
    assert curve["count"].min() >= n // bins - 1  # quantile bins: about equal counts
    conf, correct = probs.max(1), probs.argmax(1) == y
    assert curve["ece"] == pytest.approx(sum(c / n * abs(a - m) for c, a, m in
                                             zip(curve["count"], curve["accuracy"], curve["confidence"])))
    assert 0 <= curve["ece"] <= 1 and correct.mean() == pytest.approx(np.dot(curve["count"], curve["accuracy"]) / n)
    ax = plot_reliability_diagram(y, probs).axes[0]
    assert len([p for p in ax.patches if isinstance(p, Rectangle)]) == bins
    assert [t.get_text() for t in ax.texts] == [f"n = {c}" for c in curve["count"]]
    assert f"ECE = {curve['ece']:.3f}" in ax.get_title() and conf.min() >= 0.5


@pytest.mark.parametrize("volume, n, expected_vmax", [(VOLUME, 5, 1150 / 1400), (VOLUME * 1400 - 1000, 3, 150.0)])
def test_ct_slices(volume, n, expected_vmax):  # lung window: W 1500, L -600 (up to 150 HU)
    fig = plot_ct_slices(volume, n=n, title="scan")
    assert len(fig.axes) == n
    image = fig.axes[0].images[0]
    assert image.get_array().shape == (32, 32) and image.get_clim()[1] == pytest.approx(expected_vmax)
    k = int(fig.axes[0].get_title().split()[1].split("/")[0])
    np.testing.assert_array_equal(image.get_array(), volume[:, :, k].T)  # axial slice, transposed


def test_saliency_overlay_draws_each_box_on_the_slices_it_crosses():
    boxes = np.array([[0, 0, 0, 8, 8, 4], [10, 12, 2, 18, 20, 6], [20, 20, 10, 28, 28, 14]])  # (K, 6)
    fig = plot_saliency_overlay(VOLUME, SALIENCY, boxes, slices=[1, 3, 5, 12, 15])
    assert fig.axes[-1].get_ylabel().startswith("saliency")  # the colour bar of the overlay
    per_slice = [len([p for p in ax.patches if isinstance(p, Rectangle)]) for ax in fig.axes[:-1]]
    assert per_slice == [1, 2, 1, 1, 0]  # slice 3 lies in boxes 0 and 1
    rect = fig.axes[2].patches[0]  # box 1 on slice 5: voxels 10..17 along H, 12..19 along W
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (9.5, 11.5, 8, 8)
    assert all(len(ax.images) == 2 for ax in fig.axes[:-1])  # CT + saliency
    default = plot_saliency_overlay(VOLUME, SALIENCY, boxes)
    titles = [ax.get_title() for ax in default.axes[:-1]]
    assert titles == ["axial slice 1/16", "axial slice 3/16", "axial slice 11/16"]  # box centres
    assert [len(ax.patches) for ax in default.axes[:-1]] == [1, 2, 1]  # slice 3 also crosses box 0


def test_saliency_overlay_upsamples_to_the_volume():
    saliency = np.zeros((4, 4, 2))
    saliency[3, 3, 1] = 1.0  # hot cell at the far corner
    fig = plot_saliency_overlay(VOLUME, saliency, slices=[15])
    overlay = fig.axes[0].images[1].get_array()  # (W, H) after the transpose
    assert overlay.shape == (32, 32) and overlay[-1, -1] == pytest.approx(1.0) and overlay[0, 0] == 0.0
    # default: the 5 slices of largest saliency, here those nearest the hot cell (D index 1 of 2)
    titles = [ax.get_title() for ax in plot_saliency_overlay(VOLUME, saliency).axes[:-1]]
    assert titles == [f"axial slice {k}/16" for k in range(11, 16)]


def test_saliency_colormap_leaves_low_saliency_clear():
    from utils.evaluation.visualization import saliency_colormap
    cmap = saliency_colormap(floor=0.3, alpha=0.7)
    assert cmap(0.0)[3] == 0 and cmap(0.29)[3] == 0  # the CT shows unchanged where saliency is low
    assert cmap(1.0)[3] == pytest.approx(0.7) and 0 < cmap(0.65)[3] < 0.7
    assert cmap(1.0)[:3] == pytest.approx(plt.get_cmap("inferno")(1.0)[:3])  # inferno's colours, not jet's
    with pytest.raises(ValueError, match="floor must lie in"):
        saliency_colormap(floor=1.0)


def test_saliency_overlay_outlines_the_lesion_and_keeps_everything_on_the_image():
    lesion = np.zeros(VOLUME.shape, dtype=bool)
    lesion[20:26, 4:9, 9:12] = True  # largest cross-section: slices 9-11 (the first: 9)
    boxes = np.array([[24, 24, 0, 32, 32, 4]])  # touches the image's corner
    fig = plot_saliency_overlay(VOLUME, SALIENCY, boxes, lesion_mask=lesion)
    panels = fig.axes[:-1]
    assert [ax.get_title() for ax in panels] == ["axial slice 1/16", "axial slice 9/16"]  # box centre, lesion
    assert [len(ax.collections) for ax in panels] == [0, 1]  # the contour only where the lesion is
    for ax in panels:  # radiological: high H on the left; nothing outside the image
        assert ax.get_xlim() == (31.5, -0.5) and ax.get_ylim() == (-0.5, 31.5)
        for text in ax.texts:  # box labels are clipped to the image (the R / L / A / P markers sit inside it)
            assert text.get_clip_on() or text.get_text() in "RLAP"
    label = next(t for t in panels[0].texts if t.get_text().strip() == "0")
    assert label.get_position() == (31.5, 31.5) and label.get_ha() == "left" and label.get_va() == "top"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ROI box j (the DCG's crop)",
                                                                 "lesion outline (ground truth)"]
    assert "transparent below 0.3" in fig.axes[-1].get_ylabel()
    normal = plot_saliency_overlay(VOLUME, SALIENCY, boxes, lesion_mask=np.zeros_like(lesion))
    assert normal.legends[0].get_texts()[1].get_text() == "lesion outline (ground truth: none in this scan)"
    with pytest.raises(ValueError, match="lesion_mask"):
        plot_saliency_overlay(VOLUME, SALIENCY, lesion_mask=lesion[:, :, :4])


def test_slices_to_show_leads_with_the_given_slice():
    boxes = np.array([[0, 0, 0, 8, 8, 4], [0, 0, 10, 8, 8, 14]])
    shown = slices_to_show(boxes, 16, 3, first=7)
    assert 7 in shown and {1, 11} <= set(shown) and len(shown) == 3
    assert slices_to_show(boxes, 16, 1, first=7) == [7]


@pytest.mark.parametrize("probs_shape", [(11, 2), (11, 6, 5)])
def test_denoising_trajectory(probs_shape):
    n_classes = probs_shape[-1]
    probs = np.random.default_rng(1).dirichlet(np.ones(n_classes), size=probs_shape[:-1])  # (S+1, [B,] C)
    timesteps = np.linspace(500, 0, 11).astype(int)
    fig = plot_denoising_trajectory(probs, timesteps, [f"class {c}" for c in range(n_classes)])
    ax = fig.axes[0]
    assert len(ax.lines) == n_classes and len(ax.collections) == (n_classes if len(probs_shape) == 3 else 0)
    assert ax.xaxis_inverted()
    expected = probs if len(probs_shape) == 2 else probs.mean(axis=1)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected[:, 0])


def test_hu_histograms_one_step_line_per_volume():
    normal = RNG.normal(-850, 60, 5000)
    covid = np.concatenate([normal, RNG.normal(-500, 100, 2000), np.full(100, -2048)])
    fig = plot_hu_histograms({"normal": normal, "covid": covid.astype(np.int16)})
    ax = fig.axes[0]
    assert len([p for p in ax.patches if isinstance(p, StepPatch)]) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1].startswith("covid (1.4% outside range)")


def test_save_figure_writes_png_and_closes(tmp_path):
    fig = plot_ct_slices(VOLUME, n=2)
    path = save_figure(fig, tmp_path / "figures" / "slices.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"  # a vector copy beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["slices.pdf", "slices.png"]  # no temp file left
    assert not fig.axes  # released
    pyplot_fig = plt.figure()
    save_figure(pyplot_fig, tmp_path / "pyplot.png")
    assert pyplot_fig.number not in plt.get_fignums()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plot_confusion_matrix(np.ones((2, 3)), ["a", "b"]), r"shape \(C, C\)"),
        (lambda: plot_confusion_matrix(np.ones(4), ["a", "b"]), "cm must have 2 dimensions"),
        (lambda: plot_roc_curves({"m": (np.ones(4), np.ones(4))}), "both classes"),
        (lambda: plot_roc_curves({"m": (np.array([0, 1]), np.ones(3))}), "same shape"),
        (lambda: plot_ct_slices(VOLUME[:, :, 0]), "volume must have 3 dimensions"),
        (lambda: plot_ct_slices(VOLUME, n=40), "n must be an integer"),
        (lambda: plot_saliency_overlay(VOLUME, SALIENCY, np.zeros((2, 4))), r"\(K, 6\)"),
        (lambda: plot_saliency_overlay(VOLUME, SALIENCY, np.array([[0, 0, 0, 40, 8, 4]])), "start < end"),
        (lambda: plot_saliency_overlay(VOLUME, SALIENCY, slices=[16]), "slices must be"),
        (lambda: plot_saliency_overlay(VOLUME, SALIENCY[..., None]), "saliency must have 3"),
        (lambda: plot_denoising_trajectory(np.ones((5, 2)) / 2, [4, 3, 2, 1], ["a", "b"]), "5 steps"),
        (lambda: plot_denoising_trajectory(np.ones((4, 2)) / 2, [4, 3, 2, 1], ["a"]), "C = 2 classes"),
        (lambda: plot_learning_curves({}), "history is empty"),
        (lambda: plot_hu_histograms({"x": np.array([np.nan])}), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_guidance_map_one_panel_per_slice_on_a_shared_scale():
    from utils.evaluation.visualization import plot_guidance_map
    grid = torch.softmax(torch.randn(2, 4, 4, 4), dim=0)  # (C, Np, Np, Np)
    fig = plot_guidance_map(grid, 1, ["Normal", "COVID-19"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 4  # k = 0..3
    for k, image in enumerate(images):
        assert image.get_clim() == (0, 1)
        np.testing.assert_allclose(image.get_array(), grid[1, :, :, k].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="class_index"):
        plot_guidance_map(grid, 2, ["Normal", "COVID-19"])


def test_feature_prior_heatmap_and_mean_gate_per_source():
    from utils.evaluation.visualization import plot_feature_prior
    feats = RNG.normal(size=(3, 16))
    gates = torch.softmax(torch.randn(4, 16), dim=0)  # K + 1 = 4 sources
    fig = plot_feature_prior(feats, gates)
    bar_axis = next(ax for ax in fig.axes if len(ax.patches) == 4)
    heights = [p.get_height() for p in bar_axis.patches]
    np.testing.assert_allclose(heights, gates.mean(1).numpy(), rtol=1e-6)
    assert [t.get_text() for t in bar_axis.get_xticklabels()] == ["global", "ROI 1", "ROI 2", "ROI 3"]
    with pytest.raises(ValueError, match="channels"):
        plot_feature_prior(feats, gates[:, :8])


def test_uncertainty_scatter_marks_misclassified_scans_hollow():
    from utils.evaluation.visualization import plot_uncertainty
    probs, std, y = np.array([0.9, 0.2, 0.7, 0.4]), np.array([0.05, 0.1, 0.2, 0.3]), np.array([1, 0, 0, 1])
    fig = plot_uncertainty(probs, std, y, ["Normal", "COVID-19"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["Normal", "Normal (misclassified)", "COVID-19", "COVID-19 (misclassified)"]
    offsets = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    assert sorted(map(tuple, offsets)) == sorted(zip(probs, std))
    with pytest.raises(ValueError, match="same length"):
        plot_uncertainty(probs, std[:3], y, ["Normal", "COVID-19"])


def test_axial_slices_are_radiological_with_markers():
    """A bright voxel on the patient's LEFT (low H in RAS) lands on the screen's RIGHT half;
    anterior (high W) is at the top; R / L / A / P are written on the sides."""
    volume = np.zeros((32, 32, 4))
    volume[2, 28, 1] = 1.0  # patient's left, anterior
    ax = plot_ct_slices(volume, n=2).axes[0]
    x, y = ax.transData.transform((2, 28))
    (left, bottom), (right, top) = ax.transAxes.transform((0, 0)), ax.transAxes.transform((1, 1))
    assert x > (left + right) / 2 and y > (bottom + top) / 2
    markers = {t.get_text(): t.get_position() for t in ax.texts}
    assert markers["R"][0] < 0.5 < markers["L"][0] and markers["A"][1] > 0.5 > markers["P"][1]


def test_trajectory_draws_the_dcg_prior_and_confusion_matrices_cover_every_model():
    probs = np.random.default_rng(1).dirichlet(np.ones(2), size=11)
    ax = plot_denoising_trajectory(probs, np.linspace(500, 0, 11), ["Normal", "COVID-19"], prior=[0.3, 0.7]).axes[0]
    prior_lines = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [float(line.get_ydata()[0]) for line in prior_lines] == [0.3, 0.7]
    assert any("DCG prior" in t.get_text() for t in ax.get_legend().get_texts())
    fig = plot_confusion_matrices({"ours": np.eye(2) * 3, "ResNet-18": np.ones((2, 2))}, ["Normal", "COVID-19"])
    assert [ax.get_title() for ax in fig.axes] == ["ours", "ResNet-18"] and len(fig.axes[1].texts) == 4


# ----------------------------------------------------------------------------------------
# ROI boxes on the input grid, and the slices of the report's saliency figure
# ----------------------------------------------------------------------------------------

# boxes (h0, w0, d0, h1, w1, d1), half-open; scale 2 and 3: starts floor-divided, ends ceil-divided,
# depth (d0, d1) unchanged
BOXES_IN_INPUT = [
    (2, [[1, 3, 0, 5, 7, 4]], [[0, 1, 0, 3, 4, 4]]),
    (2, [[0, 0, 2, 16, 16, 6], [4, 6, 1, 20, 22, 9]], [[0, 0, 2, 8, 8, 6], [2, 3, 1, 10, 11, 9]]),  # even: exact
    (3, [[4, 2, 5, 5, 9, 7]], [[1, 0, 5, 2, 3, 7]]),  # h [4, 5) lies in input row 1, w [2, 9) in columns 0..2
    (1, [[1, 3, 0, 5, 7, 4]], [[1, 3, 0, 5, 7, 4]]),  # scale 1: unchanged
]


@pytest.mark.parametrize("scale, boxes, expected", BOXES_IN_INPUT)
def test_boxes_in_input_floors_starts_and_ceils_ends_in_plane(scale, boxes, expected):
    hires = np.array(boxes)
    out = boxes_in_input(hires, scale)
    assert isinstance(out, np.ndarray) and out.dtype == hires.dtype
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(hires, boxes)  # the input is not changed
    # the drawn box covers the whole crop: start * s <= crop start, end * s >= crop end
    assert (out[:, [0, 1]] * scale <= hires[:, [0, 1]]).all() and (out[:, [3, 4]] * scale >= hires[:, [3, 4]]).all()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_in_input_keeps_tensors_on_their_device(device):
    boxes = torch.tensor([[[1, 3, 0, 5, 7, 4]], [[0, 0, 2, 16, 16, 6]]], device=device)  # (B, K, 6)
    out = boxes_in_input(boxes, 2)
    assert isinstance(out, torch.Tensor) and out.device == boxes.device and out.dtype == torch.int64
    assert out.tolist() == [[[0, 1, 0, 3, 4, 4]], [[0, 0, 2, 8, 8, 6]]]
    assert boxes[0, 0].tolist() == [1, 3, 0, 5, 7, 4]  # the input is not changed


@pytest.mark.parametrize("boxes, scale, match", [
    (np.zeros((2, 4), dtype=int), 2, r"\(\.\.\., 6\)"),
    (np.zeros((2, 6), dtype=int), 0, "roi_scale must be an integer >= 1"),
    (np.zeros((2, 6), dtype=int), 1.5, "roi_scale must be an integer >= 1"),
])
def test_boxes_in_input_rejects_bad_input(boxes, scale, match):
    with pytest.raises(ValueError, match=match):
        boxes_in_input(boxes, scale)


@pytest.mark.parametrize("box_depths, depth, n_slices, expected", [
    # box centres 22 and 6; evenly spaced candidates 6, 12, 19, 25 (spacing 6.2): 12 is far from
    # both centres, 19 and 25 are within half a spacing of 22, so 19 only fills the last place
    ([(19, 27), (3, 11)], 32, 4, [6, 12, 19, 22]),
    ([(19, 27), (3, 11)], 32, 2, [6, 22]),
    ([(19, 27), (3, 11), (18, 26)], 32, 2, [6, 22]),  # at most n_slices centres
    ([(0, 4)], 4, 6, [0, 1, 2, 3]),  # fewer slices than asked: all of them
])
def test_saliency_slices_show_every_box_centre_then_spread_out(box_depths, depth, n_slices, expected):
    boxes = np.array([(0, 0, d0, 8, 8, d1) for d0, d1 in box_depths])
    assert slices_to_show(boxes, depth, n_slices) == expected


def test_prediction_uncertainty_uses_the_decision_and_the_assigned_class():
    import pandas as pd
    from utils.evaluation.visualization import plot_prediction_uncertainty
    binary = pd.DataFrame({"model": ["DiffMIC-3D"] * 3 + ["ResNet-18"], "label": [1, 0, 1, 0],
                           "decision": [1, 1, 0, 0],  # at the validation threshold: scan 2 and 3 wrong
                           "prob_Normal": [0.6, 0.65, 0.8, 0.5], "prob_COVID-19": [0.4, 0.35, 0.2, 0.5],
                           "std_Normal": [0.1, 0.2, 0.3, 0.0], "std_COVID-19": [0.1, 0.2, 0.3, 0.0]})
    fig = plot_prediction_uncertainty(binary, ["Normal", "COVID-19"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # a 0.5 cut would call all three Normal; the decision column says scan 1 is right, 2 and 3 wrong
    assert labels == ["Normal (misclassified)", "COVID-19", "COVID-19 (misclassified)"]
    grades = [f"CT-{i}" for i in range(5)]
    probs = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.05, 0.05]])
    five = pd.DataFrame({"model": "DiffMIC-3D", "label": [1, 3], "decision": [1, 0],
                         **{f"prob_{g}": probs[:, i] for i, g in enumerate(grades)},
                         **{f"std_{g}": 0.01 * (i + 1) * np.ones(2) for i, g in enumerate(grades)}})
    fig = plot_prediction_uncertainty(five, grades)
    offsets = sorted(map(tuple, np.concatenate([c.get_offsets() for c in fig.axes[0].collections])))
    assert offsets == sorted([(0.6, 0.02), (0.7, 0.01)])  # the assigned class's probability and spread
    assert fig.axes[0].get_xlabel() == "p(assigned class)"
    with pytest.raises(ValueError, match="no predictions"):
        plot_prediction_uncertainty(five, grades, model="ResNet-18")
