"""The prior-shifted process against closed forms and the z = y - M oracle (standard DDPM/DDIM).

Oracles here are written independently of the module: schedules in float64 numpy, the DDPM
step in Ho et al.'s epsilon form (eq. 11) rather than the posterior form the module uses.
"""
import numpy as np
import pytest
import torch

from models.diffusion_process import DiffusionConfig, PriorShiftedDiffusion, extract, one_hot_grid


def gen(seed):
    return torch.Generator().manual_seed(seed)


def schedule64(T=500, beta_start=1e-4, beta_end=0.02):
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def abar_at(abar, s):
    return 1.0 if s < 0 else abar[s]


@pytest.fixture(scope="module")
def process():
    return PriorShiftedDiffusion(DiffusionConfig())


def grid_tensors(B=2, C=3, N=4, seed=0):
    g = gen(seed)
    y0 = one_hot_grid(torch.randint(0, C, (B,), generator=g), C, N)
    M = torch.softmax(torch.randn(B, C, N, N, N, generator=g), dim=1)
    return y0, M, g


# timesteps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T, n, spacing, expected",
    [
        (500, 10, "trailing", [499, 449, 399, 349, 299, 249, 199, 149, 99, 49]),
        (1000, 5, "trailing", [999, 799, 599, 399, 199]),
        (500, 3, "trailing", [499, 332, 166]),
        (500, 5, "linspace", [499, 374, 250, 125, 0]),
        (50, 50, "trailing", list(range(49, -1, -1))),
    ],
)
def test_set_timesteps_exact(T, n, spacing, expected):
    p = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=T, ddim_steps=min(10, T)))
    p.set_timesteps(n, spacing=spacing)
    assert p.timesteps.tolist() == expected
    assert p.timesteps.dtype == torch.long


def test_leading_spacing_refused_because_start_noise_would_not_match():
    with pytest.raises(ValueError, match="spacing"):
        PriorShiftedDiffusion(DiffusionConfig()).set_timesteps(10, spacing="leading")


def test_step_and_ddim_sample_before_set_timesteps_say_what_to_do():
    p = PriorShiftedDiffusion(DiffusionConfig())
    y0, M, _ = grid_tensors()
    with pytest.raises(RuntimeError, match=r"set_timesteps"):
        p.step(torch.zeros_like(M), 499, M, M)
    with pytest.raises(RuntimeError, match=r"set_timesteps.*steps="):
        p.sample(lambda y, m, t, f: torch.zeros_like(y), M, torch.zeros(2, 4), sampler="ddim")
    with pytest.raises(ValueError, match="DDPM sampler runs all 500"):
        p.sample(lambda y, m, t, f: torch.zeros_like(y), M, torch.zeros(2, 4), sampler="ddpm", steps=10)


@pytest.mark.parametrize("bad_t", [-1, 500])
def test_out_of_range_timesteps_error(process, bad_t):
    y0, M, _ = grid_tensors()
    with pytest.raises(ValueError, match=r"\[0, 499\]"):
        process.add_noise(y0, M, torch.zeros_like(M), bad_t)


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


# forward process ----------------------------------------------------------------------


def test_q_sample_at_t0_is_y0_up_to_first_beta(process):
    y0, M, g = grid_tensors(B=4, C=5, N=8)
    eps = torch.randn(y0.shape, generator=g)
    y_t = process.add_noise(y0, M, eps, 0)
    beta1 = 1e-4
    bound = (1 - np.sqrt(1 - beta1)) * (M - y0).abs() + np.sqrt(beta1) * eps.abs()  # elementwise
    assert ((y_t - y0).abs() <= bound + 1e-6).all()
    assert (y_t - y0).abs().max() < 6 * np.sqrt(beta1)


def test_q_sample_at_last_step_is_prior_plus_unit_noise(process):
    y0, M, g = grid_tensors(B=4, C=2, N=16)  # 32768 draws
    _, abar = schedule64()
    y_t = process.add_noise(y0, M, torch.randn(y0.shape, generator=g), 499)
    resid = y_t - M  # = sqrt(abar_T)(y0 - M) + sqrt(1 - abar_T) eps
    assert abs(resid.std().item() - 1.0) < 0.02
    centred = resid - np.sqrt(abar[-1]) * (y0 - M)
    assert abs(centred.mean().item()) < 0.02
    assert np.sqrt(abar[-1]) < 0.1  # the chain really ends near N(M, I)


def test_predict_y0_inverts_add_noise_with_per_point_t(process):
    y0, M, g = grid_tensors()
    eps = torch.randn(y0.shape, generator=g)
    t = torch.randint(0, 500, (2, 4, 4, 4), generator=g)
    y_t = process.add_noise(y0, M, eps, t)
    torch.testing.assert_close(process.predict_y0(y_t, M, eps, t), y0, atol=2e-4, rtol=0)


