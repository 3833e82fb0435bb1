"""Grad-CAM saliency of the baselines (MONAI's ``GradCAM``), drawn like the DCG's maps.

The DCG's class activation maps show where DiffMIC-3D looks; the baselines get the same
figure from Grad-CAM (Selvaraju et al. 2017) on their last convolutional stage, so a reader can
compare where each model's evidence lies. MONAI's implementation (a dependency already, for
the baselines themselves) upsamples the map to the input size and normalises it per scan. It is
imported only when a map is made: without MONAI there are no baselines, so no map is asked for.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.evaluation.visualization import plot_saliency_overlay, save_figure, stack_figures

TARGET_LAYERS = {"resnet18": "layer4", "densenet121": "class_layers.relu"}  # last conv stage, before pooling
GRADCAM_PNG = "baseline_gradcam.png"


def gradcam_maps(net: nn.Module, name: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(maps (B, H, W, D) in [0, 1], class probabilities (B, C)) of baseline ``name`` on x
    (B, 1, H, W, D); each map explains the scan's predicted class, ``probs.argmax(1)``."""
    from monai.visualize import GradCAM

    net.eval()
    with torch.enable_grad():
        logits = net(x)
        cam = GradCAM(nn_module=net, target_layers=TARGET_LAYERS[name])
        maps = cam(x, class_idx=None)  # (B, 1, H, W, D), the predicted class of each scan
    probs = torch.softmax(logits.detach().float(), dim=1)
    return maps[:, 0].detach().float().cpu().numpy(), probs.cpu().numpy()


def write_baseline_gradcam(baselines: Mapping[str, nn.Module], display_names: Mapping[str, str],
                           volumes: Sequence[np.ndarray], paths: Sequence[str | Path], output_dir: str | Path,
                           class_names: Sequence[str], labels: Sequence[int] | None = None, n_slices: int = 4,
                           dpi: int = 120) -> Path | None:
    """``OUTPUT_DIR/figures/baseline_gradcam.png`` (and .pdf): per baseline and scan, one row of
    axial slices (the slices of largest saliency) with its Grad-CAM map, titled with the scan's
    true class (``labels``, when given), the predicted class and its probability; None without
    baselines."""
    figs = []
    for name, net in baselines.items():
        device = next(net.parameters()).device
        x = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in volumes])).to(device)
        maps, probs = gradcam_maps(net, name, x)
        for i, path in enumerate(paths):
            k = int(probs[i].argmax())
            truth = "" if labels is None else f" (true {class_names[int(labels[i])]})"
            figs.append(plot_saliency_overlay(
                volumes[i][0], maps[i], max_slices=n_slices,
                title=f"{display_names.get(name, name)}: {Path(path).name}{truth}, Grad-CAM of its prediction "
                      f"{class_names[k]} (p = {probs[i, k]:.2f})"))
    if not figs:
        return None
    return save_figure(stack_figures(figs, dpi), Path(output_dir) / "figures" / GRADCAM_PNG, dpi=dpi)
