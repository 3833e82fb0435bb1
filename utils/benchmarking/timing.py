"""How the suite measures: the median time of a call, peak memory, and probes (one training
stage at one size, measured in a fresh process so that its peak memory is its own)."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.paths import REPO_ROOT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (untimed) calls."""
    if repeats < 1:
        raise ValueError("timed needs repeats >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, GB.

    Read from ``VmHWM`` in /proc/self/status where available: ``getrusage``'s ``ru_maxrss``
    survives fork + exec on Linux, so a probe started by a large parent would report the
    parent's peak (measured: the same 1.77 GB for every probe).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB -> GB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def training_step(stage: str, config, x: torch.Tensor, y: torch.Tensor, model_device: str, amp: bool,
                  amp_device: str, amp_dtype: torch.dtype = torch.float16):
    """(model, parameters, loss function) of one training step of ``stage`` on the batch ``x``,
    ``y``: ``dcg`` (phase 1), ``diffusion`` (phase 2: the frozen DCG's guidance computed once,
    then ``diffusion_loss`` on the scans and that guidance -- the denoiser's own image encoder,
    the condition U-Net and the per-point head train) or a baseline name. ``model_device``
    picks the configuration (gradient checkpointing is on for the full size on CUDA);
    ``amp_device`` is the autocast device type."""
    from models.diffmic3d import DiffMIC3D
    from utils.training.baselines import build_baseline

    dev = x.device

    def placed(module):  # fake tensors (memory_estimate) cannot be swapped by a no-op .to("cpu")
        return module if dev.type == "cpu" else module.to(dev)

    if stage in ("dcg", "diffusion"):
        model = placed(DiffMIC3D(config.model_config(model_device))).train()
        if stage == "dcg":
            return model, list(model.dcg.parameters()), lambda: model.dcg_loss(
                x, y, label_smoothing=config.label_smoothing)["loss"]
        model.freeze_dcg()
        with torch.no_grad(), torch.autocast(amp_device, dtype=amp_dtype, enabled=amp):  # float16: as on a T4
            guidance = model.guidance(x)
        params = list(model.prior_generator.parameters()) + list(model.denoiser.parameters())
        gen = torch.Generator(dev).manual_seed(0) if dev.type != "meta" else None
        return model, params, lambda: model.diffusion_loss(x, guidance, y, prior_dropout=config.prior_dropout,
                                                           generator=gen)["loss"]
    net = placed(build_baseline(stage, 2))
    return net, list(net.parameters()), lambda: torch.nn.functional.cross_entropy(net(x), y)


def probe(stage: str, input_shape: tuple[int, int, int], preset: str, batch_size: int, steps: int,
          device: str) -> dict:
    """Seconds per training step (median) and peak memory of ``stage`` (:func:`training_step`)
    on random volumes. Runs in the calling process; :func:`run_probe` runs it in a subprocess."""
    from utils.training.profiles import get_profile

    dev = torch.device(device)
    torch.manual_seed(0)
    config = get_profile("full", input_shape=input_shape, model_preset=preset, batch_size=batch_size)
    x = torch.rand(batch_size, 1, *input_shape, device=dev)
    y = torch.arange(batch_size, device=dev) % 2
    amp = config.use_amp(dev)
    _, params, step_loss = training_step(stage, config, x, y, device, amp, dev.type)
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss = step_loss()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = timed(step, dev, repeats=steps, warmup=1)
    out = {"seconds_per_step": seconds, "peak_rss_gb": peak_rss_gb()}
    if dev.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated(dev) / 1024 ** 3
    return out


def run_probe(stage: str, input_shape, preset: str, batch_size: int, steps: int, device: str) -> dict:
    """:func:`probe` in a fresh Python process (``python -m utils.benchmark --probe``), so its
    peak memory is its own."""
    args = json.dumps({"stage": stage, "input_shape": list(input_shape), "preset": preset,
                       "batch_size": batch_size, "steps": steps, "device": device})
    done = subprocess.run([sys.executable, "-m", "utils.benchmark", "--probe", args], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"probe {stage} {input_shape} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
