"""The prior-shifted process against closed forms and the z = y - M oracle (standard DDPM/DDIM).

Oracles here are written independently of the module: the schedule (with the zero-terminal-SNR
rescale of Lin et al. 2024) in float64 numpy, the DDIM step of Song et al. (eq. 12) on
``z = y - M`` in its usual (z0, eps) form, the DDPM step as the Gaussian posterior
q(z_{t-1} | z_t, z_0) in closed form, and random draws replayed from a seeded generator.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.diffusion_process import (
    DiffusionConfig,
    PriorShiftedDiffusion,
    extract,
    inference_timesteps,
    linear_alphas_cumprod,
    one_hot_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


def gen(seed):
    return torch.Generator().manual_seed(seed)


def schedule64(T=T, beta_start=1e-4, beta_end=0.02, zero_terminal_snr=True):
    """abar_t (T,) float64, numpy; the ZTSNR rescale: sqrt(abar) shifted to end at 0, scaled to keep abar_0."""
    abar = np.cumprod(1.0 - np.linspace(beta_start, beta_end, T, dtype=np.float64))
    if zero_terminal_snr:
        s = np.sqrt(abar)
        abar = ((s - s[-1]) / (s[0] - s[-1]) * s[0]) ** 2
    return abar


def abar_at(abar, s):
    """abar_s with abar_{-1} = 1, elementwise for arrays."""
    s = np.asarray(s)
    return np.where(s < 0, 1.0, abar[np.maximum(s, 0)])


@pytest.fixture(scope="module")
def process():
    return PriorShiftedDiffusion(DiffusionConfig())


def grid_tensors(B=2, C=3, N=4, seed=0):
    g = gen(seed)
    y0 = one_hot_grid(torch.randint(0, C, (B,), generator=g), C, (N, N, N))
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=g), dim=1)
    return y0, M, g


# schedule -----------------------------------------------------------------------------


def test_zero_terminal_snr_schedule_matches_oracle_and_ends_at_zero(process):
    abar = process.alphas_cumprod
    assert abar.shape == (T,)
    assert (abar[1:] < abar[:-1]).all()  # strictly decreasing
    assert abar[-1].item() == 0.0  # exactly no signal left at T-1
    assert abar[-2].item() > 0.0
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)  # ~ 1 - beta_start
    np.testing.assert_allclose(linear_alphas_cumprod(DiffusionConfig()).numpy(), schedule64(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(abar.double().numpy(), schedule64(), rtol=1e-5, atol=1e-9)
    # the helper buffers are consistent with abar
    torch.testing.assert_close(process.sqrt_alphas_cumprod ** 2, abar, atol=1e-6, rtol=0)
    torch.testing.assert_close(process.sqrt_one_minus_alphas_cumprod ** 2, 1 - abar, atol=1e-6, rtol=0)
    assert process.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(process.alphas_cumprod_prev[1:], abar[:-1])


def test_schedule_without_zero_terminal_snr_keeps_signal_at_the_end():
    cfg = DiffusionConfig(zero_terminal_snr=False, parameterization="eps")
    abar = PriorShiftedDiffusion(cfg).alphas_cumprod
    assert (abar[1:] < abar[:-1]).all()
    assert abar[-1].item() > 0.0
    np.testing.assert_allclose(abar.double().numpy(), schedule64(zero_terminal_snr=False), rtol=1e-5, atol=1e-10)
    # plain linear: 1 - beta_start exactly at t=0, and the ZTSNR rescale keeps abar_0
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)


def test_process_state_dict_is_empty(process):
    assert process.state_dict() == {}
    assert dict(process.named_buffers())  # the schedule buffers exist, they are just not persistent


# inference timesteps ------------------------------------------------------------------


@pytest.mark.parametrize(
    "T_, n, spacing, expected",
    [
        (1000, 10, "trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        (1000, 5, "trailing", [999, 799, 599, 399, 199]),
        (1000, 3, "trailing", [999, 666, 332]),
        (1000, 1, "trailing", [999]),
        (1000, 5, "linspace", [999, 749, 500, 250, 0]),
        (100, 8, "linspace", [99, 85, 71, 57, 42, 28, 14, 0]),
        (50, 50, "trailing", list(range(49, -1, -1))),
        (50, 50, "linspace", list(range(49, -1, -1))),
    ],
)
def test_inference_timesteps_exact(T_, n, spacing, expected):
    ts = inference_timesteps(T_, n, spacing)
    assert ts.dtype == torch.long
    assert ts.tolist() == expected
    assert ts[0].item() == T_ - 1  # both spacings start where the chain ends


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_inference_timesteps_steps_out_of_range(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        inference_timesteps(1000, steps)


def test_inference_timesteps_unknown_spacing():
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(1000, 10, "leading")


# helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t_shape, x_shape, expected",
    [
        ((3,), (3, 2, 4, 4, 4), (3, 1, 1, 1, 1)),
        ((3, 4, 4, 4), (3, 2, 4, 4, 4), (3, 1, 4, 4, 4)),
        ((3,), (3, 2), (3, 1)),
        ((3, 5), (3, 2, 5), (3, 1, 5)),
    ],
)
def test_extract_is_rank_agnostic(t_shape, x_shape, expected):
    a = torch.arange(10.0)
    t = torch.randint(0, 10, t_shape, generator=gen(0))
    out = extract(a, t, x_shape)
    assert out.shape == expected
    torch.testing.assert_close(out.reshape(t_shape), t.float())


def test_extract_rejects_mismatched_per_point_timesteps():
    with pytest.raises(ValueError, match="per-point"):
        extract(torch.arange(10.0), torch.zeros(3, 4, 4, 2, dtype=torch.long), (3, 2, 4, 4, 4))


def test_one_hot_grid_broadcasts_labels_over_the_grid():
    y = one_hot_grid(torch.tensor([2, 0]), 3, (2, 3, 1))
    assert y.shape == (2, 3, 2, 3, 1) and y.dtype == torch.float32
    assert (y[0, 2] == 1).all() and (y[0, :2] == 0).all()
    assert (y[1, 0] == 1).all() and (y[1, 1:] == 0).all()


@pytest.mark.parametrize("bad_t", [-1, T])
def test_out_of_range_timesteps_error(process, bad_t):
    y0, M, _ = grid_tensors()
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        process.add_noise(y0, M, torch.zeros_like(M), bad_t)


# forward process ----------------------------------------------------------------------


def test_q_sample_at_t0_is_y0_up_to_first_beta(process):
    y0, M, g = grid_tensors(B=4, C=5, N=8)
    eps = torch.randn(y0.shape, generator=g)
    y_t = process.add_noise(y0, M, eps, 0)
    beta1 = 1e-4
    bound = (1 - np.sqrt(1 - beta1)) * (M - y0).abs() + np.sqrt(beta1) * eps.abs()  # elementwise
    assert ((y_t - y0).abs() <= bound + 1e-6).all()
    assert (y_t - y0).abs().max() < 6 * np.sqrt(beta1)
    assert (y_t - y0).abs().max() > 0  # but it is noised


def test_q_sample_at_last_step_is_exactly_prior_plus_noise_with_ztsnr(process):
    y0, M, g = grid_tensors(B=3, C=4, N=4)
    eps = torch.randn(y0.shape, generator=g)
    assert torch.equal(process.add_noise(y0, M, eps, T - 1), M + eps)
    # without ZTSNR the label still shows through at T-1
    p = PriorShiftedDiffusion(DiffusionConfig(zero_terminal_snr=False, parameterization="eps"))
    assert (p.add_noise(y0, M, eps, T - 1) - (M + eps)).abs().max() > 1e-4


def test_q_sample_matches_closed_form_with_per_point_t(process):
    y0, M, g = grid_tensors()
    eps = torch.randn(y0.shape, generator=g)
    t = torch.randint(0, T, (2, 4, 4, 4), generator=g)
    a = torch.from_numpy(schedule64()[t.numpy()]).unsqueeze(1)  # (B, 1, *grid) float64
    expected = a.sqrt() * y0.double() + (1 - a.sqrt()) * M.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(process.add_noise(y0, M, eps, t).double(), expected, atol=1e-5, rtol=0)
    # a per-point t really is per point: broadcasting one point's t would give something else
    t_uniform = t[:, :1, :1, :1].expand_as(t)
    assert (process.add_noise(y0, M, eps, t) - process.add_noise(y0, M, eps, t_uniform)).abs().max() > 1e-3


def test_eps_from_y0_inverts_add_noise_with_per_point_t(process):
    y0, M, g = grid_tensors()
    eps = torch.randn(y0.shape, generator=g)
    t = torch.randint(0, T, (2, 4, 4, 4), generator=g)
    t[0, 0, 0, 0], t[1, 0, 0, 0] = 0, T - 1
    y_t = process.add_noise(y0, M, eps, t)
    torch.testing.assert_close(process.eps_from_y0(y_t, M, y0, t), eps, atol=2e-3, rtol=0)
    # and with a scalar t
    y_t = process.add_noise(y0, M, eps, 500)
    torch.testing.assert_close(process.eps_from_y0(y_t, M, y0, 500), eps, atol=1e-4, rtol=0)


def test_to_y0_is_identity_for_y0_and_inverts_add_noise_for_eps(process):
    y0, M, g = grid_tensors()
    eps = torch.randn(y0.shape, generator=g)
    t = torch.randint(0, T, (2, 4, 4, 4), generator=g)
    out = torch.randn(y0.shape, generator=g)
    assert torch.equal(process.to_y0(out, torch.zeros_like(out), M, t), out)
    p = PriorShiftedDiffusion(DiffusionConfig(zero_terminal_snr=False, parameterization="eps"))
    t = t.clamp(max=800)  # where some signal is left, so the division by sqrt(abar) stays accurate
    y_t = p.add_noise(y0, M, eps, t)
    torch.testing.assert_close(p.to_y0(eps, y_t, M, t), y0, atol=2e-3, rtol=0)


# reverse steps --------------------------------------------------------------------------


def ddim_oracle_z(z_t, z0, t, s, eta, noise, abar):
    """Standard DDIM step (Song et al. 2021, eq. 12 and 16) on z, float64."""
    a_t, a_s = abar_at(abar, t), abar_at(abar, s)
    eps_hat = (z_t - np.sqrt(a_t) * z0) / np.sqrt(1 - a_t)
    sigma = eta * np.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    return np.sqrt(a_s) * z0 + np.sqrt(np.maximum(1 - a_s - sigma ** 2, 0)) * eps_hat + sigma * noise


@pytest.mark.parametrize(
    "t, s, eta",
    [(999, 899, 0.0), (999, 899, 1.0), (999, -1, 0.0), (500, 200, 0.5), (300, 299, 1.0), (99, -1, 0.0),
     (99, -1, 1.0), (1, 0, 1.0), (0, -1, 0.3)],
)
def test_ddim_step_equals_standard_ddim_on_z(process, t, s, eta):
    y0, M, g = grid_tensors(B=2, C=3, N=4)
    y_t = torch.randn(M.shape, generator=g) + M
    y0_hat = torch.randn(M.shape, generator=g)
    y_s = process.ddim_step(y0_hat, t, s, y_t, M, eta=eta, generator=gen(11))
    noise = torch.randn(M.shape, generator=gen(11)).double().numpy()
    Md = M.double().numpy()
    z_s = ddim_oracle_z(y_t.double().numpy() - Md, y0_hat.double().numpy() - Md, t, s, eta, noise, schedule64())
    # float32 module vs float64 oracle: 1 - abar_t is ~3e-4 at t=1, so allow 1e-3
    np.testing.assert_allclose(y_s.double().numpy(), z_s + Md, atol=1e-3)
    if s == -1:  # the final step lands on y0_hat
        torch.testing.assert_close(y_s, y0_hat)


def test_ddim_step_with_per_point_t_and_s_equals_oracle(process):
    y0, M, g = grid_tensors(B=2, C=3, N=4)
    y_t = torch.randn(M.shape, generator=g) + M
    y0_hat = torch.randn(M.shape, generator=g)
    t = torch.randint(1, T, (2, 4, 4, 4), generator=g)
    t[0, 0, 0, 0] = T - 1
    s = (t * 0.6).long() - 1  # in [-1, t)
    y_s = process.ddim_step(y0_hat, t, s, y_t, M, eta=0.7, generator=gen(3))
    noise = torch.randn(M.shape, generator=gen(3)).double().numpy()
    Md = M.double().numpy()
    tt, ss = t.unsqueeze(1).numpy(), s.unsqueeze(1).numpy()
    z_s = ddim_oracle_z(y_t.double().numpy() - Md, y0_hat.double().numpy() - Md, tt, ss, 0.7, noise, schedule64())
    np.testing.assert_allclose(y_s.double().numpy(), z_s + Md, atol=5e-4)


@pytest.mark.parametrize("t", [T - 1, 500, 1, 0])
def test_ddim_eta1_single_step_is_the_ddpm_posterior(process, t):
    """q(z_{t-1} | z_t, z_0) = N(c0 z_0 + ct z_t, var) with alpha_t = abar_t / abar_{t-1}."""
    abar = schedule64()
    a, a_prev = abar[t], abar_at(abar, t - 1)
    alpha = a / a_prev
    beta = 1 - alpha
    c0 = np.sqrt(a_prev) * beta / (1 - a)
    ct = np.sqrt(alpha) * (1 - a_prev) / (1 - a)
    var = (1 - a_prev) / (1 - a) * beta
    y0, M, g = grid_tensors(B=2, C=3, N=2)
    y_t = torch.randn(M.shape, generator=g) + M
    y0_hat = torch.randn(M.shape, generator=g)
    y_prev = process.ddim_step(y0_hat, t, t - 1, y_t, M, eta=1.0, generator=gen(5))
    noise = torch.randn(M.shape, generator=gen(5)).double()
    Md = M.double()
    expected = Md + c0 * (y0_hat.double() - Md) + ct * (y_t.double() - Md) + np.sqrt(var) * noise
    torch.testing.assert_close(y_prev.double(), expected, atol=1e-3, rtol=0)  # float32 near t=0
    if t == 0:
        assert var == 0
        torch.testing.assert_close(y_prev, y0_hat)


def test_ddim_eta0_is_deterministic(process):
    y0, M, g = grid_tensors()
    y_t, y0_hat = torch.randn(M.shape, generator=g), torch.randn(M.shape, generator=g)
    a = process.ddim_step(y0_hat, 999, 899, y_t, M, eta=0.0, generator=gen(1))
    b = process.ddim_step(y0_hat, 999, 899, y_t, M, eta=0.0, generator=gen(2))
    c = process.ddim_step(y0_hat, 999, 899, y_t, M, eta=1.0, generator=gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("t, s", [(500, 500), (500, 600), (500, -2)])
def test_ddim_step_rejects_s_not_below_t(process, t, s):
    y0, M, _ = grid_tensors()
    with pytest.raises(ValueError, match="-1 <= s < t"):
        process.ddim_step(M, t, s, M, M)


# sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 10, 0.0), ("ddim", 3, 0.0), ("ddim", 1, 0.0),
                                                 ("ddim", 7, 1.0), ("ddpm", None, None)])
def test_perfect_denoiser_recovers_y0_exactly_even_against_a_wrong_prior(process, sampler, steps, eta):
    labels = torch.tensor([1, 0, 4])
    y0 = one_hot_grid(labels, 5, (2, 2, 2))
    M = one_hot_grid(torch.tensor([0, 3, 2]), 5, (2, 2, 2)) * 0.6 + 0.08  # confidently wrong prior
    for seed in (0, 1):  # any start
        out = process.sample(lambda y_t, t: y0, M, steps=steps, sampler=sampler, eta=eta, generator=gen(seed),
                             return_trajectory=True)
        assert torch.equal(out.y0, y0)
        # the chain started at the (wrong) prior plus unit noise
        torch.testing.assert_close(out.trajectory[0], M + torch.randn(M.shape, generator=gen(seed)))
    n = steps or T
    assert out.trajectory.shape == (n + 1, 3, 5, 2, 2, 2)
    assert torch.equal(out.trajectory[-1], out.y0)
    assert out.timesteps.tolist() == (inference_timesteps(T, steps).tolist() if sampler == "ddim"
                                      else list(range(T - 1, -1, -1)))


def snapshot(module):
    """Deep copy of the module's attributes (buffers cloned) to compare before / after a call."""
    return copy.deepcopy(vars(module))


