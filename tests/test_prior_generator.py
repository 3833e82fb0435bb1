"""Behaviour of the priors: dense guidance map M (3D centre/corner rule), gated feature prior F."""
import itertools
import json

import pytest
import torch

from models.dcg_config import DCGConfig
from models.dcg_model import DCG
from models.prior_generator import (PriorConfig, PriorGenerator, Priors, dense_guidance_map,
                                    gated_fusion, guidance_distance_map)


def random_probs(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g).softmax(-1)


def corners(n):
    return list(itertools.product((0, n - 1), repeat=3))


# ---------------------------------------------------------------------------------------------
# dense guidance map
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid_size", [2, 3, 4, 5, 8])
def test_distance_map_range_corners_and_centre(grid_size):
    d = guidance_distance_map(grid_size)
    assert d.shape == (grid_size,) * 3
    for corner in corners(grid_size):
        assert d[corner].item() == 1.0
    assert d.max().item() == pytest.approx(1.0)
    if grid_size % 2:
        c = grid_size // 2
        assert d[c, c, c].item() == 0.0
    else:  # the centre falls between the 2x2x2 central points, each 1/(Np-1) away (normalised)
        assert d.min().item() == pytest.approx(1 / (grid_size - 1))
    # radially symmetric: invariant under flips and axis permutations
    assert torch.equal(d, d.flip(0)) and torch.equal(d, d.permute(2, 0, 1))


@pytest.mark.parametrize("batch,classes,grid_size", [(1, 2, 3), (3, 2, 8), (2, 5, 5),
                                                     (4, 5, 4), (1, 3, 7)])
def test_guidance_map_centre_corners_and_simplex(batch, classes, grid_size):
    p_g, p_l = random_probs(batch, classes, 0), random_probs(batch, classes, 1)
    m = dense_guidance_map(p_g, p_l, grid_size)
    assert m.shape == (batch, classes, grid_size, grid_size, grid_size)
    for corner in corners(grid_size):
        torch.testing.assert_close(m[(slice(None), slice(None)) + corner], p_l)
    if grid_size % 2:
        c = grid_size // 2
        torch.testing.assert_close(m[:, :, c, c, c], p_g)
    torch.testing.assert_close(m.sum(1), torch.ones(batch, grid_size, grid_size, grid_size))
    lo = torch.minimum(p_g, p_l)[..., None, None, None]
    hi = torch.maximum(p_g, p_l)[..., None, None, None]
    assert (m >= lo - 1e-6).all() and (m <= hi + 1e-6).all()


def test_guidance_map_follows_the_interpolation_rule():
    p_g, p_l = random_probs(2, 3, 2), random_probs(2, 3, 3)
    m = dense_guidance_map(p_g, p_l, 5)
    i, j, k = 1, 4, 2
    d = ((i - 2) ** 2 + (j - 2) ** 2 + (k - 2) ** 2) ** 0.5 / (2 * 3 ** 0.5)
    torch.testing.assert_close(m[:, :, i, j, k], (1 - d) * p_g + d * p_l)


def test_guidance_map_of_size_one_is_the_global_prior():
    p_g, p_l = random_probs(2, 2, 4), random_probs(2, 2, 5)
    torch.testing.assert_close(dense_guidance_map(p_g, p_l, 1)[:, :, 0, 0, 0], p_g)


@pytest.mark.parametrize("g_shape,l_shape", [((2, 3), (2, 2)), ((2, 3, 1), (2, 3, 1)),
                                             ((3,), (3,))])
def test_guidance_map_rejects_mismatched_probabilities(g_shape, l_shape):
    with pytest.raises(ValueError, match="dense_guidance_map"):
        dense_guidance_map(torch.rand(g_shape), torch.rand(l_shape), 4)


# ---------------------------------------------------------------------------------------------
# gated feature prior
# ---------------------------------------------------------------------------------------------

def test_gated_fusion_of_equal_sources_is_that_source():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(3, 1, 16, generator=g)
    sources = source.expand(3, 6, 16)
    fused, gates = gated_fusion(sources, torch.randn(6, 16, generator=g) * 3)
    torch.testing.assert_close(fused, source[:, 0])
    torch.testing.assert_close(gates.sum(0), torch.ones(16))


def test_gated_fusion_is_a_per_channel_convex_combination():
    g = torch.Generator().manual_seed(1)
    sources = torch.randn(2, 4, 8, generator=g)
    logits = torch.randn(4, 8, generator=g)
    fused, gates = gated_fusion(sources, logits)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates, logits.softmax(0))
    torch.testing.assert_close(fused, torch.einsum("sd,bsd->bd", gates, sources))
    assert (fused >= sources.min(1).values - 1e-6).all()
    assert (fused <= sources.max(1).values + 1e-6).all()
    # a dominant gate selects its source
    one_hot = torch.full((4, 8), -1e4)
    one_hot[2] = 0.0
    torch.testing.assert_close(gated_fusion(sources, one_hot)[0], sources[:, 2])


@pytest.mark.parametrize("batch,classes,rois,grid_size", [(1, 2, 5, 8), (3, 2, 3, 5),
                                                          (2, 5, 5, 4), (3, 5, 1, 3)])
