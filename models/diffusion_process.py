"""Prior-shifted diffusion over the dense guidance grid (CARD / DiffMIC), with its schedule.

Forward process (CARD, Han et al. NeurIPS 2022, sec. 2; DiffMIC, Yang et al. MICCAI 2023), with the
dense guidance map ``M`` as the prior mean that the chain ends at:

    q(y_t | y_0, M) = N( sqrt(abar_t) y_0 + (1 - sqrt(abar_t)) M,  (1 - abar_t) I )

so ``y_T ~ N(M, I)``. Writing ``z = y - M`` turns every formula into the standard DDPM
(Ho et al. 2020) / DDIM (Song et al. 2021) one on ``z``; this file implements the
closed forms with the prior term explicit (CARD's posterior, gamma_0..2) and the tests check
them against that ``z`` oracle.

Shapes: ``y`` and ``M`` are (B, C, H, W, D) class maps over the Np^3 grid; timesteps are
either (B,) (one per sample, used at inference) or (B, H, W, D) (one per grid point, the
heterologous training of DiffMIC-v2). The schedule owns no network: ``training_loss``,
``sample`` and ``predict_proba`` take the denoiser ``eps_theta(y_t, M, t, F)`` as an
argument. Probabilities are ``softmax`` over C of the grid-averaged final ``y_0``
(``prob_from='y0'``) or the grid average of the per-point softmax (``'y0_points'``).

Variable name -> paper symbol: ``betas`` beta_t, ``alphas`` alpha_t = 1 - beta_t,
``alphas_cumprod`` abar_t = prod_{s<=t} alpha_s, ``M`` the prior y_hat (CARD's f_phi(x)),
``eps_hat`` eps_theta, ``y0_hat`` the reconstructed y_0, ``g0 g1 g2`` CARD's gamma_0..2.

Sections: config, helpers, process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from models.plain_config import PlainConfig

# config

SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("trailing", "linspace")
PROB_FROM = ("y0", "y0_points")


@dataclass
class DiffusionConfig(PlainConfig):
    """Schedule, loss and sampling settings of :class:`PriorShiftedDiffusion`.

    Args:
        num_timesteps: T, length of the training chain (timesteps 0 .. T-1).
        beta_start: beta_1 of the linear schedule.
        beta_end: beta_T of the linear schedule.
        ddim_steps: default number of DDIM steps at inference (trailing spacing).
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like posterior noise).
        ce_weight: lambda in ``loss = MSE(eps_hat, eps) + lambda * CE(head(F), y)``.
        num_samples: stochastic samples per volume at inference; their spread is the
            reported uncertainty (std, predictive entropy).
        sampler: ``'ddim'`` (``ddim_steps`` steps) or ``'ddpm'`` (all T ancestral steps).
        timestep_spacing: ``'trailing'`` (diffusers; T=500, 10 steps -> 499, 449, ..., 49) or
            ``'linspace'``. Both start at T-1, where ``y_T = M + N(0, I)`` is the right start
            (``'leading'`` would start a truncated chain from full noise: refused).
        prob_from: which quantity is softmaxed into class probabilities: ``'y0'`` = softmax
            over C of the grid-averaged final y_0 (default); ``'y0_points'`` = grid average
            of the per-point softmax of y_0.
    """

    num_timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ddim_steps: int = 10
    eta: float = 0.0
    ce_weight: float = 0.5
    num_samples: int = 1
    sampler: str = "ddim"
    timestep_spacing: str = "trailing"
    prob_from: str = "y0"

    def __post_init__(self):
        if self.num_timesteps < 2:
            raise ValueError(f"DiffusionConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"DiffusionConfig needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if not 1 <= self.ddim_steps <= self.num_timesteps:
            raise ValueError(f"DiffusionConfig.ddim_steps must be in [1, {self.num_timesteps}], got {self.ddim_steps}")
        if self.eta < 0:
            raise ValueError(f"DiffusionConfig.eta must be >= 0, got {self.eta}")
        if self.num_samples < 1:
            raise ValueError(f"DiffusionConfig.num_samples must be >= 1, got {self.num_samples}")
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        _check_choice("prob_from", self.prob_from, PROB_FROM)



@dataclass
class SampleOutput:
    """Result of :meth:`PriorShiftedDiffusion.sample`.

    Attributes:
        y0: final denoised class map (B, C, H, W, D).
        trajectory: (num_steps + 1, B, C) class probabilities of the state ``y_t`` (same
            rule as ``prob_from``) at the start ``y_T`` and after every step (the last row
            is the final prediction); ``None`` unless requested.
    """

    y0: torch.Tensor
    trajectory: Optional[torch.Tensor] = None


# helpers

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # eps_theta(y_t, M, t, F)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather schedule values ``a[t]`` and shape them to broadcast against ``x``.

    Rank-agnostic: ``t`` is (B,) -> (B, 1, 1, ...) or per point (B, *spatial) with
    ``x_shape == (B, C, *spatial)`` -> (B, 1, *spatial).
    """
    out = a.gather(0, t.reshape(-1)).reshape(t.shape)
    if t.ndim == 1:
        return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))
    if tuple(t.shape) != (x_shape[0], *x_shape[2:]):
        raise ValueError(f"per-point timesteps {tuple(t.shape)} do not match (B, *spatial) of {tuple(x_shape)}")
    return out.unsqueeze(1)


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise on ``like``'s device/dtype, drawn from ``generator`` (on its device)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _randint(high: int, shape, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def one_hot_grid(labels: torch.Tensor, num_classes: int, grid_size: int) -> torch.Tensor:
    """y_0: one-hot labels (B,) broadcast over the grid -> (B, C, Np, Np, Np) float."""
    y = F.one_hot(labels.long(), num_classes).float()  # (B, C)
    return y[:, :, None, None, None].expand(-1, -1, grid_size, grid_size, grid_size).contiguous()


