"""MONAI 3D baselines: output shapes, and one short training run in the shared harness."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

from utils.training.baselines import baseline_from_checkpoint, build_baseline, train_baseline
from utils.training.precise_bn import bn_stats_loader
from utils.training.checkpoint import load_checkpoint
from utils.training.profiles import get_profile
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


class ClassSorted(Dataset):
    """``base`` reordered so that all class-0 items come first, as the splits are stored
    (``splits.csv`` lists each split sorted by path, hence by class folder)."""

    def __init__(self, base):
        self.base = base
        self.order = np.argsort(base.labels, kind="stable")
        self.labels = base.labels[self.order]

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return {**self.base[int(self.order[i])], "index": i}


def test_bn_statistics_batches_mix_the_classes_of_a_class_sorted_split():
    config = get_profile("smoke", batch_size=4, progress=False)
    data = ClassSorted(BlobVolumes(16, 0))
    batches = [b["label"] for b in bn_stats_loader(data, config.batch_size, config.seed)]
    assert sum(len(b) for b in batches) == 16
    assert sum(len(set(b.tolist())) == 2 for b in batches) >= 3  # an unshuffled loader: 0 of 4 mixed
    again = [b["label"] for b in bn_stats_loader(data, config.batch_size, config.seed)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # the same order at every evaluation


def test_trained_baseline_ranks_held_out_scans_above_chance(tmp_path):
    """End to end through train_baseline (precise BN, early stopping, best weights) on a
    learnable problem with class-sorted splits: the held-out AUC of the returned model from
    P(class 1) is far above 0.5 (a sign, column or BatchNorm-statistics bug gives <= 0.5)."""
    config = get_profile("smoke", baseline_epochs=4, patience=4, batch_size=4, progress=False)
    torch.manual_seed(0)
    train, val, test = (ClassSorted(BlobVolumes(n, seed)) for n, seed in ((16, 0), (8, 1), (16, 2)))
    model, result = train_baseline("resnet18", train, val, config, torch.device("cpu"), tmp_path / "resnet18.pth")
    assert not model.training
    assert result.best["val_auc"] >= 0.9  # selection read P(class 1) (a swapped column selects the worst epoch)
    with torch.no_grad():
        p = torch.softmax(model(torch.stack([test[i]["image"] for i in range(len(test))])), 1)[:, 1].numpy()
    assert roc_auc_score(test.labels, p) >= 0.9, (result.history, p)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_gradcam_maps_cover_the_input_and_follow_the_prediction(name):
    from utils.evaluation.gradcam import gradcam_maps

    torch.manual_seed(0)
    net = build_baseline(name, 2).eval()
    x = torch.rand(2, 1, 48, 48, 32)
    maps, probs = gradcam_maps(net, name, x)
    assert maps.shape == (2, 48, 48, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6  # normalised per scan (an untrained DenseNet's
    # ReLU-ed Grad-CAM can be all zero, so "not constant" is checked on the ResNet only)
    if name == "resnet18":
        assert maps.reshape(2, -1).std(axis=1).min() > 0
    with torch.no_grad():
        expected = torch.softmax(net(x), 1).numpy()
    assert probs.shape == (2, 2) and np.allclose(probs, expected, atol=1e-5)


def test_gradcam_figure_titles_give_the_true_class_the_prediction_and_its_probability(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import utils.evaluation.gradcam as gradcam

    titles = []

    def overlay(volume, saliency, max_slices, title):
        titles.append(title)
        return plt.figure(figsize=(2, 1))

    monkeypatch.setattr(gradcam, "plot_saliency_overlay", overlay)
    torch.manual_seed(0)
    net = build_baseline("resnet18", 2).eval()
    volumes = [np.random.default_rng(i).random((1, 48, 48, 32), dtype=np.float32) for i in range(2)]
    path = gradcam.write_baseline_gradcam({"resnet18": net}, {"resnet18": "3D ResNet-18"}, volumes,
                                          ["a/scan0.nii.gz", "b/scan1.nii.gz"], tmp_path, ["Normal", "COVID-19"],
                                          labels=[0, 1])
    assert path is not None and path.is_file()
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(np.stack(volumes))), 1).numpy()
    for i, (title, truth) in enumerate(zip(titles, ["Normal", "COVID-19"])):
        k = int(probs[i].argmax())
        assert title.startswith(f"3D ResNet-18: scan{i}.nii.gz (true {truth}), ")
        assert title.endswith(f"prediction {['Normal', 'COVID-19'][k]} (p = {probs[i, k]:.2f})")