def test_training_uses_a_different_timestep_per_grid_point(process):
    """t is drawn per point and q_sample uses each point's own t: the noise implied by the
    recorded (y_t, t) reproduces the reported MSE of a zero predictor exactly."""
    y0_labels = torch.tensor([0, 1, 2])
    N, C = 4, 3
    M = torch.softmax(torch.randn(3, C, N, N, N, generator=gen(5)), dim=1)
    seen = {}

    def recorder(y_t, M_, t, F_):
        seen.update(y_t=y_t, t=t)
        return torch.zeros_like(y_t)

    out = process.training_loss(recorder, M, torch.zeros(3, 8), torch.zeros(3, C), y0_labels, generator=gen(1))
    t = seen["t"]
    assert t.shape == (3, N, N, N)
    assert all(len(t[b].unique()) > 1 for b in range(3))
    y0 = one_hot_grid(y0_labels, C, N)
    _, abar = schedule64()
    a = torch.from_numpy(abar).float()[t].unsqueeze(1)  # (B, 1, N, N, N)
    implied_eps = (seen["y_t"] - a.sqrt() * y0 - (1 - a.sqrt()) * M) / (1 - a).sqrt()
    torch.testing.assert_close(out["mse"], (implied_eps ** 2).mean(), rtol=1e-3, atol=0)
    torch.testing.assert_close(out["ce"], torch.tensor(np.log(C), dtype=torch.float32))
    torch.testing.assert_close(out["loss"], out["mse"] + 0.5 * out["ce"])


# reverse steps --------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 1, 100, 499])
def test_ddpm_posterior_matches_hand_computed_closed_form(process, t):
    betas, abar = schedule64()
    b, a, a_prev = betas[t], abar[t], abar_at(abar, t - 1)
    alpha = 1 - b
    g0 = b * np.sqrt(a_prev) / (1 - a)
    g1 = (1 - a_prev) * np.sqrt(alpha) / (1 - a)
    g2 = 1 + (np.sqrt(a) - 1) * (np.sqrt(alpha) + np.sqrt(a_prev)) / (1 - a)
    var = (1 - a_prev) / (1 - a) * b
    y_t, M, eps_hat = 0.7, 0.3, -0.4
    y0_hat = (y_t - (1 - np.sqrt(a)) * M - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    mean = g0 * y0_hat + g1 * y_t + g2 * M

    scalar = lambda v: torch.full((1, 1, 1, 1, 1), v)  # noqa: E731
    y_prev, y0_out = process.ddpm_step(scalar(eps_hat), t, scalar(y_t), scalar(M), generator=gen(3))
    z = torch.randn((1, 1, 1, 1, 1), generator=gen(3)).item()
    assert y0_out.item() == pytest.approx(y0_hat, rel=1e-4)
    assert y_prev.item() == pytest.approx(mean + np.sqrt(var) * z, rel=1e-4, abs=1e-5)
    if t == 0:
        assert var == 0 and y_prev.item() == pytest.approx(y0_hat, rel=1e-4)


def ddpm_oracle_z(z_t, eps_hat, t, noise, betas, abar):
    """Standard DDPM step (Ho et al. 2020, eq. 11, epsilon form) on z, float64, per point."""
    b, a = betas[t], abar[t]
    a_prev = np.where(t > 0, abar[np.maximum(t - 1, 0)], 1.0)
    mean = (z_t - b / np.sqrt(1 - a) * eps_hat) / np.sqrt(1 - b)
    return mean + np.sqrt((1 - a_prev) / (1 - a) * b) * noise


def test_ddpm_step_equals_standard_ddpm_on_z(process):
    y0, M, g = grid_tensors(B=2, C=3, N=4)
    y_t = torch.randn(M.shape, generator=g) + M
    eps_hat = torch.randn(M.shape, generator=g)
    t = torch.randint(0, 500, (2, 4, 4, 4), generator=g)
    t[0, 0, 0, 0] = 0
    y_prev, _ = process.ddpm_step(eps_hat, t, y_t, M, generator=gen(7))
    noise = torch.randn(M.shape, generator=gen(7)).double().numpy()
    betas, abar = schedule64()
    tt = t.unsqueeze(1).numpy()
    z_prev = ddpm_oracle_z((y_t - M).double().numpy(), eps_hat.double().numpy(), tt, noise, betas, abar)
    np.testing.assert_allclose(y_prev.double().numpy(), z_prev + M.double().numpy(), atol=2e-4)


def ddim_oracle_z(z_t, eps_hat, t, s, eta, noise, abar):
    """Standard DDIM step (Song et al. 2021, eq. 12 and 16) on z, float64."""
    a_t, a_s = abar[t], abar_at(abar, s)
    z0 = (z_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t)
    sigma = eta * np.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    return np.sqrt(a_s) * z0 + np.sqrt(1 - a_s - sigma ** 2) * eps_hat + sigma * noise


@pytest.mark.parametrize("t, s, eta", [(499, 449, 0.0), (499, 449, 1.0), (300, 100, 0.5), (49, -1, 0.0), (49, -1, 1.0)])
def test_ddim_step_equals_standard_ddim_on_z(process, t, s, eta):
    y0, M, g = grid_tensors(B=2, C=3, N=4)
    y_t = torch.randn(M.shape, generator=g) + M
    eps_hat = torch.randn(M.shape, generator=g)
    y_s, y0_hat = process.ddim_step(eps_hat, t, s, y_t, M, eta=eta, generator=gen(11))
    noise = torch.randn(M.shape, generator=gen(11)).double().numpy()
    _, abar = schedule64()
    z_s = ddim_oracle_z((y_t - M).double().numpy(), eps_hat.double().numpy(), t, s, eta, noise, abar)
    np.testing.assert_allclose(y_s.double().numpy(), z_s + M.double().numpy(), atol=5e-4)
    if s == -1:  # the final step lands on y0_hat
        torch.testing.assert_close(y_s, y0_hat)


def test_ddim_eta0_is_deterministic(process):
    y0, M, g = grid_tensors()
    y_t, eps_hat = torch.randn(M.shape, generator=g), torch.randn(M.shape, generator=g)
    a, _ = process.ddim_step(eps_hat, 499, 449, y_t, M, eta=0.0, generator=gen(1))
    b, _ = process.ddim_step(eps_hat, 499, 449, y_t, M, eta=0.0, generator=gen(2))
    assert torch.equal(a, b)


def test_ddim_with_every_step_and_eta1_is_the_ddpm_step():
    """Same noise draw -> identical step (sigma^2 equals the posterior variance)."""
    p = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=50, ddim_steps=50))
    p.set_timesteps(50)
    y0, M, g = grid_tensors()
    y_t, eps_hat = torch.randn(M.shape, generator=g) + M, torch.randn(M.shape, generator=g)
    for t in (49, 20, 1):
        a, _ = p.step(eps_hat, t, y_t, M, eta=1.0, generator=gen(t))
        b, _ = p.ddpm_step(eps_hat, t, y_t, M, generator=gen(t))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def gaussian_oracle(mu0, s0, abar):
    """Exact eps predictor E[eps | y_t] when y0 ~ N(mu0, s0^2) (prior-shifted, any M)."""
    abar_t = torch.from_numpy(abar).float()

    def denoiser(y_t, M, t, F):
        a = abar_t[t].unsqueeze(1)
        z_t, m = y_t - M, mu0 - M
        return (1 - a).sqrt() * (z_t - a.sqrt() * m) / (a * s0 ** 2 + 1 - a)

    return denoiser