def assert_same_attributes(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key == "_buffers":
            assert before[key].keys() == after[key].keys()
            for name in before[key]:
                assert torch.equal(before[key][name], after[key][name]), name
        else:
            assert before[key] == after[key], key


def test_sample_is_stateless_and_returns_the_timesteps_it_used():
    p = PriorShiftedDiffusion(DiffusionConfig(ddim_steps=4))
    y0, M, _ = grid_tensors(B=2, C=3, N=2)
    seen = []

    def recorder(y_t, t):
        assert t.shape == (2,)  # one timestep per chain: the same at every point while sampling
        assert (t == t[0]).all()
        seen.append(int(t.flatten()[0]))
        return 0.5 * y_t

    before = snapshot(p)
    out5 = p.sample(recorder, M, steps=5, generator=gen(0))
    assert out5.timesteps.tolist() == inference_timesteps(T, 5).tolist() == seen
    assert out5.trajectory is None
    seen.clear()
    out_default = p.sample(recorder, M, generator=gen(0))
    assert out_default.timesteps.tolist() == [999, 749, 499, 249] == seen  # config.ddim_steps, unchanged by steps=5
    assert_same_attributes(before, snapshot(p))
    assert p.state_dict() == {}
    assert p.config == DiffusionConfig(ddim_steps=4)
    # no hidden state: calls in any order give the same result
    again = p.sample(recorder, M, steps=5, generator=gen(0))
    assert torch.equal(again.y0, out5.y0)


def test_sample_is_reproducible_from_the_generator(process):
    y0, M, _ = grid_tensors(B=2, C=3, N=4)
    den = lambda y_t, t: 0.3 * (y_t - M) + M  # noqa: E731  an imperfect denoiser: samples disagree
    for kw in (dict(steps=5, eta=0.0), dict(steps=5, eta=1.0)):
        a = process.sample(den, M, generator=gen(1), return_trajectory=True, **kw)
        b = process.sample(den, M, generator=gen(1), return_trajectory=True, **kw)
        c = process.sample(den, M, generator=gen(2), return_trajectory=True, **kw)
        assert torch.equal(a.y0, b.y0) and torch.equal(a.trajectory, b.trajectory)
        assert not torch.equal(a.y0, c.y0)
        assert a.trajectory.shape == (6, 2, 3, 4, 4, 4)


def test_ddpm_sampler_is_ddim_with_every_step_and_eta1():
    p = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=50, ddim_steps=10))
    y0, M, _ = grid_tensors(B=2, C=3, N=2)
    den = lambda y_t, t: 0.5 * y_t + 0.01 * per_point(t, y_t).unsqueeze(1)  # noqa: E731
    ddpm = p.sample(den, M, sampler="ddpm", generator=gen(4))
    ddim = p.sample(den, M, sampler="ddim", steps=50, eta=1.0, generator=gen(4))
    assert ddpm.timesteps.tolist() == ddim.timesteps.tolist() == list(range(49, -1, -1))
    assert torch.equal(ddpm.y0, ddim.y0)


