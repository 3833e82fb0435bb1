"""Curves and scatter plots of the evaluation report: ROC curves with bootstrap bands, learning
curves, the reliability diagram, the denoising trajectory, per-scan uncertainty and
risk-coverage curves.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from utils.evaluation.calibration import quantile_reliability
from utils.evaluation.metrics import auc_from_counts, check_bootstrap_settings, resample_counts, resample_indices
from utils.evaluation.visualization.arrays import as_numpy


def _roc_band(y: np.ndarray, p: np.ndarray, grid: np.ndarray, n_resamples: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Stratified bootstrap of a ROC curve: 2.5/97.5 percentiles of the TPR at each FPR of
    ``grid`` and the 95% interval of the AUC.

    The resamples are those of ``utils.evaluation.metrics.bootstrap_ci`` for the same labels,
    ``n_resamples`` and seed (``resample_indices``, stratified), and the AUC of each resample is
    its Mann-Whitney statistic (``auc_from_counts``): for a binary task with class 1 positive
    the AUC interval here is exactly the results table's. Each resample's curve is read from
    count-weighted cumulative sums over the scans sorted by score (ties as one threshold); its
    TPR at FPR g is the highest TPR reached at an FPR <= g, the value of the step curve drawn.
    """
    idx = resample_indices(y, n_resamples, np.random.default_rng(seed), stratified=True)  # (R, N')
    counts = resample_counts(idx, y.shape[0]).astype(np.float64)  # (R, N)
    aucs = auc_from_counts(counts, y == 1, p)  # (R,)
    order = np.argsort(-p, kind="stable")
    ends = np.r_[p[order][1:] != p[order][:-1], True]  # the last scan of each group of equal scores
    tp = np.cumsum(counts[:, order] * (y[order] == 1), axis=1)[:, ends]  # (R, G) at each threshold
    fp = np.cumsum(counts[:, order] * (y[order] == 0), axis=1)[:, ends]
    zero = np.zeros((counts.shape[0], 1))
    tpr = np.hstack([zero, tp / tp[:, -1:]])  # (R, G + 1), from (0, 0)
    fpr = np.hstack([zero, fp / fp[:, -1:]])
    tprs = np.stack([t[np.searchsorted(f, grid, side="right") - 1] for t, f in zip(tpr, fpr)])  # (R, len(grid))
    low, high = np.percentile(tprs, [2.5, 97.5], axis=0)
    return low, high, tuple(float(v) for v in np.percentile(aucs, [2.5, 97.5]))


def plot_roc_curves(curves: Mapping[str, tuple], title: str = "ROC curves", positive_label: str | None = None,
                    n_resamples: int = 2000, seed: int = 0, bands: str = "all") -> Figure:
    """All models' ROC curves on one axes with 95% stratified-bootstrap bands, each labelled
    with its ROC-AUC and that AUC's interval, plus the chance line. Curves get distinct line
    styles so overlapping ones stay visible.

    Args:
        curves: model name -> ``(y_true (N,), probs_pos (N,))`` with ``y_true`` 1 for the
            positive class and 0 otherwise, and ``probs_pos`` the predicted probability of
            the positive class (for C > 2 pass one class against the rest).
        positive_label: name of the positive class, shown on the axes.
        n_resamples, seed: the bootstrap of the bands and intervals (the same resamples for
            every model, and the same as ``metrics.bootstrap_ci`` draws with these values, so
            pass the run's ``n_resamples`` and seed to match its results table); at least
            ``metrics.MIN_RESAMPLES``.
        bands: ``'all'`` draws every model's band; ``'first'`` only the first model's (with
            several models the bands overlap into one grey area; the legend still gives every
            model's AUC interval).
    """
    if not curves:
        raise ValueError("curves is empty: pass at least one model")
    if bands not in ("all", "first"):
        raise ValueError(f"bands must be 'all' or 'first', got {bands!r}")
    check_bootstrap_settings(n_resamples, 0.05)
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    grid = np.linspace(0, 1, 101)
    styles = ["-", "--", "-.", ":"]
    for i, (name, (y_true, probs_pos)) in enumerate(curves.items()):
        y = as_numpy(y_true, f"{name}: y_true", 1)
        p = as_numpy(probs_pos, f"{name}: probs_pos", 1)
        if y.shape != p.shape:
            raise ValueError(f"{name}: y_true {y.shape} and probs_pos {p.shape} must have the same shape (N,)")
        if not np.isin(y, (0, 1)).all() or y.min() == y.max():
            raise ValueError(f"{name}: y_true must be 0/1 with both classes present for a ROC curve")
        fpr, tpr, _ = roc_curve(y, p)
        low, high, (auc_lo, auc_hi) = _roc_band(y, p, grid, n_resamples, seed)
        (line,) = ax.plot(fpr, tpr, lw=2, ls=styles[i % len(styles)], drawstyle="steps-post",
                          label=f"{name}: AUC {roc_auc_score(y, p):.3f} [{auc_lo:.3f}, {auc_hi:.3f}]")
        if bands == "all" or i == 0:
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.15 if bands == "first" else 0.12,
                            step="post", label=f"{name}: 95% band" if bands == "first" else None)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    positive = f" ({positive_label} positive)" if positive_label else ""
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel=f"True positive rate (sensitivity){positive}", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="x-small", title=f"AUC [95% bootstrap CI, {n_resamples} resamples]",
              title_fontsize="x-small")
    return fig


