"""Prior-shifted diffusion over the dense guidance grid (CARD / DiffMIC), with its schedule.

Forward process (CARD, Han et al. NeurIPS 2022, sec. 2; DiffMIC, Yang et al. MICCAI 2023), with the
dense guidance map ``M`` as the prior mean that the chain ends at:

    q(y_t | y_0, M) = N( sqrt(abar_t) y_0 + (1 - sqrt(abar_t)) M,  (1 - abar_t) I )

Writing ``z = y - M`` turns every formula into the standard DDPM (Ho et al. 2020) / DDIM
(Song et al. 2021) one on ``z``; the tests check the closed forms against that oracle.

What this version fixes (measured failures of the first one):
- the denoiser predicts ``y_0`` directly (CARD's objective: MSE on y_0 plus a CE on the
  reparameterised y_0), not eps, so nothing divides by ``sqrt(abar_t)`` near zero signal;
- the schedule is CARD's T = 1000 linear betas rescaled to zero terminal SNR (Lin et al.,
  WACV 2024): ``abar_{T-1} = 0``, so the last training step holds no label at all and the
  sampler's start ``y_T = M + N(0, I)`` is exactly the chain's end; DDIM uses trailing steps;
- the process keeps no state: :meth:`sample` takes the number of steps and returns the
  timesteps it used together with the final state and (optionally) the trajectory, like
  lucidrains' ``ddim_sample``; temperature and other learned state live on the model.

Shapes: ``y`` and ``M`` are (B, C, *grid) class maps; timesteps are (B,) or one per grid
point (B, *grid) (heterologous training, DiffMIC-v2). The denoiser is passed in as a callable
``y0_theta(y_t, t) -> y0_hat`` closed over its condition (the condition is computed once per
volume, never per step).

Variable name -> paper symbol: ``betas`` beta_t, ``alphas_cumprod`` abar_t, ``M`` the prior
y_hat (CARD's f_phi(x)), ``y0_hat`` the model's y_0, ``eps_hat`` the implied noise.

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
PARAMETERIZATIONS = ("y0", "eps")


@dataclass
class DiffusionConfig(PlainConfig):
    """Schedule, loss and sampling settings of :class:`PriorShiftedDiffusion`.

    Args:
        num_timesteps: T, length of the training chain (timesteps 0 .. T-1); CARD uses 1000.
        beta_start / beta_end: the linear beta schedule before the terminal-SNR rescale.
        zero_terminal_snr: rescale sqrt(abar) so that abar_{T-1} = 0 (Lin et al. 2024, alg. 1).
        ce_weight: lambda in ``loss = MSE(y0_hat, y0) + lambda * CE(y0_hat, label)`` (the CE
            treats each grid point's y0_hat as logits; CARD's auxiliary term).
        antithetic: draw the per-point timesteps of the second half of a batch as ``T-1-t`` of
            the first half (lower-variance loss estimate).
        ddim_steps: DDIM steps at inference (trailing spacing).
        eta: DDIM stochasticity (0 = deterministic given the start noise).
        num_samples: reverse chains per volume; the prediction is the mean of their class
            probabilities and their spread the uncertainty.
        sampler: ``'ddim'`` or ``'ddpm'`` (all T ancestral steps).
        timestep_spacing: ``'trailing'`` (T=1000, 10 steps -> 999, 899, ..., 99) or ``'linspace'``.
        parameterization: what the network outputs: ``'y0'`` (the design) or ``'eps'`` (the
            first version's noise prediction, kept for the ablation; needs a schedule with
            signal left at T-1, i.e. ``zero_terminal_snr=False``).
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = True
    ce_weight: float = 0.1
    antithetic: bool = True
    ddim_steps: int = 10
    eta: float = 0.0
    num_samples: int = 20
    sampler: str = "ddim"
    timestep_spacing: str = "trailing"
    parameterization: str = "y0"

    def __post_init__(self):
        if self.num_timesteps < 2:
            raise ValueError(f"DiffusionConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"DiffusionConfig needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if not 1 <= self.ddim_steps <= self.num_timesteps:
            raise ValueError(f"DiffusionConfig.ddim_steps must be in [1, {self.num_timesteps}], got {self.ddim_steps}")
        if self.eta < 0 or self.ce_weight < 0:
            raise ValueError(f"DiffusionConfig needs eta >= 0 and ce_weight >= 0, got {self.eta}, {self.ce_weight}")
        if self.num_samples < 1:
            raise ValueError(f"DiffusionConfig.num_samples must be >= 1, got {self.num_samples}")
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        _check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        if self.parameterization == "eps" and self.zero_terminal_snr:
            raise ValueError("eps-prediction cannot recover y_0 where no signal is left: "
                             "set zero_terminal_snr=False with parameterization='eps'")


@dataclass
class SampleOutput:
    """Result of :meth:`PriorShiftedDiffusion.sample`.

    Attributes:
        y0: final class map (B, C, *grid).
        timesteps: (n,) long, the timesteps the chain visited, descending.
        trajectory: (n + 1, B, C, *grid) the state at the start ``y_T`` and after every step;
            ``None`` unless requested.
    """

    y0: torch.Tensor
    timesteps: torch.Tensor
    trajectory: Optional[torch.Tensor] = None


# helpers

Y0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # y0_theta(y_t, t) -> y0_hat


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather schedule values ``a[t]`` shaped to broadcast against ``x`` of ``x_shape``.

    ``t`` (B,) -> (B, 1, 1, ...); per point (B, *grid) with ``x_shape == (B, C, *grid)`` -> (B, 1, *grid).
    """
    out = a.gather(0, t.reshape(-1)).reshape(t.shape)
    if t.ndim == 1:
        return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))
    if tuple(t.shape) != (x_shape[0], *x_shape[2:]):
        raise ValueError(f"per-point timesteps {tuple(t.shape)} do not match (B, *grid) of {tuple(x_shape)}")
    return out.unsqueeze(1)


def randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise on ``like``'s device/dtype, drawn from ``generator`` (on its device)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def randint(high: int, shape, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def one_hot_grid(labels: torch.Tensor, num_classes: int, grid: tuple[int, ...]) -> torch.Tensor:
    """y_0: one-hot labels (B,) broadcast over the grid -> (B, C, *grid) float."""
    y = F.one_hot(labels.long(), num_classes).float()  # (B, C)
    return y.reshape(*y.shape, *([1] * len(grid))).expand(-1, -1, *grid).contiguous()


def linear_alphas_cumprod(config: DiffusionConfig) -> torch.Tensor:
    """abar_t (T,) float64 of the linear schedule, optionally rescaled to zero terminal SNR."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_timesteps, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if config.zero_terminal_snr:  # Lin et al. 2024, algorithm 1: shift and scale sqrt(abar)
        s = abar.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        abar = ((s - sT) * s0 / (s0 - sT)) ** 2
    return abar


def inference_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Descending long timesteps for ``steps`` DDIM steps; both spacings start at T-1.

    ``'trailing'``: ``round(arange(T, 0, -T/n)) - 1`` (T=1000, n=10 -> 999, 899, ..., 99);
    ``'linspace'``: ``round(linspace(T-1, 0, n))``.
    """
    _check_choice("spacing", spacing, SPACINGS)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "trailing":
        t = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    else:
        t = np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64)
    return torch.from_numpy(t)


# process


class PriorShiftedDiffusion(nn.Module):
    """Schedule buffers, noising, reverse steps, the training loss and a stateless sampler.

    Buffers are computed in float64, stored as float32 and non-persistent (a function of the
    config): the state dict of this module is empty.
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        abar = linear_alphas_cumprod(config)  # abar_t
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])  # abar_{t-1}, abar_{-1} = 1

        def buf(name, value):
            self.register_buffer(name, value.float(), persistent=False)

        buf("alphas_cumprod", abar)
        buf("alphas_cumprod_prev", abar_prev)
        buf("sqrt_alphas_cumprod", abar.sqrt())
        buf("sqrt_one_minus_alphas_cumprod", (1.0 - abar).sqrt())

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def _as_timesteps(self, t, y: torch.Tensor) -> torch.Tensor:
        """An int, (B,) or (B, *grid) timestep -> long tensor on ``y``'s device, validated."""
        t = torch.as_tensor(t, dtype=torch.long, device=y.device)
        if t.ndim == 0:
            t = t.expand(y.shape[0])
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]")
        return t

    # -- forward process -------------------------------------------------------------

    def add_noise(self, y0: torch.Tensor, M: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """q_sample: y_t = sqrt(abar_t) y_0 + (1 - sqrt(abar_t)) M + sqrt(1 - abar_t) eps."""
        t = self._as_timesteps(t, y0)
        a = extract(self.sqrt_alphas_cumprod, t, y0.shape)
        return a * y0 + (1.0 - a) * M + extract(self.sqrt_one_minus_alphas_cumprod, t, y0.shape) * eps

    def eps_from_y0(self, y_t: torch.Tensor, M: torch.Tensor, y0_hat: torch.Tensor, t) -> torch.Tensor:
        """The noise implied by y0_hat: (y_t - sqrt(abar_t) y0_hat - (1 - sqrt(abar_t)) M) / sqrt(1 - abar_t)."""
        t = self._as_timesteps(t, y_t)
        a = extract(self.sqrt_alphas_cumprod, t, y_t.shape)
        return (y_t - a * y0_hat - (1.0 - a) * M) / extract(self.sqrt_one_minus_alphas_cumprod, t, y_t.shape)

    def to_y0(self, out: torch.Tensor, y_t: torch.Tensor, M: torch.Tensor, t) -> torch.Tensor:
        """The network output as y0_hat: itself (``'y0'``) or, for ``'eps'``, the inverse of
        q_sample: (y_t - (1 - sqrt(abar_t)) M - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
        if self.config.parameterization == "y0":
            return out
        t = self._as_timesteps(t, y_t)
        a = extract(self.sqrt_alphas_cumprod, t, y_t.shape)
        return (y_t - (1.0 - a) * M - extract(self.sqrt_one_minus_alphas_cumprod, t, y_t.shape) * out) / a

    # -- reverse steps ---------------------------------------------------------------

    def ddim_step(self, y0_hat: torch.Tensor, t, s, y_t: torch.Tensor, M: torch.Tensor, eta: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One DDIM step y_t -> y_s, -1 <= s < t (Song et al. 2021, eq. 12, on z = y - M):

            sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)
            y_s = sqrt(abar_s) y0_hat + (1 - sqrt(abar_s)) M + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z

        ``s = -1`` is the final step to abar = 1 and returns y0_hat. With ``eta = 1`` this is
        the DDPM posterior q(y_s | y_t, y0_hat, M).
        """
        t = self._as_timesteps(t, y_t)
        s = torch.as_tensor(s, dtype=torch.long, device=y_t.device)
        s = s.expand(t.shape) if s.ndim == 0 else s
        if s.shape != t.shape or bool((s >= t).any()) or int(s.min()) < -1:
            raise ValueError(f"ddim_step needs -1 <= s < t elementwise with matching shapes, got t "
                             f"{tuple(t.shape)} in [{int(t.min())}, {int(t.max())}], s {tuple(s.shape)}")
        shape = y_t.shape
        eps_hat = self.eps_from_y0(y_t, M, y0_hat, t)
        abar_t = extract(self.alphas_cumprod, t, shape)
        abar_s = extract(self.alphas_cumprod_prev, s + 1, shape)  # abar_s, with abar_{-1} = 1
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
        y_s = abar_s.sqrt() * y0_hat + (1 - abar_s.sqrt()) * M + (1 - abar_s - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            y_s = y_s + sigma * randn(shape, y_t, generator)
        return y_s

    # -- training --------------------------------------------------------------------

    def training_timesteps(self, shape: tuple[int, ...], device: torch.device,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-point timesteps (B, *grid) ~ U{0..T-1}; antithetic over the batch when configured."""
        B = shape[0]
        if not self.config.antithetic or B < 2:
            return randint(self.num_timesteps, shape, device, generator)
        half = randint(self.num_timesteps, ((B + 1) // 2, *shape[1:]), device, generator)
        return torch.cat([half, self.num_timesteps - 1 - half])[:B]

    def training_loss(self, y0_model: Y0Model, M: torch.Tensor, labels: torch.Tensor,
                      generator: Optional[torch.Generator] = None,
                      weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Heterologous y_0-prediction loss (CARD's objective with DiffMIC-v2's per-point t).

        Args:
            y0_model: y0_theta(y_t, t) -> y0_hat (B, C, *grid), closed over the condition.
            M: dense guidance map (B, C, *grid), the prior the chain ends at.
            labels: (B,) class indices; y_0 = one-hot broadcast over the grid.

            weights: optional (B,) non-negative per-volume weights (e.g. DiffMIC-v2's focus on the
                scans the DCG gets wrong); the loss is then the weighted mean over volumes.

        Every grid point draws its own t (the denoiser treats points independently, so no point
        can read another's label); eps ~ N(0, I). Returns dict(loss, mse, ce):
        ``loss = MSE(y0_hat, y0) + ce_weight * CE(y0_hat as per-point logits, label)`` (with
        ``parameterization='eps'`` the MSE is on eps, the CE on the reconstructed y0_hat);
        ``mse`` and ``ce`` are the unweighted means.
        """
        B, C, *grid = M.shape
        if labels.shape != (B,):
            raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
        labels = labels.to(M.device)
        y0 = one_hot_grid(labels, C, tuple(grid)).to(M.dtype)  # (B, C, *grid)
        t = self.training_timesteps((B, *grid), M.device, generator)  # (B, *grid)
        eps = randn(M.shape, M, generator)
        y_t = self.add_noise(y0, M, eps, t)
        out = y0_model(y_t, t).float()  # (B, C, *grid)
        target = y0 if self.config.parameterization == "y0" else eps
        mse = (out - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        y0_hat = self.to_y0(out, y_t.float(), M.float(), t)
        ce = F.cross_entropy(y0_hat, labels[(...,) + (None,) * len(grid)].expand(B, *grid),
                             reduction="none").flatten(1).mean(dim=1)  # (B,)
        per_volume = mse + self.config.ce_weight * ce  # (B,)
        if weights is None:
            loss = per_volume.mean()
        else:
            weights = weights.to(per_volume)
            if weights.shape != (B,) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
                raise ValueError(f"weights must be (B,) = ({B},), non-negative and not all 0, got {tuple(weights.shape)}")
            loss = (weights * per_volume).sum() / weights.sum()
        return {"loss": loss, "mse": mse.mean(), "ce": ce.mean()}

    # -- sampling --------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, y0_model: Y0Model, M: torch.Tensor, steps: Optional[int] = None,
               sampler: Optional[str] = None, eta: Optional[float] = None,
               generator: Optional[torch.Generator] = None, return_trajectory: bool = False) -> SampleOutput:
        """Reverse chain from ``y_T = M + N(0, I)`` to y_0; keeps no state.

        Args:
            y0_model: y0_theta(y_t, t) -> y0_hat, closed over its condition; ``t`` is (B,):
                every grid point of a chain is at the same step while sampling (the model
                embeds the timestep once per chain instead of once per point).
            M: (B, C, *grid) guidance map.
            steps: DDIM steps (default ``config.ddim_steps``); the DDPM sampler runs all T.
            sampler: ``'ddim'`` or ``'ddpm'`` (default ``config.sampler``).
            eta: DDIM stochasticity (default ``config.eta``); DDPM uses the posterior (eta=1).
            generator: source of the start and step noise.
            return_trajectory: also return every intermediate state.
        """
        sampler = sampler or self.config.sampler
        _check_choice("sampler", sampler, SAMPLERS)
        if sampler == "ddpm":
            if steps not in (None, self.num_timesteps):
                raise ValueError(f"the DDPM sampler runs all {self.num_timesteps} timesteps; got steps={steps}")
            timesteps, eta = torch.arange(self.num_timesteps - 1, -1, -1), 1.0
        else:
            timesteps = inference_timesteps(self.num_timesteps, steps or self.config.ddim_steps,
                                            self.config.timestep_spacing)
            eta = self.config.eta if eta is None else float(eta)
        B, _, *grid = M.shape
        y = M + randn(M.shape, M, generator)  # y_T ~ N(M, I)  (B, C, *grid)
        states = [y] if return_trajectory else None
        next_steps = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
        for t, s in zip(timesteps.tolist(), next_steps.tolist()):
            t_map = torch.full((B, *grid), t, dtype=torch.long, device=M.device)
            t_row = torch.full((B,), t, dtype=torch.long, device=M.device)  # one timestep for every point
            y0_hat = self.to_y0(y0_model(y, t_row).to(y.dtype), y, M, t_map)
            y = self.ddim_step(y0_hat, t_map, s, y, M, eta=eta, generator=generator)
            if return_trajectory:
                states.append(y)
        return SampleOutput(y0=y, timesteps=timesteps, trajectory=torch.stack(states) if return_trajectory else None)
