"""The denoiser's shape descriptors (``models/morphometry.py``, ``DenoiserConfig.morphometry``):
known values on a box, agreement with the readout probe's scipy descriptors, the invariances
training relies on, the standardisation, a path that starts as the model without it, and a
tiny problem that only the shape can solve."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import BlobVolumes, load_script
from models.denoiser import ConditionalDenoiser, DenoiserConfig
from models.diffmic3d import DiffMIC3D, ModelConfig
from models.morphometry import DESCRIPTORS, ShapeDescriptors, shape_descriptors
from utils.training.diffusion import predict_dataset, train_diffusion
from utils.training.dcg import cache_guidance

D = {name: i for i, name in enumerate(DESCRIPTORS)}


def box_scan(shape=(20, 16, 12), box=((2, 12), (3, 8), (4, 7)), low=0.1, high=0.9):
    x = torch.full((1, 1, *shape), low)
    (a0, a1), (b0, b1), (c0, c1) = box
    x[0, 0, a0:a1, b0:b1, c0:c1] = high
    return x


def blob(rng, shape=(24, 24, 24)):
    """A random lumpy binary blob (union of a few balls) as a float volume."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    mask = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 5)):
        centre, radius = rng.uniform(6, 18, size=3), rng.uniform(2.5, 6)
        mask |= ((grid - centre) ** 2).sum(-1) <= radius ** 2
    return mask.astype(np.float32)


def test_a_box_has_its_volume_surface_extents_and_depth():
    out = shape_descriptors(box_scan())[0]  # a 10 x 5 x 3 box
    assert out.shape == (len(DESCRIPTORS),)
    assert out[D["log volume"]] == pytest.approx(np.log(150), abs=1e-5)
    assert out[D["log surface"]] == pytest.approx(np.log(2 * (50 + 15 + 30)), abs=1e-5)
    assert out[[D["extent 1"], D["extent 2"], D["extent 3"]]].tolist() == [10, 5, 3]
    assert out[D["box fill"]] == pytest.approx(1.0)
    assert out[D["max depth"]] == 2  # a 3-voxel-thin box survives one erosion
    assert out[D["mean depth"]] == pytest.approx((150 + 8 * 3 * 1) / 150)  # the 8 x 3 x 1 core survives it
    # the axis variances of a box are (L^2 - 1) / 12 per edge, descending (x n / (n - 1): unbiased)
    expected = np.log(np.array([99, 24, 8]) / 12 * 150 / 149 + 1e-6)
    np.testing.assert_allclose(out[[D["log axis var 1"], D["log axis var 2"], D["log axis var 3"]]].numpy(),
                               expected, atol=1e-4)


def test_they_agree_with_the_readout_probes_descriptors():
    """The probe (scipy, float64) is the reference for the descriptors both compute."""
    probe = load_script("readout_probe")
    shared = [name for name in DESCRIPTORS if name in probe.MORPHOMETRY and "depth" not in name]
    rng = np.random.default_rng(0)
    volumes = np.stack([blob(rng) for _ in range(4)])
    ours = shape_descriptors(torch.from_numpy(volumes)[:, None]).numpy()
    for volume, row in zip(volumes, ours):
        reference = probe.morphometry(volume)
        for name in shared:
            assert row[D[name]] == pytest.approx(reference[probe.MORPHOMETRY.index(name)], rel=1e-4, abs=1e-4), name
    assert len(shared) == 13


def test_they_are_invariant_to_flips_and_intensity_and_each_scan_is_its_own():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(np.stack([blob(rng) for _ in range(3)]))[:, None] * 0.7 + 0.1
    base = shape_descriptors(x)
    for changed in (x.flip(2), x.flip(3), x.flip(4), 2.5 * x - 0.3):
        torch.testing.assert_close(shape_descriptors(changed), base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shape_descriptors(x[1:2]), base[1:2])  # no mixing across the batch


def test_an_empty_or_one_voxel_mask_gives_zeros_and_bad_input_is_refused():
    flat, dot = torch.full((1, 1, 8, 8, 8), 0.4), torch.zeros(1, 1, 8, 8, 8)
    dot[0, 0, 3, 3, 3] = 1.0
    assert torch.equal(shape_descriptors(torch.cat([flat, dot])), torch.zeros(2, len(DESCRIPTORS)))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W, D\)"):
        shape_descriptors(torch.zeros(8, 8, 8))