def plot_learning_curves(history: Mapping[str, Mapping[str, Sequence[float]]],
                         selected_epochs: Mapping[str, int] | None = None) -> Figure:
    """Per-epoch training curves of one or more phases, one column per phase.

    Args:
        history: phase name (e.g. ``"phase 1: DCG"``) -> series name -> one value per epoch.
            Series whose name contains ``"loss"`` go in the top row, the others (validation
            metrics such as ``val_auc``) in the bottom row; a phase without metrics leaves
            its bottom axes empty and hidden.
        selected_epochs: optional phase name -> the epoch (1-based) chosen by early stopping,
            drawn as a dotted vertical line.

    Returns:
        a Figure with 2 x (number of phases) axes.
    """
    if not history:
        raise ValueError("history is empty: pass at least one phase")
    selected_epochs = selected_epochs or {}
    fig = Figure(figsize=(5 * len(history), 6.5), layout="constrained")
    axes = fig.subplots(2, len(history), squeeze=False, sharex="col")
    for col, (phase, series) in enumerate(history.items()):
        if not series:
            raise ValueError(f"history[{phase!r}] holds no series")
        loss_ax, metric_ax = axes[0, col], axes[1, col]
        for name, values in series.items():
            values = as_numpy(values, f"history[{phase!r}][{name!r}]", 1)
            if values.size == 0:
                raise ValueError(f"history[{phase!r}][{name!r}] is empty")
            target = loss_ax if "loss" in name else metric_ax
            target.plot(np.arange(1, values.size + 1), values, marker="o", ms=3, label=name)
        for ax, ylabel in ((loss_ax, "loss"), (metric_ax, "validation metric")):
            if phase in selected_epochs:
                ax.axvline(selected_epochs[phase], ls=":", color="black", lw=1, label="selected epoch")
            ax.set_ylabel(ylabel)
            if ax.lines:
                ax.legend(fontsize="small")
        loss_ax.set_title(phase)
        metric_ax.set_xlabel("epoch")
        if not any("loss" not in name for name in series):
            metric_ax.set_visible(False)
    return fig


PHASE_TITLES = {"dcg": "phase 1: DCG", "diffusion": "phase 2: diffusion",
                "resnet18": "3D ResNet-18 (baseline)", "densenet121": "3D DenseNet-121 (baseline)"}
"""Panel titles of :func:`plot_training_history` for the phase keys of ``history.json``."""

BEST_EPOCH_KEY = "best_epoch"
"""Optional integer (1-based) in a phase of ``history.json``: the epoch kept by model
selection, drawn as a dotted line (``best: {"epoch": ...}`` is read the same way)."""


