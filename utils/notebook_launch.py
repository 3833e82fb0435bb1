"""Notebook 06's training step on one process or on every GPU: :func:`complete_training`.

A notebook kernel cannot host DDP itself (``torchrun`` starts one process per GPU). So with
two or more processes the kernel starts the training as a subprocess, the same run that
``python -m utils.run --train-only`` is, under ``torchrun`` (``utils.launch.launch``, whose
output reaches the cell line by line), waits for it, then loads what it wrote. With one (the
CPU, one GPU) the kernel trains itself, exactly as ``utils.pipeline.finish_training``::

    results, baselines = complete_training(params, exp, model, dcg, gpus="auto")

The subprocess gets the notebook's own run (:func:`run_options`: profile, data folder, output
folder, seed, cache folder, device, every ``$MEDISCOPE_SET`` value), so it finds the notebook's
split and its finished phase-1 DCG, and every stage that already finished is only loaded.
After it, the kernel reads the files (:func:`load_training`) rather than calling
``finish_training`` again: that would only load the stages too, but it would also recompute the
guidance caches and refit the readout on one GPU and rewrite the main checkpoint and
``history.json``, with numbers that may differ in their last digits from those of the run that
trained (measured on the CPU: the readout scale 17.436158 vs 17.436160).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.diffmic3d import DiffMIC3D
from utils.distributed import check_batch_size
from utils.errors import DataError
from utils.experiment import Experiment
from utils.launch import launch, resolve_gpus
from utils.notebook import NotebookParameters
from utils.paths import default_cache_dir
from utils.pipeline import finish_training, require_stage
from utils.training.baselines import baseline_from_checkpoint, runnable_baselines
from utils.training.checkpoint import load_checkpoint
from utils.training.loop import HISTORY_KEYS, FitResult

RUN_MODULE = "utils.run"
# set by the notebook itself, not by the run: the seed is --seed; the subprocess shows no bars
# (its output reaches the cell line by line, where a bar would only appear once it is full)
_NOT_PASSED = ("seed", "progress")

Launcher = Callable[..., int]  # (module, args, nproc, env=...) -> exit status, as utils.launch.launch


def setting_text(value: Any) -> str:
    """``value`` as ``--set KEY=VALUE`` text that ``utils.overrides.convert`` reads back to it:
    ``true`` / ``false``, ``none``, ``a,b,c`` for a tuple or list (``[]`` when empty), the
    ``repr`` of a float (exact), a mapping as a Python literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(setting_text(v) for v in value) if value else "[]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return repr(dict(value))
    return str(value)


