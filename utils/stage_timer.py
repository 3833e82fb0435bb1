"""Wall time and peak GPU memory per named stage of a run (``with timer.stage("data"): ...``).

On CUDA the peak memory counter is reset when a stage starts and read when it ends, so each
stage reports its own peak (``torch.cuda.max_memory_allocated``: what the tensors needed, not
what the caching allocator reserved). On the CPU only times are kept.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Collects ``seconds[stage]`` and, on CUDA, ``peak_gb[stage]``."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}
        self._started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        tic = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.peak_gb[name] = torch.cuda.max_memory_allocated(self.device) / 1024 ** 3
            self.seconds[name] = time.perf_counter() - tic

    def total(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self._started

    def as_dict(self) -> dict:
        """Plain data for ``timings.json``: ``{stage: seconds, ..., "total": s[, "peak_cuda_gb": {...}]}``."""
        out: dict = {**self.seconds, "total": self.total()}
        if self.peak_gb:
            out["peak_cuda_gb"] = dict(self.peak_gb)
        return out

    def report(self) -> str:
        """One line per stage: seconds, and peak GPU memory where measured."""
        lines = [f"{name:<22}{seconds:8.1f} s"
                 + (f"   peak CUDA memory {self.peak_gb[name]:6.2f} GB" if name in self.peak_gb else "")
                 for name, seconds in self.seconds.items()]
        return "\n".join(lines + [f"{'total':<22}{self.total():8.1f} s"])