def _is_curve(name: str) -> bool:
    """Series drawn as learning curves: losses and validation metrics (not e.g. ``lr``)."""
    return "loss" in name or name.startswith("val_")


def _selected_epoch(entries: Mapping) -> int | None:
    """The epoch kept by model selection, from ``best_epoch`` or ``best.epoch`` (1-based)."""
    best = entries.get(BEST_EPOCH_KEY)
    if best is None and isinstance(entries.get("best"), Mapping):
        best = entries["best"].get("epoch")
    return None if best is None else int(best)


def plot_training_history(history: Mapping[str, Mapping]) -> Figure:
    """The learning curves of a run's ``history.json`` (:func:`plot_learning_curves`).

    ``history`` holds, per phase (``dcg``, ``diffusion``, then one per baseline, e.g.
    ``resnet18``, ``densenet121``), per-epoch lists: losses (``train_loss``, ``val_loss``) go
    in the top row and validation metrics (``val_auc``, ``val_acc``, any ``val_*``) in the
    bottom row, one column per phase titled by ``PHASE_TITLES``. The epoch kept by model
    selection (``best_epoch``, or ``best: {"epoch": ...}``, 1-based) is drawn as a dotted
    line. Other entries (e.g. the learning rate ``lr``) are not drawn; phases without epochs
    yet are left out.

    Raises:
        ValueError: a drawn series is not a list of numbers, or no phase has any epoch.
    """
    curves, selected = {}, {}
    for phase, entries in history.items():
        title = PHASE_TITLES.get(phase, phase)
        series = {}
        for name, values in entries.items():
            if not _is_curve(name):
                continue
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{phase}.{name} is not a list of numbers")
            if values:
                series[name] = values
        if series:
            curves[title] = series
            epoch = _selected_epoch(entries)
            if epoch is not None:
                selected[title] = epoch
    if not curves:
        raise ValueError("history holds no per-epoch values yet")
    return plot_learning_curves(curves, selected)


def plot_reliability_diagram(y_true, probs, n_bins: int = 10, title: str = "Reliability diagram") -> Figure:
    """Top-label reliability diagram (Guo et al. 2017) on quantile bins, with the count of
    predictions in every bin and the ECE of those bins in the title.

    Args:
        y_true: (N,) integer labels; probs: (N, C) class probabilities.

    One bar per bin spanning its confidence range, its height the accuracy in the bin and its
    label ``n = count``; the bin's mean confidence as a point; the diagonal of perfect
    calibration. With 20 test scans that is 4 bins of 5, not 2 nearly empty fixed-width bins.
    """
    curve = quantile_reliability(y_true, probs, n_bins)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    width = np.maximum(curve["high"] - curve["low"], 0.01)
    bars = ax.bar(curve["low"], curve["accuracy"], width=width, align="edge", edgecolor="black", alpha=0.6,
                  label="accuracy in bin")
    ax.bar_label(bars, labels=[f"n = {c}" for c in curve["count"]], fontsize="x-small", padding=2)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot(curve["confidence"], curve["accuracy"], "o", color="crimson", ms=4, label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title=f"{title}\nECE = {curve['ece']:.3f} over {len(curve['count'])} quantile bins, "
                 f"N = {int(curve['count'].sum())}")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_denoising_trajectory(probs_per_step, timesteps: Sequence[int], class_names: Sequence[str],
                              title: str = "Denoising trajectory", prior=None) -> Figure:
    """Class probabilities along the reverse diffusion chain, one line per class.

    Args:
        probs_per_step: (S + 1, C) probabilities after each of S sampling steps, the first
            row at the start ``y_T``; or (S + 1, B, C) for B samples (several stochastic
            samples of one scan, or several scans), drawn as the mean over B with a band of
            +- one standard deviation.
        timesteps: (S + 1,) the timestep of each row (e.g. 500, 450, ..., 0); the x axis
            runs from the first to the last, so denoising reads left to right.
        class_names: (C,) names.
        prior: optional (C,) class probabilities of the DCG prior (the DCG alone), drawn as a
            dashed line per class: where the chain starts from and what diffusion changes.
    """
    probs = as_numpy(probs_per_step, "probs_per_step", (2, 3))
    prior = None if prior is None else as_numpy(prior, "prior", 1)
    if prior is not None and prior.shape != (len(class_names),):
        raise ValueError(f"prior must have shape ({len(class_names)},), got {prior.shape}")
    steps = as_numpy(timesteps, "timesteps", 1)
    if probs.ndim == 2:
        probs = probs[:, None, :]  # (S + 1, 1, C)
    if probs.shape[0] != steps.shape[0]:
        raise ValueError(f"probs_per_step has {probs.shape[0]} steps but timesteps has {steps.shape[0]}")
    if probs.shape[2] != len(class_names):
        raise ValueError(f"probs_per_step has C = {probs.shape[2]} classes but {len(class_names)} class names")
    mean, std = probs.mean(axis=1), probs.std(axis=1)  # (S + 1, C)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        (line,) = ax.plot(steps, mean[:, c], marker="o", ms=3, label=name)
        if probs.shape[1] > 1:
            ax.fill_between(steps, mean[:, c] - std[:, c], mean[:, c] + std[:, c], color=line.get_color(), alpha=0.2)
        if prior is not None:
            ax.axhline(prior[c], ls="--", lw=1.2, color=line.get_color(), label=f"{name}: DCG prior")
    if steps[0] > steps[-1]:
        ax.invert_xaxis()
    ax.set(xlabel="timestep t", ylabel="class probability", ylim=(0, 1), title=title)
    ax.legend(fontsize="small")
    return fig


