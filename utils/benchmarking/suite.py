"""The benchmark suite: :func:`run_benchmark` measures the chosen sections (all by default;
the docstring of ``utils.benchmark`` says what each measures), stores each with the code it
measured (``utils.benchmarking.sections``), then :func:`assemble` writes ``benchmark.md`` and
``benchmark.csv`` from every stored section, marking the stale ones."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional

from utils.atomic import atomic_write_text
from utils.benchmarking.checkpoints import checkpoint_sizes
from utils.benchmarking.design import design_choices
from utils.benchmarking.memory import memory_and_projection
from utils.benchmarking.quality_reports import QUALITY_DIR, quality
from utils.benchmarking.report import Report, machine_info, markdown_table
from utils.benchmarking.scaling import scaling
from utils.benchmarking.sections import (SECTIONS, SectionRecord, code_fingerprint, git_commit, load_section,
                                         save_section, stale_reason)
from utils.benchmarking.speed import speed
from utils.log import get_logger
from utils.paths import display_path

log = get_logger(__name__)
TITLES = {"quality": "1. Quality", "speed": "2. Speed", "checkpoints": "3. Checkpoints", "memory": "4. Memory",
          "scaling": "6. Scaling", "design": "7. Design choices"}


def run_benchmark(output_dir: Path, quick: bool = False, device: Optional[str] = None,
                  quality_dir: Optional[Path] = None, sections: Sequence[str] = SECTIONS,
                  speed_run: Optional[Path] = None) -> Path:
    """Measure ``sections`` (each stored on its own), then assemble the report from every
    stored section; returns the path of ``benchmark.md``.

    ``quality_dir``: where ``utils.benchmark_quality`` wrote its reports (read only; default
    ``outputs/benchmark``). ``speed_run``: a finished ``demo`` run folder (seed 0) for the
    speed and checkpoint sections (default: ``OUTPUT_DIR/benchmark_runs/speed_demo_seed0``,
    trained there when absent, resumed when half done).
    """
    from utils.benchmarking.quality import dataset_setup
    from utils.run import run_experiment
    from utils.seeding import pick_device, seed_everything
    from utils.training.profiles import get_profile

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {list(SECTIONS)}")
    seed_everything(0)
    dev = pick_device(device)
    output_dir = Path(output_dir)
    runs = output_dir / "benchmark_runs"
    runs.mkdir(parents=True, exist_ok=True)
    quality_dir = QUALITY_DIR if quality_dir is None else Path(quality_dir)
    info = machine_info(dev)
    commit, dirty = git_commit()
    command = ("python -m utils.benchmark" + (" --quick" if quick else "")
               + ("" if list(sections) == list(SECTIONS) else " --sections " + " ".join(sections)))
    state: dict = {}

    if quick:  # the smoke run of run_quality, seed 0
        speed_config = replace(dataset_setup("smoke")[1], seed=0)
        run0 = output_dir / "quality" / "benchmark_runs" / "quality_smoke_seed0"
    else:
        speed_config = get_profile("demo", seed=0, progress=False)
        run0 = Path(speed_run) if speed_run is not None else runs / "speed_demo_seed0"

    def finished_run() -> Path:
        if "run0" not in state:
            if quick and not run0.is_dir():
                quality(Report(), quality_dir, True, output_dir, str(dev))  # trains the smoke runs
            log.info(f"[benchmark] the run the speed sections measure: {display_path(run0)}")
            run_experiment(speed_config, run0, device=str(dev))  # loads a finished run, else trains / resumes
            state["run0"] = run0
        return state["run0"]

    measure = {
        "quality": lambda r: quality(r, quality_dir, quick, output_dir, str(dev)),
        "speed": lambda r: speed(r, finished_run(), speed_config, dev, quick),
        "checkpoints": lambda r: checkpoint_sizes(r, finished_run(), quick),
        "memory": lambda r: r.text(memory_and_projection(r, dev, quick, n_train=64)),  # n_train: the phantoms' split
        "scaling": lambda r: scaling(r, dev, quick),
        "design": lambda r: design_choices(r, runs, dev, quick),
    }
    fingerprints = {name: code_fingerprint(name) for name in SECTIONS}  # the code as it was when measuring began
    for name in SECTIONS:
        if name not in sections:
            continue
        log.info(f"[benchmark] {name} ...")
        report, tic = Report(), time.perf_counter()
        measure[name](report)
        seconds = time.perf_counter() - tic
        save_section(output_dir, SectionRecord(name, report.blocks, report.rows, report.targets, seconds, command,
                                               info, commit, dirty, fingerprints[name]))
        log.info(f"[benchmark] {name} done in {seconds:.0f} s")
    return assemble(output_dir, quick)


def assemble(output_dir: Path, quick: bool = False) -> Path:
    """``benchmark.md`` and ``benchmark.csv`` from every stored section; returns the .md path.

    Each section opens with its stamp (commit, code fingerprint, date, seconds) and, when the
    code has changed since it was measured, a **stale** line with the command that re-measures
    it; its targets carry "(stale)". A section never measured here says so.
    """
    output_dir = Path(output_dir)
    commit, dirty = git_commit()
    records = {name: load_section(output_dir, name) for name in SECTIONS}
    report = Report()
    blocks, stamps = [], []
    for name in SECTIONS:
        record = records[name]
        if record is None:
            blocks.append(f"## {TITLES[name]}\n\nNot measured here: run `python -m utils.benchmark --sections {name}`.\n")
            stamps.append([name, "not measured", "", ""])
            continue
        stale = stale_reason(record)
        note = (f"_Measured by `{record.command}` at {record.stamp()}; machine: {record.machine.get('cpu')}, "
                f"{record.machine.get('cores')} cores, torch threads {record.machine.get('torch_threads')}, device "
                f"`{record.machine.get('device')}`._")
        if stale:
            note += f"\n\n**Stale**: {stale}."
        first, *rest = record.blocks or [f"## {TITLES[name]}\n"]
        heading, _, body = first.partition("\n")
        blocks.append(f"{heading}\n\n{note}\n{body}".rstrip() + "\n")
        blocks.extend(rest)
        for row in record.rows:
            report.rows.append(dict(row))
        for target in record.targets:
            report.targets.append({**target, "measured": ("(stale) " if stale else "") + target["measured"]})
        stamps.append([name, f"`{record.commit}`{' +' if record.dirty else ''}", record.measured_at,
                       "**stale**" if stale else "current"])
    header = (f"# Benchmark{' (--quick: smoke sizes, not for reading)' if quick else ''}\n\n"
              f"Assembled from the sections stored in `{display_path(output_dir)}/benchmark_sections/` at commit "
              f"`{commit}`{' + uncommitted changes' if dirty else ''}. "
              "`python -m utils.benchmark` re-measures every section in one command; `--sections NAME ...` "
              "re-measures some and keeps the others, each stamped with the code it measured and marked stale "
              "when that code has changed. Experiment runs already complete in `benchmark_runs/` (the speed run, "
              "the design variants) are loaded, not retrained: delete a run's folder to train it again on the "
              "current code.\n\n"
              + markdown_table(["section", "commit", "measured", "status"], stamps) + "\n\n"
              "## Targets\n\nQuality targets are met only when the mean over seeds of the paired test-AUC "
              "difference is > 0 (the AUC target: when the mean AUC reaches it); 'not measured' says why.\n\n"
              + report.targets_table() + "\n")
    for record in records.values():
        if record is not None:
            for key, value in record.machine.items():
                report.add("machine", f"{record.name}: {key}", "value", float("nan"), unit=str(value))
    md = output_dir / "benchmark.md"
    atomic_write_text(md, header + "\n" + "\n".join(blocks))
    atomic_write_text(output_dir / "benchmark.csv", report.csv())
    return md