def test_full_ddim_eta1_matches_ddpm_in_distribution():
    cfg = DiffusionConfig(num_timesteps=50, beta_start=1e-3, beta_end=0.2, ddim_steps=50)
    p = PriorShiftedDiffusion(cfg)
    _, abar = schedule64(50, 1e-3, 0.2)
    mu0, s0 = 1.5, 0.5
    M = torch.full((8, 1, 10, 10, 10), 0.2)  # 8000 independent scalars
    F = torch.zeros(8, 4)
    den = gaussian_oracle(mu0, s0, abar)
    ddpm = p.sample(den, M, F, sampler="ddpm", generator=gen(0)).y0
    ddim = p.sample(den, M, F, sampler="ddim", steps=50, eta=1.0, generator=gen(1)).y0
    se = s0 / np.sqrt(M.numel())
    assert abs(ddpm.mean().item() - ddim.mean().item()) < 5 * np.sqrt(2) * se
    assert abs(ddpm.std().item() - ddim.std().item()) < 0.03
    for y in (ddpm, ddim):  # both reach the data distribution
        assert abs(y.mean().item() - mu0) < 0.03 and abs(y.std().item() - s0) < 0.05


# sampling -------------------------------------------------------------------------------


def exact_noise_oracle(process, y0):
    """A perfect denoiser for a known y0: returns the noise actually present in y_t."""

    def denoiser(y_t, M, t, F):
        a = process.alphas_cumprod[t].unsqueeze(1)
        return (y_t - a.sqrt() * y0 - (1 - a.sqrt()) * M) / (1 - a).sqrt()

    return denoiser


