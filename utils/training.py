"""The two training phases of DiffMIC-3D (DESIGN.md), on the generic loop of ``utils.trainer``.

Phase 1 (:func:`train_dcg`): the DCG alone, CE(global logits) + CE(local logits) with label
smoothing, AdamW (lr ``lr_dcg``, weight decay), ReduceLROnPlateau on the validation loss,
early stopping on validation AUC of the DCG's fused prediction, train-time H / W flips
(``CTDataset(augment=True)``). Before every evaluation the BatchNorm statistics of the
global encoder are recomputed over the training split (``utils.precise_bn``), so the kept
(best) weights carry statistics that match them, and so does the guidance cached from them.

Between the phases (:func:`cache_guidance`): the frozen DCG runs ONCE per volume and its
outputs are kept as tensors stacked in dataset order. Phase 2 therefore trains on the
guidance of the UNFLIPPED training volumes: flipping would need a DCG pass per epoch (or a
cache per flip), which is exactly the cost the cache removes; the guidance of a frozen DCG
is a deterministic function of the volume, so the loss' own noise (heterologous timesteps,
eps) is the only per-epoch randomness in phase 2.

Phase 2 (:func:`train_diffusion`): prior generator + 3D U-Net + classifier head on
``DiffMIC3D.diffusion_loss`` from the cached tensors; AdamW with three parameter groups
(prior generator, U-Net, head) at the same rate ``lr_diffusion`` (the seed's per-group rates
are unknown to us), CosineAnnealingWarmRestarts stepped per batch, gradient clipping,
early stopping on the validation AUC of ``DiffMIC3D.predict`` on the cached validation
guidance with a fixed seeded generator and few DDIM steps (no encoder pass per epoch).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from models.diffmic3d import GUIDANCE_KEYS, DiffMIC3D
from utils.metrics import classification_metrics
from utils.precise_bn import recompute_batchnorm_stats
from utils.profiles import TrainConfig
from utils.trainer import ORDER_STREAM, FitConfig, FitResult, epoch_seed, fit, make_epoch_loader


def validation_metrics(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """``{'val_loss', 'val_auc', 'val_acc'}``; AUC from the probabilities (NaN if one class)."""
    metrics = classification_metrics(labels, probs)
    return {"val_loss": float(loss), "val_auc": metrics["roc_auc"], "val_acc": metrics["accuracy"]}


def fit_config(config: TrainConfig, name: str, epochs: int, device: torch.device) -> FitConfig:
    """The :class:`FitConfig` of one stage of a run."""
    return FitConfig(name=name, epochs=epochs, patience=config.patience, grad_clip=config.grad_clip,
                     amp=config.use_amp(device), seed=config.seed, progress=config.progress)


def _inputs(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(image (B, 1, H, W, D), image_hires or None, labels (B,)) of a CTDataset batch on ``device``."""
    hires = batch.get("image_hires")
    return (batch["image"].to(device), None if hires is None else hires.to(device), batch["label"].to(device))


def eval_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """Fixed-order loader for validation / caching (no shuffling, no augmentation)."""
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)


# ------------------------------------------------------------------------------------------
# phase 1: DCG
# ------------------------------------------------------------------------------------------