def test_prior_generator_shapes_and_gates(batch, classes, rois, grid_size):
    cfg = PriorConfig(num_classes=classes, num_rois=rois, global_dim=32, roi_dim=16,
                      feature_dim=24, grid_size=grid_size)
    torch.manual_seed(0)
    gen = PriorGenerator(cfg)
    p_g, p_l = random_probs(batch, classes, 0), random_probs(batch, classes, 1)
    priors = gen(p_g, p_l, torch.randn(batch, 32), torch.randn(batch, rois, 16))
    assert isinstance(priors, Priors)
    assert priors.guidance_map.shape == (batch, classes, grid_size, grid_size, grid_size)
    assert priors.feature_prior.shape == (batch, 24)
    assert priors.gates.shape == (rois + 1, 24)
    torch.testing.assert_close(priors.gates.sum(0), torch.ones(24))
    torch.testing.assert_close(priors.gates, torch.full((rois + 1, 24), 1 / (rois + 1)))  # init
    torch.testing.assert_close(priors.guidance_map, dense_guidance_map(p_g, p_l, grid_size))


def test_prior_generator_feature_prior_of_equal_projected_sources():
    """Projections with zero weights and one shared bias make every source equal to the bias,
    whatever the gates: F must then be exactly that vector."""
    cfg = PriorConfig(num_classes=2, num_rois=4, global_dim=12, roi_dim=6, feature_dim=10)
    gen = PriorGenerator(cfg)
    bias = torch.randn(10)
    with torch.no_grad():
        for proj in (gen.global_proj, gen.roi_proj):
            proj.weight.zero_()
            proj.bias.copy_(bias)
        gen.gate_logits.normal_(0, 3)
    priors = gen(random_probs(3, 2, 0), random_probs(3, 2, 1), torch.randn(3, 12),
                 torch.randn(3, 4, 6))
    torch.testing.assert_close(priors.feature_prior, bias.expand(3, 10))


def test_prior_generator_combines_projected_global_and_roi_features():
    cfg = PriorConfig(num_classes=2, num_rois=3, global_dim=8, roi_dim=4, feature_dim=6)
    torch.manual_seed(0)
    gen = PriorGenerator(cfg)
    with torch.no_grad():
        gen.gate_logits.normal_()
    f_g, f_r = torch.randn(2, 8), torch.randn(2, 3, 4)
    priors = gen(random_probs(2, 2, 0), random_probs(2, 2, 1), f_g, f_r)
    sources = torch.cat([gen.global_proj(f_g)[:, None], gen.roi_proj(f_r)], 1)  # (B, K+1, D)
    q = gen.gate_logits.softmax(0)
    torch.testing.assert_close(priors.feature_prior, (q[None] * sources).sum(1))
    priors.feature_prior.sum().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad,match", [
    ("global_probs", "global_probs"), ("local_probs", "local_probs"),
    ("global_features", "global_features"), ("roi_features", "roi_features")])
def test_prior_generator_rejects_wrong_shapes(bad, match):
    gen = PriorGenerator(PriorConfig(num_classes=2, num_rois=3, global_dim=8, roi_dim=4))
    args = {"global_probs": torch.rand(2, 2), "local_probs": torch.rand(2, 2),
            "global_features": torch.rand(2, 8), "roi_features": torch.rand(2, 3, 4)}
    args[bad] = torch.rand(2, 7)
    with pytest.raises(ValueError, match=match):
        gen(**args)


def test_prior_generator_on_dcg_output():
    dcg_cfg = DCGConfig(num_classes=5, input_shape=(32, 32, 16), num_rois=3)
    torch.manual_seed(0)
    dcg = DCG(dcg_cfg).eval()
    gen = PriorGenerator(PriorConfig(num_classes=5, num_rois=3, global_dim=dcg_cfg.feature_dim,
                                     roi_dim=dcg_cfg.local_dim, grid_size=5))
    with torch.no_grad():
        out = dcg(torch.rand(2, 1, 32, 32, 16))
        priors = gen(global_probs=out.global_probs, local_probs=out.local_probs,
                     global_features=out.global_features, roi_features=out.roi_features)
    torch.testing.assert_close(priors.guidance_map[:, :, 2, 2, 2], out.global_probs)
    torch.testing.assert_close(priors.guidance_map[:, :, 0, 4, 0], out.local_probs)
    assert not priors.detach().feature_prior.requires_grad
    assert Priors(**priors.to("cpu").as_dict()).gates.shape == (4, 256)


def test_param_count_and_state_dict():
    gen = PriorGenerator(PriorConfig())
    n = sum(p.numel() for p in gen.parameters())
    assert 0.7 * 130_000 <= n <= 1.3 * 130_000
    state = gen.state_dict()
    assert "distance" not in state  # rebuilt from the config, not stored
    other = PriorGenerator(PriorConfig())
    other.load_state_dict(state)
    for a, b in zip(gen.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_prior_config_round_trip_and_validation():
    cfg = PriorConfig(num_classes=5, num_rois=3, grid_size=7)
    assert PriorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        PriorConfig.from_dict({"num_classes": 2, "Np": 8})
    with pytest.raises(ValueError, match="grid_size"):
        PriorConfig(grid_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        PriorConfig(num_classes=1)
