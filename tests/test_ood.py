"""The feature-distance out-of-distribution flag (``utils.evaluation.ood``)."""
import pytest
import torch

from utils.evaluation.ood import THRESHOLD_FACTOR, feature_distance, fit_feature_stats


def test_training_like_features_pass_and_far_ones_are_flagged():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 10.0, 16)  # dimensions on very different scales: z-scores, not raw distance
    train = torch.randn(200, 16, generator=g) * scale + 3.0
    stats = fit_feature_stats(train)
    new_like = torch.randn(100, 16, generator=g) * scale + 3.0
    assert (feature_distance(stats, new_like) <= stats["threshold"]).float().mean() >= 0.95
    far = new_like.clone()
    far[:, 0] += 2.0  # 20 standard deviations on the small-scale dimension only
    assert (feature_distance(stats, far) > stats["threshold"]).all()
    assert stats["threshold"] == pytest.approx(
        THRESHOLD_FACTOR * float(torch.quantile(feature_distance(stats, train), 0.95)), rel=1e-5)


def test_stats_are_plain_cpu_data_and_shapes_are_checked():
    stats = fit_feature_stats(torch.randn(10, 4))
    assert set(stats) == {"mean", "std", "threshold", "n"} and stats["n"] == 10
    assert stats["mean"].device.type == "cpu" and isinstance(stats["threshold"], float)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        feature_distance(stats, torch.randn(3, 5))
    with pytest.raises(ValueError, match="N >= 2"):
        fit_feature_stats(torch.randn(1, 4))
