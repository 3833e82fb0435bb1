"""Install only what the runtime lacks: the Kaggle cell's set-up step (standard library only).

    python -m utils.install_missing [--requirements requirements.txt] [--kaggle-input /kaggle/input]
                                    [--wheels DIR] [--no-pypi]

It runs before anything else is installed, so it imports nothing outside Python's standard
library (``tests/test_install_missing.py`` runs it in an environment holding only pip).

Each line of ``requirements.txt`` is ``name`` or ``name>=X.Y`` (a trailing ``# comment``
is allowed; a comment starting with ``optional:`` marks a package the pipeline can run
without and says what is lost, e.g. ``monai>=1.3  # optional: the 3D CNN baselines``).
A requirement counts as met when ``importlib.metadata`` finds it at or above its minimum
(versions compared by their release numbers: ``2.5.1+cu121`` is 2.5.1, ``1.3.0rc1`` is 1.3.0).
What is met is never touched: it is pinned to its installed version for pip (a constraints
file), so installing a missing package cannot upgrade or replace it. torch is special: once
some torch >= 2.0 is present (Kaggle's CUDA build) it is kept even below the declared
minimum, with a warning, since pip would replace a CUDA build by a generic one.

Sources for what is missing, in order:

1. a wheels folder: ``--wheels DIR``, ``$MEDISCOPE_WHEELS``, or a folder holding the marker
   file ``mediscope-wheels.txt`` (``WHEELS_MARKER``) at most four levels under ``--kaggle-input``
   (a Kaggle dataset made by ``scripts/build_kaggle_wheels.py``), installed with
   ``pip install --no-index --find-links DIR``;
2. PyPI, when it answers (Kaggle: the notebook's Internet setting is on); ``--no-pypi`` or
   ``MEDISCOPE_PYPI=0`` never tries it.

Outcome: exit status 0 when every required package is met (each optional one missing gets one
``warning:`` line saying what will be skipped); else exit status 1 and ONE line on standard
error naming the missing packages, why no source had them and how to fix it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WHEELS_ENV = "MEDISCOPE_WHEELS"
PYPI_ENV = "MEDISCOPE_PYPI"
WHEELS_MARKER = "mediscope-wheels.txt"
WHEELS_SEARCH_DEPTH = 4  # /kaggle/input/<dataset>/<version folders>/...: the marker sits near the top
KEEP_IF_PRESENT = {"torch": "2.0"}  # kept once present at this version or newer (a CUDA build), whatever the minimum
FIX = ("attach the MediScopeDiffusion wheels dataset (scripts/build_kaggle_wheels.py) or turn on Internet "
       "in the notebook's settings, then run the cell again")

_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.+!-]*))?\s*$")


class MissingPackages(RuntimeError):
    """Required packages that no source could install; the message is one line."""


@dataclass(frozen=True)
class Requirement:
    """One line of requirements.txt: ``name>=minimum``; ``optional`` says what is lost without it
    (None: required)."""

    name: str
    minimum: Optional[str] = None
    optional: Optional[str] = None

    def spec(self) -> str:
        return self.name if self.minimum is None else f"{self.name}>={self.minimum}"


def parse_requirements(text: str) -> list[Requirement]:
    """Requirements of a requirements.txt text (blank and comment lines skipped).

    Raises:
        ValueError: a line that is not ``name`` or ``name>=version`` (with an optional comment).
    """
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line, _, comment = raw.partition("#")
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if match is None:
            raise ValueError(f"requirements line {number} ({raw.strip()!r}) is not 'name' or 'name>=version'")
        comment = comment.strip()
        optional = comment[len("optional:"):].strip() if comment.lower().startswith("optional:") else None
        out.append(Requirement(match.group(1), match.group(2), optional))
    return out


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version: ``'2.5.1+cu121'`` -> (2, 5, 1), ``'1.3.0rc1'`` -> (1, 3, 0)."""
    numbers = []
    for part in version.split("!")[-1].split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() < len(part):  # a pre-/post-release suffix ends the release numbers
            break
    return tuple(numbers)