def train_dcg(model: DiffMIC3D, train_set: Dataset, val_set: Dataset, config: TrainConfig, device: torch.device,
              checkpoint_path: str | Path, meta: Optional[Mapping] = None) -> FitResult:
    """Phase 1: train ``model.dcg`` (see the module docstring); ``model`` ends with the best DCG.

    Args:
        train_set: ``CTDataset(..., augment=True)`` of the training split.
        val_set: ``CTDataset`` of the validation split (no augmentation).
        checkpoint_path: resumable checkpoint of this phase (e.g. ``checkpoints/dcg.pth``).
        meta: plain data stored with the checkpoint (preprocess config, class names, ...).
    """
    optimizer = torch.optim.AdamW(model.dcg.parameters(), lr=config.lr_dcg, weight_decay=config.weight_decay)
    scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                  patience=config.plateau_patience)

    def train_step(batch, generator):
        x, x_hires, y = _inputs(batch, device)
        return model.dcg_loss(x, y, x_hires, label_smoothing=config.label_smoothing)["loss"]

    def evaluate():
        recompute_batchnorm_stats(model.dcg, eval_loader(train_set, config),
                                  lambda batch: model.dcg(*_inputs(batch, device)[:2]))
        losses, probs, labels = [], [], []
        for batch in eval_loader(val_set, config):
            x, x_hires, y = _inputs(batch, device)
            out = model.dcg_loss(x, y, x_hires, label_smoothing=config.label_smoothing)
            losses.append(out["loss"].item() * len(y))
            probs.append(out["output"].fused_probs.float().cpu())
            labels.append(y.cpu())
        labels = torch.cat(labels).numpy()
        return validation_metrics(labels, torch.cat(probs).numpy(), sum(losses) / len(labels))

    return fit(model, optimizer, scheduler, train_step=train_step, evaluate=evaluate,
               train_batches=lambda epoch: make_epoch_loader(train_set, config.batch_size, config.seed, epoch,
                                                             config.num_workers),
               config=fit_config(config, "dcg", config.dcg_epochs, device), checkpoint_path=checkpoint_path,
               model_config=model.config.to_dict(), meta=meta, device=device)


