"""Checkpoints that load with ``torch.load(weights_only=True)``, written atomically.

A checkpoint is a dict of tensors and plain data only (dict, list, tuple, str, int, float,
bool, None), so it loads without unpickling arbitrary code:

    {"format": "mediscope-checkpoint", "format_version": 1,
     "model_config": {...plain data, e.g. dataclasses.asdict(config)...},
     "model_state_dict": {...tensors...},
     **extra}   # e.g. optimizer / scheduler state_dicts, epoch, history, rng_state()

As in nanoGPT, the model's configuration travels with its weights; on loading,
:func:`check_config_matches` compares it with the configuration of the model being built and
names every differing key. :func:`rng_state` / :func:`set_rng_state` capture and restore the
random number generators a training loop draws from, so a resumed run continues with exactly
the random numbers an uninterrupted run would have drawn.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from models.model_config import with_added_later

from utils.atomic import atomic_path
from utils.errors import DataError

CHECKPOINT_FORMAT = "mediscope-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "model_config", "model_state_dict")

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming ``where`` if ``value`` holds anything but tensors and plain data.

    Types are matched exactly: ``np.float64`` subclasses ``float`` but does not load with
    ``weights_only=True``.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"checkpoint key {where}: dict key {key!r} of type {type(key).__name__} "
                                "is not plain data (use str or int keys)")
            _check_plain(item, f"{where}.{key}")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    hint = ""
    if isinstance(value, (np.ndarray, np.generic)):
        hint = "; convert with .tolist() / .item() or torch.from_numpy"
    elif hasattr(value, "__dataclass_fields__"):
        hint = "; convert with dataclasses.asdict"
    elif isinstance(value, Path):
        hint = "; convert with str()"
    raise TypeError(f"checkpoint key {where}: {type(value).__module__}.{type(value).__qualname__} is not a tensor "
                    f"or plain data (dict/list/tuple/str/int/float/bool/None){hint}")


def _on_cpu(value):
    """``value`` with every tensor detached and on the CPU (containers rebuilt, a state dict's
    ``_metadata`` kept): a checkpoint written on a GPU loads anywhere without ``map_location``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value) in (dict, OrderedDict):
        out = type(value)((key, _on_cpu(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if type(value) in (list, tuple):
        return type(value)(_on_cpu(item) for item in value)
    return value


def save_checkpoint(path: str | Path, *, model_config: Mapping, model_state_dict: Mapping, **extra) -> Path:
    """Validate and write a checkpoint atomically (temp file beside ``path`` + rename); every
    tensor is stored on the CPU, whatever device it came from.

    Args:
        path: target file (parent folders are created).
        model_config: the model's configuration as plain data (``dataclasses.asdict``).
        model_state_dict: ``model.state_dict()``.
        **extra: further plain-data entries (optimizer / scheduler state, epoch, metrics,
            history, :func:`rng_state`); the names ``format``, ``format_version``,
            ``model_config`` and ``model_state_dict`` are reserved.

    Raises:
        TypeError: some entry is not a tensor or plain data; the message names its key path
            (e.g. ``extra.best.auc``). Nothing is written then.
    """
    reserved = set(REQUIRED_KEYS) & set(extra)
    if reserved:
        raise ValueError(f"save_checkpoint: extra keys {sorted(reserved)} are reserved")
    if not isinstance(model_config, Mapping):
        raise TypeError(f"checkpoint key model_config: expected a dict (dataclasses.asdict(config)), "
                        f"got {type(model_config).__name__}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_config": dict(model_config),
        "model_state_dict": model_state_dict,  # as is: keeps the state dict's _metadata (module versions)
        **extra,
    }
    for key, value in payload.items():
        _check_plain(value, key)
    payload = {key: _on_cpu(value) for key, value in payload.items()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        DataError: one line naming the file and the problem: missing, not a readable torch
            file (truncated / corrupt), holding non-plain objects, or not one of our
            checkpoints (missing keys or wrong format tag).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ...
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            # a valid torch file, but weights_only refuses an object in it; name its type
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise DataError(path, f"holds objects other than tensors and plain data{what}, "
                                  "refused by torch.load(weights_only=True)") from err
        raise DataError(path, f"corrupt or truncated checkpoint, not a readable torch file "
                              f"({type(err).__name__})") from err
    if not isinstance(ckpt, dict):
        raise DataError(path, f"not a MediScope checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise DataError(path, f"not a MediScope checkpoint (missing keys: {', '.join(missing)})")
    if ckpt["format"] != CHECKPOINT_FORMAT or ckpt["format_version"] != CHECKPOINT_VERSION:
        raise DataError(path, f"unsupported checkpoint format {ckpt['format']!r} version {ckpt['format_version']!r} "
                              f"(expected {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION})")
    return ckpt


def best_weights_path(checkpoint_path: str | Path) -> Path:
    """Where ``utils.training.loop.fit`` keeps a stage's best weights while it trains: ``dcg.pth`` ->
    ``dcg.best.pth``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.best{path.suffix}")


def kept_entries(state: Mapping, keys: Optional[Callable[[str], bool]]) -> dict:
    """The entries of ``state`` a stage checkpoints (all when ``keys`` is None)."""
    return dict(state) if keys is None else {k: v for k, v in state.items() if keys(k)}


def load_kept(model: nn.Module, state: Mapping, keys: Optional[Callable[[str], bool]], path: Path) -> None:
    """Load the checkpointed entries of ``state`` into ``model``; every entry ``keys`` selects
    must be there (a file of an older layout may hold more: the rest is ignored)."""
    if keys is None:
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(kept_entries(state, keys), strict=False)
    missing = [k for k in missing if keys(k)]
    if missing or unexpected:
        raise DataError(path, f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                              "delete it to retrain the stage")


def _flatten(config: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> ``{"a.b.c": value}``."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_config_matches(saved: Mapping, current: Mapping, path: str | Path | None = None) -> None:
    """Raise a one-line error listing every key where a checkpoint's ``model_config`` differs:
    a ``DataError`` naming ``path`` when given (a stage checkpoint in an output folder), else a
    ``ValueError``.

    Nested dicts are compared key by key (named ``a.b.c``); tuples and lists compare equal
    when their items do (a config saved from a tuple field may come back as a list). A section
    (a top-level dict) of the checkpoint that ``current`` does not have is not compared: a stage
    names the sections it depends on (the DCG stage: ``dcg``), so a change elsewhere in the
    model (e.g. the denoiser) does not invalidate a trained DCG. Fields added to the model
    after a checkpoint was written (``models.model_config.ADDED_LATER``) are compared with the
    value that checkpoint had in effect.
    """
    def normalise(value):
        return [normalise(v) for v in value] if isinstance(value, (list, tuple)) else value

    # a model field added later counts, in an older checkpoint, as the value it had in effect
    saved = with_added_later({k: v for k, v in saved.items() if k in current or not isinstance(v, Mapping)})
    ours, theirs = _flatten(saved), _flatten(current)
    problems = []
    for key in sorted(set(ours) | set(theirs)):
        if key not in theirs:
            problems.append(f"{key} (only in checkpoint: {ours[key]!r})")
        elif key not in ours:
            problems.append(f"{key} (missing from checkpoint; model has {theirs[key]!r})")
        elif normalise(ours[key]) != normalise(theirs[key]):
            problems.append(f"{key} (checkpoint {ours[key]!r} != model {theirs[key]!r})")
    if problems:
        message = "checkpoint model_config does not match the model: " + "; ".join(problems)
        if path is not None:
            raise DataError(path, message + "; it was written by another configuration: delete it to retrain, "
                                            "or use another --output-dir")
        raise ValueError(message)


# ----------------------------------------------------------------------------------------
# random number generator state
# ----------------------------------------------------------------------------------------

def _numpy_plain(value):
    """A numpy bit-generator state as plain data (arrays -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {key: _numpy_plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def rng_state(numpy_generators: Mapping[str, np.random.Generator] | None = None,
              torch_generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """Capture the state of the torch global RNGs and of the given generators, as plain data.

    Captured: the torch CPU generator (``torch.get_rng_state()``, a uint8 tensor; dropout on
    CPU, un-seeded DataLoader shuffling), every CUDA device's generator when CUDA is
    available, and each named ``np.random.Generator`` (its ``bit_generator.state``; arrays as
    lists, large integers as Python ints, which ``weights_only=True`` loads) and
    ``torch.Generator``. Python's ``random`` and numpy's legacy global RNG are not captured:
    library code here never draws from them.

    Returns:
        ``{"torch_cpu": tensor, "torch_cuda": [tensor, ...] (only with CUDA),
        "numpy": {name: state}, "torch_generators": {name: tensor}}``.
    """
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {name: _numpy_plain(gen.bit_generator.state) for name, gen in (numpy_generators or {}).items()},
        "torch_generators": {name: gen.get_state() for name, gen in (torch_generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping, numpy_generators: Mapping[str, np.random.Generator] | None = None,
                  torch_generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured, in place (the generators are modified).

    The named generators must be the ones that were captured (same names). CUDA states are
    restored when CUDA is available, for as many devices as both sides have; a run saved on
    CPU and resumed on CUDA (or the reverse) keeps its CPU and named generators but cannot be
    bit-identical on the device anyway.
    """
    numpy_generators, torch_generators = numpy_generators or {}, torch_generators or {}
    for kind, given in (("numpy", numpy_generators), ("torch_generators", torch_generators)):
        saved = set(state.get(kind, {}))
        if saved != set(given):
            raise ValueError(f"rng state {kind}: saved generators {sorted(saved)} but asked to restore {sorted(given)}")
    torch.set_rng_state(state["torch_cpu"].cpu())
    if torch.cuda.is_available() and "torch_cuda" in state:
        for device, cuda_state in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    for name, gen in numpy_generators.items():
        gen.bit_generator.state = state["numpy"][name]
    for name, gen in torch_generators.items():
        gen.set_state(state["torch_generators"][name].cpu())