def set_options(overrides: Mapping[str, Any]) -> list[str]:
    """``--set KEY=VALUE`` for each TrainConfig override of a notebook run (``NotebookParameters.
    overrides``), a ``model_overrides`` mapping as ``SECTION.FIELD`` items; not the seed or progress."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "model_overrides":
            flat.update({f"{section}.{name}": v for section, changes in value.items() for name, v in changes.items()})
        elif key not in _NOT_PASSED:
            flat[key] = value
    return [item for key, value in flat.items() for item in ("--set", f"{key}={setting_text(value)}")]


def run_options(params: NotebookParameters, device: str) -> list[str]:
    """``utils.run``'s options for the run of ``params`` (what ``NotebookParameters.config`` builds,
    progress bars off), training only. Paths are made absolute here (a kernel's working directory
    is ``notebooks/``, the subprocess's the repository); the cache folder is the one the kernel's
    experiment uses (``$MEDISCOPE_CACHE_DIR``, else ``data/processed``). ``device``: ``cpu`` or ``cuda``
    (each process then takes its own GPU)."""
    args = ["--profile", params.profile, "--output-dir", str(Path(params.output_dir).resolve()),
            "--seed", str(params.seed), "--cache-dir", str(default_cache_dir().resolve()), "--device", device]
    if params.data_dir is not None:
        args += ["--data-dir", str(Path(params.data_dir).resolve())]
    return args + set_options(params.overrides) + ["--set", "progress=false", "--train-only"]


def stage_result(checkpoint: Mapping) -> FitResult:
    """The :class:`FitResult` of a finished stage from its checkpoint (what ``fit`` returns when
    it only loads the stage: ``resumed_from`` = the epochs run)."""
    state = checkpoint["fit"]
    return FitResult({key: list(state["history"][key]) for key in HISTORY_KEYS}, dict(state["best"]), state["epoch"],
                     state["stopped_early"], resumed_from=state["epoch"])


def load_training(exp: Experiment, model: DiffMIC3D, dcg: FitResult, run_first: str = "notebook 06_training"
                  ) -> tuple[dict[str, FitResult], dict[str, nn.Module]]:
    """What :func:`utils.pipeline.finish_training` returns, loaded from the files a finished run
    wrote instead of recomputed: ``model`` gets the main checkpoint's weights (phase 2, the fold
    DCGs, the readout and thresholds); the results by stage (``dcg``, ``diffusion`` with its
    ``readout``, each baseline) come from the stages' checkpoints, the baselines (eval mode) too.

    Raises:
        DataError: a stage has not finished or the main checkpoint is missing (names ``run_first``).
    """
    for stage in ("diffusion", *runnable_baselines(exp.config.baselines)):
        require_stage(exp, stage, run_first)
    if not exp.main_checkpoint.is_file():
        raise DataError(exp.main_checkpoint, f"does not exist: run {run_first} first (with the same output folder)")
    saved = load_checkpoint(exp.main_checkpoint)
    model.load_state_dict(saved["model_state_dict"])
    diffusion = stage_result(load_checkpoint(exp.checkpoint("diffusion")))
    diffusion.history["readout"] = saved["history"]["diffusion"]["readout"]
    results, baselines = {"dcg": dcg, "diffusion": diffusion}, {}
    for name in runnable_baselines(exp.config.baselines):
        checkpoint = load_checkpoint(exp.checkpoint(name))
        baselines[name] = baseline_from_checkpoint(checkpoint).to(exp.device).eval()
        results[name] = stage_result(checkpoint)
    return results, baselines


def complete_training(params: NotebookParameters, exp: Experiment, model: DiffMIC3D, dcg: FitResult,
                      gpus: str | int = "auto", launcher: Launcher = launch
                      ) -> tuple[dict[str, FitResult], dict[str, nn.Module]]:
    """Phase 2 and the main checkpoint, the baselines, ``history.json``: on ``gpus`` processes.

    Args:
        params / exp: the notebook's run and its experiment (``utils.notebook.open_experiment``).
        model, dcg: the finished phase-1 DCG in the model, and its result (``utils.pipeline.load_dcg``).
        gpus: ``'auto'`` (every visible GPU when there are two or more, else one) or N
            (``utils.launch.resolve_gpus``). One: ``finish_training`` in this process, today's path.
            More: ``utils.run --train-only`` (:func:`run_options`) under ``torchrun`` through
            ``launcher``, its output streamed; then :func:`load_training`. ``model`` waits on the
            CPU meanwhile, so the GPU this kernel shares with rank 0 holds little besides its context.
    Returns:
        (results by stage name, baselines by name), as ``finish_training``.
    Raises:
        ValueError: a bad ``gpus``, or a batch too small to split over the processes (one line).
        RuntimeError: the run under ``torchrun`` failed (one line; its output above says why).
    """
    nproc = resolve_gpus(gpus, exp.device)
    if nproc == 1:
        return finish_training(exp, model, dcg)
    check_batch_size(exp.config.batch_size, nproc)
    model.to("cpu")
    if exp.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        code = launcher(RUN_MODULE, run_options(params, exp.device.type), nproc, env={"PYTHONUNBUFFERED": "1"})
    finally:
        model.to(exp.device)
    if code:
        raise RuntimeError(f"training on {nproc} processes failed (exit status {code}; the run's last lines above "
                           "say why); run this cell again to resume from the last checkpoints")
    return load_training(exp, model, dcg)

