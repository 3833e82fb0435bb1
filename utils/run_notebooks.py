"""Execute the seven notebooks in order with papermill: the main job.

    python -m utils.run_notebooks [--profile demo] [--data-dir DIR] [--output-dir DIR] [--seed N]
                                  [--cache-dir DIR] [--device cpu|cuda] [--label-mode binary|severity]
                                  [--gpus auto|N] [--set key=value ...] [--update-notebooks]

(the same run options as ``python -m utils.run``)

Each notebook ``notebooks/NN_name.ipynb`` runs with the ``python3`` kernel, its working
directory set to ``notebooks/`` and its ``parameters`` cell given DATA_DIR, OUTPUT_DIR, PROFILE
and SEED, and GPUS where the cell declares it (notebook 06); the executed copy goes to
``OUTPUT_DIR/notebooks/``. ``--gpus`` (default ``auto``: every visible GPU when there are two
or more, else one) is resolved once, here, into a process count: with two or more, notebook 06
trains phase 2 and the baselines as a ``torchrun`` subprocess on that many GPUs
(``utils.notebook_launch``); with one, in its own kernel, exactly as without the option.

The notebooks pass state through files in OUTPUT_DIR only (``utils.pipeline``), so a run
stopped at any point continues where it stopped when started again (finished training stages
are loaded, not redone). On a fresh machine the embedded phantoms are generated first when no
dataset is found.

A failing notebook stops the run: its name, the cell (execution count and first line) and the
error are printed, and the exit status is 1. ``--update-notebooks`` copies the executed
notebooks back over ``notebooks/`` without papermill's injected-parameters cell (how the
committed outputs are made, from a default ``demo`` run, whose parameters are the defaults). Paths in the executed copies are written relative to the repository, so they
carry no machine's folder names. Progress bars inside the notebooks are off
(``MEDISCOPE_PROGRESS=0``): the runner shows its own per-notebook progress.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import nbformat

from utils.cli import add_gpus_option, add_run_options, make_parser, run_overrides
from utils.distributed import check_batch_size
from utils.errors import DataError
from utils.launch import resolve_gpus
from utils.notebook import NOTEBOOKS, PROGRESS_ENV, SET_ENV, resolve_parameters
from utils.atomic import atomic_write_text
from utils.paths import CACHE_DIR_ENV, MAIN_JOB_TIMINGS_JSON, REPO_ROOT
from utils.stage_timer import StageTimer
from utils.prepare_data import phantom_folder, run_data_dir
from utils.training.profiles import get_profile
from utils.seeding import DEVICE_ENV_VAR, pick_device

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL = "python3"
OPTIONAL_PARAMETERS = ("GPUS",)  # passed only to the notebooks whose parameters cell declares them


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def relative_to(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when both lie in the repository, else absolute.

    Parameters are passed to the kernel (working directory ``notebooks/``) in this form, so
    an executed notebook of a run inside the repository names no machine's folders.
    """
    path = Path(path).resolve()
    try:
        path.relative_to(REPO_ROOT)
    except ValueError:
        return str(path)
    return os.path.relpath(path, Path(start).resolve())


def scrub_metadata(notebook_path: Path, name: str) -> None:
    """Replace the absolute input/output paths papermill records in the notebook metadata."""
    nb = nbformat.read(notebook_path, as_version=4)
    meta = nb.metadata.get("papermill")
    if meta is not None:
        meta["input_path"] = f"{name}.ipynb"
        meta["output_path"] = f"{name}.ipynb"
        nbformat.write(nb, notebook_path)


def strip_injected_parameters(notebook_path: Path) -> None:
    """Remove the cell papermill injects after the ``parameters`` cell (for committed copies,
    which read their parameters from their own cell; the runner passes only the defaults'
    values for a default run)."""
    nb = nbformat.read(notebook_path, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nbformat.write(nb, notebook_path)


def declared_parameters(notebook: nbformat.NotebookNode) -> set[str]:
    """The names its ``parameters`` cell assigns (``NAME = ...`` at the start of a line)."""
    return {m.group(1) for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])
            for m in re.finditer(r"^([A-Za-z_]\w*)\s*=", cell.source, flags=re.M)}


def notebook_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> dict:
    """``parameters`` less each of :data:`OPTIONAL_PARAMETERS` that ``notebook`` does not declare
    (papermill would inject it anyway, with a warning)."""
    declared = declared_parameters(notebook)
    return {k: v for k, v in parameters.items() if k not in OPTIONAL_PARAMETERS or k in declared}


