"""DiffMIC-3D: the DCG-guided diffusion classifier for 3D CT, composed from its parts.

Pipeline (DiffMIC, Yang et al. MICCAI 2023, fig. 2, made 3D; CARD, Han et al. 2022):

    scan (B, 1, H, W, D) --each DCG member (frozen in phase 2, run ONCE per volume)--> DCGOutput
        --PriorGenerator--> M (B, C, Np, Np, Np), F (B, feature_dim)
        --ConditionalDenoiser.condition(scan, M, F)--> cond (B, E, Np, Np, Np)   (once per volume)
        --PriorShiftedDiffusion.sample(per-point head)--> y_0 (B, C, Np, Np, Np)  (S chains)
        --readout: softmax(a log(grid mean of y_0) + b), mean over S--> probabilities (B, C)

Members: the final DCG and, when phase 2 trained on out-of-fold priors, the ``fold_dcgs``
DCGs that made them. Phase 2 learns from priors a DCG gave scans it did not train on; at
inference every member gives such a prior for a new scan and the S chains are spread over
the members (chain s reads member s mod m), so the chains' spread includes the members'
disagreement (a small deep ensemble of priors) and the denoiser never sees a kind of prior
it was not trained on.

Training is two-phase: phase 1 trains the DCG alone (``dcg_loss``); phase 2 freezes it
(``freeze_dcg``), caches its outputs per volume and trains the prior generator and the
denoiser (its own image encoder, the condition U-Net, the per-point head that starts from M and
learns a correction) on ``diffusion_loss``: heterologous y_0-prediction MSE + CE, optionally
weighted per volume, with prior dropout (a share of the volumes see a uniform guidance map and
no feature prior, so the denoiser must read the scan).
The readout's calibration (a scale and a per-class bias on the log of the grid-mean y_0: Platt
scaling for C = 2), the decision threshold and the referral threshold are learned state of
this model, fitted on the validation split by the training code (``set_readout``,
``set_thresholds``); the noise schedule holds none.

Checkpoints hold ``{'model_config': config.to_dict(), 'model_state_dict': state_dict()}``:

    checkpoint = torch.load(path, weights_only=True)
    model = DiffMIC3D(ModelConfig.from_dict(checkpoint['model_config']))
    model.load_state_dict(checkpoint['model_state_dict'])
    probs = model(scan)   # (B, C), rows sum to 1
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.dcg_model import DCG, DCGOutput, dcg_objective
from models.denoiser import ConditionalDenoiser
from models.diffusion_process import PriorShiftedDiffusion
from models.model_config import MODEL_SECTIONS, PRESETS, SHARED_FIELDS, ModelConfig  # noqa: F401 (re-exported)
from models.prior_generator import PriorGenerator, Priors

# model


READOUT_EPS = 1e-3  # the grid-mean y_0 is clipped here before its log (a chain may overshoot 0 or 1)


def log_simplex(q: torch.Tensor) -> torch.Tensor:
    """Grid-mean class values q (..., C), clipped to ``READOUT_EPS`` and renormalised to sum 1
    over C, then their log: the readout's logits."""
    q = q.float().clamp(min=READOUT_EPS)
    return torch.log(q / q.sum(dim=-1, keepdim=True))


def readout_logits(y: torch.Tensor) -> torch.Tensor:
    """Logits (..., C) of class maps y (..., C, Np, Np, Np): ``log_simplex`` of the grid mean.
    The y_0-prediction MSE makes y_0 an estimate of the class probabilities (it starts at the
    prior M, a probability map), so the log is their natural logit."""
    return log_simplex(y.float().mean(dim=(-3, -2, -1)))


