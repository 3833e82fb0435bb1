"""Benchmark suite: quality, speed, memory and scaling of DiffMIC-3D beside a plain 3D CNN.

    python -m utils.benchmark [--quick] [--output-dir outputs] [--device cpu|cuda]

Writes ``OUTPUT_DIR/benchmark.md`` (the report: each table with the command and machine that
produced it, and the targets met or missed) and ``OUTPUT_DIR/benchmark.csv``
(``section,item,metric,value,spread,unit``) beside it; the experiment runs it needs go to
``OUTPUT_DIR/benchmark_runs/`` and are resumed when the benchmark is started again. Every
figure comes from the same invocation on the same machine, so ratios are meaningful.

Sections (full suite; ``--quick`` runs the same code at smoke sizes, for CI):

1. Quality at the ``demo`` profile over seeds 0, 1, 2 (each seed draws its own split): ours,
   both baselines and both ablations, accuracy and ROC-AUC with 95% CIs per seed and the
   mean and standard deviation over seeds; a histogram + logistic-regression baseline.
2. Speed: seconds per training epoch of phase 1 and of phase 2 (on cached DCG outputs),
   inference seconds per volume with DDPM (all T steps), DDIM 10 and DDIM 1 next to a
   ResNet-18 forward, and the accuracy / AUC each sampler gives on the seed-0 test split.
3. Memory: peak resident memory (and peak CUDA memory on a GPU) of training steps at the
   ``full`` configuration, batch 4, each stage in its own subprocess.
4. Scaling: time per phase-1 epoch and peak memory at 64x64x32, 96x96x48 and 128x128x64, and
   epoch time for 1x, 2x and 4x the number of volumes.
5. The ``full`` profile's projected wall time from measured steps.
6. Design choices at the hard phantom difficulty (phase 1 only: the DCG's fused prediction):
   ROI crops at roi_scale 1 vs 2, top-t% vs mean pooling, K = 1, 3, 5 ROIs.

Timed sections use synthetic volumes of the right shape where only speed matters (the
network does the same work on any input) and the real phantoms where accuracy is reported.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.atomic import atomic_write_text
from utils.prepare_data import REPO_ROOT

TARGETS = {
    "full_train_minutes": 45.0,
    "phase2_over_phase1": 0.25,
    "ddim10_over_resnet": 1.5,
    "full_peak_gb": 6.0,
}
SIZES = ((64, 64, 32), (96, 96, 48), (128, 128, 64))
QUICK_SIZES = ((32, 32, 16), (48, 48, 16), (64, 64, 32))


# ------------------------------------------------------------------------------------------
# report rows
# ------------------------------------------------------------------------------------------

class Report:
    """Rows for the CSV and markdown blocks for the report, in the order they are added."""

    def __init__(self):
        self.rows: list[dict] = []
        self.blocks: list[str] = []

    def add(self, section: str, item: str, metric: str, value: float, spread: float = float("nan"),
            unit: str = "") -> float:
        self.rows.append({"section": section, "item": item, "metric": metric, "value": float(value),
                          "spread": float(spread), "unit": unit})
        return float(value)

    def text(self, block: str) -> None:
        self.blocks.append(block.rstrip() + "\n")

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["section", "item", "metric", "value", "spread", "unit"],
                                lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else
                                 ("" if isinstance(v, float) else v)) for k, v in row.items()})
        return buffer.getvalue()


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, torch version, device (and GPU name) of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


# ------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
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


# ------------------------------------------------------------------------------------------
# probes: one training stage at one size, measured in a fresh process (clean peak memory)
# ------------------------------------------------------------------------------------------

def probe(stage: str, input_shape: tuple[int, int, int], preset: str, batch_size: int, steps: int,
          device: str) -> dict:
    """Seconds per training step (median) and peak memory of ``stage`` on random volumes.

    ``stage``: ``dcg`` (phase 1), ``diffusion`` (phase 2 on guidance computed once), or a
    baseline name. Runs in the calling process; :func:`run_probe` runs it in a subprocess.
    """
    from models.diffmic3d import DiffMIC3D
    from utils.baselines import build_baseline
    from utils.profiles import get_profile

    dev = torch.device(device)
    torch.manual_seed(0)
    config = get_profile("full", input_shape=input_shape, model_preset=preset, batch_size=batch_size)
    x = torch.rand(batch_size, 1, *input_shape, device=dev)
    y = torch.arange(batch_size, device=dev) % 2
    amp = config.use_amp(dev)
    if stage in ("dcg", "diffusion"):
        model = DiffMIC3D(config.model_config(dev)).to(dev)
        if stage == "dcg":
            params, step_loss = model.dcg.parameters(), lambda: model.dcg_loss(x, y)["loss"]
        else:
            model.freeze_dcg()
            with torch.no_grad():
                guidance = model.guidance(x).as_dict()
            params = [p for p in model.parameters() if p.requires_grad]
            step_loss = lambda: model.diffusion_loss(guidance, y)["loss"]  # noqa: E731
    else:
        net = build_baseline(stage, 2).to(dev)
        params = net.parameters()
        step_loss = lambda: torch.nn.functional.cross_entropy(net(x), y)  # noqa: E731
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
    """:func:`probe` in a fresh Python process, so its peak memory is its own."""
    args = json.dumps({"stage": stage, "input_shape": list(input_shape), "preset": preset,
                       "batch_size": batch_size, "steps": steps, "device": device})
    done = subprocess.run([sys.executable, "-m", "utils.benchmark", "--probe", args], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"probe {stage} {input_shape} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------

def quality(report: Report, profile: str, seeds: tuple[int, ...], runs: Path, device: Optional[str]) -> Path:
    """Section 1; returns the seed-0 run folder (reused by the speed section)."""
    from utils.discovery import discover_scans, find_dataset_root
    from utils.histogram_baseline import histogram_baseline_accuracy
    from utils.profiles import get_profile
    from utils.run import run_experiment

    per_model: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for seed in seeds:
        config = get_profile(profile, seed=seed, progress=False)
        rows = run_experiment(config, runs / f"quality_{profile}_seed{seed}", device=device)
        for row in rows:
            if row["metric"] in ("accuracy", "roc_auc"):
                per_model.setdefault(row["model"], {}).setdefault(row["metric"], []).append(
                    (row["value"], row["ci_low"], row["ci_high"]))
    table = []
    for model, metrics in per_model.items():
        cells = [model]
        for metric in ("accuracy", "roc_auc"):
            values = [v for v, _, _ in metrics[metric]]
            mean, std = float(np.mean(values)), float(np.std(values))
            report.add("quality", model, f"{metric} mean over seeds", mean, std)
            for seed, (v, lo, hi) in zip(seeds, metrics[metric]):
                report.add("quality", model, f"{metric} seed {seed}", v, unit=f"CI [{lo:.3f}, {hi:.3f}]")
            cells.append(f"{mean:.3f} ± {std:.3f}")
            cells += [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in metrics[metric]]
        table.append(cells)
    header = ["Model", "accuracy (mean ± sd)"] + [f"acc seed {s} [95% CI]" for s in seeds] + \
             ["ROC-AUC (mean ± sd)"] + [f"AUC seed {s} [95% CI]" for s in seeds]
    config = get_profile(profile)
    root, _ = find_dataset_root(REPO_ROOT / config.phantom_dir)
    records = discover_scans(root)
    hist_mean, hist_std = histogram_baseline_accuracy([r.path for r in records], [r.label for r in records])
    report.add("quality", "histogram + logistic regression", "accuracy 5-fold CV", hist_mean, hist_std)
    ours = np.mean([v for v, _, _ in per_model["DiffMIC-3D"]["roc_auc"]])
    resnet = np.mean([v for v, _, _ in per_model["3D ResNet-18"]["roc_auc"]])
    report.add("targets", "ours above 3D ResNet-18 in AUC", "AUC difference", ours - resnet)
    report.text(f"## 1. Quality (`{profile}` profile, embedded phantoms, seeds {', '.join(map(str, seeds))})\n\n"
                f"Each seed draws its own 64/16/20 split, initialisation and sampling; intervals are 95% "
                f"stratified bootstrap CIs on that seed's test split ({len(records)} scans in all).\n\n"
                + _table(header, table) +
                f"\n\nHistogram + logistic regression (32 HU bins, 5-fold CV on all {len(records)} scans): "
                f"accuracy {hist_mean:.3f} ± {hist_std:.3f}"
                + (": global intensity statistics do not separate the classes.\n\n" if hist_mean <= 0.7
                   else ": above 0.7, global intensity statistics separate the classes.\n\n") +
                f"Ours vs 3D ResNet-18, mean ROC-AUC over seeds: {ours:.3f} vs {resnet:.3f} "
                f"({ours - resnet:+.3f}): target {_met(ours > resnet)}.")
    return runs / f"quality_{profile}_seed{seeds[0]}"


def speed(report: Report, run_dir: Path, profile: str, device: torch.device, quick: bool) -> dict:
    """Section 2 on the trained seed-0 run; returns figures the later sections reuse."""
    from torch.utils.data import DataLoader

    from utils.baselines import baseline_from_checkpoint
    from utils.checkpoint import load_checkpoint
    from utils.metrics import classification_metrics
    from utils.predict import load_model
    from utils.profiles import get_profile
    from utils.training import _inputs, cache_guidance, select_guidance
    from utils.pipeline import prepare_experiment

    config = get_profile(profile, seed=0, progress=False)
    exp = prepare_experiment(config, run_dir, device=str(device), verbose=False)
    model, meta = load_model(exp.main_checkpoint, device)
    train, test = exp.datasets["train"], exp.datasets["test"]

    # phase 1: one real epoch of DCG training on a copy of the trained model
    from models.diffmic3d import DiffMIC3D
    torch.manual_seed(0)
    fresh = DiffMIC3D(model.config).to(device)
    opt1 = torch.optim.AdamW(fresh.dcg.parameters(), lr=1e-4)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=False)

    def phase1_epoch():
        fresh.train()
        for batch in loader:
            x, x_hires, y = _inputs(batch, device)
            opt1.zero_grad(set_to_none=True)
            fresh.dcg_loss(x, y, x_hires)["loss"].backward()
            opt1.step()

    t1 = timed(phase1_epoch, device, repeats=1 if quick else 2, warmup=0)
    guidance = cache_guidance(fresh, exp.datasets["train_plain"], device, config.batch_size, progress=False)
    labels = torch.from_numpy(exp.datasets["train_plain"].labels)
    fresh.freeze_dcg()
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-4)
    n = len(labels)

    def phase2_epoch():
        fresh.train()
        for start in range(0, n, config.batch_size):
            rows = slice(start, start + config.batch_size)
            opt2.zero_grad(set_to_none=True)
            fresh.diffusion_loss(select_guidance(guidance, rows, device), labels[rows].to(device))["loss"].backward()
            opt2.step()

    t2 = timed(phase2_epoch, device, repeats=1 if quick else 3, warmup=1)
    report.add("speed", f"phase 1 epoch ({len(train)} volumes)", "seconds", t1, unit="s")
    report.add("speed", f"phase 2 epoch ({n} volumes, cached guidance)", "seconds", t2, unit="s")
    report.add("targets", "phase-2 epoch <= 0.25 x phase-1 epoch", "ratio", t2 / t1)

    # inference per volume, and what each sampler gives on the test split
    model.eval()
    resnet = baseline_from_checkpoint(load_checkpoint(exp.checkpoint("resnet18"))).to(device).eval()
    x = test[0]["image"][None].to(device)
    samplers = {"DDPM (all T steps)": ("ddpm", None), "DDIM 10 steps": ("ddim", 10), "DDIM 1 step": ("ddim", 1)}
    test_guidance = cache_guidance(model, test, device, config.batch_size, progress=False)
    y_test = test.labels
    rows = []
    per_volume = {}
    with torch.no_grad():
        t_resnet = timed(lambda: resnet(x), device, repeats=5 if not quick else 2)
        for name, (sampler, steps) in samplers.items():
            gen = torch.Generator(device).manual_seed(0)
            one = timed(lambda: model.predict(x, num_samples=1, sampler=sampler, steps=steps, generator=gen),
                        device, repeats=1 if sampler == "ddpm" else (5 if not quick else 2))
            per_volume[name] = one
            probs = []
            gen = torch.Generator(device).manual_seed(0)
            for start in range(0, len(y_test), config.batch_size):
                g = select_guidance(test_guidance, slice(start, start + config.batch_size), device)
                probs.append(model.predict(g, num_samples=config.num_samples, sampler=sampler, steps=steps,
                                           generator=gen)["probs"].float().cpu())
            m = classification_metrics(y_test, torch.cat(probs).numpy())
            report.add("speed", name, "seconds per volume (1 sample, incl. DCG)", one, unit="s")
            report.add("speed", name, "test accuracy", m["accuracy"])
            report.add("speed", name, "test ROC-AUC", m["roc_auc"])
            rows.append([name, f"{one * 1000:.1f}", f"{one / t_resnet:.2f}", f"{m['accuracy']:.3f}", f"{m['roc_auc']:.3f}"])
    with torch.no_grad():
        gen = torch.Generator(device).manual_seed(0)
        batched = timed(lambda: model.predict(x, num_samples=config.num_samples, steps=10, generator=gen), device,
                        repeats=5 if not quick else 2)
    report.add("speed", f"DDIM 10 steps, {config.num_samples} samples batched", "seconds per volume", batched, unit="s")
    rows.append([f"DDIM 10 steps, {config.num_samples} samples in one batch", f"{batched * 1000:.1f}",
                 f"{batched / t_resnet:.2f}", "", ""])
    report.add("speed", "3D ResNet-18 forward", "seconds per volume", t_resnet, unit="s")
    ratio = per_volume["DDIM 10 steps"] / t_resnet
    report.add("targets", "DDIM-10 per volume <= 1.5 x ResNet-18 forward", "ratio", ratio)
    rows.append(["3D ResNet-18 forward", f"{t_resnet * 1000:.1f}", "1.00", "", ""])
    report.text(f"## 2. Speed (`{profile}` profile, input {config.input_shape}, batch {config.batch_size})\n\n"
                f"Phase 1 epoch ({len(train)} training volumes): **{t1:.1f} s**; phase 2 epoch on the cached DCG "
                f"outputs: **{t2:.2f} s**, ratio {t2 / t1:.3f} (target <= 0.25: {_met(t2 / t1 <= 0.25)}).\n\n"
                "Inference per volume (batch 1, one sample, the DCG pass included), and the test-split "
                f"accuracy / AUC of each sampler with the run's {config.num_samples} samples "
                f"({len(y_test)} scans, seed-0 model):\n\n"
                + _table(["sampler", "ms / volume", "x ResNet-18", "accuracy", "ROC-AUC"], rows) +
                f"\n\nDDIM 10 vs a ResNet-18 forward: {ratio:.2f}x (target <= 1.5: {_met(ratio <= 1.5)}).")
    return {"phase1_epoch": t1, "phase2_epoch": t2}


def memory_and_projection(report: Report, device: torch.device, quick: bool, n_train: int) -> str:
    """Section 3 (added to the report) and section 5 (returned, to follow section 4): each
    stage at the full configuration, batch 4, in its own process."""
    shape, preset = ((64, 64, 32), "small") if quick else ((128, 128, 64), "seed")
    steps = 2 if quick else 3
    stages = {"dcg": "phase 1 (DCG)", "diffusion": "phase 2 (diffusion, cached guidance)",
              "resnet18": "3D ResNet-18", "densenet121": "3D DenseNet-121"}
    measured = {s: run_probe(s, shape, preset, 4, steps, str(device)) for s in stages}
    rows = []
    for stage, name in stages.items():
        m = measured[stage]
        report.add("memory", name, "peak RSS", m["peak_rss_gb"], unit="GB")
        if "peak_cuda_gb" in m:
            report.add("memory", name, "peak CUDA", m["peak_cuda_gb"], unit="GB")
        report.add("memory", name, "seconds per step (batch 4)", m["seconds_per_step"], unit="s")
        rows.append([name, f"{m['peak_rss_gb']:.2f}", f"{m.get('peak_cuda_gb', float('nan')):.2f}",
                     f"{m['seconds_per_step']:.2f}"])
    peak = max(m["peak_rss_gb"] for m in measured.values())
    report.add("targets", "peak memory of full training at batch 4 <= 6 GB", "GB", peak)
    # projection of the full profile: epochs x steps per epoch x seconds per step (upper bound:
    # every stage runs its whole epoch budget; early stopping only shortens it)
    steps_per_epoch = math.ceil(n_train / 4)
    epochs = {"dcg": 15, "diffusion": 30, "resnet18": 15, "densenet121": 15}
    minutes = {s: epochs[s] * steps_per_epoch * measured[s]["seconds_per_step"] / 60 for s in stages}
    ours = minutes["dcg"] + minutes["diffusion"]
    total = sum(minutes.values())
    report.add("projection", "full profile, DiffMIC-3D (15 + 30 epochs)", "minutes", ours, unit="min")
    report.add("projection", "full profile, with both baselines", "minutes", total, unit="min")
    report.add("targets", "full profile trains in < 45 min", "minutes", ours)
    label = "demo-size stand-in (--quick)" if quick else "the seed's full configuration"
    ratio = measured["diffusion"]["seconds_per_step"] / measured["dcg"]["seconds_per_step"]
    report.add("memory", "phase 2 / phase 1 step time at this size", "ratio", ratio)
    report.text(f"## 3. Memory ({label}: input {shape}, model `{preset}`, batch 4)\n\n"
                "Each stage runs a few training steps on random volumes in a fresh process: peak resident "
                "memory of that process (and peak CUDA memory on a GPU), and the median seconds per step.\n\n"
                + _table(["stage", "peak RSS (GB)", "peak CUDA (GB)", "s / step"], rows) +
                f"\n\nPeak: **{peak:.2f} GB** (target <= 6 GB: {_met(peak <= 6.0)}). At this size a phase-2 step "
                f"takes {ratio:.3f} x a phase-1 step.")
    return (f"## 5. Projected wall time of `full` on this machine\n\n"
            f"{steps_per_epoch} steps per epoch ({n_train} training volumes, batch 4) x the measured seconds "
            f"per step (section 3) x the epoch budget (15 DCG, 30 diffusion, 15 per baseline; early stopping can "
            f"only shorten it): DiffMIC-3D **{ours:.0f} min** (DCG {minutes['dcg']:.0f}, diffusion "
            f"{minutes['diffusion']:.1f}), with both baselines {total:.0f} min. Target < 45 min for "
            f"DiffMIC-3D: {_met(ours < 45)}.")


def scaling(report: Report, device: torch.device, quick: bool) -> None:
    """Section 4: phase-1 step time and memory against input size; epoch time against volumes."""
    sizes = QUICK_SIZES if quick else SIZES
    base = None
    rows = []
    for shape in sizes:
        m = run_probe("dcg", shape, "small", 4, 2 if quick else 3, str(device))
        voxels = math.prod(shape)
        base = base or (voxels, m["seconds_per_step"], m["peak_rss_gb"])
        report.add("scaling", f"input {shape}", "phase-1 seconds per step (batch 4)", m["seconds_per_step"], unit="s")
        report.add("scaling", f"input {shape}", "peak RSS", m["peak_rss_gb"], unit="GB")
        rows.append([f"{shape}", f"{voxels / base[0]:.1f}x", f"{m['seconds_per_step']:.2f}",
                     f"{m['seconds_per_step'] / base[1]:.1f}x", f"{m['peak_rss_gb']:.2f}"])
    # epoch time against the number of volumes, at the smallest size, real epochs on random data
    from models.diffmic3d import DiffMIC3D
    from utils.profiles import get_profile
    shape = sizes[0]
    config = get_profile("demo", input_shape=shape)
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config(device)).to(device).train()
    opt = torch.optim.AdamW(model.dcg.parameters(), lr=1e-4)
    count_rows = []
    unit = 8 if quick else 16
    first = None
    for factor in (1, 2, 4):
        n = unit * factor
        x = torch.rand(n, 1, *shape, device=device)
        y = torch.arange(n, device=device) % 2

        def epoch():
            for s in range(0, n, 4):
                opt.zero_grad(set_to_none=True)
                model.dcg_loss(x[s:s + 4], y[s:s + 4])["loss"].backward()
                opt.step()

        seconds = timed(epoch, device, repeats=1, warmup=0 if factor > 1 else 1)
        first = first or seconds
        report.add("scaling", f"{n} volumes", "phase-1 epoch seconds", seconds, unit="s")
        count_rows.append([f"{n} ({factor}x)", f"{seconds:.1f}", f"{seconds / first:.2f}x"])
    voxel_ratio = math.prod(sizes[-1]) / math.prod(sizes[0])
    time_ratio = float(rows[-1][3].rstrip("x"))
    exponent = math.log(max(time_ratio, 1e-9)) / math.log(voxel_ratio)
    count_exponent = math.log(max(seconds / first, 1e-9)) / math.log(4)
    report.add("scaling", "time vs voxels", "exponent", exponent)
    report.add("scaling", "epoch time vs volumes", "exponent", count_exponent)
    report.text("## 4. Scaling (phase 1, `small` model, batch 4, random volumes)\n\n"
                + _table(["input", "voxels", "s / step", "time", "peak RSS (GB)"], rows) +
                f"\n\nFrom the smallest to the largest input ({voxel_ratio:.0f}x the voxels) a step takes "
                f"{time_ratio:.1f}x as long: time grows as voxels^{exponent:.2f} here (1 = linear; below 1 while "
                "fixed costs, e.g. the diffusion on the fixed Np^3 grid and the per-step overhead, still weigh in).\n\n"
                + _table(["volumes per epoch", "epoch s", "time"], count_rows) +
                f"\n\nEpoch time grows as volumes^{count_exponent:.2f} (1 = linear: one step per batch of 4).")


def design_choices(report: Report, runs: Path, device: torch.device, quick: bool) -> None:
    """Section 6: phase-1 DCG variants on hard phantoms; fused-prior AUC on validation and test."""
    from utils.metrics import classification_metrics
    from utils.phantoms import DIFFICULTIES, PhantomConfig, write_dataset
    from utils.pipeline import build_model, cache_split_guidance, prepare_experiment, train_phase1
    from utils.profiles import get_profile

    profile = "smoke" if quick else "demo"
    data = runs / f"phantoms_hard_{profile}"
    size = 32 if quick else 128
    n = 12 if quick else 100
    write_dataset(data, n, seed=1, config=PhantomConfig(size=size, difficulty=DIFFICULTIES["hard"]), progress=False)
    variants = {"default (roi_scale 1, top-t%, K=3)": {}, "roi_scale 2": {"roi_scale": 2},
                "mean pooling": {"pooling": "mean"}, "K = 1": {"num_rois": 1}, "K = 5": {"num_rois": 5}}
    rows = []
    for name, change in variants.items():
        train_overrides = {"roi_scale": change["roi_scale"]} if "roi_scale" in change else {}
        config = get_profile(profile, seed=0, progress=False, baselines=(), phantom_size=size, **train_overrides)
        out = runs / f"design_{profile}_{'_'.join(f'{k}-{v}' for k, v in change.items()) or 'default'}"
        exp = prepare_experiment(config, out, data_dir=data, device=str(device), verbose=False)
        model = build_model(exp)
        dcg_change = {k: v for k, v in change.items() if k != "roi_scale"}
        if dcg_change:
            from models.diffmic3d import DiffMIC3D
            prior = replace(model.config.prior, num_rois=dcg_change.get("num_rois", model.config.prior.num_rois))
            model = DiffMIC3D(replace(model.config, dcg=replace(model.config.dcg, **dcg_change), prior=prior)).to(device)
            exp.meta["variant"] = dcg_change
        train_phase1(exp, model)
        cells = [name]
        for split in ("val", "test"):
            g = cache_split_guidance(exp, model, (split,))[split]
            m = classification_metrics(exp.datasets[split].labels, g["fused_probs"].numpy())
            report.add("design (hard phantoms)", name, f"DCG fused ROC-AUC, {split}", m["roc_auc"])
            cells.append(f"{m['roc_auc']:.3f}")
        rows.append(cells)
        n_val, n_test = len(exp.datasets["val"]), len(exp.datasets["test"])
    report.text(f"## 6. Design choices on small lesions (hard phantoms, {n} scans at {size} in-plane, "
                f"`{profile}` phase 1 only)\n\n"
                "The DCG's fused prediction (mean of its global and local priors) after phase 1, per variant; "
                f"validation ({n_val} scans) and test ({n_test} scans) AUC. Exploratory: the defaults were not changed on "
                "the strength of these numbers.\n\n"
                + _table(["variant", "val AUC", "test AUC"], rows))


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------

def run_benchmark(output_dir: Path, quick: bool = False, device: Optional[str] = None) -> Path:
    """Run every section and write ``benchmark.md`` and ``benchmark.csv``; returns the .md path."""
    from utils.seeding import pick_device, seed_everything

    started = time.perf_counter()
    seed_everything(0)
    dev = pick_device(device)
    output_dir = Path(output_dir)
    runs = output_dir / "benchmark_runs"
    runs.mkdir(parents=True, exist_ok=True)
    report = Report()
    profile, seeds = ("smoke", (0, 1)) if quick else ("demo", (0, 1, 2))
    sections = []

    def section(name, fn):
        tic = time.perf_counter()
        print(f"[benchmark] {name} ...", flush=True)
        result = fn()
        sections.append((name, time.perf_counter() - tic))
        print(f"[benchmark] {name} done in {sections[-1][1]:.0f} s", flush=True)
        return result

    run0 = section("quality", lambda: quality(report, profile, seeds, runs, str(dev)))
    n_train = 64  # the full profile's training split of the 100 embedded scans
    section("speed", lambda: speed(report, run0, profile, dev, quick))
    projection = section("memory", lambda: memory_and_projection(report, dev, quick, n_train))
    section("scaling", lambda: scaling(report, dev, quick))
    report.text(projection)
    section("design", lambda: design_choices(report, runs, dev, quick))

    info = machine_info(dev)
    command = "python -m utils.benchmark" + (" --quick" if quick else "")
    targets = {r["item"]: r["value"] for r in report.rows if r["section"] == "targets"}
    checks = [
        ("`full` profile (DiffMIC-3D) trains in < 45 min on this machine",
         targets["full profile trains in < 45 min"], lambda v: v < 45, "{:.0f} min (projected)"),
        ("phase-2 epoch <= 0.25 x phase-1 epoch", targets["phase-2 epoch <= 0.25 x phase-1 epoch"],
         lambda v: v <= 0.25, "{:.3f}"),
        ("DDIM-10 per volume <= 1.5 x 3D ResNet-18 forward",
         targets["DDIM-10 per volume <= 1.5 x ResNet-18 forward"], lambda v: v <= 1.5, "{:.2f}x"),
        ("peak memory of `full` training at batch 4 <= 6 GB",
         targets["peak memory of full training at batch 4 <= 6 GB"], lambda v: v <= 6.0, "{:.2f} GB"),
        ("ours above 3D ResNet-18 in ROC-AUC (mean over seeds)", targets["ours above 3D ResNet-18 in AUC"],
         lambda v: v > 0, "{:+.3f}"),
    ]
    target_rows = [[name, fmt.format(v), "met" if ok(v) else "missed"] for name, v, ok, fmt in checks]
    header = (f"# Benchmark{' (--quick: smoke sizes, not for reading)' if quick else ''}\n\n"
              f"Command: `{command}`, run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{(time.perf_counter() - started) / 60:.1f} min in all (experiment runs already complete in "
              f"`{runs.name}/` are loaded from their checkpoints, not retrained: the first full run trained "
              f"them; see 'Sections took' below).\n\n"
              f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
              f"torch {info['torch']}, Python {info['python']}, device `{info['device']}`"
              + (f" ({info['gpu']})" if "gpu" in info else "") + ".\n\n"
              "## Targets\n\n" + _table(["target", "measured", ""], target_rows) + "\n")
    for key, value in info.items():
        report.add("machine", key, "value", float("nan"), unit=str(value))
    md = output_dir / "benchmark.md"
    atomic_write_text(md, header + "\n" + "\n".join(report.blocks) + "\nSections took: "
                      + ", ".join(f"{n} {s:.0f} s" for n, s in sections) + ".\n")
    atomic_write_text(output_dir / "benchmark.csv", report.csv())
    return md


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: checks the suite runs (for CI)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: $MEDISCOPE_DEVICE, auto)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:  # internal: one measurement in a fresh process
        spec = json.loads(args.probe)
        print(json.dumps(probe(spec["stage"], tuple(spec["input_shape"]), spec["preset"], spec["batch_size"],
                               spec["steps"], spec["device"])))
        return 0
    md = run_benchmark(args.output_dir, args.quick, args.device)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