def execute(name: str, notebook_dir: Path, out_dir: Path, parameters: dict, progress: bool = True) -> Path:
    """Run one notebook with papermill (:func:`notebook_parameters` of ``parameters``); returns
    the executed copy's path.

    Raises:
        NotebookFailed: the notebook raised (the executed copy, with the error, is kept).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_dir / f"{name}.ipynb"
    if not source.is_file():
        raise NotebookFailed(f"{name}: notebook not found at {source}")
    target = out_dir / f"{name}.ipynb"
    parameters = notebook_parameters(nbformat.read(source, as_version=4), parameters)
    try:
        papermill.execute_notebook(str(source), str(target), parameters=parameters, kernel_name=KERNEL,
                                   cwd=str(notebook_dir), progress_bar=progress)
    except PapermillExecutionError as err:
        first_line = next((line for line in err.source.splitlines() if line.strip()), "")
        raise NotebookFailed(f"{name} failed in cell In [{err.exec_count}] ({first_line.strip()!r}): "
                             f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {target}") from None
    finally:
        if target.is_file():
            scrub_metadata(target, name)
    return target


def run_notebooks(profile: str = "demo", data_dir: Optional[Path] = None, output_dir: Optional[Path] = None,
                  seed: Optional[int] = None, notebook_dir: Path = NOTEBOOK_DIR, names: Sequence[str] = NOTEBOOKS,
                  progress: bool = True, cache_dir: Optional[Path] = None, device: Optional[str] = None,
                  overrides: Optional[dict] = None, timer: Optional[StageTimer] = None,
                  gpus: str | int = 1) -> list[Path]:
    """Execute ``names`` in order (see the module docstring); returns the executed copies.
    Each notebook is a stage of ``timer`` (a new one when None), and so is the phantom
    generation; a whole main job (all seven notebooks) writes the times to
    ``OUTPUT_DIR/main_job_timings.json`` (read by the benchmark's speed section).

    ``output_dir`` None: as the notebooks resolve it (``$MEDISCOPE_OUTPUT_DIR``,
    ``/kaggle/working/outputs`` on Kaggle, else ``outputs/``). ``cache_dir``, ``device`` and
    ``overrides`` (TrainConfig fields) reach the kernels through ``$MEDISCOPE_CACHE_DIR``,
    ``$MEDISCOPE_DEVICE`` and ``$MEDISCOPE_SET``, which every notebook reads (``label_mode`` too:
    severity phantoms are generated here into their own folder, ``utils.prepare_data.phantom_folder``).
    ``gpus``: the GPUS parameter of the notebooks that declare it: a process count, or text
    (``auto``, ``'2'``) resolved here by ``utils.launch.resolve_gpus`` on ``device``; the default,
    1, is one process (the command line's default is ``auto``, resolved by :func:`main`).

    Raises:
        NotebookFailed: at the first notebook that raises.
        ValueError: an unknown profile or override, a bad ``gpus`` or a batch too small for it.
        DataError: the phantoms cannot be generated (e.g. too few for the five severity grades).
    """
    resolved = resolve_parameters(profile=profile)  # what the notebooks will see of the environment
    overrides = {**resolved.overrides, **(overrides or {})}  # $MEDISCOPE_SET, then --set
    if seed is not None:
        overrides["seed"] = int(seed)
    config = get_profile(profile, **overrides)
    if not isinstance(gpus, int):
        gpus = resolve_gpus(gpus, pick_device(device))
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: expected a positive number of processes")
    check_batch_size(config.batch_size, gpus)
    output_dir = Path(output_dir) if output_dir is not None else resolved.output_dir
    out_dir = output_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = timer if timer is not None else StageTimer()
    if data_dir is None:  # the embedded phantoms, generated here (with progress) on first use
        with timer.stage("phantoms (when absent)"):
            data_dir_used = run_data_dir(replace(config, progress=progress))
        data_param = None if data_dir_used.resolve() == phantom_folder(config).resolve() \
            else relative_to(data_dir_used, notebook_dir)
    else:
        data_param = relative_to(Path(data_dir), notebook_dir)
    parameters = {"DATA_DIR": data_param, "OUTPUT_DIR": relative_to(output_dir, notebook_dir),
                  "PROFILE": profile, "SEED": int(config.seed), "GPUS": gpus}
    if cache_dir is not None:
        os.environ[CACHE_DIR_ENV] = str(Path(cache_dir).resolve())
    if device is not None:
        os.environ[DEVICE_ENV_VAR] = device
    rest = {k: v for k, v in overrides.items() if k != "seed"}
    if rest:
        os.environ[SET_ENV] = json.dumps(rest)
    os.environ.setdefault(PROGRESS_ENV, "0")  # inherited by the kernels
    executed = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        with timer.stage(name):
            executed.append(execute(name, Path(notebook_dir), out_dir, parameters, progress))
        print(f"[{i}/{len(names)}] {name} done in {timer.seconds[name]:.0f} s", flush=True)
    if list(names) == list(NOTEBOOKS):  # a whole main job: its times, for the benchmark's speed section
        atomic_write_text(output_dir / MAIN_JOB_TIMINGS_JSON, json.dumps(
            {"runner": "utils.run_notebooks", "profile": profile, "overrides": rest, **timer.as_dict()},
            indent=2) + "\n")
    return executed


def build_parser():
    parser = make_parser("utils.run_notebooks", __doc__)
    add_run_options(parser)
    add_gpus_option(parser)
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOK_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--update-notebooks", action="store_true",
                        help="copy the executed notebooks back over notebooks/ (their committed outputs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    timer = StageTimer()
    try:  # fail early, with the reason, on a bad --set, $MEDISCOPE_SET (what the notebooks merge), device or --gpus
        overrides = run_overrides(args)
        config = get_profile(args.profile, **{**resolve_parameters(profile=args.profile).overrides, **overrides})
        gpus = resolve_gpus(args.gpus, pick_device(args.device))  # once: the notebooks get the count
        check_batch_size(config.batch_size, gpus)
    except ValueError as exc:
        parser.error(str(exc))
    output_dir = args.output_dir
    try:
        executed = run_notebooks(args.profile, args.data_dir, output_dir, None, args.notebooks_dir,
                                 progress=not args.no_progress, cache_dir=args.cache_dir, device=args.device,
                                 overrides=overrides, timer=timer, gpus=gpus)
    except DataError as exc:  # e.g. the phantoms cannot be generated
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.update_notebooks:
        for path in executed:
            target = Path(args.notebooks_dir) / path.name
            shutil.copyfile(path, target)
            strip_injected_parameters(target)
        print(f"updated {len(executed)} notebooks in {args.notebooks_dir}")
    print(timer.report())
    print(f"all {len(executed)} notebooks ran in {timer.total() / 60:.1f} min; executed copies in "
          f"{output_dir / 'notebooks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