@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("ddim", 3), ("ddpm", None)])
def test_perfect_denoiser_recovers_y0_even_against_a_wrong_prior(process, sampler, steps):
    labels = torch.tensor([1, 0, 4])
    y0 = one_hot_grid(labels, 5, 4)
    M = one_hot_grid(torch.tensor([0, 3, 2]), 5, 4) * 0.6 + 0.08  # confidently wrong prior
    out = process.sample(exact_noise_oracle(process, y0), M, torch.zeros(3, 4), sampler=sampler, steps=steps,
                         generator=gen(0), return_trajectory=True)
    torch.testing.assert_close(out.y0, y0, atol=2e-3, rtol=0)
    probs = process.probabilities(out.y0)
    assert probs.argmax(1).tolist() == labels.tolist()
    n = (steps or 500) + 1
    assert out.trajectory.shape == (n, 3, 5)
    torch.testing.assert_close(out.trajectory[-1], probs)
    # the chain starts at the prior: the first row prefers M's class
    assert out.trajectory[0].argmax(1).tolist() == [0, 3, 2]


def test_predict_proba_shapes_uncertainty_and_reproducibility(process):
    M = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=gen(0)), dim=1)
    den = lambda y, m, t, f: 0.3 * (y - m)  # noqa: E731  an imperfect denoiser: samples disagree
    kw = dict(num_samples=4, steps=5, return_trajectory=True)
    a = process.predict_proba(den, M, torch.zeros(2, 8), generator=gen(1), **kw)
    b = process.predict_proba(den, M, torch.zeros(2, 8), generator=gen(1), **kw)
    assert a["probs"].shape == (2, 3) and a["std"].shape == (2, 3) and a["entropy"].shape == (2,)
    assert a["samples"].shape == (4, 2, 3) and a["trajectory"].shape == (4, 6, 2, 3)
    torch.testing.assert_close(a["probs"].sum(1), torch.ones(2))
    torch.testing.assert_close(a["probs"], a["samples"].mean(0))
    assert (a["std"] > 0).all()
    p = a["probs"]
    torch.testing.assert_close(a["entropy"], -(p * p.log()).sum(1))
    for key in a:
        assert torch.equal(a[key], b[key])


def test_prob_from_points_averages_per_point_softmax():
    p = PriorShiftedDiffusion(DiffusionConfig(prob_from="y0_points"))
    y = torch.zeros(1, 2, 2, 1, 1)
    y[0, 0, 0] = 10.0  # point 0 is sure of class 0, point 1 undecided
    torch.testing.assert_close(p.probabilities(y)[0, 0], torch.tensor(0.5 * (1 + 0.5)), atol=1e-4, rtol=0)
    torch.testing.assert_close(PriorShiftedDiffusion(DiffusionConfig()).probabilities(y)[0, 0],
                               torch.sigmoid(torch.tensor(5.0)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="euler"), "sampler"),
        (dict(timestep_spacing="leading"), "timestep_spacing"),
        (dict(beta_start=0.02, beta_end=1e-4), "beta_start < beta_end"),
        (dict(ddim_steps=0), "ddim_steps"),
        (dict(prob_from="logits"), "prob_from"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


# temperature scaling of the class probabilities


def _saturated_case(n=64, seed=0):
    """Final class maps that are exactly one-hot (S=2 samples), right for 90% of volumes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    predicted = torch.where(torch.rand(n, generator=g) < 0.9, labels, 1 - labels)
    y0 = one_hot_grid(predicted, 2, 2)  # (N, 2, 2, 2, 2)
    return y0.unsqueeze(0).repeat(2, 1, 1, 1, 1, 1), labels  # (S, N, C, ...)


def test_fit_temperature_sharpens_saturated_probabilities_without_changing_predictions():
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=10))
    y0_samples, labels = _saturated_case()
    flat = y0_samples[0]
    before = process.probabilities(flat)
    assert float(before.max()) < 0.74  # softmax of one-hot caps at e / (e + 1)

    def nll(p):
        return float(-p.gather(1, labels[:, None]).log().mean())

    value = process.fit_temperature(y0_samples, labels)
    after = process.probabilities(flat)
    assert value < 1.0 and float(process.temperature) == pytest.approx(value)
    assert nll(after) < nll(before)
    assert torch.equal(after.argmax(1), before.argmax(1))
    # 90% right -> the calibrated confidence of a one-hot prediction is close to 0.9
    assert float(after.max(1).values.mean()) == pytest.approx(0.9, abs=0.03)


def test_temperature_is_saved_in_the_state_dict():
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=10))
    process.fit_temperature(*_saturated_case())
    restored = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=10))
    restored.load_state_dict(process.state_dict())
    assert float(restored.temperature) == float(process.temperature) != 1.0


def test_fit_temperature_rejects_mismatched_labels():
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=10))
    y0_samples, labels = _saturated_case()
    with pytest.raises(ValueError, match="matching labels"):
        process.fit_temperature(y0_samples, labels[:-1])