def test_the_standardisation_is_fitted_before_training_and_saved_with_the_model():
    module = ShapeDescriptors().train()
    scans = torch.cat([box_scan(box=((0, k), (0, 4), (0, 3))) for k in range(3, 9)])
    with pytest.raises(RuntimeError, match="fit the standardisation"):
        module(scans)
    module.fit(shape_descriptors(scans))
    z = module(scans)
    torch.testing.assert_close(z.mean(0), torch.zeros(len(DESCRIPTORS)), atol=1e-5, rtol=0)
    assert float(z.abs().max()) <= 5.0
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert set(state) == {"mean", "sd", "fitted"} and bool(state["fitted"])
    with pytest.raises(ValueError, match="N >= 2"):
        module.fit(torch.zeros(1, len(DESCRIPTORS)))


def test_the_path_starts_as_the_denoiser_without_it_and_gets_a_gradient():
    sizes = dict(grid_size=4, feature_dim=16, encoder_channels=(8, 16), encoder_blocks=(1, 1), image_dim=8,
                 prior_dim=4, cond_dim=16, unet_base=16, unet_mults=(1,), time_dim=8, groups=4)
    torch.manual_seed(0)
    plain = ConditionalDenoiser(DenoiserConfig(**sizes))
    torch.manual_seed(0)
    shaped = ConditionalDenoiser(DenoiserConfig(**sizes, morphometry=True))
    missing, unexpected = shaped.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("shape.", "shape_proj.")) for k in missing)
    scans = torch.cat([box_scan(shape=(16, 16, 16), box=((0, k), (2, 9), (1, 5))) for k in (4, 8, 12)])
    shaped.shape.fit(shape_descriptors(scans))
    M, F_prior = torch.full((3, 2, 4, 4, 4), 0.5), torch.randn(3, 16)
    plain.eval(), shaped.eval()
    torch.testing.assert_close(shaped.condition(scans, M, F_prior), plain.condition(scans, M, F_prior))
    shaped.train()
    shaped.condition(scans, M, F_prior).square().sum().backward()
    assert float(shaped.shape_proj.weight.grad.abs().max()) > 0


class ShapeVolumes(BlobVolumes):
    """(1, 32, 32, 32) binary boxes of about the same volume at random places: class 1 a long
    thin bar, class 0 a compact block. Nothing but the shape tells them apart."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 2
        self.images = np.zeros((n, 1, 32, 32, 32), np.float32)
        for i, label in enumerate(self.labels):
            edges = np.array([24, 4, 4]) if label else np.array([8, 6, 8])
            edges = rng.permutation(edges + rng.integers(-1, 2, size=3))
            corner = [rng.integers(0, 32 - e + 1) for e in edges]
            self.images[i, 0, corner[0]:corner[0] + edges[0], corner[1]:corner[1] + edges[1],
                        corner[2]:corner[2] + edges[2]] = 1.0


@pytest.mark.parametrize("denoiser", [{"morphometry": True, "use_image_encoder": False},
                                      {"morphometry": False, "use_image_encoder": False},
                                      "shape-only"])
def test_phase2_learns_a_problem_that_only_the_shape_solves(tmp_path, denoiser):
    """Own encoder off and uninformative priors: the descriptors are the only way to the label
    (without them, the same run stays near chance); also with the feature prior off, as the
    retrained variant ``shape-only`` runs (its overrides, read from the ablation table)."""
    from test_diffusion_method import blob_config
    from utils.benchmarking.ablations import RETRAINED, RETRAINED_KEYS, uninformative

    if denoiser == "shape-only":
        changes, overrides = RETRAINED[RETRAINED_KEYS["shape-only"]]
        assert changes == {} and not overrides["denoiser"]["use_feature_prior"]
        denoiser = overrides["denoiser"]
    morphometry = denoiser["morphometry"]
    train, val = ShapeVolumes(48, 0), ShapeVolumes(24, 1)
    torch.manual_seed(0)
    config = ModelConfig.tiny(input_shape=(32, 32, 32)).with_changes(denoiser=denoiser)
    model = DiffMIC3D(config).freeze_dcg()
    guidance = {name: uninformative(cache_guidance(model, data, torch.device("cpu"), progress=False))
                for name, data in (("train", train), ("val", val))}
    train_diffusion(model, train, guidance["train"], val, guidance["val"], blob_config(), torch.device("cpu"),
                    tmp_path / "diffusion.pth")
    probs = predict_dataset(model, val, guidance["val"], torch.device("cpu"), 8, 0)["probs"]
    auc = roc_auc_score(val.labels, probs[:, 1].numpy())
    if not morphometry:
        assert auc <= 0.75, auc
        return
    assert auc >= 0.9, auc
    raw = shape_descriptors(torch.from_numpy(train.images))
    torch.testing.assert_close(model.denoiser.shape.mean, raw.mean(0))  # fitted on the training split
    saved = torch.load(tmp_path / "diffusion.pth", weights_only=True)["model_state_dict"]
    torch.testing.assert_close(saved["ema.module.denoiser.shape.mean"], raw.mean(0))  # and checkpointed
