"""The conditional denoiser: the condition branch (image, feature prior, M -> U-Net) and the
per-point head, whose output at a grid point depends on that point's y_t and t only."""
import pytest
import torch

from models.denoiser import ConditionalDenoiser, DenoiserConfig, PointHead, sinusoidal_embedding
from models.diffusion_process import DiffusionConfig, PriorShiftedDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(num_classes=3, grid_size=4, feature_dim=12, encoder_channels=(4, 8), encoder_blocks=(1, 1), image_dim=8,
             prior_dim=4, cond_dim=16, unet_base=8, unet_mults=(1, 2), time_dim=8, groups=4)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(trained_film=True, trained_out=True, **kw):
    """A denoiser in eval mode; ``trained_film``: its FiLM layer (zero at initialisation, so
    the timestep has no effect yet) gets random weights, as after training; ``trained_out``:
    so does the last layer of the head (zero at initialisation: y0_hat = M until trained)."""
    torch.manual_seed(0)
    net = ConditionalDenoiser(DenoiserConfig(**{**SMALL, **kw})).eval()
    if trained_film:
        torch.nn.init.normal_(net.head.time_mlp[-1].weight, std=0.5)
    if trained_out:
        torch.nn.init.normal_(net.head.out.weight, std=0.5)
    return net


def inputs(B=2, C=3, N=4, scan_size=16, feature_dim=12, seed=1):
    g = gen(seed)
    scan = torch.randn(B, 1, scan_size, scan_size, scan_size, generator=g)
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=g), dim=1)
    F = torch.randn(B, feature_dim, generator=g)
    y_t = torch.randn(B, C, N, N, N, generator=g) + M
    t = torch.randint(0, 1000, (B, N, N, N), generator=g)
    return scan, M, F, y_t, t


# shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("B, C, N, scan_size", [(2, 3, 4, 16), (1, 2, 4, 24), (3, 3, 8, 16)])
def test_condition_and_output_shapes(B, C, N, scan_size):
    net = make(num_classes=C, grid_size=N)
    scan, M, F, y_t, t = inputs(B, C, N, scan_size)
    with torch.no_grad():
        cond = net.condition(scan, M, F)
        out = net(y_t, M, t, cond)
    assert cond.shape == (B, 16, N, N, N)
    assert out.shape == (B, C, N, N, N)
    assert torch.isfinite(out).all()