def test_sampler_argument_errors(process):
    y0, M, _ = grid_tensors()
    with pytest.raises(ValueError, match="DDPM sampler runs all 1000"):
        process.sample(lambda y, t: y, M, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="sampler"):
        process.sample(lambda y, t: y, M, sampler="euler")
    with pytest.raises(ValueError, match="steps must be in"):
        process.sample(lambda y, t: y, M, steps=1001)


def per_point(t, y):
    """A y0 model's timestep (B,) while sampling (one step for the whole chain) or (B, *grid)
    in training, as (B, *grid)."""
    return t.view(-1, *[1] * (y.dim() - 2)).expand(y.shape[0], *y.shape[2:]) if t.dim() == 1 else t


def gaussian_posterior_mean(mu0, s0, abar):
    """Exact y0 predictor E[y0 | y_t] when y0 ~ N(mu0, s0^2) (prior-shifted, any M)."""
    abar_t = torch.from_numpy(abar).float()

    def denoiser(M):
        def y0_model(y_t, t):
            a = abar_t[per_point(t, y_t)].unsqueeze(1)
            m = mu0 - M
            return M + m + a.sqrt() * s0 ** 2 / (a * s0 ** 2 + 1 - a) * (y_t - M - a.sqrt() * m)

        return y0_model

    return denoiser


