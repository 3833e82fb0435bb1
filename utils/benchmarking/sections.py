"""Each benchmark section stored on its own, stamped with the code it measured.

A section run writes ``OUTPUT_DIR/benchmark_sections/NAME.json``: its markdown blocks, CSV
rows and target rows, when it ran, how long it took, on which machine, the git commit (and
whether the working tree had uncommitted changes) and a fingerprint of the code that
measures: a SHA-256 over the ``.py`` files of ``models/`` and ``utils/`` (the report's own
assembly and formatting modules excluded, so rewording the report does not age a
measurement). ``benchmark.md`` is assembled from every stored section; a section whose
fingerprint differs from the current code's is marked stale there by the benchmark itself,
with the command that re-measures it, and so are its targets.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from utils.atomic import atomic_write_text
from utils.paths import REPO_ROOT

SECTIONS = ("quality", "speed", "checkpoints", "memory", "scaling", "design")
SECTIONS_DIR = "benchmark_sections"
CODE_DIRS = ("models", "utils")
BENCHMARK_DIR = "utils/benchmarking"
SECTION_MODULES = {  # the benchmark modules each section measures with (beside all other code)
    "quality": ("quality_reports.py", "quality.py", "pooled.py", "ablations.py"),
    "speed": ("speed.py", "timing.py"),
    "checkpoints": ("checkpoints.py",),
    "memory": ("memory.py", "memory_estimate.py", "timing.py"),
    "scaling": ("scaling.py", "timing.py"),
    "design": ("design.py",),
}


def code_fingerprint(section: str, root: Path = REPO_ROOT) -> str:
    """SHA-256 (16 hex digits) over the path and bytes of the code ``section`` measures: every
    ``.py`` file under ``CODE_DIRS`` outside ``utils/benchmarking/``, and that section's own
    modules there (``SECTION_MODULES``). Equal fingerprints, equal measuring code; editing
    another section's module or the report's assembly does not age a measurement."""
    if section not in SECTION_MODULES:
        raise ValueError(f"unknown benchmark section {section!r}; choose from {SECTIONS}")
    own = {f"{BENCHMARK_DIR}/{name}" for name in SECTION_MODULES[section]}
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or (rel.startswith(BENCHMARK_DIR + "/") and rel not in own):
                continue
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """(short commit of HEAD or ``'unknown'``, whether ``CODE_DIRS`` have uncommitted changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_DIRS], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


@dataclass
class SectionRecord:
    """One measured section (plain data, stored as JSON)."""

    name: str
    blocks: list[str]
    rows: list[dict]
    targets: list[dict]
    seconds: float
    command: str
    machine: dict
    commit: str = "unknown"
    dirty: bool = False
    fingerprint: str = ""
    measured_at: str = field(default_factory=lambda: f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")

    def stamp(self) -> str:
        """'commit abc1234 (+ uncommitted changes), 2026-12-03 05:00 UTC'."""
        return (f"commit `{self.commit}`{' + uncommitted changes' if self.dirty else ''}, code "
                f"`{self.fingerprint[:8]}`, {self.measured_at}, {self.seconds:.0f} s")


def stale_reason(record: SectionRecord, root: Path = REPO_ROOT) -> Optional[str]:
    """Why ``record`` no longer describes the code under ``root`` (None: it does)."""
    now = code_fingerprint(record.name, root)
    if record.fingerprint == now:
        return None
    return (f"measured on code `{record.fingerprint[:8] or 'unknown'}` (commit `{record.commit}`), the code is now "
            f"`{now[:8]}`: rerun `python -m utils.benchmark --sections {record.name}`")


def section_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / SECTIONS_DIR / f"{name}.json"


def save_section(output_dir: Path, record: SectionRecord) -> Path:
    """Write ``record`` atomically; returns its path."""
    if record.name not in SECTIONS:
        raise ValueError(f"unknown benchmark section {record.name!r}; choose from {SECTIONS}")
    path = section_path(output_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(record), indent=1) + "\n")
    return path


def load_section(output_dir: Path, name: str) -> Optional[SectionRecord]:
    """The stored section ``name``, or None when it was never measured here."""
    path = section_path(output_dir, name)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return SectionRecord(**data)
