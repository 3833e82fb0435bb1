"""Re-run DiffMIC-3D on AdrenalMNIST3D (seeds 0, 1, 2; no baselines) and compare it, paired on the
same 298 test scans, with the committed benchmark runs of an earlier version (its DiffMIC-3D and
its 3D ResNet-18) and with this run's own DCG.

    python scripts/compare_versions_adrenal.py [--old outputs/benchmark/benchmark_runs] [--out /tmp]

Needs ../shared/data/medmnist/adrenalmnist3d.npz and the earlier runs' predictions.csv (written by
``python -m utils.benchmark_quality --data adrenal --seeds 0 1 2``). About 7 min per seed on 2
CPU cores. Prints one JSON line per seed and writes ``<out>/adrenal_versions.json``.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.benchmarking.quality import dataset_setup, read_predictions  # noqa: E402
from utils.evaluation.metrics import classification_metrics  # noqa: E402
from utils.evaluation.paired import paired_auc_difference  # noqa: E402
from utils.paths import REPO_ROOT  # noqa: E402
from utils.run import run_experiment  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, default=REPO_ROOT / "outputs" / "benchmark" / "benchmark_runs")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    _, base, path = dataset_setup("adrenal")
    results = {}
    for seed in (0, 1, 2):
        run = args.out / f"adrenal_film_seed{seed}"
        if not (run / "predictions.csv").is_file():
            run_experiment(replace(base, baselines=(), seed=seed), run, data_dir=path, device="cpu")
        labels, new = read_predictions(run)
        old_labels, old = read_predictions(args.old / f"quality_adrenalmnist3d_seed{seed}")
        if not (labels == old_labels).all():
            raise SystemExit("the two runs were not scored on the same test scans")
        auc = lambda p: classification_metrics(labels, p)["roc_auc"]  # noqa: E731
        results[seed] = {
            "diffmic_new": auc(new["DiffMIC-3D"]), "diffmic_old": auc(old["DiffMIC-3D"]),
            "dcg_fused_new": auc(new["DCG without diffusion"]), "resnet_old_run": auc(old["3D ResNet-18"]),
            "new_minus_old": paired_auc_difference(labels, new["DiffMIC-3D"], old["DiffMIC-3D"], 2000, seed),
            "new_minus_dcg": paired_auc_difference(labels, new["DiffMIC-3D"], new["DCG without diffusion"], 2000, seed),
            "new_minus_resnet": paired_auc_difference(labels, new["DiffMIC-3D"], old["3D ResNet-18"], 2000, seed)}
        print(seed, json.dumps(results[seed], default=float), flush=True)
    (args.out / "adrenal_versions.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
