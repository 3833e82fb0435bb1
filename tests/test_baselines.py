"""MONAI 3D baselines: output shapes, and one short training run in the shared harness."""
import pytest
import torch

from utils.baselines import baseline_from_checkpoint, build_baseline, train_baseline
from utils.checkpoint import load_checkpoint
from utils.profiles import get_profile
from helpers import BlobVolumes

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
