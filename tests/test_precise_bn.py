import torch

from utils.training.precise_bn import recompute_batchnorm_stats


def test_precise_batchnorm_statistics_are_the_training_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(1))
    model[0].running_mean.fill_(-5.0)  # stale statistics, as after noisy batch-4 updates
    model.eval()
    batches = [{"image": torch.randn(4, 1, 4, 4, 4) * 2 + 3} for _ in range(3)]
    assert recompute_batchnorm_stats(model, batches, lambda b: model(b["image"])) == 1
    expected = torch.cat([b["image"] for b in batches]).mean()
    assert torch.allclose(model[0].running_mean, expected.reshape(1), atol=1e-5)
    assert 3.0 < float(model[0].running_var) < 5.0  # ~ variance 4 of the data
    assert model[0].momentum == 0.1 and not model.training  # restored


def test_precise_batchnorm_is_a_no_op_without_batchnorm():
    model = torch.nn.Sequential(torch.nn.GroupNorm(1, 1))
    assert recompute_batchnorm_stats(model, [], lambda b: model(b["image"])) == 0
