"""Prepare a dataset for training: find (or generate) the scans, split them, fill the cache.

    python -m utils.prepare_data [--data-dir DIR] [--output-dir outputs] [--seed 0]
                                 [--label-mode binary|severity] [--target 128 128 64]
                                 [--no-cache] [--phantoms 100]

Data comes from, first match wins: ``--data-dir``; ``$MEDISCOPE_DATA_DIR``; a MosMedData
copy attached under ``/kaggle/input`` (found by content); the embedded phantom set in
``data/MosMedData``, generated here on first use. Prints a summary: layout, scans per class
and per split, where the manifest and cache are.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from utils.data.cache import VolumeCache
from utils.data.discovery import CLASS_NAMES, default_data_dir, discover_scans, find_dataset_root
from utils.errors import DataError
from utils.cli import add_data_options, make_parser
from utils.paths import EMBEDDED_DATA, REPO_ROOT, default_cache_dir
from utils.stage_timer import StageTimer
from utils.data.phantoms import PhantomConfig, write_dataset
from utils.data.preprocessing import PreprocessConfig
from utils.data.splits import SPLITS, load_or_create_splits



def resolve_data_dir(data_dir: Path | None, phantom_dir: Path = EMBEDDED_DATA, n_phantoms: int = 100,
                     seed: int = 0, config: PhantomConfig = PhantomConfig(), progress: bool = True) -> Path:
    """The folder to read scans from, first match wins: ``data_dir``; ``$MEDISCOPE_DATA_DIR``;
    a MosMedData copy under ``/kaggle/input``; else phantoms generated into ``phantom_dir``
    (a no-op when that folder already holds a complete set with the same settings)."""
    if data_dir is not None:
        return Path(data_dir)
    chosen = default_data_dir(REPO_ROOT)
    if chosen.resolve() != EMBEDDED_DATA.resolve():
        return chosen
    write_dataset(phantom_dir, n_phantoms, seed, config=config, progress=progress)
    return Path(phantom_dir)


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
    add_data_options(parser, "folder holding a MosMedData layout", "where splits.csv goes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (and of generated phantoms)")
    parser.add_argument("--label-mode", choices=("binary", "severity"), default="binary", help="labels")
    parser.add_argument("--target", type=int, nargs=3, default=(128, 128, 64), metavar=("H", "W", "D"),
                        help="preprocessed shape")
    parser.add_argument("--phantoms", type=int, default=100, help="size of the embedded set if generated")
    parser.add_argument("--no-cache", action="store_true", help="skip preprocessing into the cache")
    args = parser.parse_args(argv)
    timer = StageTimer()
    try:
        data_dir = resolve_data_dir(args.data_dir, n_phantoms=args.phantoms, seed=args.seed)
        root, layout = find_dataset_root(data_dir)
        records = discover_scans(root, args.label_mode)
        manifest = args.output_dir / "splits.csv"
        splits = load_or_create_splits(records, manifest, seed=args.seed, data_dir=root)
        print(f"dataset: {root} ({layout} layout, {len(records)} scans, labels: {args.label_mode})")
        print(split_summary(splits, args.label_mode))
        print(f"split manifest: {manifest}")
        if not args.no_cache:
            cache = VolumeCache(args.cache_dir or default_cache_dir(), PreprocessConfig(target_shape=tuple(args.target)))
            cache.warm([r.path for r in records])
            print(f"preprocessed cache: {cache.folder}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {timer.total():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
