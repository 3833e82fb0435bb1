"""Is there information its DCG lacks? A probe on the training folds, before any model is changed.

    python scripts/readout_probe.py RUNS_DIR DATA [--features morphometry dcg ...] [--seeds S ...] [--out DIR]

RUNS_DIR holds finished runs of the quality benchmark (``quality_<data>_seed<s>``), DATA is
``adrenal``, ``phantoms`` or the scan folder they ran on (``utils.benchmarking.quality.run_setup``).

Why: cross-fitted on the training folds (``scripts/crossfit_correction.py``), the correction phase
2 learns takes a little away from its prior. Before another denoiser is trained, this asks
whether any readout can add to the prior on scans it did not fit, and from which inputs. It
mirrors the cross-fit exactly, with an L2 logistic regression in place of phase 2:

* every training scan has the prior of the out-of-fold DCG that did not train on it (fold DCG
  k's fused prediction for fold k, the folds of ``utils.pipeline.out_of_fold_guidance``);
* for each fold k, a readout of ``[logit of the prior, features]`` is fitted on the other folds'
  scans (other networks' priors, as phase 2 trains) and predicts fold k's scans from fold DCG k's
  prior: it never sees the held-out fold's scans or its network. Its regularisation is chosen by
  an inner 5-fold cross-validation (log-loss) on the fitting scans alone;
* compared on those scans: readout minus its prior alone, per seed and pooled over seeds and scans
  (``utils.evaluation.protocol.pooled_comparison``), and against the cross-fitted correction where
  ``crossfit_correction.py`` has cached it (``OUT/<run>/default.npz``).

Feature sets (``--features``): ``none``, the prior alone (its readout refitted fold by fold
like the others: pooled over the folds, a fold-wise refit alone moves the AUC a little, so the
features are judged against it too); ``dcg``, the DCG's global feature vector (its own fold network's,
so a readout must carry across networks, as phase 2's feature prior must); ``morphometry``, shape
descriptors of the scan thresholded at half its intensity range (:func:`morphometry`): for mask
data such as AdrenalMNIST3D (binary adrenal masks), global shape statistics a CNN of the DCG's
size need not find; on CT intensities the threshold mask is not an organ and the set is not
meaningful. ``--seed-ensemble`` fits the same readouts again on the prior averaged over the seeds
(every DCG in the average out-of-fold for the scan), to tell a feature's gain over one DCG from the
gain of averaging DCGs. The test split is not read. The prior, features and images of each run are computed
once (the fold DCGs' inference) and cached in ``OUT/<run>/probe_inputs.npz``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy import ndimage  # noqa: E402
from scipy.spatial import ConvexHull, QhullError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from scripts.crossfit_correction import (DEFAULT, auc, fold_rows, pooled_line, read_npz, seed_runs,  # noqa: E402
                                         write_report)
from utils.atomic import atomic_path  # noqa: E402

NONE = "none"  # the readout of the prior alone: refitted fold by fold like the others, with no features
FEATURES = (NONE, "dcg", "morphometry")
MORPHOMETRY = ("log volume", "log surface", "sphericity", "log axis var 1", "log axis var 2", "log axis var 3",
               "elongation", "flatness", "extent 1", "extent 2", "extent 3", "box fill", "solidity",
               "components", "largest component share", "max diameter", "max inscribed radius",
               "mean depth", "surface / volume")
CS = np.logspace(-3, 1, 5)  # the inner cross-validation's grid of inverse L2 strengths


def morphometry(volume: np.ndarray) -> np.ndarray:
    """Shape descriptors (len(MORPHOMETRY),) of a 3D volume thresholded at half its range.

    Volume and surface are voxel and exposed-face counts; the axis variances are the eigenvalues
    of the voxel coordinates' covariance (descending), elongation and flatness the square roots
    of their ratios to the first; extents are the bounding box's edges (descending), box fill and
    solidity the volume over the box's and the convex hull's; the radii come from the Euclidean
    distance transform. An empty or one-voxel mask gives zeros.
    """
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"morphometry needs one 3D volume, got shape {volume.shape}")
    mask = volume > 0.5 * (volume.min() + volume.max())
    n = int(mask.sum())
    if n < 2:
        return np.zeros(len(MORPHOMETRY))
    padded = np.pad(mask, 1).astype(np.int8)
    surface = float(sum(np.count_nonzero(np.diff(padded, axis=a)) for a in range(3)))
    coords = np.argwhere(mask).astype(np.float64)
    variances = np.sort(np.linalg.eigvalsh(np.cov(coords.T)))[::-1] + 1e-6
    extents = np.sort(coords.max(0) - coords.min(0) + 1)[::-1]
    labels, components = ndimage.label(mask)
    largest = np.bincount(labels.ravel())[1:].max()
    try:
        hull = ConvexHull(coords)
        hull_volume = hull.volume
        corners = coords[hull.vertices]
        diameter = np.sqrt(((corners[:, None] - corners[None]) ** 2).sum(-1)).max()
    except QhullError:  # all voxels in one plane or line: no 3D hull
        hull_volume, diameter = float(n), float(extents[0])
    depth = ndimage.distance_transform_edt(mask)
    return np.array([np.log(n), np.log(surface), np.pi ** (1 / 3) * (6 * n) ** (2 / 3) / surface,
                     *np.log(variances), np.sqrt(variances[1] / variances[0]), np.sqrt(variances[2] / variances[0]),
                     *extents, n / np.prod(extents), n / max(hull_volume, n), components, largest / n, diameter,
                     depth.max(), depth[mask].mean(), surface / n])


def logit(probs: np.ndarray, positive_class: int = 1) -> np.ndarray:
    """(N,) log-odds of ``positive_class`` from (N, C) probabilities (clipped at 1e-6)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1.0)
    return np.log(p[:, positive_class]) - np.log(np.delete(p, positive_class, axis=1).sum(1).clip(1e-6))


