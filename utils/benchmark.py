"""Benchmark suite: quality, speed, memory and scaling of DiffMIC-3D beside a plain 3D CNN.

    python -m utils.benchmark [--quick] [--output-dir outputs] [--quality-dir outputs/benchmark] [--device cpu|cuda]

Writes ``OUTPUT_DIR/benchmark.md`` (the report: each table with the command and machine that
produced it, and the targets met, missed or not measured) and ``OUTPUT_DIR/benchmark.csv``
(``section,item,metric,value,spread,unit``) beside it; the experiment runs it needs go to
``OUTPUT_DIR/benchmark_runs/`` and are resumed when the benchmark is started again. Every
timing comes from the same invocation on the same machine, so ratios are meaningful.

Sections (full suite; ``--quick`` runs the same code at smoke sizes, for CI):

1. Quality: the reports of ``python -m utils.benchmark_quality`` (``QUALITY_DIR/quality_
   phantoms300.md``, ``quality_adrenalmnist3d.md``, ``quality_adrenalmnist3d_ablations.md``;
   paired test-AUC differences over seeds), included as text when they exist; the quality
   targets are read from their CSVs ("not measured" when absent). ``--quick`` also runs
   ``run_quality('smoke', (0, 1), OUTPUT_DIR/quality)`` to exercise that code path. Plus a
   histogram + logistic-regression baseline on the phantoms.
2. Speed (a finished run: the ``demo`` profile's seed 0, or the smoke run with ``--quick``):
   seconds per training epoch of phase 1 (DCG) and of phase 2 (``diffusion_loss`` on the
   scans -- the denoiser's own image encoder runs on them every step -- and the cached
   guidance), inference seconds per volume with DDPM (all T steps), DDIM 10 and DDIM 1 (the
   DCG and the condition once per call, the per-point head per step) next to a ResNet-18
   forward, and the accuracy / AUC each sampler gives on the run's test split.
3. Memory: peak resident memory (and peak CUDA memory on a GPU) of training steps at the
   ``full`` configuration, batch 4, each stage in its own subprocess (phase 2: the frozen
   DCG's guidance once, then ``diffusion_loss`` steps on scan + guidance).
4. Scaling: time per phase-1 and phase-2 step and peak memory at 64x64x32, 96x96x48 and
   128x128x64, and phase-1 epoch time for 1x, 2x and 4x the number of volumes.
5. The ``full`` profile's projected wall time from measured steps (out-of-fold DCGs included).
6. Design choices at the hard phantom difficulty (phase 1 only: the DCG's fused prediction):
   ROI crops at roi_scale 1 vs 2, top-t% vs mean pooling, K = 1, 3, 5 ROIs, foreground-only
   ROIs vs anywhere, probability-weighted vs summed ROI scores.

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

from utils.cli import make_parser
from utils.log import get_logger
from utils.atomic import atomic_write_text
from utils.paths import REPO_ROOT

OURS, DCG_FUSED, RESNET = "DiffMIC-3D", "DCG without diffusion", "3D ResNet-18"
TARGETS = {
    "adrenal_auc": 0.85,
    "full_train_minutes": 45.0,
    "phase2_over_phase1": 0.25,
    "ddim10_over_resnet": 1.5,
    "full_peak_gb": 6.0,
}
QUALITY_DIR = REPO_ROOT / "outputs" / "benchmark"
# report stem -> the command of utils.benchmark_quality that writes it
QUALITY_REPORTS = {
    "quality_phantoms300": "python -m utils.benchmark_quality --data phantoms --seeds 0 1 2",
    "quality_adrenalmnist3d": "python -m utils.benchmark_quality --data adrenal --seeds 0 1 2",
    "quality_adrenalmnist3d_ablations": "python -m utils.benchmark_quality --data adrenal --seeds 0 --ablations",
}
SIZES = ((64, 64, 32), (96, 96, 48), (128, 128, 64))
QUICK_SIZES = ((32, 32, 16), (48, 48, 16), (64, 64, 32))
STATUSES = ("met", "missed", "not measured")

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------
# report rows
# ------------------------------------------------------------------------------------------

class Report:
    """Rows for the CSV, markdown blocks and target rows for the report, in the order added."""

    def __init__(self):
        self.rows: list[dict] = []
        self.blocks: list[str] = []
        self.targets: list[dict] = []

    def add(self, section: str, item: str, metric: str, value: float, spread: float = float("nan"),
            unit: str = "") -> float:
        self.rows.append({"section": section, "item": item, "metric": metric, "value": float(value),
                          "spread": float(spread), "unit": unit})
        return float(value)

    def text(self, block: str) -> None:
        self.blocks.append(block.rstrip() + "\n")

    def target(self, name: str, status: str, measured: str, value: Optional[float] = None) -> str:
        """One row of the targets table: ``status`` is ``met``, ``missed`` or ``not measured``
        (then ``measured`` says why); ``value`` also goes to the CSV (section ``targets``)."""
        if status not in STATUSES:
            raise ValueError(f"target status must be one of {STATUSES}, got {status!r}")
        if status == "not measured" and not measured.strip():
            raise ValueError(f"target {name!r}: 'not measured' needs a stated reason")
        self.targets.append({"target": name, "measured": measured, "status": status})
        if value is not None and status != "not measured":
            self.add("targets", name, "measured", value)
        return status

    def check(self, name: str, value: float, ok: bool, measured: str) -> str:
        """A measured target: met iff ``ok``."""
        return self.target(name, "met" if ok else "missed", measured, value)

    def targets_table(self) -> str:
        return _table(["target", "measured", "status"],
                      [[t["target"], t["measured"], f"**{t['status']}**"] for t in self.targets])

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


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------

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


def _batch(batch, device: torch.device):
    """(image, image_hires or None, label, index) of a dataset batch, tensors on ``device``."""
    hires = batch.get("image_hires")
    return (batch["image"].to(device), None if hires is None else hires.to(device), batch["label"].to(device),
            torch.as_tensor(batch["index"]))


# ------------------------------------------------------------------------------------------
# probes: one training stage at one size, measured in a fresh process (clean peak memory)
# ------------------------------------------------------------------------------------------

def probe(stage: str, input_shape: tuple[int, int, int], preset: str, batch_size: int, steps: int,
          device: str) -> dict:
    """Seconds per training step (median) and peak memory of ``stage`` on random volumes.

    ``stage``: ``dcg`` (phase 1), ``diffusion`` (phase 2: the frozen DCG's guidance computed
    once, then ``diffusion_loss`` steps on the scans and that guidance -- the denoiser's own
    image encoder, the condition U-Net and the per-point head train), or a baseline name.
    Runs in the calling process; :func:`run_probe` runs it in a subprocess.
    """
    from models.diffmic3d import DiffMIC3D
    from utils.training.baselines import build_baseline
    from utils.training.profiles import get_profile

    dev = torch.device(device)
    torch.manual_seed(0)
    config = get_profile("full", input_shape=input_shape, model_preset=preset, batch_size=batch_size)
    x = torch.rand(batch_size, 1, *input_shape, device=dev)
    y = torch.arange(batch_size, device=dev) % 2
    amp = config.use_amp(dev)
    if stage in ("dcg", "diffusion"):
        model = DiffMIC3D(config.model_config(dev)).to(dev).train()
        if stage == "dcg":
            params = model.dcg.parameters()
            step_loss = lambda: model.dcg_loss(x, y, label_smoothing=config.label_smoothing)["loss"]  # noqa: E731
        else:
            model.freeze_dcg()
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp):  # float16: as on a T4
                guidance = model.guidance(x).as_dict()
            params = list(model.prior_generator.parameters()) + list(model.denoiser.parameters())
            gen = torch.Generator(dev).manual_seed(0)
            step_loss = lambda: model.diffusion_loss(x, guidance, y, prior_dropout=config.prior_dropout,  # noqa: E731
                                                     generator=gen)["loss"]
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
# section 1: quality, from the reports of utils.benchmark_quality
# ------------------------------------------------------------------------------------------

def read_quality_csv(path: Path) -> dict:
    """``{'auc': {model: {seed: value}}, 'diff': {other: {seed: (diff, ci_low, ci_high)}}}`` of a
    ``quality_<name>.csv`` written by ``utils.benchmark_quality`` (``OURS - other`` differences)."""
    out: dict = {"auc": {}, "diff": {}}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            seed = int(row["metric"].split()[-1])
            if row["table"] == "auc":
                out["auc"].setdefault(row["item"], {})[seed] = float(row["value"])
            elif row["table"] == "paired AUC difference":
                other = row["item"].split(" - ", 1)[1]
                out["diff"].setdefault(other, {})[seed] = (float(row["value"]), float(row["ci_low"]),
                                                           float(row["ci_high"]))
    return out


def _seeds_text(per_seed: dict) -> str:
    return ", ".join(f"seed {s} {v:.3f}" for s, v in sorted(per_seed.items()))


def auc_target(report: Report, name: str, data: Optional[dict], source: str, threshold: float) -> str:
    """Met iff the mean test AUC of DiffMIC-3D over the report's seeds is >= ``threshold``."""
    if data is None:
        return report.target(name, "not measured", f"{source} absent (run `{_command_of(source)}`)")
    per_seed = data["auc"].get(OURS)
    if not per_seed:
        return report.target(name, "not measured", f"no `auc,{OURS}` rows in {source}")
    mean = float(np.mean(list(per_seed.values())))
    return report.check(name, mean, mean >= threshold,
                        f"mean {mean:.3f} over {len(per_seed)} seeds ({_seeds_text(per_seed)})")


