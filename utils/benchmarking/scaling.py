"""Suite section 4: phase-1 / phase-2 step time and peak memory against the input size (each
probe in a fresh process), and phase-1 epoch time against the number of volumes."""
from __future__ import annotations

import math

import torch

from utils.benchmarking.report import Report, markdown_table
from utils.benchmarking.timing import run_probe, timed

SIZES = ((64, 64, 32), (96, 96, 48), (128, 128, 64))
QUICK_SIZES = ((32, 32, 16), (48, 48, 16), (64, 64, 32))


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
    report.text("## 6. Scaling (`small` model, batch 4, random volumes, each probe in a fresh process)\n\n"
                + markdown_table(["input", "voxels", "phase 1 s / step", "time", "phase 2 s / step", "time",
                                  "peak RSS p1 (GB)", "peak RSS p2 (GB)"], rows) +
                f"\n\nFrom the smallest to the largest input ({voxel_ratio:.0f}x the voxels) a phase-1 step takes "
                f"{last['p1']:.1f}x as long (voxels^{exponent['p1']:.2f}), a phase-2 step {last['p2']:.1f}x "
                f"(voxels^{exponent['p2']:.2f}; its image encoder grows with the input, the U-Net and the per-point "
                "head on the fixed Np^3 grid do not). 1 = linear; below 1 while fixed costs still weigh in.\n\n"
                + markdown_table(["volumes per epoch", "epoch s", "time"], count_rows) +
                f"\n\nPhase-1 epoch time grows as volumes^{count_exponent:.2f} (1 = linear: one step per batch of 4).")
