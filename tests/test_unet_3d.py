"""Behaviour of the condition U-Net: shapes, GroupNorm-ed output, spatial mixing, no batch
coupling, validation. It sees the condition only (no y_t, no timestep)."""
import pytest
import torch

from models.unet_3d import UNet3D, UNetConfig, check_grid_size

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(in_channels=3, out_channels=8, base_channels=8, channel_mults=(1, 2), groups=4)


def make(grid_size=8, **kw):
    torch.manual_seed(0)
    return UNet3D(UNetConfig(grid_size=grid_size, **{**SMALL, **kw})).eval()


def inputs(batch, channels, grid, seed=1):
    return torch.randn(batch, channels, grid, grid, grid, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "in_channels, out_channels, grid_size, batch, mults",
    [
        (3, 8, 8, 1, (1, 2)),
        (3, 8, 8, 3, (1, 2, 4)),  # 8 -> 4 -> 2
        (5, 12, 8, 2, (1,)),  # a single level: no down/upsampling
        (2, 8, 4, 1, (1, 2, 2)),  # 4 -> 2 -> 1, the smallest legal grid for 3 levels
        (3, 4, 4, 3, (1, 2)),
        (3, 8, 16, 1, (1, 2)),
    ],
)
def test_output_shape(in_channels, out_channels, grid_size, batch, mults):
    net = make(grid_size, in_channels=in_channels, out_channels=out_channels, channel_mults=mults)
    with torch.no_grad():
        out = net(inputs(batch, in_channels, grid_size))
    assert out.shape == (batch, out_channels, grid_size, grid_size, grid_size)
    assert torch.isfinite(out).all()


def test_accepts_other_divisible_grids_than_configured():
    net = make(8, channel_mults=(1, 2))
    with torch.no_grad():
        assert net(inputs(1, 3, 4)).shape == (1, 8, 4, 4, 4)


def test_output_is_group_normalised():
    """GroupNorm (identity affine at init) on the output: per (sample, group) mean 0 and var 1,
    whatever the input scale."""
    net = make(8)
    with torch.no_grad():
        out = net(100.0 * inputs(2, 3, 8) + 7.0)
    groups = out.reshape(2, 4, -1)  # 8 channels in 4 groups
    torch.testing.assert_close(groups.mean(-1), torch.zeros(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    # per channel it is not normalised (groups of 2 channels), so the norm is over groups, not channels
    assert out.reshape(2, 8, -1).mean(-1).abs().max() > 1e-3


def test_spatial_mixing_changing_one_cell_changes_its_neighbours():
    net = make(8)
    x = inputs(1, 3, 8)
    x2 = x.clone()
    x2[0, :, 3, 4, 5] += 5.0
    with torch.no_grad():
        diff = (net(x) - net(x2)).abs()
    assert diff[0, :, 3, 4, 5].max() > 1e-3
    for nb in [(2, 4, 5), (4, 4, 5), (3, 3, 5), (3, 5, 5), (3, 4, 4), (3, 4, 6), (2, 3, 4)]:
        assert diff[(0, slice(None), *nb)].max() > 1e-4, nb
    # the effect is local-first: the cell itself moves more than a far corner
    assert diff[0, :, 3, 4, 5].max() > diff[0, :, 7, 0, 0].max()


def test_samples_do_not_interact():
    """No batch statistics: changing sample 1 leaves sample 0's output unchanged, also in train mode."""
    net = make(8).train()
    x = inputs(2, 3, 8)
    x2 = x.clone()
    x2[1] = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    out, out2 = net(x), net(x2)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[1] - out[1]).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    net = make(8, channel_mults=(1, 2, 2)).train()
    out = net(inputs(2, 3, 8))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid_size=6, channel_mults=(1, 2, 4)), "divisible by 4"),
        (dict(grid_size=2, channel_mults=(1, 2, 4)), "halved 2 times"),
        (dict(base_channels=6), "groups"),
        (dict(out_channels=6), "groups"),
        (dict(in_channels=0), "in_channels, out_channels >= 1"),
        (dict(out_channels=0), "in_channels, out_channels >= 1"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(channel_mults=(1, 0)), "channel_mults"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, "grid_size": 8, **kwargs})


def test_config_round_trips_through_a_dict():
    cfg = UNetConfig(**{**SMALL, "grid_size": 8, "channel_mults": (1, 2, 4)})
    d = cfg.to_dict()
    assert d["channel_mults"] == [1, 2, 4]
    assert UNetConfig.from_dict(d) == cfg and UNetConfig.from_dict(d).channel_mults == (1, 2, 4)


def test_check_grid_size():
    check_grid_size(8, 4)  # 8 -> 4 -> 2 -> 1
    with pytest.raises(ValueError, match="divisible by 16"):
        check_grid_size(8, 5)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 4, 8, 8, 8), r"\(B, 3, Np, Np, Np\)"),  # wrong channels
        ((1, 3, 8, 8, 4), r"\(B, 3, Np, Np, Np\)"),  # not cubic
        ((3, 8, 8, 8), r"\(B, 3, Np, Np, Np\)"),  # no batch dim
        ((1, 3, 6, 6, 6), "divisible by 4"),  # grid not divisible for 3 levels
    ],
)
def test_invalid_inputs_error(shape, match):
    net = make(8, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))


def test_default_config_size():
    """The default condition U-Net (in 2, out 64, base 32, mults (1, 2)) is about 1M parameters."""
    n = sum(p.numel() for p in UNet3D(UNetConfig()).parameters())
    assert 0.7e6 < n < 1.3e6
