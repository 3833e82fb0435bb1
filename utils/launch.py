"""Start a distributed run: ``torchrun`` (``python -m torch.distributed.run``) as a subprocess.

``python -m utils.run --gpus N`` and notebook 06 (a notebook kernel cannot host DDP itself)
both call :func:`launch`: it starts ``torchrun --standalone --nproc_per_node N -m MODULE ARGS``,
copies every line it prints to this process's standard output as it comes (so a notebook
cell shows the run's progress), and returns its exit status; interrupted (a notebook's stop
button), it ends the processes before it re-raises. ``torchrun`` ends every process
when one dies and names the failed rank in its report; :func:`launch` then adds one line
saying so. :func:`resolve_gpus` turns ``--gpus`` into a process count.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from utils.log import get_logger
from utils.paths import REPO_ROOT

log = get_logger(__name__)


def resolve_gpus(gpus: str | int, device: torch.device) -> int:
    """How many processes ``--gpus`` asks for on ``device``: ``'auto'``, every visible GPU when
    there are two or more (else 1); ``N``, N processes (one per GPU; on the CPU, N gloo
    processes, which proves the distributed path but is not faster).

    Raises:
        ValueError: not ``auto`` or a positive integer, or more than the visible GPUs.
    """
    text = str(gpus).strip().lower()
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if text == "auto":
        return visible if visible >= 2 else 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--gpus {gpus!r}: expected auto or a positive integer")
    n = int(text)
    if device.type == "cuda" and n > visible:
        raise ValueError(f"--gpus {n}: only {visible} CUDA device(s) visible")
    if device.type != "cuda" and n > 1:
        log.warning(f"no CUDA device: {n} CPU processes (gloo); this checks the distributed path, it is not faster")
    return n


def torchrun_command(module: str, args: Sequence[str], nproc: int) -> list[str]:
    """The command line that runs ``python -m module args`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def launch(module: str, args: Sequence[str], nproc: int, env: Optional[dict] = None) -> int:
    """Run ``module`` under ``torchrun`` with ``nproc`` processes from the repository root,
    streaming its output line by line; returns its exit status (0: every rank finished)."""
    command = torchrun_command(module, args, nproc)
    log.info(f"starting {nproc} processes: torchrun --nproc_per_node={nproc} -m {module} {' '.join(args)}")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        code = process.wait()
    except BaseException:  # e.g. an interrupted notebook cell: never leave the ranks training behind
        process.terminate()  # torchrun passes it on to every rank
        process.wait()
        raise
    if code:
        print(f"error: the {nproc}-process run of {module} failed (exit status {code}); torchrun's report above "
              "names the failed rank", file=sys.stderr)
    return code
