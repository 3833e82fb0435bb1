"""Prepare a run's data exactly as a run of the same options would: find (or generate) the scans,
split them, fill the cache.

    python -m utils.prepare_data [--profile demo] [--data-dir DIR] [--output-dir DIR] [--cache-dir DIR]
                                 [--seed N] [--label-mode binary|severity] [--set key=value ...] [--no-cache]

The options are those of ``python -m utils.run`` (``utils.cli``), and so is what they mean: the
data folder (``run_data_dir``: ``--data-dir``; ``$MEDISCOPE_DATA_DIR``; a MosMedData copy under
``/kaggle/input``, found by content; else the profile's phantoms, generated here on first use
into ``phantom_folder``), the split ``OUTPUT_DIR/splits.csv`` and the cache entries
(``volume_caches``: the profile's ``input_shape`` and ``target_spacing``, plus the
high-resolution copy when ``roi_scale > 1``). A later ``python -m utils.run`` with the same
options therefore preprocesses nothing. Prints a summary: layout, scans per class and per split,
where the manifest and cache are.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from utils.cli import add_config_options, add_data_options, make_parser, run_config
from utils.data.cache import VolumeCache
from utils.data.discovery import CLASS_NAMES, default_data_dir, discover_scans, find_dataset_root
from utils.data.medmnist import is_medmnist_file
from utils.data.phantoms import PhantomConfig, write_dataset
from utils.data.preprocessing import PreprocessConfig
from utils.data.splits import SPLITS, load_or_create_splits
from utils.errors import DataError
from utils.paths import EMBEDDED_DATA, REPO_ROOT, SPLITS_CSV, default_cache_dir, display_path
from utils.stage_timer import StageTimer
from utils.training.profiles import TrainConfig

PHANTOM_LAYOUTS = {"binary": "ct0_ct23", "severity": "studies"}  # label mode -> layout of its phantom set
MIN_SEVERITY_PHANTOMS = 20  # from 20 on, the 'studies' layout gives every grade the 3 scans a split needs


def resolve_data_dir(data_dir: Path | None, phantom_dir: Path = EMBEDDED_DATA, n_phantoms: int = 100,
                     seed: int = 0, config: PhantomConfig = PhantomConfig(), progress: bool = True,
                     layout: str = "ct0_ct23") -> Path:
    """The folder to read scans from, first match wins: ``data_dir``; ``$MEDISCOPE_DATA_DIR``;
    a MosMedData copy under ``/kaggle/input``; else phantoms in ``layout`` generated into
    ``phantom_dir`` (a no-op when that folder already holds a complete set with the same settings).

    Raises:
        DataError: severity phantoms (``layout='studies'``) asked for fewer than 20 scans.
    """
    if data_dir is not None:
        return Path(data_dir)
    chosen = default_data_dir(REPO_ROOT)
    if chosen.resolve() != EMBEDDED_DATA.resolve():
        return chosen
    if layout == PHANTOM_LAYOUTS["severity"] and n_phantoms < MIN_SEVERITY_PHANTOMS:
        raise DataError(phantom_dir, f"n_phantoms={n_phantoms} leaves some severity grade fewer than the 3 "
                                     f"phantoms a split needs; use --set n_phantoms={MIN_SEVERITY_PHANTOMS} or more")
    write_dataset(phantom_dir, n_phantoms, seed, layout=layout, config=config, progress=progress)
    return Path(phantom_dir)


def phantom_folder(config: TrainConfig) -> Path:
    """Where the phantoms of ``config`` go: ``REPO_ROOT / phantom_dir`` for binary labels (the
    CT-0 / CT-23 layout), ``phantom_dir`` + ``_severity`` for severity labels (the five-grade
    ``studies`` layout), so neither set overwrites the other."""
    folder = REPO_ROOT / config.phantom_dir
    return folder if config.label_mode == "binary" else folder.with_name(f"{folder.name}_{config.label_mode}")


def run_data_dir(config: TrainConfig, data_dir: Optional[Path] = None) -> Path:
    """The data folder of a run of ``config`` (``resolve_data_dir``), its phantoms generated at the
    profile's settings (``n_phantoms``, ``phantom_size``, ``phantom_seed``) into ``phantom_folder``."""
    return resolve_data_dir(data_dir, phantom_folder(config), config.n_phantoms, config.phantom_seed,
                            PhantomConfig(size=config.phantom_size), config.progress, PHANTOM_LAYOUTS[config.label_mode])


def volume_caches(config: TrainConfig, cache_dir: Optional[Path] = None) -> tuple[VolumeCache, Optional[VolumeCache]]:
    """The caches a run of ``config`` reads, in ``cache_dir`` (default ``$MEDISCOPE_CACHE_DIR``, else
    ``data/processed``): the network input (``input_shape`` at ``target_spacing``) and, for
    ``roi_scale`` s > 1, the copy ROIs are cropped from ((sH, sW, D) at spacing / s in-plane), else None."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = VolumeCache(cache_dir, PreprocessConfig(target_shape=config.input_shape,
                                                    target_spacing=config.target_spacing))
    if config.roi_scale == 1:
        return cache, None
    (h, w, d), s, spacing = config.input_shape, config.roi_scale, config.target_spacing
    hires = PreprocessConfig(target_shape=(h * s, w * s, d),
                             target_spacing=None if spacing is None else (spacing[0] / s, spacing[1] / s, spacing[2]))
    return cache, VolumeCache(cache_dir, hires)


def split_summary(splits: dict, classes) -> str:
    """A small table: one row per split, one column per class; ``classes`` is a label mode
    (``'binary'``, ``'severity'``) or the class names (label k = names[k])."""
    names = CLASS_NAMES[classes] if isinstance(classes, str) else list(classes)
    width = max(10, *(len(n) + 2 for n in names))
    rows = [f"{'split':<6}" + "".join(f"{n:>{width}}" for n in names) + f"{'total':>8}"]
    for split in SPLITS:
        counts = Counter(r.label for r in splits[split])
        rows.append(f"{split:<6}" + "".join(f"{counts.get(k, 0):>{width}}" for k in range(len(names)))
                    + f"{len(splits[split]):>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("utils.prepare_data", __doc__)
    add_config_options(parser)
    add_data_options(parser, "MosMedData folder", "the run folder, where splits.csv goes")
    parser.add_argument("--no-cache", action="store_true", help="skip preprocessing into the cache")
    args = parser.parse_args(argv)
    try:
        config = run_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.data_dir is not None and is_medmnist_file(args.data_dir):
        print(f"{args.data_dir}: a MedMNIST file needs no preparation (a run reads it into memory)")
        return 0
    timer = StageTimer()
    try:
        root, layout = find_dataset_root(run_data_dir(config, args.data_dir))
        records = discover_scans(root, config.label_mode)
        caches = [c for c in volume_caches(config, args.cache_dir) if c is not None and not args.no_cache]
        paths = [r.path for r in records]
        if caches:  # every scan read and checked before the split is frozen, as a run does
            caches[0].warm(paths, progress=config.progress)
        manifest = args.output_dir / SPLITS_CSV
        splits = load_or_create_splits(records, manifest, seed=config.seed, data_dir=root)
        for hires_cache in caches[1:]:
            hires_cache.warm(paths, progress=config.progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dataset: {display_path(root)} ({layout} layout, {len(records)} scans, labels: {config.label_mode})")
    print(split_summary(splits, config.label_mode))
    print(f"split manifest: {display_path(manifest)}")
    for cache in caches:
        print(f"preprocessed cache: {display_path(cache.folder)} (input {cache.config.target_shape})")
    print(f"done in {timer.total():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
