"""What the seven notebooks share: their parameters, the run they belong to, and file checks.

Every notebook has one cell tagged ``parameters`` (papermill injects values after it)::

    DATA_DIR = None    # None: $MEDISCOPE_DATA_DIR, a MosMedData copy under /kaggle/input, else the embedded phantoms
    OUTPUT_DIR = None  # None: $MEDISCOPE_OUTPUT_DIR, /kaggle/working/outputs on Kaggle, else outputs/
    PROFILE = None     # None: $MEDISCOPE_PROFILE, else "demo"
    SEED = None        # None: $MEDISCOPE_SEED, else 0

and then ``params = resolve_parameters(DATA_DIR, OUTPUT_DIR, PROFILE, SEED)``. An explicit
value wins, then the environment, then Kaggle detection, then the embedded default, so
``MEDISCOPE_PROFILE=smoke pytest --nbval-lax notebooks/`` runs all seven at the smoke size
and a Kaggle session needs no edits. ``$MEDISCOPE_PROGRESS=0`` turns the progress bars off
(the runner does so for the committed notebooks, so they hold no widget output).

Notebooks pass state only through files in OUTPUT_DIR (``utils.pipeline``), so each can be
re-run alone; :func:`open_experiment` says which notebook to run first when a file is missing.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.data.discovery import default_data_dir
from utils.errors import DataError
from utils.experiment import Experiment, prepare_experiment
from utils.paths import display_path
from utils.paths import EMBEDDED_DATA, KAGGLE_WORKING, REPO_ROOT, default_output_dir
from utils.training.profiles import PROFILES, TrainConfig, get_profile

PROFILE_ENV = "MEDISCOPE_PROFILE"
SEED_ENV = "MEDISCOPE_SEED"
PROGRESS_ENV = "MEDISCOPE_PROGRESS"
SET_ENV = "MEDISCOPE_SET"  # JSON object of TrainConfig overrides (utils.run_notebooks --set)
DEFAULT_PROFILE = "demo"
NOTEBOOKS = ("01_data_loading", "02_preprocessing", "03_dcg_model", "04_prior_generation", "05_unet",
             "06_training", "07_evaluation")


@dataclass(frozen=True)
class NotebookParameters:
    """The resolved parameters of a notebook run.

    Attributes:
        data_dir: folder to read scans from, or None for the profile's embedded phantoms
            (generated on first use by notebook 01).
        output_dir: the run folder all notebooks read and write.
        profile: a ``utils.training.profiles`` name (smoke, demo, full).
        seed: the run's seed (split, initialisation, sampling).
        progress: show progress bars.
        overrides: further ``TrainConfig`` fields (``$MEDISCOPE_SET``, set by ``utils.run_notebooks --set``).
    """

    data_dir: Optional[Path]
    output_dir: Path
    profile: str
    seed: int
    progress: bool
    overrides: Mapping = field(default_factory=dict)

    def config(self) -> TrainConfig:
        """The profile's ``TrainConfig`` with the overrides, this seed and progress setting."""
        return get_profile(self.profile, **{**self.overrides, "seed": self.seed, "progress": self.progress})

    def summary(self) -> str:
        """One line per parameter, paths relative to the repository when inside it."""
        data = "embedded phantoms" if self.data_dir is None else display_path(self.data_dir)
        return (f"DATA_DIR   = {data}\nOUTPUT_DIR = {display_path(self.output_dir)}\n"
                f"PROFILE    = {self.profile}\nSEED       = {self.seed}")


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "")


def resolve_parameters(data_dir=None, output_dir=None, profile=None, seed=None,
                       environ: Optional[Mapping[str, str]] = None,
                       kaggle_working: Path = KAGGLE_WORKING, kaggle_input: Path = Path("/kaggle/input"),
                       ) -> NotebookParameters:
    """Fill each parameter left as None: environment, then Kaggle, then the embedded default.

    ``environ`` (default ``os.environ``) and the Kaggle folders are arguments so the choice is
    testable. Raises ValueError for an unknown profile or a seed that is not an integer, and
    ``DataError`` (one line naming a few of the files) when an attached Kaggle dataset holds CT
    data in no accepted layout (``utils.data.discovery.default_data_dir``): never a silent
    fall-back to the phantoms. ``open_experiment`` then prints which data the run uses first.
    """
    environ = os.environ if environ is None else environ
    if data_dir is None:
        found = default_data_dir(REPO_ROOT, kaggle_input, environ)
        data_dir = None if found.resolve() == EMBEDDED_DATA.resolve() else found
    if output_dir is None:
        output_dir = default_output_dir(environ, kaggle_working)
    profile = profile or environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ValueError(f"PROFILE={profile!r} is not a profile; choose one of {sorted(PROFILES)}")
    if seed is None:
        seed = environ.get(SEED_ENV, "0")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"SEED must be an integer, got {seed!r}") from None
    progress = _flag(environ.get(PROGRESS_ENV, "1"))
    try:
        overrides = json.loads(environ.get(SET_ENV) or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"${SET_ENV} must be a JSON object of TrainConfig fields, got {environ[SET_ENV]!r}") from None
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return NotebookParameters(None if data_dir is None else Path(data_dir), Path(output_dir), profile, seed, progress,
                              overrides)


def open_experiment(params: NotebookParameters, run_first: Optional[str] = "01_data_loading",
                    verbose: bool = False) -> Experiment:
    """The run of ``params`` (``utils.pipeline.prepare_experiment``).

    Args:
        run_first: the notebook that creates the run folder's split; when ``OUTPUT_DIR/splits.csv``
            is missing a ``DataError`` names it. None (notebook 01) creates the split and, on
            first use, the embedded phantoms.
    """
    splits = params.output_dir / "splits.csv"
    if run_first is not None and not splits.is_file():
        raise DataError(splits, f"not found: run notebook {run_first} first (same OUTPUT_DIR and PROFILE)")
    return prepare_experiment(params.config(), params.output_dir, params.data_dir, verbose=verbose)


def require_file(path: str | Path, notebook: str) -> Path:
    """``path`` if it exists, else a one-line ``DataError`` naming the notebook that writes it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"not found: run notebook {notebook} first (same OUTPUT_DIR and PROFILE)")
    return path
