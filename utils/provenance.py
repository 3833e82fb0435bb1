"""Where and with what a run was made: ``OUTPUT_DIR/provenance.json``.

Every start of a run (``utils.pipeline.prepare_experiment``: ``utils.run``, each notebook, a
resume) appends one entry with the library versions (python, torch, monai, numpy), the git
commit of the code (and whether it had uncommitted changes), the device and the CPU/GPU model,
the command line and the time. A run resumed on another machine therefore says so. A
distributed start (``utils.distributed``) adds its world size and every rank's device.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from utils.atomic import atomic_write_text
from utils.paths import REPO_ROOT

PROVENANCE_JSON = "provenance.json"
LIBRARIES = ("torch", "monai", "numpy", "scipy", "nibabel", "scikit-learn")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(device: torch.device | str) -> dict:
    """The provenance of this process for a run on ``device`` (plain data)."""
    device = torch.device(device)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        **rank_device(device),
    }


def record(output_dir: str | Path, device: torch.device | str, rank_devices: list | None = None) -> Path:
    """Append this start's :func:`collect` to ``OUTPUT_DIR/provenance.json`` (atomically);
    ``rank_devices`` (a distributed start, written by rank 0: :func:`rank_device` of every rank,
    in rank order) adds ``world_size`` and ``rank_devices``."""
    entry = collect(device)
    if rank_devices:
        entry.update(world_size=len(rank_devices), rank_devices=rank_devices)
    path = Path(output_dir) / PROVENANCE_JSON
    starts = json.loads(path.read_text()).get("starts", []) if path.is_file() else []
    starts.append(entry)
    atomic_write_text(path, json.dumps({"starts": starts}, indent=2) + "\n")
    return path


def rank_device(device: torch.device | str) -> dict:
    """This process's device and GPU name, for :func:`record`'s ``rank_devices``."""
    device = torch.device(device)
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