def plot_uncertainty(probs, std, y_true, class_names: Sequence[str], positive_class: int = 1,
                     title: str = "Per-scan prediction and uncertainty", predicted=None,
                     xlabel: str | None = None) -> Figure:
    """Each test scan's probability of ``positive_class`` against its sampling spread.

    Args:
        probs: (N,) predicted probability of ``positive_class`` per scan (or, with ``predicted``
            and ``xlabel``, of any per-scan class, e.g. the predicted one).
        std: (N,) its standard deviation over the diffusion samples (the uncertainty).
        y_true: (N,) true labels; marker colour = true class, hollow markers = misclassified.
        predicted: (N,) the decided classes (e.g. at the validation threshold); None: ``probs >= 0.5``.
        xlabel: the x axis; None: ``p(<positive class>)``.
    """
    p = as_numpy(probs, "probs", 1)
    s = as_numpy(std, "std", 1)
    y = as_numpy(y_true, "y_true", 1).astype(int)
    if not len(p) == len(s) == len(y):
        raise ValueError(f"probs, std and y_true must have the same length, got {len(p)}, {len(s)}, {len(y)}")
    if predicted is None:
        predicted = (p >= 0.5).astype(int) * positive_class
    else:
        predicted = as_numpy(predicted, "predicted", 1).astype(int)
        if len(predicted) != len(y):
            raise ValueError(f"predicted must have one class per scan, got {len(predicted)} for {len(y)} scans")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    colours = sns.color_palette("tab10", len(class_names))
    for c, name in enumerate(class_names):
        for wrong in (False, True):
            sel = (y == c) & ((predicted != y) == wrong)
            if sel.any():
                ax.scatter(p[sel], s[sel], s=40, label=f"{name}{' (misclassified)' if wrong else ''}",
                           facecolors="none" if wrong else colours[c], edgecolors=colours[c], linewidths=1.5)
    ax.axvline(0.5, color="grey", ls=":")
    ax.set(xlabel=xlabel or f"p({class_names[positive_class]})", ylabel="std over samples", xlim=(-0.02, 1.02),
           title=title)
    ax.legend(fontsize="small")
    return fig


