"""Suite sections 3 and 5: peak memory and seconds per step of each training stage at the
``full`` configuration (each in its own process), and the ``full`` profile's projected wall
time from those steps."""
from __future__ import annotations

import math

import torch

from utils.benchmarking.memory_estimate import CUDA_OVERHEAD_GB, T4_USABLE_GB, estimate_peak, largest_batch
from utils.benchmarking.report import TARGETS, Report, markdown_table, met_text
from utils.benchmarking.timing import run_probe


def memory_and_projection(report: Report, device: torch.device, quick: bool, n_train: int) -> str:
    """Section 4 (added to the report) and section 5 (returned, to follow it): each
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
    t4_rows, t4_peaks = t4_estimates(report, stages, shape, preset, measured)
    worst = max(t4_peaks.values())
    fits = worst + CUDA_OVERHEAD_GB <= T4_USABLE_GB
    report.check(f"`full` training at batch 4 fits a 15 GB T4 (estimated peak GPU memory + {CUDA_OVERHEAD_GB:g} GiB "
                 f"overhead <= {T4_USABLE_GB} GiB)" + (" [--quick: stand-in size]" if quick else ""), worst,
                 fits, f"{worst:.2f} GiB at most ({max(t4_peaks, key=t4_peaks.get)})")
    gpu_note = ("" if device.type != "cuda" else
                " The last column is the same step measured on this GPU (`torch.cuda.max_memory_allocated`): the "
                "check of the estimate.")
    report.text(f"## 4. Memory ({label}: input {shape}, model `{preset}`, batch 4)\n\n"
                "**On a T4, estimated without one.** Each stage's training step (two steps: forward under float16 "
                "autocast, backward, AdamW) with the model, optimizer and batch built under PyTorch's `FakeTensorMode` "
                "(shapes and dtypes, no data, no compute) and every live tensor followed by PyTorch's `MemTracker` "
                "(`utils.benchmarking.memory_estimate`): the peak of what `torch.cuda.max_memory_allocated` counts, "
                f"with the GPU configuration (gradient checkpointing on at the full size). {CUDA_OVERHEAD_GB:g} GiB is "
                "added for the CUDA context, cuDNN workspace and allocator fragmentation, against the "
                f"{T4_USABLE_GB} GiB a 15 GB T4 offers. The largest batch is predicted from the peak's line in the "
                "batch (fixed weights and optimizer state, activations per volume) and checked by estimating it."
                + gpu_note + "\n\n"
                + markdown_table(["stage", "weights + grads + optimizer (GiB)", "activations + temporaries (GiB)",
                                  "peak at batch 4 (GiB)", "per volume (GiB)", "largest batch on a T4"]
                                 + (["measured CUDA peak (GiB)"] if device.type == "cuda" else []), t4_rows) +
                f"\n\n`full` at batch 4 {'fits' if fits else 'does not fit'} a 15 GB T4: the largest stage peak is "
                f"**{worst:.2f} GiB** + {CUDA_OVERHEAD_GB:g} GiB ({met_text(fits)}). Estimated, not measured on a "
                "T4: the fake tensors follow the CPU's autocast policy (convolutions and matrix products in float16, "
                "as on CUDA).\n\n"
                "**On this machine.** Each stage runs a few training steps on random volumes in a fresh process: peak "
                "resident memory of that process (and peak CUDA memory on a GPU), and the median seconds per step. "
                "Phase 2 computes the frozen DCG's guidance once, then trains the prior generator and the denoiser "
                "(own image encoder on the scans, condition U-Net, per-point head) on `diffusion_loss`.\n\n"
                + markdown_table(["stage", "peak RSS (GB)", "peak CUDA (GB)", "s / step"], rows) +
                f"\n\nPeak: **{peak:.2f} GB** (target <= {TARGETS['full_peak_gb']:g} GB: "
                f"{met_text(peak <= TARGETS['full_peak_gb'])}). At this size a phase-2 step takes {ratio:.3f} x a "
                "phase-1 step.")
    return ("## 5. Projected wall time of `full` on this machine"
            + (" (--quick: from the stand-in size of section 4)" if quick else "") + "\n\n"
            f"{steps_per_epoch} steps per epoch ({n_train} training volumes, batch 4) x the measured seconds "
            f"per step (section 4) x the epoch budget ({full.dcg_epochs} DCG epochs for the final DCG and for each of "
            f"the {k} out-of-fold DCGs on {max(k - 1, 0)}/{k} of the split = {epochs['dcg']:g} DCG-epoch "
            f"equivalents, {full.diffusion_epochs} diffusion, {full.baseline_epochs} per baseline; early stopping can "
            f"only shorten it; validation passes not included): DiffMIC-3D **{ours:.0f} min** (DCGs "
            f"{minutes['dcg']:.0f}, diffusion {minutes['diffusion']:.1f}), with both baselines {total:.0f} min. "
            f"Target < {TARGETS['full_train_minutes']:g} min for DiffMIC-3D: "
            f"{met_text(ours < TARGETS['full_train_minutes'])}.")


def t4_estimates(report: Report, stages: dict[str, str], shape, preset: str, measured: dict
                 ) -> tuple[list[list[str]], dict[str, float]]:
    """Rows of the T4 table and the estimated peak (GiB) per stage at batch 4."""
    rows, peaks = [], {}
    for stage, name in stages.items():
        at = {b: estimate_peak(stage, shape, preset, b) for b in (1, 4)}
        four = at[4]
        per_volume = (four["total"] - at[1]["total"]) / 3
        batch, batch_peak = largest_batch(stage, shape, preset, T4_USABLE_GB, {b: v["total"] for b, v in at.items()})
        fixed = sum(four.get(k, 0.0) for k in ("parameter", "buffer", "gradient", "optstate"))
        peaks[name] = four["total"]
        report.add("memory", name, "estimated peak GPU memory at batch 4 (float16 AMP)", four["total"], unit="GiB")
        report.add("memory", name, "largest batch on a 15 GB T4 (estimated)", batch)
        row = [name, f"{fixed:.2f}", f"{four['total'] - fixed:.2f}", f"{four['total']:.2f}", f"{per_volume:.3f}",
               f"{batch}{'+' if batch >= 64 else ''} ({batch_peak:.1f} GiB)"]
        if "peak_cuda_gb" in measured[stage]:
            row.append(f"{measured[stage]['peak_cuda_gb']:.2f}")
        rows.append(row)
    return rows, peaks
