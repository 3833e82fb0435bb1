"""What every command line of the project shares: help with defaults, and the run options.

``make_parser`` gives a parser whose ``--help`` shows each option's default (flags: "off");
an option whose default is None says in its own help what happens then. ``add_run_options``
adds the options of a run, the same for ``utils.run`` and ``utils.run_notebooks``
(``add_config_options``, its --profile / --seed / --label-mode / --set, also serve
``utils.prepare_data``); ``run_config`` turns them into the ``TrainConfig``, every --set value
converted to its field's type and checked (``utils.overrides``): a bad one is a one-line
``ValueError`` that the commands pass to ``parser.error`` (exit status 2).
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from utils.data.discovery import LABEL_MODES
from utils.paths import default_output_dir, display_path
from utils.training.profiles import PROFILES, TrainConfig, get_profile, parse_overrides

SET_KEYS = tuple(f.name for f in fields(TrainConfig))


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already speaks of its
    default; flags show ``(default: off)``; None defaults are described by the help itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)".strip()
        if action.default is None or action.default == []:
            return text
        default = action.default
        if isinstance(default, Path):
            default = display_path(default)
        elif isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})".strip()


def make_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for ``python -m <prog>`` described by the first paragraph of ``doc``."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.strip().split("\n\n")[0],
                                   formatter_class=_DefaultsFormatter)


def add_data_options(parser: argparse.ArgumentParser, data: str, output: str) -> None:
    """--data-dir (``data``: what it may be), --output-dir (``output``: what goes there), --cache-dir."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"{data} (default: $MEDISCOPE_DATA_DIR, a MosMedData copy under /kaggle/input, "
                             "else the embedded phantoms)")
    parser.add_argument("--output-dir", type=Path, default=default_output_dir(),
                        help=f"{output} (default: $MEDISCOPE_OUTPUT_DIR, /kaggle/working/outputs on Kaggle, "
                             "else outputs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="preprocessed-volume cache (default: $MEDISCOPE_CACHE_DIR, else data/processed)")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--profile, --seed, --label-mode, --set: what ``run_config`` turns into a ``TrainConfig``."""
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo", help="run size (utils.training.profiles)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of split, initialisation and sampling (default: the profile's, 0)")
    parser.add_argument("--label-mode", choices=LABEL_MODES, default=None,
                        help="binary (Normal / COVID-19) or severity (the five grades CT-0 .. CT-4; generated "
                             "phantoms then go to PHANTOM_DIR_severity in the five-grade layout) (default: the "
                             "profile's, binary)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field, or SECTION.FIELD of the model (sections dcg, "
                             "denoiser, diffusion); repeatable, e.g. --set dcg_epochs=3 --set input_shape=64,64,32 "
                             "--set diffusion.num_samples=4; each value is checked against the field's type and "
                             "range (true/false, none or auto where allowed) (default: none). Keys: "
                             + ", ".join(SET_KEYS))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a run: --profile, --data-dir, --output-dir, --cache-dir, --seed, --label-mode,
    --device, --set."""
    add_config_options(parser)
    add_data_options(parser, "MosMedData folder or MedMNIST .npz", "the run folder")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or auto (default: $MEDISCOPE_DEVICE, else CUDA when available)")


def add_gpus_option(parser: argparse.ArgumentParser) -> None:
    """--gpus, for ``utils.run`` and ``utils.run_notebooks``."""
    parser.add_argument("--gpus", default="auto",
                        help="processes, one per GPU: auto (every visible GPU when there are two or more, else one) "
                             "or N; N > 1 restarts the run under torchrun (on a machine without CUDA: N CPU "
                             "processes with gloo, which checks the distributed path but is not faster)")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig overrides of parsed config options: the --set values, --seed, --label-mode.

    Raises:
        ValueError: one line: a bad --set (``utils.overrides.parse_settings``), or --seed /
            --label-mode contradicting a --set of the same field.
    """
    overrides = parse_overrides(args.set)
    for field, value in (("seed", args.seed), ("label_mode", args.label_mode)):
        if value is None:
            continue
        if overrides.get(field, value) != value:
            raise ValueError(f"--{field.replace('_', '-')} {value} contradicts --set {field}={overrides[field]}")
        overrides[field] = value
    return overrides


def run_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed config options. Raises ValueError (one line) for a bad value."""
    return get_profile(args.profile, **run_overrides(args))