# ------------------------------------------------------------------------------------------
# guidance cache
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def cache_guidance(model: DiffMIC3D, dataset: Dataset, device: torch.device, batch_size: int = 4,
                   num_workers: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the frozen DCG once per volume of ``dataset``; stack its outputs by dataset index.

    Returns:
        ``DCGOutput.as_dict()`` with every tensor stacked over the dataset, on CPU, row ``i``
        = ``dataset[i]``: e.g. ``global_probs`` (N, C), ``roi_features`` (N, K, L),
        ``saliency`` (N, C, h, w, d). Pass the ``GUIDANCE_KEYS`` rows to
        ``DiffMIC3D.diffusion_loss`` / ``predict``.
    """
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    seen = []
    for batch in tqdm(loader, desc="cache DCG guidance", leave=False, disable=not progress):
        x, x_hires, _ = _inputs(batch, device)
        for key, value in model.guidance(x, x_hires).as_dict().items():
            parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
        seen.append(torch.as_tensor(batch["index"]))
    order = torch.cat(seen)
    if not torch.equal(order, torch.arange(len(dataset))):
        raise RuntimeError("cache_guidance: the loader did not visit the dataset in index order")
    return {key: torch.cat(values) for key, values in parts.items()}


def select_guidance(guidance: Mapping[str, torch.Tensor], index, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows ``index`` of the ``GUIDANCE_KEYS`` tensors of a cache, on ``device``."""
    return {key: guidance[key][index].to(device) for key in GUIDANCE_KEYS}


# ------------------------------------------------------------------------------------------
# phase 2: diffusion
# ------------------------------------------------------------------------------------------

def diffusion_param_groups(model: DiffMIC3D, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups of phase 2: prior generator, U-Net, classifier head."""
    return [{"params": list(module.parameters()), "lr": config.lr_diffusion, "name": name}
            for name, module in (("prior_generator", model.prior_generator), ("unet", model.unet),
                                 ("head", model.head))]


def predict_guidance(model: DiffMIC3D, guidance: Mapping[str, torch.Tensor], device: torch.device,
                     batch_size: int, seed: int, num_samples: int, steps: int,
                     keep_y0: bool = False) -> dict[str, torch.Tensor]:
    """``model.predict`` over cached guidance in batches with ONE generator seeded with
    ``seed`` (so the result depends on nothing else); tensors concatenated on CPU.

    Returns probs (N, C), std (N, C), entropy (N,) and, with ``keep_y0``, the final class
    maps y0_samples (S, N, C, Np, Np, Np)."""
    generator = torch.Generator(device).manual_seed(seed)
    n = len(guidance[GUIDANCE_KEYS[0]])
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        out = model.predict(select_guidance(guidance, rows, device), num_samples=num_samples, steps=steps,
                            generator=generator)
        for key in ("probs", "std", "entropy") + (("y0_samples",) if keep_y0 else ()):
            outputs.setdefault(key, []).append(out[key].float().cpu())
    return {key: torch.cat(values, dim=1 if key == "y0_samples" else 0) for key, values in outputs.items()}


def calibrate_temperature(model: DiffMIC3D, val_guidance: Mapping[str, torch.Tensor], val_labels: torch.Tensor,
                          config: TrainConfig, device: torch.device) -> float:
    """Fit the softmax temperature of the diffusion probabilities on the VALIDATION split.

    Samples exactly as the test predictions will (``num_samples``, ``ddim_steps``, seed) and
    sets ``model.diffusion.temperature`` to the value that minimises the validation NLL
    (``PriorShiftedDiffusion.fit_temperature``). Each sample's argmax is unchanged; the mean
    over several samples can shift marginally, since softmax is not linear in T.
    Deterministic, so a resumed run refits the same value.
    """
    out = predict_guidance(model, val_guidance, device, config.batch_size, config.seed, config.num_samples,
                           config.ddim_steps, keep_y0=True)
    return model.diffusion.fit_temperature(out["y0_samples"], torch.as_tensor(val_labels))


def train_diffusion(model: DiffMIC3D, train_guidance: Mapping[str, torch.Tensor], train_labels: torch.Tensor,
                    val_guidance: Mapping[str, torch.Tensor], val_labels: torch.Tensor, config: TrainConfig,
                    device: torch.device, checkpoint_path: str | Path,
                    meta: Optional[Mapping] = None) -> FitResult:
    """Phase 2 on cached guidance (see the module docstring); ``model`` ends with the best weights.

    Args:
        train_guidance / val_guidance: :func:`cache_guidance` outputs of the two splits.
        train_labels / val_labels: (N,) int64 labels in the same order.
    """
    model.freeze_dcg()
    optimizer = torch.optim.AdamW(diffusion_param_groups(model, config), lr=config.lr_diffusion,
                                  weight_decay=config.weight_decay)
    scheduler = CosineAnnealingWarmRestarts(optimizer, T_0=config.cosine_t0)
    train_labels, val_labels = torch.as_tensor(train_labels), torch.as_tensor(val_labels)
    n = len(train_labels)

    def train_batches(epoch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch, ORDER_STREAM)))
        return [order[i:i + config.batch_size] for i in range(0, n, config.batch_size)]

    def train_step(index, generator):
        guidance = select_guidance(train_guidance, index, device)
        return model.diffusion_loss(guidance, train_labels[index].to(device), generator=generator)["loss"]

    def evaluate():
        generator = torch.Generator(device).manual_seed(config.seed)
        loss = 0.0
        for start in range(0, len(val_labels), config.batch_size):
            rows = slice(start, start + config.batch_size)
            labels = val_labels[rows].to(device)
            out = model.diffusion_loss(select_guidance(val_guidance, rows, device), labels, generator=generator)
            loss += out["loss"].item() * len(labels)
        probs = predict_guidance(model, val_guidance, device, config.batch_size, config.seed,
                                 config.val_num_samples, config.val_ddim_steps)["probs"]
        return validation_metrics(val_labels.numpy(), probs.numpy(), loss / len(val_labels))

    return fit(model, optimizer, scheduler, train_step=train_step, evaluate=evaluate, train_batches=train_batches,
               config=fit_config(config, "diffusion", config.diffusion_epochs, device),
               checkpoint_path=checkpoint_path, model_config=model.config.to_dict(), meta=meta, device=device)
