"""Does phase 2 add to its prior? Measured cross-fitted on the training folds, not on validation.

    python scripts/crossfit_correction.py RUNS_DIR DATA [--variant NAME ...] [--seeds S ...] [--out DIR]

RUNS_DIR holds finished runs of the quality benchmark (``quality_<data>_seed<s>``), DATA is
``adrenal``, ``phantoms`` or the scan folder they ran on (``utils.benchmarking.quality.run_setup``).

Why: the validation split that selects and decides (98 scans on AdrenalMNIST3D) cannot tell
configurations 0.01 AUC apart, and its verdict on the correction is biased upward, because the
same scans select phase 2's epoch. Here every TRAINING scan gets a prediction from a phase-2
model that did not train on it, read from a prior of a DCG that did not train on it:

* the training split is cut into the folds of the run's out-of-fold DCGs (those of
  ``utils.pipeline.out_of_fold_guidance``, same seed); scan i of fold k has fold DCG k's prior;
* for each fold k, phase 2 is trained exactly as in the run (the run's configuration, or a
  retrained variant's, ``--variant``; selected and checked on the validation split) on the other
  folds' scans with their out-of-fold priors, and predicts fold k's scans from fold DCG k's prior
  (the model's own chains and DDIM steps, one prior member);
* compared on those scans (1,188 per seed on AdrenalMNIST3D, 12x the validation split): the
  prediction against its prior alone (fold DCG k's fused prediction: what the chains read), and a
  variant against the default, per seed and pooled over seeds and scans
  (``utils.evaluation.protocol.pooled_comparison``; the scans are shared by the seeds).

The test split is not read. What is not held out: the fold DCGs j != k that made the priors of
phase 2's training scans were trained on fold k's scans (their weights, not phase 2's, saw them);
each fold's phase 2 is selected on the validation split as in the run. A fold's phase 2 costs
about 2/3 of the run's (resumable: ``OUT/<run>/<variant>/fold<k>.pth``); its predictions are
cached in ``OUT/<run>/<variant>.npz``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.model_selection import StratifiedKFold  # noqa: E402

from scripts.compare_validation import SEED_DIR, seed_runs as finished_runs  # noqa: E402
from utils.atomic import atomic_path, atomic_write_text  # noqa: E402
from utils.benchmarking.ablations import RETRAINED_KEYS, variant_config as retrained_config  # noqa: E402
from utils.benchmarking.quality import dataset_setup  # noqa: E402
from utils.evaluation.metrics import classification_metrics  # noqa: E402
from utils.evaluation.protocol import format_pooled, pooled_comparison  # noqa: E402

DEFAULT = "default"


def fold_rows(labels, n_folds: int, seed: int) -> list[np.ndarray]:
    """The held-out rows of each out-of-fold DCG: the folds of ``utils.pipeline.out_of_fold_guidance``."""
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    return [held for _, held in folds]


def check_variant(variant: str) -> str:
    if variant != DEFAULT and variant not in RETRAINED_KEYS:
        raise SystemExit(f"unknown variant {variant!r}; known: {DEFAULT}, {', '.join(RETRAINED_KEYS)}")
    return variant


def variant_config(config, variant: str):
    """The run's TrainConfig, or a retrained variant's (``--ablations`` short names)."""
    return config if check_variant(variant) == DEFAULT else retrained_config(config, RETRAINED_KEYS[variant])


def crossfit_run(run_dir: Path, data: str, variant: str, out: Path) -> dict[str, np.ndarray]:
    """One finished run's cross-fitted predictions (cached): ``rows`` (N,) training-split rows,
    ``labels`` (N,), ``fold`` (N,), ``prior`` and ``corrected`` (N, C) class probabilities,
    ``kept`` (folds,) whether each fold's correction passed its validation check."""
    from models.diffmic3d import DiffMIC3D
    from utils.benchmarking.quality import open_finished_run
    from utils.data.dataset import EpochSubset
    from utils.pipeline import cache_member_guidance, out_of_fold_guidance, reseed_stage
    from utils.training.diffusion import predict_dataset, train_diffusion

    cached = out / run_dir.name / f"{variant}.npz"
    if cached.is_file():
        return read_npz(cached)
    work = out / run_dir.name / variant
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the run folder is only read
        exp, model = open_finished_run(Path(shutil.copytree(run_dir, Path(tmp) / run_dir.name)), data)
        config = exp.config
        if config.oof_folds < 2:
            raise SystemExit(f"{run_dir}: the run has no out-of-fold DCGs (oof_folds {config.oof_folds})")
        train, plain, val = exp.datasets["train"], exp.datasets["train_plain"], exp.datasets["val"]
        oof = out_of_fold_guidance(exp, model)  # finished: loads the fold DCGs; rows in train_plain order
        val_members = cache_member_guidance(exp, model, "val")
        cfg = variant_config(config, variant)
        labels = np.asarray(plain.labels)
        rows, fold, corrected, kept = [], [], [], []
        for k, held in enumerate(fold_rows(labels, config.oof_folds, config.seed)):
            reseed_stage(exp, "diffusion")
            net = DiffMIC3D(cfg.model_config(exp.device, exp.num_classes)).to(exp.device)
            net.dcg.load_state_dict(model.dcg.state_dict())
            net.fold_dcgs.load_state_dict(model.fold_dcgs.state_dict())
            rest = np.setdiff1d(np.arange(len(labels)), held)
            result = train_diffusion(net, EpochSubset(train, rest.tolist()), oof, val, val_members, cfg, exp.device,
                                     work / f"fold{k}.pth", exp.meta)
            kept.append(bool(result.history["correction_check"]["kept"]))
            # one prior member: fold DCG k's, looked up by the items' training-split index
            out_k = predict_dataset(net, EpochSubset(plain, held.tolist()), oof, exp.device, config.batch_size,
                                    config.seed)
            rows.append(held), fold.append(np.full(len(held), k)), corrected.append(out_k["probs"].numpy())
        rows = np.concatenate(rows)
        result = {"rows": rows, "labels": labels[rows], "fold": np.concatenate(fold),
                  "prior": oof.fused_probs.numpy()[rows], "corrected": np.concatenate(corrected),
                  "kept": np.asarray(kept)}
    with atomic_path(cached) as tmp_file:
        np.savez(tmp_file, **result)
    return result


