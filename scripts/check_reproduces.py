"""Does the current code reproduce a finished run's stored DiffMIC-3D predictions?

    python scripts/check_reproduces.py RUN_DIR DATA

RUN_DIR is a finished run folder; DATA the data it ran on (``adrenal`` or ``phantoms``, the
quality benchmark's, or a scan folder; ``utils.benchmarking.quality.run_setup``). The run is
copied to a temporary folder (its provenance is left untouched), its finished model predicts
the VALIDATION split again with the run's seed and sampling settings, and the result is
compared with the run's ``val_predictions.csv``: the largest probability difference and both
AUCs. The test split is not read. Use it after a change to the sampler or the model code to tell
whether the benchmark's quality figures, measured by runs of older code, still hold.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.metrics import roc_auc_score  # noqa: E402

from utils.benchmarking.pooled import read_split  # noqa: E402
from utils.benchmarking.quality import finished_run_parser, open_finished_run  # noqa: E402
from utils.pipeline import cache_member_guidance  # noqa: E402
from utils.benchmarking.report import OURS  # noqa: E402
from utils.training.diffusion import predict_dataset  # noqa: E402


def main(argv=None) -> int:
    args = finished_run_parser(__doc__).parse_args(argv)
    split = read_split(args.run_dir, "val_predictions.csv")
    stored, labels = split.models[OURS], split.labels
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(args.run_dir, Path(tmp) / args.run_dir.name))
        exp, model = open_finished_run(run, args.data)
        config = exp.config
        members = cache_member_guidance(exp, model, "val")
        probs = predict_dataset(model, exp.datasets["val"], members, exp.device, config.batch_size,
                                config.seed)["probs"].numpy()
    print(f"{args.run_dir}: {len(labels)} validation scans; largest |p_now - p_stored| "
          f"{np.abs(probs - stored.probs).max():.2e}; validation AUC stored {roc_auc_score(labels, stored.probs[:, 1]):.6f}, "
          f"now {roc_auc_score(labels, probs[:, 1]):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