def test_ddpm_and_full_ddim_reach_the_data_distribution():
    """With the exact posterior mean as y0 predictor, both chains land on N(mu0, s0^2) (up to
    the discretisation of a 200-step chain, which shrinks the spread by ~1%)."""
    cfg = DiffusionConfig(num_timesteps=200, beta_start=1e-4, beta_end=0.05, ddim_steps=200)
    p = PriorShiftedDiffusion(cfg)
    abar = schedule64(200, 1e-4, 0.05)
    mu0, s0 = 1.5, 0.5
    M = torch.full((8, 1, 10, 10, 10), 0.2)  # 8000 independent scalars, prior far from the data
    den = gaussian_posterior_mean(mu0, s0, abar)(M)
    ddpm = p.sample(den, M, sampler="ddpm", generator=gen(0)).y0
    ddim = p.sample(den, M, sampler="ddim", eta=0.0, generator=gen(1)).y0
    for y in (ddpm, ddim):
        assert abs(y.mean().item() - mu0) < 0.02 and abs(y.std().item() - s0) < 0.015


def test_zero_terminal_snr_start_matches_the_chain_end_and_removes_the_bias():
    """y_T = M + N(0, I) is the chain's end only with ZTSNR; without it a short schedule that
    leaves signal at T-1 biases the samples towards the prior M."""
    mu0, s0 = 1.5, 0.5
    M = torch.full((8, 1, 10, 10, 10), 0.2)
    means = {}
    for ztsnr in (True, False):
        cfg = DiffusionConfig(num_timesteps=50, beta_start=1e-3, beta_end=0.2, ddim_steps=50, zero_terminal_snr=ztsnr,
                              parameterization="y0")
        den = gaussian_posterior_mean(mu0, s0, schedule64(50, 1e-3, 0.2, ztsnr))(M)
        means[ztsnr] = PriorShiftedDiffusion(cfg).sample(den, M, eta=0.0, generator=gen(0)).y0.mean().item()
    assert abs(means[True] - mu0) < 0.015
    assert mu0 - means[False] > 0.03


