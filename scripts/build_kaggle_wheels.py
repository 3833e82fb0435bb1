"""Build the wheels dataset that lets the Kaggle cell install without internet.

    python scripts/build_kaggle_wheels.py [--python-version 3.11] [--out outputs/kaggle-wheels]

Run it on any machine with internet and pip (standard library only otherwise). It resolves the
runtime requirements (``requirements.txt``) for Kaggle's interpreter and platform (CPython
``--python-version``, Linux x86_64 manylinux wheels), then downloads every resolved wheel except
torch and what only torch's CUDA build needs (``triton``, ``nvidia-*``, ``cuda-*``): Kaggle ships
its own CUDA torch and the installer never replaces it. The folder gets the marker file
``mediscope-wheels.txt`` by which ``utils.install_missing`` finds it under ``/kaggle/input``.
Upload the folder as a Kaggle dataset (e.g. ``kaggle datasets create -p outputs/kaggle-wheels``
after ``kaggle datasets init``) and attach it to the notebook beside the code.

Kaggle's python version is what ``!python --version`` prints in a Kaggle notebook (3.11 on the
images this was written for); wheels of another version are not installed there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.install_missing import WHEELS_MARKER, parse_requirements  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")  # pip takes every older manylinux tag with them
SKIPPED = ("torch",)
SKIPPED_PREFIXES = ("nvidia-", "cuda-", "triton")  # torch's CUDA build's own dependencies


def target_options(python_version: str) -> list[str]:
    """pip options selecting wheels for CPython ``python_version`` on Linux x86_64."""
    nodot = python_version.replace(".", "")
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    return ["--only-binary=:all:", *platforms, "--python-version", python_version,
            "--implementation", "cp", "--abi", f"cp{nodot}"]


def resolve_command(specs: list[str], python_version: str, report: Path, scratch: Path,
                    python: str = sys.executable) -> list[str]:
    """A ``pip install --dry-run --report`` that resolves ``specs`` for the target (metadata only)."""
    return [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report),
            *target_options(python_version), "--target", str(scratch), *specs]


def download_command(pins: list[str], python_version: str, out: Path, python: str = sys.executable) -> list[str]:
    """A ``pip download --no-deps`` of the resolved ``pins`` (``name==version``) into ``out``."""
    return [python, "-m", "pip", "download", "--no-deps", "-q", *target_options(python_version), "-d", str(out),
            *pins]


def kept(name: str) -> bool:
    """Whether a resolved distribution goes into the wheels folder (not torch or its CUDA parts)."""
    name = name.lower().replace("_", "-")
    return name not in SKIPPED and not name.startswith(SKIPPED_PREFIXES)


def pins_from_report(report: dict) -> list[str]:
    """``name==version`` of every distribution a pip ``--report`` installs, torch's left out."""
    items = [(item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"]]
    return sorted(f"{name}=={version}" for name, version in items if kept(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/build_kaggle_wheels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.11", help="Kaggle's python version (default: 3.11)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "kaggle-wheels",
                        help="the folder to upload as a Kaggle dataset (default: outputs/kaggle-wheels)")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    specs = [r.spec() for r in parse_requirements(args.requirements.read_text()) if kept(r.name)]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        subprocess.run(resolve_command(specs, args.python_version, report_path, Path(tmp) / "target"), check=True)
        pins = pins_from_report(json.loads(report_path.read_text()))
    subprocess.run(download_command(pins, args.python_version, args.out), check=True)
    wheels = sorted(p.name for p in args.out.glob("*.whl"))
    (args.out / WHEELS_MARKER).write_text(
        f"MediScopeDiffusion wheels for CPython {args.python_version}, Linux x86_64 (without torch); "
        f"made by scripts/build_kaggle_wheels.py from requirements.txt\n" + "".join(f"{w}\n" for w in wheels))
    print(f"{len(wheels)} wheels in {args.out}: upload the folder as a Kaggle dataset and attach it to the notebook")
    return 0


if __name__ == "__main__":
    sys.exit(main())