def test_sinusoidal_embedding():
    t = torch.tensor([[0, 3], [999, 10]])
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (2, 2, 8)
    torch.testing.assert_close(emb[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(emb[1, 0, 0], torch.sin(torch.tensor(999.0)))  # first frequency is 1
    torch.testing.assert_close(emb[..., :4] ** 2 + emb[..., 4:] ** 2, torch.ones(2, 2, 4))
    assert not torch.equal(emb[0, 1], emb[1, 1])


# locality of the head ----------------------------------------------------------------------


def perturbed_output_diff(net, which, point=(1, 2, 3)):
    """|out - out'| where ``which`` ('y_t', 't' or 'M') is changed at one grid point of sample 0."""
    scan, M, F, y_t, t = inputs()
    with torch.no_grad():
        cond = net.condition(scan, M, F)
        out = net(y_t, M, t, cond)
        y2, t2, M2 = y_t.clone(), t.clone(), M.clone()
        if which == "y_t":
            y2[(0, slice(None), *point)] += 2.0
        elif which == "t":
            t2[(0, *point)] = (t[(0, *point)] + 500) % 1000
        else:
            M2[(0, slice(None), *point)] = M[(0, slice(None), *point)].flip(0)
        out2 = net(y2, M2, t2, cond)
    return (out - out2).abs()


@pytest.mark.parametrize("which", ["y_t", "t", "M"])
def test_a_point_output_depends_on_its_own_inputs_only(which):
    net = make()
    diff = perturbed_output_diff(net, which)
    assert diff[0, :, 1, 2, 3].max() > 1e-4
    others = diff.clone()
    others[0, :, 1, 2, 3] = 0
    assert others.max() == 0  # exactly: no other point (nor the other sample) moves


def test_point_head_directly_is_pointwise():
    torch.manual_seed(0)
    head = PointHead(num_classes=2, width=8, time_dim=8, kernel=1)
    torch.nn.init.normal_(head.out.weight, std=0.5)  # as after training (zero at initialisation)
    g = gen(3)
    y_t, M = torch.randn(1, 2, 3, 3, 3, generator=g), torch.randn(1, 2, 3, 3, 3, generator=g)
    t, cond = torch.randint(0, 1000, (1, 3, 3, 3), generator=g), torch.randn(1, 8, 3, 3, 3, generator=g)
    with torch.no_grad():
        out = head(y_t, M, t, cond)
        cond2 = cond.clone()
        cond2[0, :, 0, 1, 2] += 1.0
        diff = (head(y_t, M, t, cond2) - out).abs()
    assert out.shape == (1, 2, 3, 3, 3)
    assert diff[0, :, 0, 1, 2].max() > 1e-4
    diff[0, :, 0, 1, 2] = 0
    assert diff.max() == 0


@pytest.mark.parametrize("which", ["y_t", "t"])
def test_head_kernel_3_leaks_to_neighbours(which):
    """The ablation's 3x3x3 head: a point's y_t (or t) reaches its neighbours' outputs."""
    net = make(head_kernel=3)
    diff = perturbed_output_diff(net, which)
    assert diff[0, :, 1, 2, 3].max() > 1e-4
    assert diff[0, :, 0, 2, 3].max() > 1e-5 and diff[0, :, 1, 1, 2].max() > 1e-5
    assert diff[1].max() == 0  # still no coupling across the batch


# condition branch ---------------------------------------------------------------------------


def condition_pair(net, change):
    scan, M, F, _, _ = inputs()
    scan2, F2 = scan.clone(), F.clone()
    if change == "scan":
        scan2[0] = torch.randn(scan.shape[1:], generator=gen(7))
    else:
        F2[0] = torch.randn(F.shape[1:], generator=gen(7))
    with torch.no_grad():
        return net.condition(scan, M, F), net.condition(scan2, M, F2)


@pytest.mark.parametrize("change, switch", [("scan", "use_image_encoder"), ("F", "use_feature_prior")])
def test_ablation_switches_remove_the_dependence(change, switch):
    a, b = condition_pair(make(), change)
    assert (a[0] - b[0]).abs().max() > 1e-4  # with the input, the condition depends on it
    torch.testing.assert_close(a[1], b[1])  # per sample (eval-mode BatchNorm, GroupNorm)
    a, b = condition_pair(make(**{switch: False}), change)
    assert torch.equal(a, b)


def test_condition_depends_on_the_guidance_map():
    net = make()
    scan, M, F, _, _ = inputs()
    with torch.no_grad():
        assert (net.condition(scan, M, F) - net.condition(scan, M.flip(1), F)).abs().max() > 1e-4


def test_condition_is_computed_once_and_reused_across_steps():
    """The condition does not depend on y_t or t: sampling with a closure over it is
    consistent with the process and gives the output shape."""
    net = make()
    scan, M, F, _, _ = inputs()
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=100, ddim_steps=3))
    calls = []

    def y0_model(y_t, t):
        calls.append(1)
        return net(y_t, M, t, cond)

    with torch.no_grad():
        cond = net.condition(scan, M, F)
        out = process.sample(y0_model, M, generator=gen(0))
    assert out.y0.shape == M.shape and len(calls) == 3


@pytest.mark.parametrize("kernel", [1, 3])
def test_one_timestep_per_row_equals_that_timestep_at_every_point(kernel):
    """Sampling hands the head t of shape (B,) (every point of a chain is at the same step),
    so the time MLP runs once per row: the output equals the per-point form's."""
    net = make(head_kernel=kernel)
    scan, M, F, y_t, _ = inputs()
    t = torch.tensor([3, 870])
    with torch.no_grad():
        cond = net.condition(scan, M, F)
        per_row = net(y_t, M, t, cond)
        per_point = net(y_t, M, t[:, None, None, None].expand(-1, *M.shape[2:]), cond)
    torch.testing.assert_close(per_row, per_point, rtol=1e-5, atol=1e-5)
    assert (per_row - net(y_t, M, t.flip(0), cond)).abs().max() > 1e-4  # the timestep still matters
    with pytest.raises(ValueError, match="do not match"):
        net(y_t, M, t[:1], cond)


def test_training_loss_backpropagates_into_every_branch():
    net = make().train()
    scan, M, F, _, _ = inputs()
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=100, ddim_steps=3))
    cond = net.condition(scan, M, F)
    loss = process.training_loss(lambda y_t, t: net(y_t, M, t, cond), M, torch.tensor([0, 2]), generator=gen(0))
    loss["loss"].backward()
    for name in ("image_encoder", "image_proj", "prior_proj", "unet", "head"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads), name


# validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        ("y_t", "do not match"),
        ("t_of_another_batch", "do not match"),
        ("cond_grid", "do not match"),
    ],
)
def test_forward_rejects_mismatched_shapes(change, match):
    net = make()
    scan, M, F, y_t, t = inputs()
    with torch.no_grad():
        cond = net.condition(scan, M, F)
    if change == "y_t":
        y_t = y_t[:, :2]
    elif change == "t_of_another_batch":
        t = t[:1]
    else:
        cond = cond[..., :2]
    with pytest.raises(ValueError, match=match):
        net(y_t, M, t, cond)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_kernel=2), "head_kernel must be 1 or 3"),
        (dict(num_classes=1), "num_classes >= 2"),
        (dict(time_dim=7), "even time_dim"),
        (dict(encoder_blocks=(1,)), "same non-zero length"),
        (dict(encoder_channels=(), encoder_blocks=()), "same non-zero length"),
        (dict(cond_dim=18), "groups"),
        (dict(unet_base=6), "groups"),
        (dict(grid_size=4, unet_mults=(1, 2, 2, 2)), "divisible by 8"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenoiserConfig(**{**SMALL, **kwargs})


def test_config_round_trips_and_derives_the_unet_config():
    cfg = DenoiserConfig(**SMALL)
    assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
    u = cfg.unet_config()
    assert u.in_channels == 3 + 8 + 4 and u.out_channels == 16 and u.grid_size == 4
    assert u.base_channels == 8 and u.channel_mults == (1, 2) and u.groups == 4


def test_default_config_size():
    """DenoiserConfig() is about 5.9M parameters: 1.7M image encoder, 4.0M U-Net, 0.1M head."""
    net = ConditionalDenoiser(DenoiserConfig())
    n = sum(p.numel() for p in net.parameters())
    assert 4.5e6 < n < 7.5e6
    head = sum(p.numel() for p in net.head.parameters())
    assert head < 0.05 * n  # the per-point head is small; the condition branch carries the capacity


# the FiLM of the head ------------------------------------------------------------------------


def test_film_starts_as_the_identity_and_its_scale_is_bounded():
    """Zero-initialised FiLM: at initialisation the timestep does not change the output; with
    huge FiLM weights the tanh-bounded scale keeps |h| within 2x its unmodulated value, so
    the output stays finite and moderate (an unbounded scale would grow with the weights)."""
    net = make(trained_film=False)
    scan, M, F, y_t, t = inputs(C=3)
    with torch.no_grad():
        cond = net.condition(scan, M, F)
        assert torch.equal(net(y_t, M, t, cond), net(y_t, M, (t + 400) % 1000, cond))
        base = net(y_t, M, t, cond).abs().max()
        film, E = net.head.time_mlp[-1], net.config.cond_dim  # rows: scale1, shift1, scale2, shift2
        torch.nn.init.normal_(film.weight[:E], std=1e4)  # huge scales, zero shifts
        torch.nn.init.normal_(film.weight[2 * E:3 * E], std=1e4)
        big = net(y_t, M, t, cond)
    assert torch.isfinite(big).all()
    assert big.abs().max() < 10 * base  # unbounded, h * (1 + s) would scale it by ~1e4 per layer


def test_the_unbounded_film_variant_is_the_earlier_head():
    """``film='unbounded'`` drops the tanh (the head before the float16 hardening); the field is
    part of the config, so neither variant's checkpoint loads as the other."""
    bounded, unbounded = make(), make(film="unbounded")
    unbounded.load_state_dict(bounded.state_dict())
    scan, M, F, y_t, t = inputs(C=3)
    with torch.no_grad():
        cond = bounded.condition(scan, M, F)
        assert not torch.allclose(bounded(y_t, M, t, cond), unbounded(y_t, M, t, cond))
    assert bounded.config.to_dict()["film"] == "bounded"
    with pytest.raises(ValueError, match="film"):
        DenoiserConfig(**{**SMALL, "film": "wide"})


# starting from the prior ---------------------------------------------------------------------


def test_an_untrained_residual_head_returns_its_prior_and_learns_a_correction_from_there():
    net = make(trained_film=False, trained_out=False).train()
    scan, M, F, y_t, t = inputs()
    cond = net.condition(scan, M, F)
    torch.testing.assert_close(net(y_t, M, t, cond), M)  # y0_hat = M + 0, whatever y_t, t, scan
    target = torch.zeros_like(M)
    target[:, 0] = 1.0
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        loss = (net(y_t, M, t, net.condition(scan, M, F)) - target).pow(2).mean()
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first  # the zero-initialised correction does receive gradient
    direct = make(trained_film=False, trained_out=False, prior_residual=False)
    with torch.no_grad():
        assert not torch.allclose(direct(y_t, M, t, direct.condition(scan, M, F)), M, atol=1e-3)


def test_a_trained_correction_switched_off_returns_the_prior_exactly():
    net = make().eval()  # a trained-like head: its correction is not zero
    scan, M, F, y_t, t = inputs()
    with torch.no_grad():
        cond = net.condition(scan, M, F)
        assert not torch.allclose(net(y_t, M, t, cond), M, atol=1e-3)
        net.head.switch_off_correction()
        torch.testing.assert_close(net(y_t, M, t, cond), M)
    direct = make(prior_residual=False)
    with pytest.raises(ValueError, match="no correction to switch off"):
        direct.head.switch_off_correction()