# training loss --------------------------------------------------------------------------


def record(fn):
    seen = {}

    def y0_model(y_t, t):
        seen.update(y_t=y_t.clone(), t=t.clone())
        return fn(y_t, t)

    return y0_model, seen


def replay(seed, B, C, grid, T_=T, antithetic=True):
    """The timesteps and noise training_loss draws from gen(seed): timesteps first, then eps."""
    g = gen(seed)
    if antithetic and B >= 2:
        half = torch.randint(0, T_, ((B + 1) // 2, *grid), generator=g)
        t = torch.cat([half, T_ - 1 - half])[:B]
    else:
        t = torch.randint(0, T_, (B, *grid), generator=g)
    return t, torch.randn((B, C, *grid), generator=g)


@pytest.mark.parametrize("B", [4, 3])
def test_training_uses_per_point_antithetic_timesteps(process, B):
    C, N = 3, 4
    labels = torch.arange(B) % C
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=gen(5)), dim=1)
    y0_model, seen = record(lambda y_t, t: torch.zeros_like(y_t))
    process.training_loss(y0_model, M, labels, generator=gen(1))
    t = seen["t"]
    assert t.shape == (B, N, N, N) and t.dtype == torch.long
    assert all(len(t[b].unique()) > 10 for b in range(B))  # a different t per grid point
    assert t.min() >= 0 and t.max() <= T - 1
    half = (B + 1) // 2
    assert ((t[:B - half] + t[half:]) == T - 1).all()  # antithetic pairs: t and T-1-t
    # the noisy input is q_sample with each point's own t
    t_ref, eps = replay(1, B, C, (N, N, N))
    assert torch.equal(t, t_ref)
    y0 = one_hot_grid(labels, C, (N, N, N))
    torch.testing.assert_close(seen["y_t"], process.add_noise(y0, M, eps, t))