# process


class PriorShiftedDiffusion(nn.Module):
    """The prior-shifted diffusion process: schedule buffers, noising, steps, loss, sampling.

    Buffers are computed once in float64 and stored as float32 (non-persistent: they are a
    function of the config, so checkpoints carry only learned weights).
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        T = config.num_timesteps
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)  # beta_t
        alphas = 1.0 - betas  # alpha_t
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # abar_t
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])  # abar_{t-1}, abar_{-1} = 1

        def buf(name, value):
            self.register_buffer(name, value.float(), persistent=False)

        buf("betas", betas)
        buf("alphas", alphas)
        buf("alphas_cumprod", alphas_cumprod)
        buf("alphas_cumprod_prev", alphas_cumprod_prev)

        # q(y_t | y_0, M)
        buf("sqrt_alphas_cumprod", alphas_cumprod.sqrt())  # sqrt(abar_t)
        buf("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())  # sqrt(1 - abar_t)

        # posterior q(y_{t-1} | y_t, y_0, M) = N(g0 y_0 + g1 y_t + g2 M, var) (CARD's gamma_0..2)
        buf("posterior_coef_y0", betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))  # gamma_0
        buf("posterior_coef_yt", (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod))  # gamma_1
        buf("posterior_coef_prior", 1.0 + (alphas_cumprod.sqrt() - 1.0) * (alphas.sqrt() + alphas_cumprod_prev.sqrt())
            / (1.0 - alphas_cumprod))  # gamma_2
        buf("posterior_variance", (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) * betas)  # beta_tilde_t

        # Softmax temperature of the class probabilities. y_0 is trained towards one-hot, so
        # softmax(grid-mean y_0) saturates near e / (e + 1) = 0.73 for C = 2: ranking (AUC)
        # and argmax are unaffected, but the probabilities are under-confident. Temperature
        # scaling (Guo et al., ICML 2017) fitted on the validation split fixes calibration
        # without changing any prediction; it is learned state, so it lives in the state dict.
        self.register_buffer("temperature", torch.ones(()))
        self.timesteps: Optional[torch.Tensor] = None  # filled by set_timesteps (descending)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    # -- timesteps -------------------------------------------------------------------

    def _as_timesteps(self, t, y: torch.Tensor) -> torch.Tensor:
        """An int, (B,) or (B, *spatial) timestep -> long tensor on ``y``'s device, validated."""
        t = torch.as_tensor(t, dtype=torch.long, device=y.device)
        if t.ndim == 0:
            t = t.expand(y.shape[0])
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]"
            )
        return t

    def set_timesteps(self, num_inference_steps: int, spacing: Optional[str] = None) -> None:
        """Fill ``self.timesteps`` (descending, long) for ``num_inference_steps`` DDIM steps.

        ``'trailing'`` (diffusers; Lin et al., WACV 2024): ``round(arange(T, 0, -T/n)) - 1``,
        e.g. T=500, n=10 -> 499, 449, ..., 49. ``'linspace'``: ``round(linspace(T-1, 0, n))``.
        """
        spacing = spacing or self.config.timestep_spacing
        _check_choice("spacing", spacing, SPACINGS)
        T = self.num_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        if spacing == "trailing":
            steps = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
        else:
            steps = np.round(np.linspace(T - 1, 0, num_inference_steps)).astype(np.int64)
        self.timesteps = torch.from_numpy(steps)

    # -- forward process -------------------------------------------------------------

    def add_noise(self, y0: torch.Tensor, M: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """q_sample: y_t = sqrt(abar_t) y_0 + (1 - sqrt(abar_t)) M + sqrt(1 - abar_t) eps.

        ``y0``, ``M``, ``eps`` (B, C, *spatial); ``t`` (B,) or per point (B, *spatial).
        """
        t = self._as_timesteps(t, y0)
        sqrt_abar = extract(self.sqrt_alphas_cumprod, t, y0.shape)
        return sqrt_abar * y0 + (1.0 - sqrt_abar) * M + extract(self.sqrt_one_minus_alphas_cumprod, t, y0.shape) * eps

    def predict_y0(self, y_t: torch.Tensor, M: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
        """Invert q_sample: y0_hat = (y_t - (1 - sqrt(abar_t)) M - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
        t = self._as_timesteps(t, y_t)
        sqrt_abar = extract(self.sqrt_alphas_cumprod, t, y_t.shape)
        noise = extract(self.sqrt_one_minus_alphas_cumprod, t, y_t.shape) * eps_hat
        return (y_t - (1.0 - sqrt_abar) * M - noise) / sqrt_abar

    # -- reverse steps ---------------------------------------------------------------

    def ddpm_step(self, eps_hat: torch.Tensor, t, y_t: torch.Tensor, M: torch.Tensor,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step y_t -> y_{t-1} from the posterior q(y_{t-1} | y_t, y0_hat, M).

        1. y0_hat from eps_hat (``predict_y0``);
        2. mean = g0 y0_hat + g1 y_t + g2 M (CARD's gamma_0..2);
        3. y_{t-1} = mean + sqrt(beta_tilde_t) z, z ~ N(0, I), no noise where t = 0.

        Returns ``(y_prev, y0_hat)``, both shaped like ``y_t``.
        """
        t = self._as_timesteps(t, y_t)
        y0_hat = self.predict_y0(y_t, M, eps_hat, t)
        shape = y_t.shape
        mean = (extract(self.posterior_coef_y0, t, shape) * y0_hat + extract(self.posterior_coef_yt, t, shape) * y_t
                + extract(self.posterior_coef_prior, t, shape) * M)
        std = extract(self.posterior_variance, t, shape).sqrt()  # 0 at t = 0
        return mean + std * _randn(shape, y_t, generator), y0_hat

    def ddim_step(self, eps_hat: torch.Tensor, t, s, y_t: torch.Tensor, M: torch.Tensor,
                  eta: Optional[float] = None, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step y_t -> y_s, s < t (Song et al. 2021, eq. 12 and 16, on z = y - M).

        1. y0_hat from eps_hat;
        2. sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s);
        3. y_s = sqrt(abar_s) y0_hat + (1 - sqrt(abar_s)) M + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.

        ``s = -1`` is the final step to abar = 1 (returns y0_hat). Returns ``(y_s, y0_hat)``.
        """
        eta = self.config.eta if eta is None else float(eta)
        t = self._as_timesteps(t, y_t)
        s = torch.as_tensor(s, dtype=torch.long, device=y_t.device)
        s = s.expand(t.shape) if s.ndim == 0 else s
        if s.shape != t.shape or bool((s >= t).any()) or int(s.min()) < -1:
            raise ValueError(f"ddim_step needs -1 <= s < t elementwise with matching shapes, got t of shape "
                             f"{tuple(t.shape)} in [{int(t.min())}, {int(t.max())}], s of shape {tuple(s.shape)} "
                             f"in [{int(s.min())}, {int(s.max())}]")
        shape = y_t.shape
        y0_hat = self.predict_y0(y_t, M, eps_hat, t)
        abar_t = extract(self.alphas_cumprod, t, shape)
        abar_s = extract(self.alphas_cumprod_prev, s + 1, shape)  # abar_s, with abar_{-1} = 1
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
        direction = (1 - abar_s - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        y_s = abar_s.sqrt() * y0_hat + (1 - abar_s.sqrt()) * M + direction
        if eta > 0:
            y_s = y_s + sigma * _randn(shape, y_t, generator)
        return y_s, y0_hat

    def step(self, eps_hat: torch.Tensor, t: int, y_t: torch.Tensor, M: torch.Tensor,
             eta: Optional[float] = None, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM step from ``t`` to the next timestep of ``self.timesteps`` (-1 after the last)."""
        if self.timesteps is None:
            raise RuntimeError("PriorShiftedDiffusion.step: call set_timesteps(num_inference_steps) first")
        positions = (self.timesteps == int(t)).nonzero()
        if len(positions) != 1:
            raise ValueError(
                f"timestep {int(t)} is not in the schedule set by set_timesteps: {self.timesteps.tolist()}"
            )
        i = int(positions[0])
        s = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        return self.ddim_step(eps_hat, t, s, y_t, M, eta=eta, generator=generator)

    # -- training ----------------------------------------------------------------------

    def training_loss(self, denoiser: Denoiser, M: torch.Tensor, F_prior: torch.Tensor, logits: torch.Tensor,
                      labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Heterologous denoising loss + lambda * CE (DiffMIC-v2 training objective).

        Args:
            denoiser: eps_theta(y_t, M, t, F) -> eps_hat (B, C, Np, Np, Np).
            M: dense guidance map (B, C, Np, Np, Np).
            F_prior: feature prior (B, feature_dim).
            logits: classifier head on F (B, C).
            labels: class indices (B,).

        Every grid point draws its own t ~ U{0..T-1} (B, Np, Np, Np); eps ~ N(0, I);
        y_0 = one-hot(labels) broadcast over the grid.

        Returns:
            dict(loss, mse, ce) of scalar tensors, ``loss = mse + ce_weight * ce``.
        """
        B, C, H, W, D = M.shape
        if labels.shape != (B,):
            raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
        y0 = one_hot_grid(labels.to(M.device), C, H).to(M.dtype)  # (B, C, Np, Np, Np)
        t = _randint(self.num_timesteps, (B, H, W, D), M.device, generator)  # (B, Np, Np, Np)
        eps = _randn(M.shape, M, generator)  # (B, C, Np, Np, Np)
        y_t = self.add_noise(y0, M, eps, t)
        mse = F.mse_loss(denoiser(y_t, M, t, F_prior), eps)
        ce = F.cross_entropy(logits, labels.to(logits.device))
        return {"loss": mse + self.config.ce_weight * ce, "mse": mse, "ce": ce}

    # -- sampling ------------------------------------------------------------------------

    def probabilities(self, y: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C) of a class map (B, C, *spatial), per ``config.prob_from``,
        divided by ``self.temperature`` before the softmax (1 until ``fit_temperature``)."""
        spatial = tuple(range(2, y.ndim))
        if self.config.prob_from == "y0":
            return torch.softmax(y.mean(dim=spatial) / self.temperature, dim=1)
        return torch.softmax(y / self.temperature, dim=1).mean(dim=spatial)

    @torch.no_grad()
    def fit_temperature(self, y0_samples: torch.Tensor, labels: torch.Tensor,
                        grid: Optional[torch.Tensor] = None) -> float:
        """Set ``self.temperature`` to minimise the validation NLL of the mean probabilities.

        Args:
            y0_samples: final class maps of S samples per volume, (S, N, C, *spatial) (the
                ``y0_samples`` that ``predict_proba`` returns), of the VALIDATION split.
            labels: (N,) class indices.
            grid: candidate temperatures (default 200 log-spaced values in [0.01, 10]).
        A 1-D search on a fixed grid: deterministic, no optimiser state. Returns the value.
        """
        if y0_samples.ndim < 3 or y0_samples.shape[1] != labels.shape[0]:
            raise ValueError(f"fit_temperature needs y0_samples (S, N, C, ...) matching labels (N,), "
                             f"got {tuple(y0_samples.shape)} and {tuple(labels.shape)}")
        grid = torch.logspace(-2, 1, 200, dtype=torch.float64) if grid is None else grid.double()
        S, N = y0_samples.shape[:2]
        flat = y0_samples.reshape(S * N, *y0_samples.shape[2:]).to(self.temperature.device, torch.float64)
        labels = labels.long().cpu()
        best, best_nll = 1.0, float("inf")
        for value in grid.tolist():
            self.temperature.fill_(value)
            probs = self.probabilities(flat).reshape(S, N, -1).mean(dim=0).cpu()  # (N, C)
            nll = float(-probs.gather(1, labels[:, None]).clamp(min=1e-12).log().mean())
            if nll < best_nll:
                best, best_nll = value, nll
        self.temperature.fill_(best)
        return best

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, M: torch.Tensor, F_prior: torch.Tensor, sampler: Optional[str] = None,
               steps: Optional[int] = None, eta: Optional[float] = None,
               generator: Optional[torch.Generator] = None, return_trajectory: bool = False) -> SampleOutput:
        """Run the reverse chain from y_T = M + N(0, I) to y_0.

        All grid points share one timestep. ``'ddpm'``: T ancestral steps T-1 .. 0.
        ``'ddim'``: the timesteps of ``set_timesteps`` (call it first, or pass ``steps`` to
        set them here); the first is T-1, matching the start noise.

        Args:
            denoiser: eps_theta(y_t, M, t, F).
            M: dense guidance map (B, C, Np, Np, Np).
            F_prior: feature prior (B, feature_dim).
            sampler, eta: override ``config.sampler`` / ``config.eta``.
            steps: DDIM steps (calls ``set_timesteps(steps)``); must be None or T for DDPM.
            generator: source of the start and step noise.
            return_trajectory: also return per-step class probabilities (see SampleOutput).
        """
        sampler = sampler or self.config.sampler
        _check_choice("sampler", sampler, SAMPLERS)
        T = self.num_timesteps
        if sampler == "ddpm":
            if steps not in (None, T):
                raise ValueError(f"the DDPM sampler runs all {T} timesteps; got steps={steps} (use sampler='ddim')")
            timesteps = list(range(T - 1, -1, -1))
        else:
            if steps is not None:
                self.set_timesteps(steps)
            if self.timesteps is None:
                raise RuntimeError("DDIM sampling: call set_timesteps(num_inference_steps) first or pass steps=")
            timesteps = self.timesteps.tolist()

        B, _, H, W, D = M.shape
        y = M + _randn(M.shape, M, generator)  # y_T ~ N(M, I)  (B, C, Np, Np, Np)
        trajectory = [self.probabilities(y)] if return_trajectory else None
        for t in timesteps:
            t_map = torch.full((B, H, W, D), t, dtype=torch.long, device=M.device)  # shared timestep
            eps_hat = denoiser(y, M, t_map, F_prior)
            if sampler == "ddpm":
                y, _ = self.ddpm_step(eps_hat, t_map, y, M, generator=generator)
            else:
                y, _ = self.step(eps_hat, t, y, M, eta=eta, generator=generator)
            if return_trajectory:
                trajectory.append(self.probabilities(y))
        return SampleOutput(y0=y, trajectory=torch.stack(trajectory) if return_trajectory else None)

    @torch.no_grad()
    def predict_proba(self, denoiser: Denoiser, M: torch.Tensor, F_prior: torch.Tensor,
                      num_samples: Optional[int] = None, sampler: Optional[str] = None, steps: Optional[int] = None,
                      eta: Optional[float] = None, generator: Optional[torch.Generator] = None,
                      return_trajectory: bool = False) -> dict[str, torch.Tensor]:
        """Class probabilities with uncertainty from ``num_samples`` reverse chains.

        The S chains run as one batch of S*B. Returns dict:
            probs (B, C): mean over samples; std (B, C): their standard deviation (0 for S=1);
            entropy (B,): predictive entropy -sum_c p_c log p_c of the mean;
            samples (S, B, C); y0_samples (S, B, C, Np, Np, Np) the final class maps (for
            ``fit_temperature``); trajectory (S, steps + 1, B, C) if requested.
        """
        S = num_samples or self.config.num_samples
        B = M.shape[0]
        M_rep = M.repeat(S, 1, 1, 1, 1)  # (S*B, C, Np, Np, Np), sample-major
        F_rep = F_prior.repeat(S, 1)  # (S*B, feature_dim)
        out = self.sample(denoiser, M_rep, F_rep, sampler=sampler, steps=steps, eta=eta,
                          generator=generator, return_trajectory=return_trajectory)
        y0_samples = out.y0.reshape(S, B, *out.y0.shape[1:])  # (S, B, C, Np, Np, Np)
        samples = self.probabilities(out.y0).reshape(S, B, -1)  # (S, B, C)
        probs = samples.mean(dim=0)
        result = {
            "probs": probs,
            "std": samples.std(dim=0, unbiased=False),
            "entropy": -(probs * probs.clamp(min=1e-12).log()).sum(dim=1),
            "samples": samples,
            "y0_samples": y0_samples,
        }
        if return_trajectory:
            n = out.trajectory.shape[0]
            result["trajectory"] = out.trajectory.reshape(n, S, B, -1).transpose(0, 1)  # (S, n, B, C)
        return result