def seed_runs(runs_dir: Path, seeds=None, data: str = "") -> dict[int, Path]:
    """Seed -> finished run folder under ``runs_dir`` (``compare_validation.seed_runs``), the
    ``seeds`` asked for or all. For ``data`` ``adrenal`` or ``phantoms`` only the quality
    benchmark's runs of that dataset (``quality_<name>_seed<s>``): its run folder holds both
    datasets' runs, with the same seeds. Two runs of one seed left are an error, not a guess."""
    tag = f"_{dataset_setup(data)[0]}_seed" if data in ("adrenal", "phantoms") else ""
    by_seed: dict[int, list[Path]] = {}
    for name, path in finished_runs(runs_dir, tag).items():
        seed = int(SEED_DIR.search(name).group(1))
        if seeds is None or seed in seeds:
            by_seed.setdefault(seed, []).append(path)
    if not by_seed:
        raise SystemExit(f"no finished run (*{tag or '_seed'}<s>/val_predictions.csv) under {runs_dir}")
    for seed, paths in by_seed.items():
        if len(paths) > 1:
            raise SystemExit(f"seed {seed}: several finished runs under {runs_dir} "
                             f"({', '.join(p.name for p in paths)}); keep one dataset's runs in the folder")
    return {seed: paths[0] for seed, paths in sorted(by_seed.items())}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cached ``.npz``, read into memory (the file is closed)."""
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def auc(labels, probs) -> float:
    return classification_metrics(labels, probs)["roc_auc"]


def report(results: dict[str, dict[int, dict]], n_resamples: int = 2000) -> str:
    """Markdown: per variant and seed, the AUC of the prior alone and of the cross-fitted model
    (pooled over the folds), the mean of the folds' own differences, the folds whose correction was
    kept; pooled over seeds and scans, each variant minus its prior and minus the default, then the
    same within folds (``WITHIN_FOLDS``)."""
    lines = ["| variant | seed | scans | prior alone | cross-fitted | difference | within folds | corrections kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    pooled, within = [], []
    for variant, by_seed in results.items():
        for seed, r in sorted(by_seed.items()):
            a, b = auc(r["labels"], r["corrected"]), auc(r["labels"], r["prior"])
            folds = by_fold({seed: r}, [seed]).values()
            inside = np.mean([auc(f["labels"], f["corrected"]) - auc(f["labels"], f["prior"]) for f in folds])
            lines.append(f"| {variant} | {seed} | {len(r['labels'])} | {b:.4f} | {a:.4f} | {a - b:+.4f} | "
                         f"{inside:+.4f} | {int(r['kept'].sum())}/{len(r['kept'])} |")
        seeds = sorted(by_seed)
        pooled.append(pooled_line(by_seed, by_seed, seeds, "corrected", "prior", n_resamples,
                                  f"{variant}: cross-fitted minus its prior alone"))
        within.append(within_fold_line(by_seed, by_seed, seeds, "corrected", "prior", n_resamples,
                                       f"{variant}, within folds: minus its prior alone"))
        if variant != DEFAULT and DEFAULT in results:
            common = sorted(set(seeds) & set(results[DEFAULT]))
            if common:
                pooled.append(pooled_line(by_seed, results[DEFAULT], common, "corrected", "corrected", n_resamples,
                                          f"{variant} minus {DEFAULT}, cross-fitted"))
                within.append(within_fold_line(by_seed, results[DEFAULT], common, "corrected", "corrected",
                                               n_resamples, f"{variant} minus {DEFAULT}, within folds"))
    return ("\n".join(lines + [""] + [f"- {line}" for line in pooled]) + "\n\n" + WITHIN_FOLDS + "\n\n"
            + "\n".join(f"- {line}" for line in within) + "\n")


WITHIN_FOLDS = ("Within folds (a second reading, not the decision's): the AUC differences of each (seed, fold) "
                "on its own held-out scans, averaged over the seeds' folds and bootstrapped over them and the "
                "scans as if each fold were a seed (a fold's scans are scored by one phase-2 model and one "
                "fold DCG; across the folds of a seed, outputs on different scales do not pool into one "
                "ranking; the folds of a seed share its data and are not independent, so the interval is "
                "somewhat narrow).")


def by_fold(runs: dict, seeds) -> dict:
    """(seed, fold) -> that seed's arrays restricted to that fold's held-out scans."""
    units = {}
    for s in seeds:
        run = runs[s]
        for k in np.unique(run["fold"]):
            held = run["fold"] == k
            units[(s, int(k))] = {key: v if key == "kept" else v[held] for key, v in run.items()}
    return units


def within_fold_line(a_runs, b_runs, seeds, a_key, b_key, n_resamples, name) -> str:
    """``pooled_line`` with every (seed, fold) its own unit (``WITHIN_FOLDS``)."""
    a_units, b_units = by_fold(a_runs, seeds), by_fold(b_runs, seeds)
    line = pooled_line(a_units, b_units, sorted(a_units), a_key, b_key, n_resamples, name)
    line = line.replace(f"{len(a_units)} seeds", f"{len(a_units)} seed-folds", 1)
    return line.split("; DeLong", 1)[0] + ")"  # no DeLong: the folds score different scans


def _by_row(run: dict) -> dict:
    """A run's per-scan arrays in training-split order (the folds come out in fold order), so that
    every seed lists the same scans in the same order (DeLong on the seed-averaged predictions)."""
    order = np.argsort(run["rows"], kind="stable")
    return {k: v if k == "kept" else v[order] for k, v in run.items()}


def pooled_line(a_runs, b_runs, seeds, a_key, b_key, n_resamples, name) -> str:
    """``format_pooled`` of ``a_runs[s][a_key]`` minus ``b_runs[s][b_key]`` over ``seeds``: per-seed
    dicts with ``rows`` (training-split rows, any order: paired by row), ``labels`` and (N, C)
    probabilities; the seeds share the scans (ids ``train/<row>``)."""
    a_runs, b_runs = {s: _by_row(a_runs[s]) for s in seeds}, {s: _by_row(b_runs[s]) for s in seeds}
    for s in seeds:
        if not np.array_equal(a_runs[s]["rows"], b_runs[s]["rows"]):
            raise SystemExit(f"seed {s}: the two sides scored different scans")
    ids = [[f"train/{i}" for i in a_runs[s]["rows"]] for s in seeds]
    result = pooled_comparison([a_runs[s]["labels"] for s in seeds], [a_runs[s][a_key] for s in seeds],
                               [b_runs[s][b_key] for s in seeds], paths=ids, n_resamples=n_resamples)
    return format_pooled(result, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path, help="folder of finished runs, one per seed")
    parser.add_argument("data", help="adrenal, phantoms, or the scan folder the runs ran on")
    parser.add_argument("--variant", nargs="+", default=[DEFAULT],
                        help=f"{DEFAULT} (the runs' configuration) and/or retrained variants: {', '.join(RETRAINED_KEYS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: every finished run")
    parser.add_argument("--out", type=Path, default=None, help="work and report folder (default: RUNS_DIR/crossfit)")
    parser.add_argument("--n-resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    for variant in args.variant:
        check_variant(variant)  # an unknown name fails before any training
    out = args.out or args.runs_dir / "crossfit"
    runs = seed_runs(args.runs_dir, args.seeds, args.data)
    results = {v: {s: crossfit_run(path, args.data, v, out) for s, path in runs.items()} for v in args.variant}
    write_report(out / "crossfit.md", "crossfit_correction.py", argv, report(results, args.n_resamples))
    return 0


def write_report(path: Path, script: str, argv, text: str) -> None:
    """Write ``text`` under the command that made it (atomically) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"Command: `python scripts/{script} {' '.join(sys.argv[1:] if argv is None else argv)}`"
                            f"\n\n{text}")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