def leave_fold_out_readout(prior: np.ndarray, features: np.ndarray, labels: np.ndarray, fold: np.ndarray,
                           seed: int = 0) -> np.ndarray:
    """(N, 2) probabilities of a logistic readout of ``[logit(prior), features]``, each fold
    predicted by a readout fitted on the other folds only, its L2 strength chosen from ``CS`` by
    a stratified inner 5-fold cross-validation (log-loss, :func:`best_strength`) on those scans.
    Binary labels."""
    labels, fold = np.asarray(labels), np.asarray(fold)
    if set(np.unique(labels)) - {0, 1}:
        raise ValueError("the readout probe is binary: labels must be 0 / 1")
    x = np.column_stack([logit(prior), np.asarray(features, dtype=np.float64).reshape(len(labels), -1)])
    out = np.zeros(len(labels))
    with threadpool_limits(1):  # hundreds of small fits: BLAS threads only contend (5x slower on 2 cores)
        for k in np.unique(fold):
            fit, held = np.flatnonzero(fold != k), fold == k
            c = best_strength(x[fit], labels[fit], seed)
            out[held] = _readout(c).fit(x[fit], labels[fit]).predict_proba(x[held])[:, 1]
    return np.column_stack([1 - out, out])


def _readout(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def best_strength(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """The inverse L2 strength of ``CS`` with the lowest mean log-loss over a stratified 5-fold
    cross-validation on (x, labels) alone (fewer folds where a class has fewer than 5 scans).
    Log-loss, not ROC-AUC: a rank score cannot tell a readout from its shrunken copy (with the
    prior alone every strength ties), and shrunken probabilities of readouts fitted fold by fold
    no longer rank the pooled scans."""
    splits = min(5, int(np.bincount(labels, minlength=2).min()))
    if splits < 2:
        raise ValueError(f"the readout probe needs 2 scans of each class to fit on, got {np.bincount(labels).tolist()}")
    inner = list(StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed).split(x, labels))
    losses = [np.mean([log_loss(labels[te], _readout(c).fit(x[tr], labels[tr]).predict_proba(x[te])[:, 1],
                                labels=[0, 1]) for tr, te in inner]) for c in CS]
    return float(CS[int(np.argmin(losses))])


def probe_inputs(run_dir: Path, data: str, out: Path) -> dict[str, np.ndarray]:
    """One finished run's training scans (cached): ``labels`` (N,), ``fold`` (N,) its out-of-fold
    DCG, ``prior`` (N, C) that DCG's fused prediction, ``dcg`` (N, D) its global features and
    ``morphometry`` (N, len(MORPHOMETRY)) of the preprocessed scan; rows in training-split order."""
    from utils.benchmarking.quality import open_finished_run
    from utils.pipeline import out_of_fold_guidance

    cached = out / run_dir.name / "probe_inputs.npz"
    if cached.is_file():
        return read_npz(cached)
    with tempfile.TemporaryDirectory() as tmp:  # the run folder is only read
        exp, model = open_finished_run(Path(shutil.copytree(run_dir, Path(tmp) / run_dir.name)), data)
        if exp.config.oof_folds < 2:
            raise SystemExit(f"{run_dir}: the run has no out-of-fold DCGs (oof_folds {exp.config.oof_folds})")
        oof = out_of_fold_guidance(exp, model)  # finished: loads the fold DCGs; rows in train_plain order
        plain = exp.datasets["train_plain"]
        labels = np.asarray(plain.labels)
        fold = np.zeros(len(labels), dtype=np.int64)
        for k, held in enumerate(fold_rows(labels, exp.config.oof_folds, exp.config.seed)):
            fold[held] = k
        shapes = np.stack([morphometry(plain[i]["image"].numpy()[0]) for i in range(len(plain))])
        result = {"labels": labels, "fold": fold, "prior": oof.fused_probs.numpy(),
                  "dcg": oof.global_features.numpy(), "morphometry": shapes}
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp_file:
        np.savez(tmp_file, **result)
    return result


def probe_run(inputs: dict, feature_sets, seed: int) -> dict[str, np.ndarray]:
    """Readout probabilities (N, 2) per feature set name (``'+'``-joined names combine sets;
    ``NONE``: the prior alone)."""
    n = len(inputs["labels"])
    return {name: leave_fold_out_readout(
        inputs["prior"], np.column_stack([np.zeros((n, 0))] + [inputs[f] for f in name.split("+") if f != NONE]),
        inputs["labels"], inputs["fold"], seed) for name in feature_sets}


def report(runs: dict[int, dict], readouts: dict[int, dict], crossfit: dict[int, dict], n_resamples: int = 2000) -> str:
    """Markdown: per seed the AUC of the prior alone, of each readout (and the cross-fitted
    correction where cached); pooled, each readout minus the prior and minus the correction."""
    names = list(next(iter(readouts.values())))
    head = ["seed", "scans", "prior alone", *[f"readout: {n}" for n in names]]
    if crossfit:
        head.append("cross-fitted correction")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for seed, r in sorted(runs.items()):
        cells = [str(seed), str(len(r["labels"])), f"{auc(r['labels'], r['prior']):.4f}",
                 *[f"{auc(r['labels'], readouts[seed][n]):.4f}" for n in names]]
        if crossfit:
            fitted = crossfit.get(seed)  # its own scan order: labels and predictions paired as stored
            cells.append(f"{auc(fitted['labels'], fitted['corrected']):.4f}" if fitted else "-")
        lines.append("| " + " | ".join(cells) + " |")
    rows = {s: np.arange(len(r["labels"])) for s, r in runs.items()}
    side = {s: {"rows": rows[s], "labels": r["labels"], "prior": r["prior"], **readouts[s]} for s, r in runs.items()}
    seeds = sorted(runs)
    pooled = [pooled_line(side, side, seeds, n, "prior", n_resamples, f"readout ({n}) minus its prior alone")
              for n in names]
    if NONE in names:  # what the features add, beyond refitting the prior's scale fold by fold
        pooled += [pooled_line(side, side, seeds, n, NONE, n_resamples, f"readout ({n}) minus readout ({NONE})")
                   for n in names if n != NONE]
    common = [s for s in seeds if s in crossfit]
    if common:
        pooled += [pooled_line(side, crossfit, common, n, "corrected", n_resamples,
                               f"readout ({n}) minus the cross-fitted correction") for n in names]
    return "\n".join(lines + [""] + [f"- {line}" for line in pooled]) + "\n"


def seed_ensemble(runs: dict[int, dict]) -> dict[int, dict]:
    """Each seed's probe inputs with its prior replaced by the mean over the seeds of their
    out-of-fold priors, (N, C): per scan an ensemble of ``len(runs)`` DCGs none of which trained on
    it (each seed has its own fold split). The readouts then still use each seed's folds and
    features, so a feature's gain over a single DCG can be told from the gain of averaging DCGs."""
    first = next(iter(runs.values()))
    for seed, r in runs.items():
        if not np.array_equal(r["labels"], first["labels"]):
            raise SystemExit(f"seed {seed}: the seeds' training scans differ; a seed ensemble needs the same scans")
    mean = np.mean([r["prior"] for r in runs.values()], axis=0)
    return {seed: {**r, "prior": mean} for seed, r in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path, help="folder of finished runs, one per seed")
    parser.add_argument("data", help="adrenal, phantoms, or the scan folder the runs ran on")
    parser.add_argument("--features", nargs="+", default=[NONE, "dcg", "morphometry", "dcg+morphometry"],
                        help=f"feature sets ({', '.join(FEATURES)}; '+' joins sets)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: every finished run")
    parser.add_argument("--out", type=Path, default=None, help="cache and report folder (default: RUNS_DIR/crossfit)")
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--seed-ensemble", action="store_true",
                        help="also fit the readouts on the seeds' averaged out-of-fold prior (2 or more seeds)")
    args = parser.parse_args(argv)
    unknown = sorted({f for name in args.features for f in name.split("+")} - set(FEATURES))
    if unknown:
        raise SystemExit(f"unknown feature sets {unknown}; known: {', '.join(FEATURES)}")
    out = args.out or args.runs_dir / "crossfit"
    paths = seed_runs(args.runs_dir, args.seeds, args.data)
    if args.seed_ensemble and len(paths) < 2:
        raise SystemExit("--seed-ensemble needs finished runs of 2 or more seeds")
    runs = {s: probe_inputs(path, args.data, out) for s, path in paths.items()}
    readouts = {s: probe_run(r, args.features, s) for s, r in runs.items()}
    cached = {s: out / path.name / f"{DEFAULT}.npz" for s, path in paths.items()}
    crossfit = {s: read_npz(path) for s, path in cached.items() if path.is_file()}
    text = report(runs, readouts, crossfit, args.n_resamples)
    if args.seed_ensemble:
        ensemble = seed_ensemble(runs)
        text += (f"\nOn the prior averaged over the {len(runs)} seeds (per scan, {len(runs)} out-of-fold DCGs; "
                 "each seed's row uses its own folds and features):\n\n"
                 + report(ensemble, {s: probe_run(r, args.features, s) for s, r in ensemble.items()}, {},
                          args.n_resamples))
    write_report(out / "readout_probe.md", "readout_probe.py", argv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
