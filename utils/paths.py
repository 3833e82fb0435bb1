"""Repository paths and the environment variables that move them (one place for both)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DATA = REPO_ROOT / "data" / "MosMedData"
CACHE_DIR_ENV = "MEDISCOPE_CACHE_DIR"
OUTPUT_DIR_ENV = "MEDISCOPE_OUTPUT_DIR"
KAGGLE_WORKING = Path("/kaggle/working")


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it (what outputs print), else as is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def default_cache_dir() -> Path:
    """The preprocessed-volume cache: ``$MEDISCOPE_CACHE_DIR``, else ``data/processed``."""
    return Path(os.environ[CACHE_DIR_ENV]).expanduser() if os.environ.get(CACHE_DIR_ENV) else REPO_ROOT / "data" / "processed"


def default_output_dir(environ: Optional[Mapping[str, str]] = None, kaggle_working: str | Path = KAGGLE_WORKING) -> Path:
    """The run folder when none is given, for the notebooks and every command line: ``$MEDISCOPE_OUTPUT_DIR``,
    else ``/kaggle/working/outputs`` when ``kaggle_working`` exists (a Kaggle session), else
    ``outputs/`` in the repository. ``environ`` defaults to ``os.environ``."""
    environ = os.environ if environ is None else environ
    if environ.get(OUTPUT_DIR_ENV):
        return Path(environ[OUTPUT_DIR_ENV]).expanduser()
    if Path(kaggle_working).is_dir():
        return Path(kaggle_working) / "outputs"
    return REPO_ROOT / "outputs"


# file names inside a run's output folder (OUTPUT_DIR/...)
SPLITS_CSV = "splits.csv"  # the frozen train / val / test split (utils.data.splits)
TRAIN_CONFIG_JSON = "train_config.json"  # the run's TrainConfig; another configuration is refused
CHECKPOINTS_DIR = "checkpoints"  # one resumable checkpoint per training stage
MAIN_CHECKPOINT = "diffmic3d_enhanced_model.pth"  # the finished model that utils.predict loads
HISTORY_JSON = "history.json"  # per-epoch series and selected epoch of every stage
MAIN_JOB_TIMINGS_JSON = "main_job_timings.json"  # seconds per notebook of utils.run_notebooks
TIMINGS_JSON = "timings.json"  # seconds (and peak CUDA memory) per stage (utils.stage_timer)