def at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` on their release numbers, shorter ones padded with zeros."""
    a, b = release(version), release(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def installed_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def split_met(requirements: Sequence[Requirement], version_of: Callable[[str], Optional[str]] = installed_version
              ) -> tuple[dict[str, str], list[Requirement], list[str]]:
    """(met: name -> installed version, missing requirements, warnings about kept packages)."""
    met, missing, warnings = {}, [], []
    for req in requirements:
        version = version_of(req.name)
        if version is not None and (req.minimum is None or at_least(version, req.minimum)):
            met[req.name] = version
        elif version is not None and req.name in KEEP_IF_PRESENT and at_least(version, KEEP_IF_PRESENT[req.name]):
            met[req.name] = version
            warnings.append(f"warning: {req.name} {version} kept (the code is tested with {req.spec()}); "
                            f"it is not replaced, since pip would swap this build for a generic one")
        else:
            missing.append(req)
    return met, missing, warnings


def find_wheels(kaggle_input: Optional[Path], environ: Mapping[str, str]) -> Optional[Path]:
    """The wheels folder: ``$MEDISCOPE_WHEELS``, else the first folder (sorted walk, at most
    ``WHEELS_SEARCH_DEPTH`` levels down) under ``kaggle_input`` holding ``WHEELS_MARKER``."""
    if environ.get(WHEELS_ENV):
        return Path(environ[WHEELS_ENV]).expanduser()
    if kaggle_input is None or not Path(kaggle_input).is_dir():
        return None
    base = len(Path(kaggle_input).parts)
    for dirpath, dirnames, filenames in os.walk(kaggle_input):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if WHEELS_MARKER in filenames:
            return Path(dirpath)
        if len(Path(dirpath).parts) - base >= WHEELS_SEARCH_DEPTH:
            dirnames[:] = []
    return None


def pypi_answers(environ: Mapping[str, str], timeout: float = 3.0) -> bool:
    """Whether the package index (``$PIP_INDEX_URL``, else pypi.org) accepts a connection."""
    url = urllib.parse.urlparse(environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/")
    if url.scheme == "file":
        return True
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def pip_install(specs: Sequence[str], source: Sequence[str], constraints: Path, python: str) -> Optional[str]:
    """``pip install`` of ``specs`` from ``source`` (pip arguments) under ``constraints``: None
    when pip succeeded, else its last error line. On failure each spec is retried alone, so
    one package no source has does not keep the others out."""
    def run(chosen: Sequence[str]) -> Optional[str]:
        done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *source,
                               "-c", str(constraints), *chosen], capture_output=True, text=True)
        if done.returncode == 0:
            return None
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        return (errors or lines or [f"pip exited with status {done.returncode}"])[-1]

    error = run(specs)
    if error is not None and len(specs) > 1:
        for spec in specs:
            error = run([spec]) or error
    return error


def _names(requirements: Sequence[Requirement]) -> str:
    return ", ".join(r.spec() for r in requirements)


def ensure_requirements(requirements: Sequence[Requirement], kaggle_input: Optional[Path] = None,
                        environ: Optional[Mapping[str, str]] = None,
                        python: str = sys.executable, say: Callable[[str], None] = print) -> dict[str, str]:
    """Install what ``requirements`` lacks (module docstring); returns name -> installed version
    of every met requirement.

    Args:
        kaggle_input: where to look for the wheels dataset (None: nowhere).
        environ: ``$MEDISCOPE_WHEELS``; ``$MEDISCOPE_PYPI`` (0: never PyPI, else PyPI when
            ``$PIP_INDEX_URL`` or pypi.org answers) (default ``os.environ``).
        python: the interpreter whose environment pip installs into.
        say: where the progress and warning lines go.

    Raises:
        MissingPackages: a required package is still missing (one line: which, why, how to fix).
    """
    environ = os.environ if environ is None else environ
    met, missing, warnings = split_met(requirements)
    tried = []  # why each source did not help, for the final line
    if missing:
        wheels = find_wheels(kaggle_input, environ)
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp) / "constraints.txt"  # what is met stays as it is
            constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(met.items())))
            if wheels is None:
                tried.append("no wheels dataset attached")
            elif not wheels.is_dir():
                tried.append(f"wheels folder {wheels} not found")
            else:
                say(f"installing {_names(missing)} from {wheels}")
                error = pip_install([r.spec() for r in missing], ["--no-index", "--find-links", str(wheels)],
                                    constraints, python)
                importlib.invalidate_caches()
                met, missing, _ = split_met(requirements)
                if missing:
                    tried.append(f"the wheels folder {wheels} lacks them ({error})")
            if missing and environ.get(PYPI_ENV, "1") == "0":
                tried.append(f"PyPI not used (${PYPI_ENV}=0)")
            elif missing and not pypi_answers(environ):
                tried.append("PyPI not reachable (no internet)")
            elif missing:
                say(f"installing {_names(missing)} from PyPI")
                error = pip_install([r.spec() for r in missing], ["--retries", "1", "--timeout", "30"],
                                    constraints, python)
                importlib.invalidate_caches()
                met, missing, _ = split_met(requirements)
                if missing:
                    tried.append(f"PyPI did not install them ({error})")
    why = "; ".join(tried)
    for line in warnings:
        say(line)
    for req in missing:
        if req.optional:
            say(f"warning: {req.spec()} is not installed ({why}): {req.optional} will be skipped; "
                f"to include them, {FIX}")
    required = [r for r in missing if not r.optional]
    if required:
        raise MissingPackages(f"missing packages: {_names(required)} ({why}); {FIX}")
    kept = [f"{name} {met[name]}" for name in KEEP_IF_PRESENT if name in met]
    say(f"packages: {len(met)} of {len(requirements)} requirements met" + (f" ({', '.join(kept)} untouched)" if kept else ""))
    return met


def main(argv: Optional[list[str]] = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m utils.install_missing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=repo / "requirements.txt", help="requirements file")
    parser.add_argument("--kaggle-input", type=Path, default=Path("/kaggle/input"),
                        help="where attached datasets are searched for the wheels folder")
    parser.add_argument("--wheels", type=Path, default=None, help="the wheels folder (default: $MEDISCOPE_WHEELS, "
                                                                  "else found by its marker file)")
    parser.add_argument("--no-pypi", action="store_true", help="never install from PyPI (as $MEDISCOPE_PYPI=0)")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.wheels is not None:
        environ[WHEELS_ENV] = str(args.wheels)
    if args.no_pypi:
        environ[PYPI_ENV] = "0"
    try:
        requirements = parse_requirements(args.requirements.read_text())
        ensure_requirements(requirements, args.kaggle_input, environ)
    except (OSError, ValueError, MissingPackages) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