class DiffMIC3D(nn.Module):
    """DCG members + prior generator + conditional denoiser + prior-shifted diffusion + readout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dcg = DCG(config.dcg)
        # the out-of-fold DCGs that made phase 2's training priors (PriorConfig.fold_dcgs)
        self.fold_dcgs = nn.ModuleList(DCG(config.dcg) for _ in range(config.prior.fold_dcgs))
        self.prior_generator = PriorGenerator(config.prior)
        self.denoiser = ConditionalDenoiser(config.denoiser)
        self.diffusion = PriorShiftedDiffusion(config.diffusion)
        C = config.num_classes
        # Learned state fitted on the validation split after phase 2 (utils.training.diffusion):
        # the readout's calibration softmax(scale * readout_logits + bias) (Platt scaling for C = 2),
        self.register_buffer("readout_scale", torch.ones(()))
        self.register_buffer("readout_bias", torch.zeros(C))
        # the decision threshold on p(class 1) (C = 2; argmax otherwise) and the uncertainty
        # above which a scan is referred (inf: never).
        self.register_buffer("decision_threshold", torch.full((), 0.5))
        self.register_buffer("refer_threshold", torch.full((), math.inf))

    @classmethod
    def from_config_dict(cls, data: Mapping) -> "DiffMIC3D":
        """``DiffMIC3D(ModelConfig.from_dict(data))``."""
        return cls(ModelConfig.from_dict(data))

    @property
    def num_members(self) -> int:
        """DCGs that give priors at inference: the final one and the fold DCGs."""
        return 1 + len(self.fold_dcgs)

    # -- phase 1 -------------------------------------------------------------------------

    def dcg_loss(self, scan: torch.Tensor, labels: torch.Tensor, x_hires: Optional[torch.Tensor] = None,
                 **kwargs) -> dict[str, torch.Tensor]:
        """Phase-1 objective of the DCG (``models.dcg_model.dcg_objective``; keyword arguments
        such as ``label_smoothing`` and ``progress`` are passed on).

        Returns dict(loss, global_ce, local_ce, output) with ``output`` the DCGOutput.
        """
        return dcg_objective(self.dcg, scan, labels, x_hires, **kwargs)

    def freeze_dcg(self) -> "DiffMIC3D":
        """Freeze every DCG member for phase 2 (no gradients, eval mode); returns self."""
        for dcg in (self.dcg, *self.fold_dcgs):
            dcg.requires_grad_(False)
            dcg.eval()
        return self

    # -- phase 2 and inference -----------------------------------------------------------

    @torch.no_grad()
    def guidance(self, scan: torch.Tensor, x_hires: Optional[torch.Tensor] = None) -> DCGOutput:
        """Run the final (frozen) DCG once on ``scan`` (B, 1, H, W, D); cache the result per volume."""
        return self.dcg(scan, x_hires)

    @torch.no_grad()
    def member_guidance(self, scan: torch.Tensor, x_hires: Optional[torch.Tensor] = None) -> list[DCGOutput]:
        """Every member's DCG outputs for ``scan``: [final DCG, fold DCG 0, 1, ...]."""
        return [dcg(scan, x_hires) for dcg in (self.dcg, *self.fold_dcgs)]

    def priors(self, guidance: DCGOutput) -> Priors:
        """The dense guidance map M and the feature prior F of the (cached) DCG outputs."""
        g = guidance
        return self.prior_generator(g.global_probs, g.local_probs, g.global_features, g.roi_features)

    def _prior_tensors(self, guidance: DCGOutput,
                       drop_prior: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M (B, C, Np^3), F (B, feature_dim)); ``drop_prior`` (B,) bool volumes get a uniform M
        (1/C) and a zero F (prior dropout, training only)."""
        priors = self.priors(guidance)
        M, F_prior = priors.guidance_map, priors.feature_prior
        if drop_prior is not None:
            keep = (~drop_prior).to(M.dtype)
            M = M * keep[:, None, None, None, None] + (1 - keep[:, None, None, None, None]) / M.shape[1]
            F_prior = F_prior * keep[:, None]
        return M, F_prior

    def condition(self, scan: torch.Tensor, guidance: DCGOutput,
                  drop_prior: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M (B, C, Np, Np, Np), cond (B, E, Np, Np, Np)) for a batch and one member's guidance;
        run once per volume. ``drop_prior``: see ``_prior_tensors``."""
        M, F_prior = self._prior_tensors(guidance, drop_prior)
        return M, self.denoiser.condition(scan, M, F_prior)

    def diffusion_loss(self, scan: torch.Tensor, guidance: DCGOutput, labels: torch.Tensor,
                       prior_dropout: float = 0.0, generator: Optional[torch.Generator] = None,
                       weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Phase-2 objective: dict(loss, mse, ce) of ``PriorShiftedDiffusion.training_loss``, plus
        ``image_ce`` (added to ``loss`` with ``DenoiserConfig.image_ce_weight``) when the own image
        encoder is deeply supervised.

        Args:
            scan: (B, 1, H, W, D) the volumes (the denoiser's own encoder reads them).
            guidance: the frozen DCG's outputs for them (cached; out of fold in training).
            labels: (B,) class indices.
            prior_dropout: probability that a volume's priors are replaced (see ``condition``).
            weights: optional (B,) per-volume loss weights.
        """
        drop = None
        if prior_dropout > 0:
            drop = torch.rand(labels.shape[0], generator=generator,
                              device=generator.device if generator is not None else "cpu") < prior_dropout
            drop = drop.to(scan.device)
        M, F_prior = self._prior_tensors(guidance, drop)
        image = self.denoiser.encode_image(scan)  # (B, E_img, Np, Np, Np)
        cond = self.denoiser.condition_from(image, M, F_prior)
        out = self.diffusion.training_loss(lambda y_t, t: self.denoiser(y_t, M, t, cond), M, labels,
                                           generator=generator, weights=weights)
        weight = self.config.denoiser.image_ce_weight
        if weight > 0:  # deep supervision of the own image encoder (unweighted mean over volumes)
            out["image_ce"] = F.cross_entropy(self.denoiser.classify_image(image), labels.to(scan.device).long())
            out["loss"] = out["loss"] + weight * out["image_ce"]
        return out

    def probabilities(self, y: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (..., C) of class maps (..., C, Np, Np, Np):
        ``softmax(readout_scale * readout_logits(y) + readout_bias)``."""
        return torch.softmax(self.readout_scale * readout_logits(y) + self.readout_bias, dim=-1)

    def set_readout(self, scale: float, bias: Sequence[float]) -> None:
        """Store the validation-fitted readout calibration (scale > 0, one bias per class)."""
        bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
        if not scale > 0 or bias.shape != self.readout_bias.shape or not bool(torch.isfinite(bias).all()):
            raise ValueError(f"readout needs scale > 0 and {self.readout_bias.numel()} finite biases, "
                             f"got {scale}, {bias.tolist()}")
        self.readout_scale.fill_(float(scale))
        self.readout_bias.copy_(bias.to(self.readout_bias.device))

    def set_thresholds(self, decision: Optional[float] = None, refer: Optional[float] = None) -> None:
        """Store the validation-chosen decision threshold (on p(class 1), in (0, 1)) and/or the
        referral threshold on the uncertainty (any real; inf: never refer)."""
        if decision is not None:
            if not 0 < decision < 1:
                raise ValueError(f"decision threshold must lie in (0, 1), got {decision}")
            self.decision_threshold.fill_(float(decision))
        if refer is not None:
            if math.isnan(refer):
                raise ValueError("refer threshold must not be NaN")
            self.refer_threshold.fill_(float(refer))

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Class decisions (B,) of probabilities (B, C): class 1 iff p_1 >= the decision
        threshold when C = 2, else the argmax."""
        if probs.shape[-1] == 2:
            return (probs[..., 1] >= self.decision_threshold).long()
        return probs.argmax(dim=-1)

    def chains(self, num_samples: Optional[int] = None) -> int:
        """The number of chains ``predict`` runs: ``num_samples`` (default: the config's) rounded
        up to a multiple of the number of members, so every member gets as many chains."""
        S, m = num_samples or self.config.diffusion.num_samples, self.num_members
        return -(-S // m) * m

    def chain_conditions(self, scan: torch.Tensor, members: Sequence[DCGOutput], S: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The condition branch of ``predict``, once per scan: the own image encoder on ``scan``
        (B, 1, H, W, D) once, the priors and the condition U-Net once for all m ``members`` as
        one batch of m*B, then each of the ``S`` chains pointed at its member's tensors.

        Returns (M_rep (S*B, C, Np^3), cond_rep (S*B, E, Np^3), member (S,)), sample-major:
        row s*B + b is chain s of scan b, which reads member s mod m.
        """
        m, B = len(members), scan.shape[0]
        image = self.denoiser.encode_image(scan)  # (B, E_img, Np^3): once per scan
        priors = [self._prior_tensors(g) for g in members]
        M_all = torch.cat([M for M, _ in priors])  # (m*B, C, Np^3), member-major
        cond_all = self.denoiser.condition_from(image.repeat(m, *(1,) * (image.dim() - 1)), M_all,
                                                torch.cat([F_prior for _, F_prior in priors]))  # (m*B, E, Np^3)
        member = torch.arange(S, device=scan.device) % m  # (S,) chain s reads member s mod m
        M_rep = M_all.unflatten(0, (m, B))[member].flatten(0, 1)
        cond_rep = cond_all.unflatten(0, (m, B))[member].flatten(0, 1)
        return M_rep, cond_rep, member

    def run_chains(self, M_rep: torch.Tensor, cond_rep: torch.Tensor, **sampling):
        """All chains of all scans as one batch: the per-point head once per sampler step over
        the S*B rows of ``chain_conditions``; ``sampling``: steps, sampler, eta, generator,
        return_trajectory of ``PriorShiftedDiffusion.sample``."""
        return self.diffusion.sample(lambda y_t, t: self.denoiser(y_t, M_rep, t, cond_rep), M_rep, **sampling)

    @torch.inference_mode()
    def predict(self, scan: torch.Tensor, guidance: Union[DCGOutput, Sequence[DCGOutput], None] = None,
                x_hires: Optional[torch.Tensor] = None, num_samples: Optional[int] = None,
                sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                generator: Optional[torch.Generator] = None,
                return_trajectory: bool = False) -> dict[str, torch.Tensor]:
        """Class probabilities with uncertainty from reverse chains spread over the members.

        Three parts, each run once per call with no Python loop over chains or grid points:
        the DCG members (unless ``guidance`` is given), :meth:`chain_conditions` and
        :meth:`run_chains`. Runs under ``torch.inference_mode``.

        Args:
            scan: (B, 1, H, W, D) volumes (always needed: the denoiser encodes them).
            guidance: cached DCG outputs for them: one DCGOutput (that prior only) or one per
                member in ``member_guidance`` order; None runs every member here (once each).
            x_hires: the high-resolution copy for ``roi_scale > 1`` (when the DCGs run here).
            num_samples: chains (rounded up to a multiple of the members, ``chains``); sampler,
                steps, eta: override the DiffusionConfig defaults.
            generator: the source of all sampling noise (same seed -> same output).
            return_trajectory: add the per-step class probabilities.

        Returns:
            dict(probs (B, C) mean over chains, std (B, C) their spread, entropy (B,) of the
            mean, samples (S, B, C) each chain's probabilities, y0_mean (S, B, C) grid means of
            the final y_0 (for fitting the readout), member (S,) the member chain s read,
            timesteps (n,) and, if asked, trajectory (S, n + 1, B, C)).
        """
        if guidance is None:
            guidance = self.member_guidance(scan, x_hires)
        members = [guidance] if isinstance(guidance, DCGOutput) else list(guidance)
        m, B = len(members), scan.shape[0]
        S = -(-(num_samples or self.config.diffusion.num_samples) // m) * m
        M_rep, cond_rep, member = self.chain_conditions(scan, members, S)
        out = self.run_chains(M_rep, cond_rep, steps=steps, sampler=sampler, eta=eta, generator=generator,
                              return_trajectory=return_trajectory)
        y0 = out.y0.reshape(S, B, *out.y0.shape[1:])  # (S, B, C, Np, Np, Np)
        samples = self.probabilities(y0)  # (S, B, C)
        probs = samples.mean(dim=0)
        result = {"probs": probs, "std": samples.std(dim=0, unbiased=False),
                  "entropy": -(probs * probs.clamp(min=1e-12).log()).sum(dim=1), "samples": samples,
                  "y0_mean": y0.float().mean(dim=(-3, -2, -1)), "member": member.cpu(), "timesteps": out.timesteps}
        if return_trajectory:
            states = out.trajectory.reshape(out.trajectory.shape[0], S, B, *out.trajectory.shape[2:])
            result["trajectory"] = self.probabilities(states).transpose(0, 1)  # (S, n + 1, B, C)
        return result

    def forward(self, scan: torch.Tensor, x_hires: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Probabilities (B, C) of ``scan`` (every DCG member runs once, then the sampler)."""
        return self.predict(scan, x_hires=x_hires, generator=generator)["probs"]

    # -- reporting -----------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """Parameters per component: dcg_global, dcg_local, prior_generator, image_encoder,
        condition_unet, point_head, total."""
        dcg = self.dcg.param_counts()
        d = self.denoiser
        counts = {
            "dcg_global": dcg["global_encoder"] + dcg["saliency_head"],
            "dcg_local": dcg["local_encoder"] + dcg["attention"] + dcg["local_classifier"],
            "prior_generator": _count(self.prior_generator),
            "image_encoder": (_count(d.image_encoder) + _count(d.image_proj) + _count(d.image_classifier)
                              + _count(d.shape_proj)),
            "condition_unet": _count(d.unet) + _count(d.prior_norm) + _count(d.prior_proj),
            "point_head": _count(d.head),
        }
        if len(self.fold_dcgs):
            counts["fold_dcgs"] = _count(self.fold_dcgs)
        counts["total"] = sum(counts.values())
        return counts

    def format_param_table(self) -> str:
        """Markdown table of ``param_counts`` for the README."""
        names = {"dcg_global": "DCG global stream", "dcg_local": "DCG local stream + MIL",
                 "prior_generator": "Prior generator", "image_encoder": "Denoiser image encoder",
                 "condition_unet": "Condition 3D U-Net", "point_head": "Per-point denoiser head",
                 "fold_dcgs": f"Out-of-fold DCGs ({len(self.fold_dcgs)}, prior members)", "total": "**Total**"}
        rows = ["| Component | Parameters |", "|---|---:|"]
        rows += [f"| {names[k]} | {_human(v)} ({v:,}) |" for k, v in self.param_counts().items()]
        return "\n".join(rows)


def _count(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
