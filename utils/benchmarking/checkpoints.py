"""Suite section 3: checkpoint sizes per training stage, in the earlier layout and the lean one
(``utils.training.loop``, "Lean files"), and what a finished run actually wrote."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from utils.benchmarking.report import Report, markdown_table
from utils.paths import display_path

MB = 1e6


def _bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _adam_state(params) -> dict:
    """AdamW's state after one step: both moments (and the step) of every parameter."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer.state_dict()


def stage_layouts(profile: str) -> dict[str, dict[str, int]]:
    """Bytes per stage of ``profile``: ``earlier`` (the resume file written before the lean
    layout: every weight of the checkpointed module, the optimizer, and a second copy of the
    best weights), ``resume`` (now: the trained weights and the optimizer), ``best`` (the
    best-weights file) and ``finished`` (the trained weights)."""
    from models.diffmic3d import DiffMIC3D
    from utils.training.baselines import build_baseline
    from utils.training.diffusion import _Phase2, _trained_in_phase2
    from utils.training.profiles import get_profile

    config = get_profile(profile)
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    stages: dict[str, tuple[nn.Module, list, callable]] = {
        "phase 1 (DCG; each out-of-fold DCG the same)": (model, list(model.dcg.parameters()),
                                                          lambda k: k.startswith("dcg."))}
    phase2 = _Phase2(model, 0.999)  # the model and its EMA copy, as phase 2 checkpoints them
    stages["phase 2 (diffusion, with its EMA)"] = (
        phase2, list(model.prior_generator.parameters()) + list(model.denoiser.parameters()), _trained_in_phase2)
    for name in config.baselines:
        net = build_baseline(name, config.num_classes)
        stages[name] = (net, list(net.parameters()), lambda k: True)
    out = {}
    for stage, (module, params, keep) in stages.items():
        state = module.state_dict()
        kept = {k: v for k, v in state.items() if keep(k)}
        optimizer = _adam_state(params)
        best = {k: v.clone() for k, v in state.items()}  # a copy: torch.save stores a shared tensor once
        out[stage] = {"earlier": _bytes({"w": state, "o": optimizer, "b": best}),
                      "resume": _bytes({"w": kept, "o": optimizer}), "best": _bytes(kept), "finished": _bytes(kept)}
    return out


def run_disk(run_dir: Path) -> list[list[str]]:
    """Rows (file, epochs, largest resume file, best file, written in all, finished file) of the
    finished stage files of ``run_dir`` (``fit.disk``; files older than it: '-')."""
    from utils.training.checkpoint import load_checkpoint

    rows = []
    for path in sorted((Path(run_dir) / "checkpoints").glob("*.pth")):
        fit = load_checkpoint(path).get("fit", {})
        disk = fit.get("disk")
        cells = ([f"{disk['resume_file_bytes'] / MB:.1f}", f"{disk['best_file_bytes'] / MB:.1f}",
                  f"{disk['bytes_written'] / MB:.0f}"] if disk else ["-", "-", "-"])
        rows.append([f"`{path.name}`", str(fit.get("epoch", "")), *cells, f"{path.stat().st_size / MB:.1f}"])
    return rows


def checkpoint_sizes(report: Report, run_dir: Path, quick: bool) -> None:
    """Section 3: layouts per stage (demo and full sizes) and the run's own files."""
    profiles = ("smoke",) if quick else ("demo", "full")
    rows = []
    for profile in profiles:
        for stage, sizes in stage_layouts(profile).items():
            for key, value in sizes.items():
                report.add("checkpoints", f"{profile}: {stage}", f"{key} file", value / MB, unit="MB")
            rows.append([f"`{profile}`: {stage}", f"{sizes['earlier'] / MB:.1f}", f"{sizes['resume'] / MB:.1f}",
                         f"{sizes['best'] / MB:.1f}", f"{sizes['finished'] / MB:.1f}"])
    disk_rows = run_disk(run_dir)
    report.text("## 3. Checkpoints\n\n"
                "Per training stage: the per-epoch resume file in the earlier layout (every weight of the "
                "checkpointed module, the optimizer's two moments, and a second copy of the best weights on every "
                "epoch that did not improve) and now (the weights the stage trains and the optimizer: the frozen "
                "DCGs are not copied into phase 2's files, phase 1 stores the DCG and not the untrained rest of the "
                "model); the best weights in their own file, written only when they change; the finished stage keeps "
                "the trained weights only (MB, measured by serialising each layout):\n\n"
                + markdown_table(["stage", "resume file before", "resume file now", "best-weights file",
                                  "finished file"], rows) +
                f"\n\nWhat the run `{display_path(run_dir)}` wrote (`fit.disk` of each finished file: the largest "
                "resume and best-weights files and the bytes written over the stage; MB):\n\n"
                + markdown_table(["file", "epochs", "largest resume file", "best-weights file", "written in all",
                                  "finished file"], disk_rows))
