"""MONAI 3D baselines: output shapes, and one short training run in the shared harness."""
import pytest
import torch

from utils.baselines import baseline_from_checkpoint, build_baseline, recompute_batchnorm_stats, train_baseline
from utils.checkpoint import load_checkpoint
from utils.profiles import get_profile
from conftest import BlobVolumes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, num_classes, shape, expected", [
    ("resnet18", 2, (2, 1, 32, 32, 32), (2, 2)),
    ("resnet18", 5, (1, 1, 32, 32, 16), (1, 5)),
    ("densenet121", 2, (2, 1, 32, 32, 32), (2, 2)),
    ("densenet121", 5, (1, 1, 32, 32, 32), (1, 5)),
])
def test_baseline_logit_shape(name, num_classes, shape, expected):
    model = build_baseline(name, num_classes).eval()
    with torch.no_grad():
        assert model(torch.rand(shape)).shape == expected


@pytest.mark.parametrize("name, num_classes", [("vgg", 2), ("resnet18", 1)])
def test_bad_baseline_arguments(name, num_classes):
    with pytest.raises(ValueError):
        build_baseline(name, num_classes)


def test_train_baseline_writes_a_rebuildable_checkpoint(tmp_path):
    config = get_profile("smoke", baseline_epochs=1, batch_size=4, progress=False)
    torch.manual_seed(0)
    model, result = train_baseline("resnet18", BlobVolumes(8, 0), BlobVolumes(4, 1), config, torch.device("cpu"),
                                   tmp_path / "resnet18.pth", meta={"label_mode": "binary"})
    assert result.epochs_run == 1
    ckpt = load_checkpoint(tmp_path / "resnet18.pth")
    assert ckpt["model_config"] == {"name": "resnet18", "num_classes": 2, "in_channels": 1}
    rebuilt = baseline_from_checkpoint(ckpt).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x))


def test_precise_batchnorm_statistics_are_the_training_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(1))
    model[0].running_mean.fill_(-5.0)  # stale statistics, as after noisy batch-4 updates
    model.eval()
    batches = [{"image": torch.randn(4, 1, 4, 4, 4) * 2 + 3} for _ in range(3)]
    assert recompute_batchnorm_stats(model, batches, torch.device("cpu")) == 1
    expected = torch.cat([b["image"] for b in batches]).mean()
    assert torch.allclose(model[0].running_mean, expected.reshape(1), atol=1e-5)
    assert 3.0 < float(model[0].running_var) < 5.0  # ~ variance 4 of the data
    assert model[0].momentum == 0.1 and not model.training  # restored


def test_precise_batchnorm_is_a_no_op_without_batchnorm():
    model = torch.nn.Sequential(torch.nn.GroupNorm(1, 1))
    assert recompute_batchnorm_stats(model, [], torch.device("cpu")) == 0