def test_training_without_antithetic_draws_independent_timesteps():
    p = PriorShiftedDiffusion(DiffusionConfig(antithetic=False))
    M = torch.softmax(torch.randn(4, 2, 4, 4, 4, generator=gen(5)), dim=1)
    y0_model, seen = record(lambda y_t, t: torch.zeros_like(y_t))
    p.training_loss(y0_model, M, torch.tensor([0, 1, 0, 1]), generator=gen(1))
    t = seen["t"]
    assert not ((t[:2] + t[2:]) == T - 1).all()
    assert torch.equal(t, replay(1, 4, 2, (4, 4, 4), antithetic=False)[0])


def test_loss_decomposes_into_mse_plus_weighted_ce():
    p = PriorShiftedDiffusion(DiffusionConfig(ce_weight=0.3))
    B, C, N = 3, 4, 2
    labels = torch.tensor([3, 0, 1])
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=gen(2)), dim=1)
    y0_model, seen = record(lambda y_t, t: 0.7 * y_t - 0.001 * t.unsqueeze(1))
    out = p.training_loss(y0_model, M, labels, generator=gen(3))
    y0_hat = 0.7 * seen["y_t"] - 0.001 * seen["t"].unsqueeze(1)
    y0 = one_hot_grid(labels, C, (N, N, N))
    mse = ((y0_hat - y0) ** 2).mean()
    logp = torch.log_softmax(y0_hat, dim=1)  # per-point logits
    ce = -logp.gather(1, labels.view(B, 1, 1, 1, 1).expand(B, 1, N, N, N)).mean()
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], mse + 0.3 * ce)


