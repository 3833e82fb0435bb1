"""The one-batch overfitting check of phase 2 (utils.training.sanity)."""
import numpy as np
import pytest
import torch

from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.training.sanity import OverfitResult, overfit_one_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 32)))
    return model, torch.rand(2, 1, 32, 32, 32), torch.tensor([0, 1])


def test_the_denoiser_overfits_one_batch_and_the_model_is_left_alone(batch):
    model, scan, labels = batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = overfit_one_batch(model, scan, labels, steps=25)
    assert len(result.losses) == 26 and result.passed() and result.losses[-1] < 0.5 * result.losses[0]
    assert "25 steps" in result.report() and result.report().endswith(": learned")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy was trained
    again = overfit_one_batch(model, scan, labels, steps=25)
    assert again.losses == result.losses  # fixed noise, fixed seed: the same run


def test_a_setup_that_cannot_learn_fails_the_check(batch):
    model, scan, labels = batch
    frozen = overfit_one_batch(model, scan, labels, steps=5, lr=0.0)  # no step changes anything
    assert frozen.ratio == pytest.approx(1.0) and not frozen.passed()
    assert "NOT learned" in frozen.report()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        overfit_one_batch(model, scan, labels, steps=0)
    assert OverfitResult((1.0, 0.4)).passed() and not OverfitResult((1.0, 0.6)).passed()


def test_class_balanced_batch_takes_each_class_in_turn():
    from helpers import BlobVolumes
    from utils.training.sanity import class_balanced_batch
    data = BlobVolumes(6, seed=0)
    data.labels = np.array([0, 0, 0, 0, 1, 1])  # class-sorted, as a split
    assert class_balanced_batch(data)["index"].tolist() == [0, 4]
    assert class_balanced_batch(data, 5)["index"].tolist() == [0, 4, 1, 5, 2]
    assert class_balanced_batch(data, 2)["image"].shape == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="size must be in"):
        class_balanced_batch(data, 7)
