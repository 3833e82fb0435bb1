"""How phase 2's loss weighting moves the y_0 regression's dependence on the prior, on a finished run.

    python scripts/diagnose_error_weighting.py RUN_DIR DATA

RUN_DIR is a finished run folder (``train_config.json``, the fold DCG checkpoints); DATA is the
data it ran on: ``adrenal`` or ``phantoms`` (the quality benchmark's; the seed is the run's) or a
scan folder (e.g. ``data/MosMedData`` for the demo run in ``outputs``). Prints the out-of-fold
priors' test-free statistics on the TRAINING split (their AUC, mean probability of the true
class) and ``utils.training.diffusion.prior_label_slope`` unweighted, with DiffMIC-v2's error
weights ``1 + w (1 - p(true class))`` and with label-free weights ``1 + w (1 - max p)``. A negative
error-weighted slope means phase 2 is taught to move its output against its prior. Reads only
the training and nothing of the test split; the fold DCGs are loaded from their checkpoints.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.metrics import roc_auc_score  # noqa: E402

from utils.benchmarking.quality import finished_run_parser, open_finished_run  # noqa: E402
from utils.pipeline import out_of_fold_guidance  # noqa: E402
from utils.training.diffusion import error_weights, prior_label_slope  # noqa: E402


def main(argv=None) -> int:
    args = finished_run_parser(__doc__).parse_args(argv)
    exp, model = open_finished_run(args.run_dir, args.data)
    config = exp.config
    oof = out_of_fold_guidance(exp, model)
    labels = np.asarray(exp.datasets["train_plain"].labels)
    probs = oof.fused_probs.float().numpy()
    p_true = probs[np.arange(labels.size), labels]
    weighted = error_weights(oof, oof.fused_probs.new_tensor(labels).long(), config.error_weight).numpy()
    label_free = error_weights(oof, oof.fused_probs.new_tensor(labels).long(), config.error_weight, "uncertainty").numpy()
    print(f"{args.run_dir}: out-of-fold priors on the {labels.size} training scans: AUC "
          f"{roc_auc_score(labels, probs[:, 1]):.3f}, mean p(true class) {p_true.mean():.3f}")
    print(f"slope of the label on the prior: unweighted {prior_label_slope(probs, labels):+.3f}, "
          f"error-weighted (w = {config.error_weight:g}) {prior_label_slope(probs, labels, weighted):+.3f}, "
          f"label-free weighted {prior_label_slope(probs, labels, label_free):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