def test_perfect_y0_model_has_zero_mse(process):
    B, C, N = 2, 3, 4
    labels = torch.tensor([2, 0])
    y0 = one_hot_grid(labels, C, (N, N, N))
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=gen(2)), dim=1)
    out = process.training_loss(lambda y_t, t: y0, M, labels, generator=gen(0))
    assert out["mse"].item() == 0.0
    # CE of one-hot logits on the right class: log(e + C - 1) - 1
    assert out["ce"].item() == pytest.approx(math.log(math.e + C - 1) - 1, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.1 * out["ce"].item(), rel=1e-6)
    # an eps output is wrong under the y0 parameterization
    assert process.training_loss(lambda y_t, t: y_t - M, M, labels, generator=gen(0))["mse"].item() > 0.1


def test_training_loss_backpropagates_to_the_model(process):
    w = torch.tensor(0.5, requires_grad=True)
    M = torch.softmax(torch.randn(2, 2, 2, 2, 2, generator=gen(2)), dim=1)
    out = process.training_loss(lambda y_t, t: w * y_t, M, torch.tensor([0, 1]), generator=gen(0))
    out["loss"].backward()
    assert w.grad is not None and w.grad.abs() > 0


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 1]), torch.tensor([[0], [1]]), torch.tensor(0)])
def test_training_loss_rejects_bad_label_shape(process, labels):
    M = torch.zeros(2, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        process.training_loss(lambda y_t, t: y_t, M, labels)


def test_eps_parameterization_targets_the_noise():
    p = PriorShiftedDiffusion(DiffusionConfig(zero_terminal_snr=False, parameterization="eps", ce_weight=0.2))
    B, C, N = 4, 3, 2
    labels = torch.tensor([0, 2, 1, 2])
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=gen(2)), dim=1)
    t, eps = replay(7, B, C, (N, N, N))
    y0_model, seen = record(lambda y_t, t_: eps)  # the true noise, replayed from the generator
    out = p.training_loss(y0_model, M, labels, generator=gen(7))
    assert torch.equal(seen["t"], t)
    assert out["mse"].item() == 0.0
    # the CE is on the reconstructed y0_hat (= y0 up to the division by sqrt(abar_t)); with large
    # t the reconstruction is noisy, so only check it is the CE of to_y0 of the output
    y0_hat = p.to_y0(eps, seen["y_t"], M, t)
    ce = F.cross_entropy(y0_hat, labels.view(B, 1, 1, 1).expand(B, N, N, N))
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], 0.2 * ce)
    # a model returning the true y0 is now wrong
    y0 = one_hot_grid(labels, C, (N, N, N))
    wrong = p.training_loss(lambda y_t, t_: y0, M, labels, generator=gen(7))
    torch.testing.assert_close(wrong["mse"], ((y0 - eps) ** 2).mean())


