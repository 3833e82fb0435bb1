"""Is a scan like the ones the model was trained on? A distance in the DCG's feature space.

At the end of training (``utils.pipeline.save_main_checkpoint``) the frozen DCG's pooled global
features (B, F) of the TRAINING scans are summarised per dimension (mean, standard deviation).
A new scan's distance is the root-mean-square z-score of its features,

    d(f) = sqrt(mean_k ((f_k - mean_k) / std_k)^2),

and it is flagged out-of-distribution when d exceeds ``THRESHOLD_FACTOR`` times the 95th
percentile of the training scans' own distances (a diagonal Mahalanobis distance; with tens of
training scans a full covariance is not estimable). The flag says "unlike the training data", not
"wrong": a phantom-trained model flags real CT, and a model trained on real CT flags a phantom.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

THRESHOLD_FACTOR = 1.5
MIN_STD = 1e-4


def feature_distance(stats: Mapping, features: torch.Tensor) -> torch.Tensor:
    """features (B, F) -> (B,) RMS z-score against ``stats`` (from :func:`fit_feature_stats`)."""
    mean, std = stats["mean"].to(features), stats["std"].to(features)
    if features.dim() != 2 or features.shape[1] != mean.shape[0]:
        raise ValueError(f"features must be (B, {mean.shape[0]}), got {tuple(features.shape)}")
    return ((features - mean) / std).pow(2).mean(dim=1).sqrt()


def fit_feature_stats(features: torch.Tensor) -> dict:
    """Plain-data statistics of training features (N, F), N >= 2: ``{mean (F,), std (F,),
    threshold, n}`` (tensors on the CPU, so they go into a checkpoint as they are)."""
    features = features.detach().double().cpu()
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, F) training features, got {tuple(features.shape)}")
    stats = {"mean": features.mean(0).float(), "std": features.std(0).clamp_min(MIN_STD).float()}
    train = feature_distance(stats, features.float())
    stats.update(threshold=float(THRESHOLD_FACTOR * torch.quantile(train, 0.95)), n=int(features.shape[0]))
    return stats
