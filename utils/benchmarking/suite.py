"""The benchmark suite: :func:`run_benchmark` runs sections 1-6 in order (the docstring of
``utils.benchmark`` says what each measures) and writes ``benchmark.md`` and ``benchmark.csv``."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from utils.atomic import atomic_write_text
from utils.benchmarking.design import design_choices
from utils.benchmarking.memory import memory_and_projection
from utils.benchmarking.quality_reports import QUALITY_DIR, quality
from utils.benchmarking.report import Report, machine_info
from utils.benchmarking.scaling import scaling
from utils.benchmarking.speed import speed
from utils.log import get_logger
from utils.paths import display_path

log = get_logger(__name__)


def run_benchmark(output_dir: Path, quick: bool = False, device: Optional[str] = None,
                  quality_dir: Optional[Path] = None, quality_only: bool = False) -> Path:
    """Run every section and write ``benchmark.md`` and ``benchmark.csv``; returns the .md path.

    ``quality_only``: only section 1 (the quality reports and their targets); the report says
    that the other sections were not run.

    ``quality_dir``: where ``utils.benchmark_quality`` wrote its reports (read only; default
    ``outputs/benchmark``).
    """
    from utils.benchmarking.quality import dataset_setup
    from utils.run import run_experiment
    from utils.seeding import pick_device, seed_everything
    from utils.training.profiles import get_profile

    started = time.perf_counter()
    seed_everything(0)
    dev = pick_device(device)
    output_dir = Path(output_dir)
    runs = output_dir / "benchmark_runs"
    runs.mkdir(parents=True, exist_ok=True)
    quality_dir = QUALITY_DIR if quality_dir is None else Path(quality_dir)
    report = Report()
    sections = []

    def section(name, fn):
        tic = time.perf_counter()
        log.info(f"[benchmark] {name} ...")
        result = fn()
        sections.append((name, time.perf_counter() - tic))
        log.info(f"[benchmark] {name} done in {sections[-1][1]:.0f} s")
        return result

    run0 = section("quality", lambda: quality(report, quality_dir, quick, output_dir, str(dev)))
    if quality_only:
        report.text("## 2.-6. Speed, memory, scaling, projection, design\n\nNot run in this report "
                    "(`--quality-only`); run `python -m utils.benchmark` for them.")
    elif quick:  # the smoke run of run_quality, seed 0
        speed_config = replace(dataset_setup("smoke")[1], seed=0)
    else:
        speed_config = get_profile("demo", seed=0, progress=False)
        run0 = runs / "speed_demo_seed0"
        section("speed run (demo, seed 0)", lambda: run_experiment(speed_config, run0, device=str(dev)))
    if not quality_only:
        n_train = 64  # the full profile's training split of the 100 embedded scans
        section("speed", lambda: speed(report, run0, speed_config, dev, quick))
        projection = section("memory", lambda: memory_and_projection(report, dev, quick, n_train))
        section("scaling", lambda: scaling(report, dev, quick))
        report.text(projection)
        section("design", lambda: design_choices(report, runs, dev, quick))

    info = machine_info(dev)
    command = "python -m utils.benchmark" + (" --quick" if quick else "") + (" --quality-only" if quality_only else "")
    header = (f"# Benchmark{' (--quick: smoke sizes, not for reading)' if quick else ''}\n\n"
              f"Command: `{command}`, run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{(time.perf_counter() - started) / 60:.1f} min in all (experiment runs already complete in "
              f"`{runs.name}/` are loaded from their checkpoints, not retrained; see 'Sections took' below). "
              f"Quality reports read from `{display_path(quality_dir)}/`.\n\n"
              f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
              f"torch {info['torch']}, Python {info['python']}, device `{info['device']}`"
              + (f" ({info['gpu']})" if "gpu" in info else "") + ".\n\n"
              "## Targets\n\nQuality targets are met only when the mean over seeds of the paired test-AUC "
              "difference is > 0 (the AUC target: when the mean AUC reaches it); 'not measured' says why.\n\n"
              + report.targets_table() + "\n")
    for key, value in info.items():
        report.add("machine", key, "value", float("nan"), unit=str(value))
    md = output_dir / "benchmark.md"
    atomic_write_text(md, header + "\n" + "\n".join(report.blocks) + "\nSections took: "
                      + ", ".join(f"{n} {s:.0f} s" for n, s in sections) + ".\n")
    atomic_write_text(output_dir / "benchmark.csv", report.csv())
    return md