def paired_target(report: Report, name: str, data: Optional[dict], source: str, other: str) -> str:
    """Met iff the mean over seeds of the paired test-AUC difference ``OURS - other`` is > 0;
    quotes each seed's 95% paired CI and how many seeds' CIs exclude 0."""
    if data is None:
        return report.target(name, "not measured", f"{source} absent (run `{_command_of(source)}`)")
    per_seed = data["diff"].get(other)
    if not per_seed:
        return report.target(name, "not measured", f"no `{OURS} - {other}` rows in {source}")
    diffs = [d for d, _, _ in per_seed.values()]
    mean = float(np.mean(diffs))
    above = sum(lo > 0 for _, lo, _ in per_seed.values())
    below = sum(hi < 0 for _, _, hi in per_seed.values())
    cis = "; ".join(f"seed {s} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for s, (d, lo, hi) in sorted(per_seed.items()))
    return report.check(name, mean, mean > 0,
                        f"mean paired AUC difference {mean:+.3f} over {len(per_seed)} seeds ({cis}); "
                        f"CI excludes 0 in {above} seed(s) above, {below} below")


def _command_of(source: str) -> str:
    return QUALITY_REPORTS.get(Path(source).stem, "python -m utils.benchmark_quality")


def _demote(markdown: str) -> str:
    """Headings one level down, so an included report nests under section 1."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _quality_rows(report: Report, name: str, data: dict) -> None:
    for model, per_seed in data["auc"].items():
        for seed, value in sorted(per_seed.items()):
            report.add("quality", f"{name}: {model}", f"test ROC-AUC seed {seed}", value)
    for other, per_seed in data["diff"].items():
        for seed, (d, lo, hi) in sorted(per_seed.items()):
            report.add("quality", f"{name}: {OURS} - {other}", f"paired AUC difference seed {seed}", d,
                       unit=f"CI [{lo:.3f}, {hi:.3f}]")


def quality(report: Report, quality_dir: Path, quick: bool, output_dir: Path, device: Optional[str]) -> Optional[Path]:
    """Section 1 and the quality targets; returns the seed-0 smoke run folder with ``quick``."""
    from utils.data.discovery import discover_scans, find_dataset_root
    from utils.histogram_baseline import histogram_baseline_accuracy
    from utils.training.profiles import get_profile

    quality_dir = Path(quality_dir)
    parts = [f"## 1. Quality\n\nThe quality benchmark is `utils.benchmark_quality` (DiffMIC-3D against its own DCG "
             "and the 3D CNN baselines on the same test scans, paired 95% bootstrap intervals, over seeds); its "
             f"reports in `{_rel(quality_dir)}/` are included below as written (each states its own command)."]
    loaded: dict[str, Optional[dict]] = {}
    for stem, command in QUALITY_REPORTS.items():
        md, table = quality_dir / f"{stem}.md", quality_dir / f"{stem}.csv"
        if md.is_file():
            when = dt.datetime.fromtimestamp(md.stat().st_mtime, dt.timezone.utc)
            parts.append(f"### `{_rel(md)}` (written {when:%Y-%m-%d %H:%M} UTC by `{command}`)\n\n"
                         + _demote(md.read_text().strip()))
        else:
            parts.append(f"### `{_rel(md)}`: not present\n\nNot measured: run `{command}` to write it.")
        loaded[stem] = read_quality_csv(table) if table.is_file() else None
        if loaded[stem] is not None:
            _quality_rows(report, stem.removeprefix("quality_"), loaded[stem])

    adrenal, phantoms = "quality_adrenalmnist3d", "quality_phantoms300"
    src = {k: _rel(quality_dir / f"{k}.csv") for k in (adrenal, phantoms)}
    auc_target(report, f"AdrenalMNIST3D: {OURS} test AUC >= {TARGETS['adrenal_auc']} (mean over seeds)",
               loaded[adrenal], src[adrenal], TARGETS["adrenal_auc"])
    paired_target(report, f"AdrenalMNIST3D: {OURS} >= the same-run {RESNET} (paired test AUC)",
                  loaded[adrenal], src[adrenal], RESNET)
    paired_target(report, f"phantoms (300): {OURS} above its own DCG (fused prediction)",
                  loaded[phantoms], src[phantoms], DCG_FUSED)
    paired_target(report, f"phantoms (300): {OURS} above the same-run {RESNET}",
                  loaded[phantoms], src[phantoms], RESNET)

    run0 = None
    if quick:  # exercise the quality benchmark's code path at smoke size (CI)
        from utils.benchmark_quality import run_quality
        smoke_dir = output_dir / "quality"
        md = run_quality("smoke", (0, 1), smoke_dir, device=device)
        smoke = read_quality_csv(md.with_suffix(".csv"))
        _quality_rows(report, "smoke", smoke)
        parts.append(f"### `--quick`: `run_quality('smoke', (0, 1), {_rel(smoke_dir)})` (12 phantoms; code path only)\n\n"
                     + _demote(md.read_text().strip()))
        src_smoke = _rel(md.with_suffix(".csv"))
        paired_target(report, f"[--quick code path, not a target] smoke: {OURS} above its DCG (fused)",
                      smoke, src_smoke, DCG_FUSED)
        paired_target(report, f"[--quick code path, not a target] smoke: {OURS} above {RESNET}",
                      smoke, src_smoke, RESNET)
        run0 = smoke_dir / "benchmark_runs" / "quality_smoke_seed0"

    # histogram + logistic regression on the phantoms (global intensity statistics only)
    if quick:
        phantom_dir = REPO_ROOT / get_profile("smoke").phantom_dir
    else:
        phantom_dir = REPO_ROOT / "data" / "phantoms_300"
        if not phantom_dir.is_dir():
            phantom_dir = REPO_ROOT / get_profile("demo").phantom_dir
    root, _ = find_dataset_root(phantom_dir)
    records = discover_scans(root)
    hist_mean, hist_std = histogram_baseline_accuracy([r.path for r in records], [r.label for r in records])
    report.add("quality", "histogram + logistic regression", "accuracy 5-fold CV", hist_mean, hist_std)
    parts.append(f"### Histogram + logistic regression\n\n32 HU bins, 5-fold CV on all {len(records)} scans of "
                 f"`{_rel(root)}`: accuracy {hist_mean:.3f} ± {hist_std:.3f}"
                 + (": global intensity statistics do not separate the classes." if hist_mean <= 0.7
                    else ": above 0.7, global intensity statistics separate the classes."))
    report.text("\n\n".join(parts))
    return run0


# ------------------------------------------------------------------------------------------
# section 2: speed
# ------------------------------------------------------------------------------------------

def speed(report: Report, run_dir: Path, config, device: torch.device, quick: bool) -> dict:
    """Section 2 on the finished run in ``run_dir`` (trained with ``config``); returns the
    epoch times."""
    from torch.utils.data import DataLoader

    from models.diffmic3d import DiffMIC3D
    from utils.training.baselines import baseline_from_checkpoint, build_baseline
    from utils.training.checkpoint import load_checkpoint
    from utils.training.diffusion import select_guidance
    from utils.evaluation.metrics import classification_metrics
    from utils.pipeline import prepare_experiment
    from utils.predict import load_model
    from utils.training.dcg import cache_guidance

    exp = prepare_experiment(config, run_dir, device=str(device), verbose=False)
    model, _ = load_model(exp.main_checkpoint, device)
    train, test = exp.datasets["train"], exp.datasets["test"]
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=False)
    repeats = 2

    # phase 1: real epochs of DCG training (the curriculum at mid-phase) on a fresh model
    torch.manual_seed(0)
    fresh = DiffMIC3D(model.config).to(device)
    opt1 = torch.optim.AdamW(fresh.dcg.parameters(), lr=1e-4)
    curriculum = dict(label_smoothing=config.label_smoothing, progress=0.5, pool_warmup=config.dcg_pool_warmup,
                      local_start=config.dcg_local_start, local_ramp=config.dcg_local_ramp)

    def phase1_epoch():
        fresh.train()
        for batch in loader:
            x, x_hires, y, _ = _batch(batch, device)
            opt1.zero_grad(set_to_none=True)
            fresh.dcg_loss(x, y, x_hires, **curriculum)["loss"].backward()
            opt1.step()

    t1 = timed(phase1_epoch, device, repeats=repeats, warmup=1)

    # phase 2: diffusion_loss on the (augmented) training scans + their cached guidance
    fresh.freeze_dcg()
    guidance = cache_guidance(fresh, exp.datasets["train_plain"], device, config.batch_size, progress=False)

    def phase2_timer(net: DiffMIC3D) -> float:
        opt = torch.optim.AdamW(list(net.prior_generator.parameters()) + list(net.denoiser.parameters()), lr=1e-4)
        gen = torch.Generator(device).manual_seed(0)

        def epoch():
            net.train()
            net.dcg.eval()  # frozen
            for batch in loader:
                x, _, y, rows = _batch(batch, device)
                opt.zero_grad(set_to_none=True)
                net.diffusion_loss(x, select_guidance(guidance, rows, device), y, prior_dropout=config.prior_dropout,
                                   generator=gen)["loss"].backward()
                opt.step()

        return timed(epoch, device, repeats=repeats, warmup=1)

    t2 = phase2_timer(fresh)
    # the same without the denoiser's own image encoder: what phase 2 costs on cached guidance only
    torch.manual_seed(0)
    no_encoder = DiffMIC3D(replace(model.config, denoiser=replace(model.config.denoiser, use_image_encoder=False)))
    no_encoder = no_encoder.to(device)
    no_encoder.dcg.load_state_dict(fresh.dcg.state_dict())
    no_encoder.freeze_dcg()
    t2_cached = phase2_timer(no_encoder)
    k = config.oof_folds
    oof_epochs = k * (k - 1) / k if k >= 2 else 0.0  # phase-1 epochs of the out-of-fold DCGs per final-DCG epoch
    report.add("speed", f"phase 1 epoch ({len(train)} volumes)", "seconds", t1, unit="s")
    report.add("speed", f"phase 2 epoch ({len(train)} volumes, scans + cached guidance)", "seconds", t2, unit="s")
    report.add("speed", f"phase 2 epoch without the own image encoder (cached guidance only)", "seconds", t2_cached,
               unit="s")
    ratio2 = t2 / t1
    report.check(f"phase-2 epoch <= {TARGETS['phase2_over_phase1']} x phase-1 epoch (set when phase 2 ran on cached "
                 "guidance only; phase 2 now also trains its own image encoder on the scans)", ratio2,
                 ratio2 <= TARGETS["phase2_over_phase1"],
                 f"{ratio2:.3f} ({t2:.2f} s / {t1:.2f} s; without the image encoder {t2_cached / t1:.3f})")

    # inference per volume, and what each sampler gives on the test split
    model.eval()
    if exp.checkpoint("resnet18").is_file():
        resnet = baseline_from_checkpoint(load_checkpoint(exp.checkpoint("resnet18")))
    else:  # untrained: same work per forward
        resnet = build_baseline("resnet18", exp.num_classes)
    resnet = resnet.to(device).eval()
    item = test[0]
    x = item["image"][None].to(device)
    x_hires = item["image_hires"][None].to(device) if "image_hires" in item else None
    T = model.config.diffusion.num_timesteps
    samplers = {f"DDPM (all T = {T} steps)": ("ddpm", None), "DDIM 10 steps": ("ddim", 10),
                "DDIM 1 step": ("ddim", 1)}
    test_guidance = cache_guidance(model, test, device, config.batch_size, progress=False)
    y_test = test.labels
    reps = 2 if quick else 5
    rows, per_volume = [], {}
    with torch.no_grad():
        t_resnet = timed(lambda: resnet(x), device, repeats=reps)
        for name, (sampler, steps) in samplers.items():
            gen = torch.Generator(device).manual_seed(0)
            one = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=1, sampler=sampler, steps=steps,
                                              generator=gen),
                        device, repeats=1 if sampler == "ddpm" else reps, warmup=0 if sampler == "ddpm" else 1)
            per_volume[name] = one
            probs = []
            gen = torch.Generator(device).manual_seed(config.seed)
            for batch in DataLoader(test, batch_size=config.batch_size, shuffle=False):
                images, _, _, index = _batch(batch, device)
                probs.append(model.predict(images, select_guidance(test_guidance, index, device),
                                           num_samples=config.num_samples, sampler=sampler, steps=steps,
                                           generator=gen)["probs"].float().cpu())
            m = classification_metrics(y_test, torch.cat(probs).numpy())
            report.add("speed", name, "seconds per volume (1 sample, DCG + condition included)", one, unit="s")
            report.add("speed", name, "test accuracy", m["accuracy"])
            report.add("speed", name, "test ROC-AUC", m["roc_auc"])
            rows.append([name, f"{one * 1000:.1f}", f"{one / t_resnet:.2f}", f"{m['accuracy']:.3f}",
                         f"{m['roc_auc']:.3f}"])
        gen = torch.Generator(device).manual_seed(0)
        batched = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=config.num_samples, sampler="ddim",
                                              steps=10, generator=gen), device, repeats=reps)
    report.add("speed", f"DDIM 10 steps, {config.num_samples} samples batched", "seconds per volume", batched, unit="s")
    rows.append([f"DDIM 10 steps, {config.num_samples} samples in one batch", f"{batched * 1000:.1f}",
                 f"{batched / t_resnet:.2f}", "", ""])
    report.add("speed", "3D ResNet-18 forward", "seconds per volume", t_resnet, unit="s")
    rows.append(["3D ResNet-18 forward", f"{t_resnet * 1000:.1f}", "1.00", "", ""])
    ratio = per_volume["DDIM 10 steps"] / t_resnet
    report.check(f"DDIM-10 per volume (1 sample, DCG + denoiser encoder included) <= {TARGETS['ddim10_over_resnet']} "
                 f"x {RESNET} forward", ratio, ratio <= TARGETS["ddim10_over_resnet"],
                 f"{ratio:.2f}x ({per_volume['DDIM 10 steps'] * 1000:.1f} ms vs {t_resnet * 1000:.1f} ms)")
    report.text(f"## 2. Speed (`{config.profile}` profile, input {config.input_shape}, model `{config.model_preset}`, "
                f"batch {config.batch_size}; run `{_rel(run_dir)}`)\n\n"
                f"Training steps only (median of {repeats} epochs after one untimed; validation passes excluded), "
                f"{len(train)} training volumes with the train-time flips:\n\n"
                + _table(["phase", "s / epoch", "x phase 1"], [
                    ["phase 1 (DCG, `dcg_loss`)", f"{t1:.2f}", "1.00"],
                    ["phase 2 (`diffusion_loss` on scans + cached guidance)", f"{t2:.2f}", f"{ratio2:.3f}"],
                    ["phase 2 without the own image encoder (cached guidance only)", f"{t2_cached:.2f}",
                     f"{t2_cached / t1:.3f}"]]) +
                f"\n\nPhase 2 now runs the denoiser's own image encoder over every training scan each step, so its "
                f"epoch is no longer a small fraction of phase 1's: {ratio2:.3f} x (target <= "
                f"{TARGETS['phase2_over_phase1']}, set for the cached-guidance-only design: {_met(ratio2 <= TARGETS['phase2_over_phase1'])}). "
                f"Before phase 2, {k} out-of-fold DCGs (`oof_folds`) each train on {k - 1}/{k} of the split: about "
                f"{oof_epochs:.1f} phase-1 epochs per epoch of the final DCG.\n\n"
                "Inference per volume (batch 1, one sample, the DCG and the condition (own image encoder + U-Net) once "
                "per call, the per-point head once per step), and the test-split accuracy / AUC of each sampler with "
                f"the run's {config.num_samples} samples ({len(y_test)} scans, seed-{config.seed} model, cached test "
                "guidance):\n\n"
                + _table(["sampler", "ms / volume", "x ResNet-18", "accuracy", "ROC-AUC"], rows) +
                f"\n\nDDIM 10 vs a ResNet-18 forward: {ratio:.2f}x (target <= {TARGETS['ddim10_over_resnet']}: "
                f"{_met(ratio <= TARGETS['ddim10_over_resnet'])}).")
    return {"phase1_epoch": t1, "phase2_epoch": t2, "phase2_cached_epoch": t2_cached}


# ------------------------------------------------------------------------------------------
# sections 3 and 5: memory, projected wall time
# ------------------------------------------------------------------------------------------

def memory_and_projection(report: Report, device: torch.device, quick: bool, n_train: int) -> str:
    """Section 3 (added to the report) and section 5 (returned, to follow section 4): each
    stage at the full configuration, batch 4, in its own process."""
    from utils.training.profiles import get_profile

    shape, preset = ((64, 64, 32), "small") if quick else ((128, 128, 64), "full")
    steps = 2 if quick else 3
    stages = {"dcg": "phase 1 (DCG)", "diffusion": "phase 2 (scan + cached guidance, `diffusion_loss`)",
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
    label = "demo-size stand-in (--quick)" if quick else "the `full` configuration"
    peak = max(m.get("peak_cuda_gb", m["peak_rss_gb"]) if device.type == "cuda" else m["peak_rss_gb"]
               for m in measured.values())
    report.check(f"peak memory of `full` training at batch 4 <= {TARGETS['full_peak_gb']} GB"
                 + (" [--quick: measured at the stand-in size]" if quick else ""), peak,
                 peak <= TARGETS["full_peak_gb"], f"{peak:.2f} GB ({'CUDA' if device.type == 'cuda' else 'RSS'})")
    # projection of the full profile: epochs x steps per epoch x seconds per step (upper bound:
    # every stage runs its whole epoch budget; early stopping only shortens it)
    full = get_profile("full")
    k = full.oof_folds
    dcg_runs = 1 + (k - 1 if k >= 2 else 0)  # the final DCG + k out-of-fold DCGs on (k-1)/k of the split
    steps_per_epoch = math.ceil(n_train / 4)
    epochs = {"dcg": full.dcg_epochs * dcg_runs, "diffusion": full.diffusion_epochs,
              "resnet18": full.baseline_epochs, "densenet121": full.baseline_epochs}
    minutes = {s: epochs[s] * steps_per_epoch * measured[s]["seconds_per_step"] / 60 for s in stages}
    ours = minutes["dcg"] + minutes["diffusion"]
    total = sum(minutes.values())
    report.add("projection", f"full profile, DiffMIC-3D ({epochs['dcg']:g} DCG-epoch equivalents + "
               f"{epochs['diffusion']} diffusion epochs)", "minutes", ours, unit="min")
    report.add("projection", "full profile, with both baselines", "minutes", total, unit="min")
    report.check(f"`full` profile (DiffMIC-3D, out-of-fold DCGs included) trains in < {TARGETS['full_train_minutes']:g} "
                 "min on this machine" + (" [--quick: stand-in size]" if quick else ""), ours,
                 ours < TARGETS["full_train_minutes"], f"{ours:.0f} min (projected, training steps only)")
    ratio = measured["diffusion"]["seconds_per_step"] / measured["dcg"]["seconds_per_step"]
    report.add("memory", "phase 2 / phase 1 step time at this size", "ratio", ratio)
    report.text(f"## 3. Memory ({label}: input {shape}, model `{preset}`, batch 4)\n\n"
                "Each stage runs a few training steps on random volumes in a fresh process: peak resident "
                "memory of that process (and peak CUDA memory on a GPU), and the median seconds per step. Phase 2 "
                "computes the frozen DCG's guidance once, then trains the prior generator and the denoiser (own "
                "image encoder on the scans, condition U-Net, per-point head) on `diffusion_loss`.\n\n"
                + _table(["stage", "peak RSS (GB)", "peak CUDA (GB)", "s / step"], rows) +
                f"\n\nPeak: **{peak:.2f} GB** (target <= {TARGETS['full_peak_gb']:g} GB: "
                f"{_met(peak <= TARGETS['full_peak_gb'])}). At this size a phase-2 step takes {ratio:.3f} x a "
                "phase-1 step.")
    return (f"## 5. Projected wall time of `full` on this machine"
            + (" (--quick: from the stand-in size of section 3)" if quick else "") + "\n\n"
            f"{steps_per_epoch} steps per epoch ({n_train} training volumes, batch 4) x the measured seconds "
            f"per step (section 3) x the epoch budget ({full.dcg_epochs} DCG epochs for the final DCG and for each of "
            f"the {k} out-of-fold DCGs on {max(k - 1, 0)}/{k} of the split = {epochs['dcg']:g} DCG-epoch "
            f"equivalents, {full.diffusion_epochs} diffusion, {full.baseline_epochs} per baseline; early stopping can "
            f"only shorten it; validation passes not included): DiffMIC-3D **{ours:.0f} min** (DCGs "
            f"{minutes['dcg']:.0f}, diffusion {minutes['diffusion']:.1f}), with both baselines {total:.0f} min. "
            f"Target < {TARGETS['full_train_minutes']:g} min for DiffMIC-3D: {_met(ours < TARGETS['full_train_minutes'])}.")


# ------------------------------------------------------------------------------------------
# section 4: scaling
# ------------------------------------------------------------------------------------------

def scaling(report: Report, device: torch.device, quick: bool) -> None:
    """Section 4: phase-1 / phase-2 step time and memory against input size; epoch time against volumes."""
    sizes = QUICK_SIZES if quick else SIZES
    steps = 2 if quick else 3
    base = None
    rows = []
    for shape in sizes:
        m = run_probe("dcg", shape, "small", 4, steps, str(device))
        m2 = run_probe("diffusion", shape, "small", 4, steps, str(device))
        voxels = math.prod(shape)
        base = base or (voxels, m["seconds_per_step"], m2["seconds_per_step"])
        report.add("scaling", f"input {shape}", "phase-1 seconds per step (batch 4)", m["seconds_per_step"], unit="s")
        report.add("scaling", f"input {shape}", "phase-2 seconds per step (batch 4)", m2["seconds_per_step"], unit="s")
        report.add("scaling", f"input {shape}", "peak RSS phase 1", m["peak_rss_gb"], unit="GB")
        report.add("scaling", f"input {shape}", "peak RSS phase 2", m2["peak_rss_gb"], unit="GB")
        rows.append([f"{shape}", f"{voxels / base[0]:.1f}x", f"{m['seconds_per_step']:.2f}",
                     f"{m['seconds_per_step'] / base[1]:.1f}x", f"{m2['seconds_per_step']:.2f}",
                     f"{m2['seconds_per_step'] / base[2]:.1f}x", f"{m['peak_rss_gb']:.2f}", f"{m2['peak_rss_gb']:.2f}"])
    # epoch time against the number of volumes, at the smallest size, real epochs on random data
    from models.diffmic3d import DiffMIC3D
    from utils.training.profiles import get_profile
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
                model.dcg_loss(x[s:s + 4], y[s:s + 4], label_smoothing=config.label_smoothing)["loss"].backward()
                opt.step()

        seconds = timed(epoch, device, repeats=1, warmup=0 if factor > 1 else 1)
        first = first or seconds
        report.add("scaling", f"{n} volumes", "phase-1 epoch seconds", seconds, unit="s")
        count_rows.append([f"{n} ({factor}x)", f"{seconds:.1f}", f"{seconds / first:.2f}x"])
    voxel_ratio = math.prod(sizes[-1]) / math.prod(sizes[0])
    last = {"p1": float(rows[-1][3].rstrip("x")), "p2": float(rows[-1][5].rstrip("x"))}
    exponent = {k: math.log(max(v, 1e-9)) / math.log(voxel_ratio) for k, v in last.items()}
    count_exponent = math.log(max(seconds / first, 1e-9)) / math.log(4)
    report.add("scaling", "phase-1 time vs voxels", "exponent", exponent["p1"])
    report.add("scaling", "phase-2 time vs voxels", "exponent", exponent["p2"])
    report.add("scaling", "epoch time vs volumes", "exponent", count_exponent)
    report.text("## 4. Scaling (`small` model, batch 4, random volumes, each probe in a fresh process)\n\n"
                + _table(["input", "voxels", "phase 1 s / step", "time", "phase 2 s / step", "time",
                          "peak RSS p1 (GB)", "peak RSS p2 (GB)"], rows) +
                f"\n\nFrom the smallest to the largest input ({voxel_ratio:.0f}x the voxels) a phase-1 step takes "
                f"{last['p1']:.1f}x as long (voxels^{exponent['p1']:.2f}), a phase-2 step {last['p2']:.1f}x "
                f"(voxels^{exponent['p2']:.2f}; its image encoder grows with the input, the U-Net and the per-point "
                "head on the fixed Np^3 grid do not). 1 = linear; below 1 while fixed costs still weigh in.\n\n"
                + _table(["volumes per epoch", "epoch s", "time"], count_rows) +
                f"\n\nPhase-1 epoch time grows as volumes^{count_exponent:.2f} (1 = linear: one step per batch of 4).")


# ------------------------------------------------------------------------------------------
# section 6: design choices
# ------------------------------------------------------------------------------------------

def design_choices(report: Report, runs: Path, device: torch.device, quick: bool) -> None:
    """Section 6: phase-1 DCG variants on hard phantoms; fused-prior AUC on validation and test."""
    from models.diffmic3d import DiffMIC3D
    from utils.evaluation.metrics import classification_metrics
    from utils.data.phantoms import DIFFICULTIES, PhantomConfig, write_dataset
    from utils.pipeline import build_model, cache_split_guidance, prepare_experiment, train_phase1
    from utils.training.profiles import get_profile

    profile = "smoke" if quick else "demo"
    data = runs / f"phantoms_hard_{profile}"
    size = 32 if quick else 128
    n = 12 if quick else 100
    write_dataset(data, n, seed=1, config=PhantomConfig(size=size, difficulty=DIFFICULTIES["hard"]), progress=False)
    dcg0 = get_profile(profile).model_config(device).dcg
    k0 = dcg0.num_rois
    default = (f"default (roi_scale 1, {'top-t%' if dcg0.pooling == 'topt' else dcg0.pooling} pooling, K={k0}, "
               f"foreground ROIs, '{dcg0.roi_weighting}' ROI weighting)")
    variants = {default: {}, "roi_scale 2": {"roi_scale": 2}, "mean pooling": {"pooling": "mean"},
                "K = 1": {"num_rois": 1}, f"K = {k0 + 2}": {"num_rois": k0 + 2},
                "ROIs anywhere (roi_foreground=False)": {"roi_foreground": False},
                f"ROI weighting '{'sum' if dcg0.roi_weighting == 'probs' else 'probs'}'":
                    {"roi_weighting": "sum" if dcg0.roi_weighting == "probs" else "probs"}}
    rows = []
    n_val = n_test = 0
    for name, change in variants.items():
        train_overrides = {"roi_scale": change["roi_scale"]} if "roi_scale" in change else {}
        config = get_profile(profile, seed=0, progress=False, baselines=(), phantom_size=size, **train_overrides)
        out = runs / f"design_{profile}_{'_'.join(f'{k}-{v}' for k, v in change.items()) or 'default'}"
        exp = prepare_experiment(config, out, data_dir=data, device=str(device), verbose=False)
        model = build_model(exp)
        dcg_change = {k: v for k, v in change.items() if k != "roi_scale"}
        if dcg_change:
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
                "The DCG's fused prediction (mean of its global and local priors) after phase 1 (with its "
                "curriculum: mean-to-top-t% pooling warmup, delayed local CE), per variant; "
                f"validation ({n_val} scans) and test ({n_test} scans) AUC. Exploratory: the defaults were not changed "
                "on the strength of these numbers.\n\n"
                + _table(["variant", "val AUC", "test AUC"], rows))


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------

def run_benchmark(output_dir: Path, quick: bool = False, device: Optional[str] = None,
                  quality_dir: Optional[Path] = None, quality_only: bool = False) -> Path:
    """Run every section and write ``benchmark.md`` and ``benchmark.csv``; returns the .md path.

    ``quality_only``: only section 1 (the quality reports and their targets); the report says
    that the other sections were not run.

    ``quality_dir``: where ``utils.benchmark_quality`` wrote its reports (read only; default
    ``outputs/benchmark``).
    """
    from utils.benchmark_quality import dataset_setup
    from utils.training.profiles import get_profile
    from utils.run import run_experiment
    from utils.seeding import pick_device, seed_everything

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
              f"Quality reports read from `{_rel(quality_dir)}/`.\n\n"
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser("utils.benchmark", __doc__)
    parser.add_argument("--quick", action="store_true", help="smoke sizes: checks the suite runs (for CI)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs", help="where benchmark.md/.csv go")
    parser.add_argument("--quality-dir", type=Path, default=QUALITY_DIR,
                        help="where utils.benchmark_quality wrote its reports (read only)")
    parser.add_argument("--quality-only", action="store_true",
                        help="only section 1 (reads the quality reports; no training)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: $MEDISCOPE_DEVICE, else auto)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:  # internal: one measurement in a fresh process
        spec = json.loads(args.probe)
        print(json.dumps(probe(spec["stage"], tuple(spec["input_shape"]), spec["preset"], spec["batch_size"],
                               spec["steps"], spec["device"])))
        return 0
    md = run_benchmark(args.output_dir, args.quick, args.device, args.quality_dir, args.quality_only)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
