"""PriorConfig.blend='fitted': the guidance map's weight of the local prior fitted on the training
split's out-of-fold priors (models/prior_generator.py, utils/training/diffusion.fit_prior_blend)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

from helpers import BlobVolumes
from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D, ModelConfig
from models.prior_generator import (BLEND_WEIGHTS, PriorConfig, PriorGenerator, blend_distance,
                                    guidance_distance_map)
from utils.training.dcg import cache_guidance
from utils.training.diffusion import fit_prior_blend, predict_dataset, train_diffusion


def auc(y, p):
    return roc_auc_score(y, p[:, 1])


@pytest.mark.parametrize("grid", [1, 4, 8])
@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 0.63, 0.9, 1.0])
def test_the_rescaled_distance_has_the_weight_as_grid_mean_keeps_its_order_and_stays_in_0_1(grid, weight):
    d = guidance_distance_map(grid, dtype=torch.float64)
    b = blend_distance(d, weight)
    assert abs(float(b.mean()) - weight) < 1e-9 and float(b.min()) >= -1e-12 and float(b.max()) <= 1 + 1e-12
    if grid > 1 and 0 < weight < 1:  # strictly increasing with d where d is
        order = torch.argsort(d.flatten())
        assert bool((b.flatten()[order].diff() >= -1e-12).all())
        assert torch.equal(torch.argmax(b), torch.argmax(d))
    if grid > 1:
        torch.testing.assert_close(blend_distance(d, d.mean()), d)  # the design's own mean: the design's map


def _probs(score):
    return torch.stack([1 - score, score], 1).float()


def test_the_fit_keeps_the_prior_that_ranks_and_the_map_follows_it():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 2
    good = torch.from_numpy(1 / (1 + np.exp(-(3 * (labels - 0.5) + rng.normal(size=300)))))
    noise = torch.from_numpy(rng.random(300))
    gen = PriorGenerator(PriorConfig(blend="fitted", grid_size=4, num_rois=2, global_dim=8, roi_dim=8, feature_dim=8))
    feats = torch.zeros(300, 8), torch.zeros(300, 2, 8)
    torch.testing.assert_close(gen.blend_map(), gen.distance)  # until fitted: the design's map
    w = gen.fit_blend(_probs(good), _probs(noise), labels, auc)
    assert w <= 0.25  # the local prior is noise (a little of it can rank this sample better by chance)
    grid_mean = gen(_probs(good), _probs(noise), *feats).guidance_map.mean(dim=(2, 3, 4))  # (N, C)
    torch.testing.assert_close(grid_mean, (1 - w) * _probs(good) + w * _probs(noise))
    assert gen.fit_blend(_probs(noise), _probs(good), labels, auc) >= 0.75  # the global prior is noise
    assert "local_weight" in gen.state_dict() and round(float(gen.state_dict()["local_weight"]), 2) in BLEND_WEIGHTS
    with pytest.raises(ValueError, match="blend='fitted'"):
        PriorGenerator(PriorConfig(blend="distance")).fit_blend(_probs(good), _probs(noise), labels, auc)
    with pytest.raises(ValueError, match="blend"):
        PriorConfig(blend="learned")


def test_the_fit_skips_unscorable_candidates_and_breaks_ties_to_the_smaller_weight():
    """NaN below w = 0.3: those candidates are never chosen; a score that rises to w = 0.7 and is
    flat above gives 0.7, the smallest of the tied best, and one flat from 0.3 gives 0.3."""
    gen = PriorGenerator(PriorConfig(grid_size=4, num_rois=2, global_dim=8, roi_dim=8, feature_dim=8))
    g, loc = _probs(torch.zeros(4)), _probs(torch.ones(4))  # the blend's positive score is w itself

    def score(y, p):
        w = round(float(p[0, 1]), 2)
        return float("nan") if w < 0.3 else min(w, 0.7)  # rises to 0.7, then ties

    assert gen.fit_blend(g, loc, np.arange(4) % 2, score) == pytest.approx(0.7)
    assert gen.fit_blend(g, loc, np.arange(4) % 2, lambda y, p: float("nan") if float(p[0, 1]) < 0.29 else 0.5) \
        == pytest.approx(0.3)


def test_a_single_class_leaves_the_design_blend():
    """No candidate can be scored (AUC undefined on one class): w is d's own grid mean, M the design's."""
    gen = PriorGenerator(PriorConfig(grid_size=4, num_rois=2, global_dim=8, roi_dim=8, feature_dim=8))
    probs = _probs(torch.rand(10))
    w = gen.fit_blend(probs, probs.flip(1), np.ones(10, dtype=int), lambda y, p: float("nan"))
    assert w == pytest.approx(float(gen.distance.mean()))
    torch.testing.assert_close(gen.blend_map(), gen.distance)


def test_the_config_takes_the_blend_as_a_prior_override_and_old_configs_load_with_the_design():
    assert PriorConfig().blend == "fitted" and ModelConfig.tiny().prior.blend == "fitted"  # the default
    config = ModelConfig.tiny().with_changes(prior={"blend": "distance"})
    assert config.prior.blend == "distance" and config.with_changes(dcg={"num_rois": 2}).prior.blend == "distance"
    with pytest.raises(ValueError, match="grid_size"):
        ModelConfig.tiny().with_changes(prior={"grid_size": 4})  # a shared size: set it as grid_size=
    old = ModelConfig.tiny().to_dict()
    del old["prior"]["blend"]  # a checkpoint written before the option
    assert ModelConfig.from_dict(old).prior.blend == "distance"


def test_phase2_fits_the_blend_on_its_training_rows_only_and_saves_it(tmp_path):
    """The weight is fitted on the rows of the (subset of the) training split phase 2 trains on,
    before training, and travels in the checkpoint; the model then predicts with it."""
    from test_diffusion_method import blob_config

    train, val = BlobVolumes(24, 0), BlobVolumes(12, 1)
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 32)).with_changes(prior={"blend": "fitted"})).freeze_dcg()
    guidance = {name: cache_guidance(model, data, torch.device("cpu"), progress=False)
                for name, data in (("train", train), ("val", val))}
    fields = guidance["train"].as_dict()
    labels = torch.as_tensor(train.labels)
    rows = torch.arange(12, 24)  # the subset phase 2 trains on: its global prior is the truth, its local noise
    fields["global_probs"][rows] = torch.nn.functional.one_hot(labels[rows], 2).float() * 0.8 + 0.1
    fields["local_probs"][rows] = 0.5 + 0.4 * torch.rand(12, 1).repeat(1, 2) * torch.tensor([1.0, -1.0])
    fields["local_probs"][:12] = torch.nn.functional.one_hot(labels[:12], 2).float()  # rows it must not read
    train_guidance = DCGOutput(**fields)
    subset = Subset(train, rows.tolist())
    subset.labels = np.asarray(train.labels)[rows.numpy()]
    fit_prior_blend(model, subset, train_guidance)
    assert float(model.prior_generator.local_weight) <= 0.1
    train_diffusion(model, subset, train_guidance, val, guidance["val"], blob_config(diffusion_epochs=1),
                    torch.device("cpu"), tmp_path / "diffusion.pth")
    saved = torch.load(tmp_path / "diffusion.pth", weights_only=True)["model_state_dict"]
    assert float(saved["ema.module.prior_generator.local_weight"]) == float(model.prior_generator.local_weight)
    probs = predict_dataset(model, val, guidance["val"], torch.device("cpu"), 8, 0)["probs"]
    assert probs.shape == (12, 2) and torch.isfinite(probs).all()
