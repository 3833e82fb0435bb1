"""Behaviour of the grid denoiser: shapes, per-point time conditioning, FiLM, validation."""
import pytest
import torch

from models.unet_3d import UNet3D, UNetConfig

SMALL = dict(base_channels=8, channel_mults=(1, 2), time_dim=16, feature_dim=12, groups=4)


def make(num_classes, grid_size, **kw):
    torch.manual_seed(0)
    return UNet3D(UNetConfig(num_classes=num_classes, grid_size=grid_size, **{**SMALL, **kw})).eval()


def inputs(batch, num_classes, grid_size, feature_dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, num_classes, grid_size, grid_size, grid_size)
    y_t = torch.randn(shape, generator=g)
    M = torch.softmax(torch.randn(shape, generator=g), dim=1)
    t = torch.randint(0, 500, (batch, grid_size, grid_size, grid_size), generator=g)
    F = torch.randn(batch, feature_dim, generator=g)
    return y_t, M, t, F


@pytest.mark.parametrize(
    "num_classes, grid_size, batch, mults",
    [
        (2, 8, 1, (1, 2)),
        (2, 8, 3, (1, 2, 4)),  # 8 -> 4 -> 2
        (5, 8, 3, (1, 2)),
        (2, 4, 1, (1, 2, 2)),  # 4 -> 2 -> 1, the smallest legal grid for 3 levels
        (5, 4, 3, (1, 2)),
        (2, 16, 1, (1, 2)),
    ],
)
def test_output_shape(num_classes, grid_size, batch, mults):
    net = make(num_classes, grid_size, channel_mults=mults)
    y_t, M, t, F = inputs(batch, num_classes, grid_size)
    with torch.no_grad():
        out = net(y_t, M, t, F)
    assert out.shape == (batch, num_classes, grid_size, grid_size, grid_size)
    assert torch.isfinite(out).all()


def test_per_point_timestep_changes_output_near_that_point():
    net = make(2, 8)
    y_t, M, t, F = inputs(1, 2, 8)
    t2 = t.clone()
    t2[0, 1, 2, 3] = (t[0, 1, 2, 3] + 250) % 500
    with torch.no_grad():
        out1, out2 = net(y_t, M, t, F), net(y_t, M, t2, F)
    diff = (out1 - out2).abs()
    assert diff[0, :, 1, 2, 3].max() > 1e-4
    # a single point's time is local information, not a global one: a far corner is less affected
    assert diff[0, :, 1, 2, 3].max() > diff[0, :, 7, 7, 7].max()


def test_feature_prior_conditions_output_by_film():
    net = make(2, 8)
    y_t, M, t, F = inputs(2, 2, 8)
    with torch.no_grad():
        out1 = net(y_t, M, t, F)
        out2 = net(y_t, M, t, F + torch.randn_like(F))
        # FiLM is per sample: changing sample 1's F leaves sample 0 untouched
        F3 = F.clone()
        F3[1] += 1.0
        out3 = net(y_t, M, t, F3)
    assert (out1 - out2).abs().max() > 1e-4
    torch.testing.assert_close(out3[0], out1[0])
    assert (out3[1] - out1[1]).abs().max() > 1e-4


def test_guidance_map_is_an_input():
    net = make(2, 8)
    y_t, M, t, F = inputs(1, 2, 8)
    with torch.no_grad():
        assert (net(y_t, M, t, F) - net(y_t, M.flip(1), t, F)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid_size=6, channel_mults=(1, 2, 4)), "divisible by 4"),
        (dict(grid_size=2, channel_mults=(1, 2, 4)), "halved 2 times"),
        (dict(grid_size=8, base_channels=6, groups=4), "groups"),
        (dict(grid_size=8, num_classes=1), "num_classes"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "shapes, match",
    [
        (dict(grid=5), "divisible by 2"),
        (dict(t_shape=(1,)), "per-point timesteps"),
        (dict(channels=3), r"\(B, 2, H, W, D\)"),
    ],
)
def test_invalid_inputs_error(shapes, match):
    net = make(2, 8)
    grid = shapes.get("grid", 8)
    y_t, M, t, F = inputs(1, shapes.get("channels", 2), grid)
    if "t_shape" in shapes:
        t = torch.zeros(shapes["t_shape"], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        net(y_t, M, t, F)


def test_seed_config_size():
    """The default (seed) configuration is about 18M parameters, as in the seed's table."""
    n = sum(p.numel() for p in UNet3D(UNetConfig()).parameters())
    assert 15e6 < n < 21e6