def test_eps_parameterization_sampling_with_the_true_noise_recovers_y0():
    p = PriorShiftedDiffusion(DiffusionConfig(zero_terminal_snr=False, parameterization="eps"))
    y0 = one_hot_grid(torch.tensor([1, 0]), 2, (2, 2, 2))
    M = torch.full_like(y0, 0.5)
    out = p.sample(lambda y_t, t: p.eps_from_y0(y_t, M, y0, t), M, steps=10, generator=gen(0))
    torch.testing.assert_close(out.y0, y0, atol=1e-3, rtol=0)


# config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_timesteps=1), "num_timesteps must be >= 2"),
        (dict(beta_start=0.02, beta_end=1e-4), "beta_start < beta_end"),
        (dict(beta_start=0.0), "beta_start < beta_end"),
        (dict(beta_end=1.0), "beta_start < beta_end"),
        (dict(ddim_steps=0), "ddim_steps"),
        (dict(ddim_steps=1001), r"ddim_steps must be in \[1, 1000\]"),
        (dict(eta=-0.1), "eta >= 0"),
        (dict(ce_weight=-1.0), "ce_weight >= 0"),
        (dict(num_samples=0), "num_samples"),
        (dict(sampler="euler"), "sampler"),
        (dict(timestep_spacing="leading"), "timestep_spacing"),
        (dict(parameterization="v"), "parameterization"),
        (dict(parameterization="eps"), "zero_terminal_snr=False"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = DiffusionConfig(num_timesteps=50, ddim_steps=5, eta=0.5, sampler="ddpm")
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        DiffusionConfig.from_dict({**cfg.to_dict(), "prob_from": "logits"})
