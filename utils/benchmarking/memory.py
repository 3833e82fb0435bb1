"""Suite sections 3 and 5: peak memory and seconds per step of each training stage at the
``full`` configuration (each in its own process), and the ``full`` profile's projected wall
time from those steps."""
from __future__ import annotations

import math

import torch

from utils.benchmarking.report import TARGETS, Report, markdown_table, met_text
from utils.benchmarking.timing import run_probe


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
    report.check("`full` profile (DiffMIC-3D, out-of-fold DCGs included) trains in < "
                 f"{TARGETS['full_train_minutes']:g} min on this machine"
                 + (" [--quick: stand-in size]" if quick else ""), ours,
                 ours < TARGETS["full_train_minutes"], f"{ours:.0f} min (projected, training steps only)")
    ratio = measured["diffusion"]["seconds_per_step"] / measured["dcg"]["seconds_per_step"]
    report.add("memory", "phase 2 / phase 1 step time at this size", "ratio", ratio)
    report.text(f"## 3. Memory ({label}: input {shape}, model `{preset}`, batch 4)\n\n"
                "Each stage runs a few training steps on random volumes in a fresh process: peak resident "
                "memory of that process (and peak CUDA memory on a GPU), and the median seconds per step. Phase 2 "
                "computes the frozen DCG's guidance once, then trains the prior generator and the denoiser (own "
                "image encoder on the scans, condition U-Net, per-point head) on `diffusion_loss`.\n\n"
                + markdown_table(["stage", "peak RSS (GB)", "peak CUDA (GB)", "s / step"], rows) +
                f"\n\nPeak: **{peak:.2f} GB** (target <= {TARGETS['full_peak_gb']:g} GB: "
                f"{met_text(peak <= TARGETS['full_peak_gb'])}). At this size a phase-2 step takes {ratio:.3f} x a "
                "phase-1 step.")
    return ("## 5. Projected wall time of `full` on this machine"
            + (" (--quick: from the stand-in size of section 3)" if quick else "") + "\n\n"
            f"{steps_per_epoch} steps per epoch ({n_train} training volumes, batch 4) x the measured seconds "
            f"per step (section 3) x the epoch budget ({full.dcg_epochs} DCG epochs for the final DCG and for each of "
            f"the {k} out-of-fold DCGs on {max(k - 1, 0)}/{k} of the split = {epochs['dcg']:g} DCG-epoch "
            f"equivalents, {full.diffusion_epochs} diffusion, {full.baseline_epochs} per baseline; early stopping can "
            f"only shorten it; validation passes not included): DiffMIC-3D **{ours:.0f} min** (DCGs "
            f"{minutes['dcg']:.0f}, diffusion {minutes['diffusion']:.1f}), with both baselines {total:.0f} min. "
            f"Target < {TARGETS['full_train_minutes']:g} min for DiffMIC-3D: "
            f"{met_text(ours < TARGETS['full_train_minutes'])}.")