def plot_risk_coverage(curves: Mapping[str, tuple], accuracy_table: Mapping[str, Mapping[float, float]] | None = None,
                       title: str | None = None) -> Figure:
    """Risk-coverage curves of selective prediction (refer the most uncertain scans), each
    labelled with its AURC, and optionally the accuracy at a few coverages as grouped bars.

    Args:
        curves: label (e.g. ``"DiffMIC-3D: chain spread"``) -> ``(coverage (N,), risk (N,))``,
            as ``coverage`` and ``risk`` of ``utils.evaluation.uncertainty.risk_coverage_curve``
            (coverage k / N, risk = error rate among the k most certain scans). The AURC in the
            legend is the mean risk over the coverage points (``uncertainty.aurc``).
        accuracy_table: optional label -> {coverage in (0, 1]: accuracy} (as from
            ``uncertainty.accuracy_at_coverage``, e.g. at 1.0, 0.9, 0.8, 0.7); every label must
            give the same coverages. Drawn in a second panel as grouped bars, values printed.
        title: optional figure title.

    Returns:
        a Figure: one axes with one line per curve, plus the bar axes when ``accuracy_table``
        is given.
    """
    if not curves:
        raise ValueError("curves is empty: pass at least one (coverage, risk) pair")
    fig = Figure(figsize=(11 if accuracy_table else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if accuracy_table else 1, squeeze=False)[0]
    ax = axes[0]
    styles = ["-", "--", "-.", ":"]
    labels = list(curves) + [name for name in (accuracy_table or {}) if name not in curves]
    colour = {name: f"C{i % 10}" for i, name in enumerate(labels)}  # one colour per label in both panels
    for i, (name, (coverage, risk)) in enumerate(curves.items()):
        cov = as_numpy(coverage, f"{name}: coverage", 1)
        r = as_numpy(risk, f"{name}: risk", 1)
        if cov.shape != r.shape or cov.size == 0:
            raise ValueError(f"{name}: coverage {cov.shape} and risk {r.shape} must have the same shape (N,), N > 0")
        if cov.min() < 0 or cov.max() > 1 or r.min() < 0 or r.max() > 1:
            raise ValueError(f"{name}: coverage and risk must lie in [0, 1]")
        ax.plot(100 * cov, 100 * r, lw=2, ls=styles[i % len(styles)], color=colour[name],
                label=f"{name}: AURC {r.mean():.3f}")
    ax.set(xlim=(0, 100), ylim=(0, None), xlabel="coverage (% of scans kept, most certain first)",
           ylabel="risk (% of kept scans misclassified)", title="Risk-coverage curve")
    ax.legend(fontsize="x-small", title="lower AURC = better ranking", title_fontsize="x-small")
    if accuracy_table:
        coverages = sorted({float(c) for c in next(iter(accuracy_table.values()))}, reverse=True)
        bar_ax, width = axes[1], 0.8 / len(accuracy_table)
        lowest = 100.0
        for i, name in enumerate(n for n in labels if n in accuracy_table):  # in the curves' order
            row = accuracy_table[name]
            if sorted((float(c) for c in row), reverse=True) != coverages:
                raise ValueError(f"accuracy_table[{name!r}] has coverages {sorted(row)}, expected {coverages}")
            values = as_numpy([row[c] for c in sorted(row, key=float, reverse=True)], f"accuracy_table[{name!r}]", 1)
            if values.min() < 0 or values.max() > 1:
                raise ValueError(f"accuracy_table[{name!r}] accuracies must lie in [0, 1]")
            bars = bar_ax.bar(np.arange(len(coverages)) + (i - (len(accuracy_table) - 1) / 2) * width, 100 * values,
                              width=width, label=name, color=colour[name], edgecolor="black",
                              hatch=["", "//", "..", "xx"][i % 4])
            bar_ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2, rotation=90)
            lowest = min(lowest, 100 * float(values.min()))
        bar_ax.set_xticks(np.arange(len(coverages)), [f"{100 * c:g}%" for c in coverages])
        floor = max(0.0, 5 * np.floor(lowest / 5) - 5)  # the differences are a few points: start near them
        bar_ax.set(ylim=(floor, 100 + 0.12 * (100 - floor)), xlabel="coverage (% of scans kept)",
                   ylabel=f"accuracy on kept scans (%; axis from {floor:g})",
                   title="Accuracy after referring the most uncertain scans")
        bar_ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2)
    if title:
        fig.suptitle(title)
    return fig
