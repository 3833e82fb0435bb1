"""The readout of a trained DiffMIC-3D, fitted on the VALIDATION split after phase 2:
calibration, decision threshold, referral threshold (all stored on the model).

* Calibration: ``p = softmax(a * log q + b)`` per chain, q the chain's grid-mean y_0 on the
  simplex (``models.diffmic3d.readout_logits``), a > 0 one scale, b one bias per class; for
  C = 2 this is Platt scaling of the log-odds. a and b minimise the negative log-likelihood of
  the chain-mean probability on the validation split. The readout before this version divided
  y_0, a probability-like map, by a temperature as if it were a logit, with no bias: on
  AdrenalMNIST3D (23% positive) it then called 13% of the positives positive at 0.5.
* Decision threshold (C = 2): Youden's J on the calibrated validation probabilities
  (``utils.evaluation.thresholds.youden_threshold``), the same rule every model gets.
* Referral threshold: the uncertainty (``REFER_SCORE``, the decision risk: the calibrated
  probability that the decision is wrong) below which ``refer_coverage`` of the validation scans
  lie (``utils.evaluation.uncertainty.refer_threshold``); a scan above it is referred to a human
  reader by ``utils.predict``. Model files written before the score was stored used the margin.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D, log_simplex
from utils.evaluation.thresholds import youden_threshold
from utils.evaluation import uncertainty as u
from utils.log import get_logger
from utils.training.diffusion import predict_dataset
from utils.training.profiles import TrainConfig

log = get_logger(__name__)

SCALE_BOUND = 3.0  # log a lies in [-3, 3]: a in [0.05, 20]
BIAS_BOUND = 5.0  # each bias in [-5, 5]
REFER_SCORE = "risk"  # see diffmic_uncertainty; stored in the model file as "refer_score"
FIRST_REFER_SCORE = "margin"  # the score of model files written before "refer_score" was stored
REFER_SCORES = ("margin", "risk", "spread", "ttest")


def fit_readout(y0_mean: torch.Tensor, labels, l2: float = 1e-3, iterations: int = 200) -> tuple[float, list[float]]:
    """(a, b) minimising the NLL of the chain-mean of ``softmax(a log q + b)`` (module docstring).

    Args:
        y0_mean: (S, N, C) grid means of the final y_0 of S chains per scan (validation).
        labels: (N,) class indices.
        l2: a small penalty on log a and b, so a separable validation split cannot push them to
            infinity; both are also bounded (``SCALE_BOUND``, ``BIAS_BOUND``) and a fit on a
            bound warns.
    """
    z = log_simplex(torch.as_tensor(y0_mean, dtype=torch.float64)).double()  # (S, N, C)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if z.ndim != 3 or z.shape[1] != y.shape[0]:
        raise ValueError(f"fit_readout: y0_mean must be (S, N, C) with N = {y.shape[0]}, got {tuple(z.shape)}")
    alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(z.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([alpha, beta], lr=0.5, max_iter=iterations, line_search_fn="strong_wolfe")

    def params():
        return (torch.exp(SCALE_BOUND * torch.tanh(alpha / SCALE_BOUND)),
                BIAS_BOUND * torch.tanh(beta / BIAS_BOUND))

    def closure():
        optimizer.zero_grad()
        a, b = params()
        probs = torch.softmax(a * z + b, dim=-1).mean(dim=0)  # (N, C)
        nll = -probs[torch.arange(len(y)), y].clamp(min=1e-12).log().mean()
        loss = nll + l2 * (alpha ** 2 + (beta ** 2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (v.detach() for v in params())
    if abs(float(torch.log(a))) > 0.98 * SCALE_BOUND or float(b.abs().max()) > 0.98 * BIAS_BOUND:
        warnings.warn(f"readout fit reached its bound (scale {float(a):.3g}, bias {b.tolist()}): the validation "
                      f"split ({len(y)} scans) barely constrains it", RuntimeWarning, stacklevel=2)
    b = b - b.mean()  # softmax is unchanged by a common shift
    return float(a), [float(v) for v in b]


def diffmic_uncertainty(out: dict, threshold: float, score: str = REFER_SCORE) -> np.ndarray:
    """Per-scan uncertainty (N,) of ``predict``-style outputs (``probs`` (N, C), ``samples`` (S, N, C)):
    ``'margin'`` = minus the distance of the chain-mean decision from its threshold
    (``uncertainty.threshold_margin``), ``'risk'`` = the calibrated probability that the
    chain-mean decision is wrong (``uncertainty.decision_risk``), ``'spread'`` = the chains'
    spread, ``'ttest'`` = CARD's top-2 t-test p-value."""
    probs = np.asarray(out["probs"], dtype=np.float64)
    binary_threshold = threshold if probs.shape[1] == 2 else None
    if score == "margin":
        return -u.threshold_margin(probs, binary_threshold)
    if score == "risk":
        return u.decision_risk(probs, binary_threshold)
    samples = np.asarray(out["samples"], dtype=np.float64)
    if score == "spread":
        return u.chain_spread(samples)
    if score == "ttest":
        return u.ttest_top2_pvalue(samples)
    raise ValueError(f"unknown uncertainty score {score!r}; choose 'margin', 'risk', 'spread' or 'ttest'")


@torch.no_grad()
def calibrate_readout(model: DiffMIC3D, val_set: Dataset, val_guidance: DCGOutput | list[DCGOutput],
                      config: TrainConfig, device: torch.device) -> dict:
    """Fit the readout, the decision threshold and the referral threshold on the VALIDATION
    split, sampling exactly as the test predictions will (the model's ``num_samples`` and
    ``ddim_steps``, the run's seed), and store them on the model. Deterministic, so a resumed
    run refits the same values. Returns ``{'scale', 'bias', 'decision_threshold', 'refer_threshold'}``.
    """
    model.set_readout(1.0, [0.0] * model.config.num_classes)
    out = predict_dataset(model, val_set, val_guidance, device, config.batch_size, config.seed,
                          num_workers=config.num_workers)
    labels = np.asarray(val_set.labels)
    scale, bias = fit_readout(out["y0_mean"], labels)
    model.set_readout(scale, bias)
    z = log_simplex(out["y0_mean"])  # (S, N, C): the chains as predict sees them, now calibrated
    samples = torch.softmax(scale * z + torch.tensor(bias), dim=-1)
    calibrated = {"probs": samples.mean(0).numpy(), "samples": samples.numpy()}
    decision = 0.5
    if model.config.num_classes == 2 and len(np.unique(labels)) == 2:
        decision = float(np.clip(youden_threshold(labels, calibrated["probs"]), 1e-6, 1 - 1e-6))
    refer = u.refer_threshold(diffmic_uncertainty(calibrated, decision), config.refer_coverage)
    model.set_thresholds(decision=decision, refer=refer if math.isfinite(refer) else math.inf)
    return {"scale": scale, "bias": bias, "decision_threshold": decision, "refer_threshold": refer}


def warn_if_inverted(history: dict) -> Optional[str]:
    """A warning (logged and returned) when the phase-2 model kept ranks the validation scans
    below chance: its test figures then mean little. ``history``: phase 2's ``history.json``
    entry (per-epoch series, ``best_epoch`` and, from runs that validate the correction,
    ``correction_check``: ``utils.training.diffusion.check_correction``). The model kept is the
    selected epoch, or its prior ensemble where the correction was switched off; None otherwise."""
    best = history.get("best_epoch")
    if not best:
        return None
    check = history.get("correction_check")
    if check is not None and not check["kept"]:
        auc, what = check["val_auc_prior_only"], "its prior ensemble (the correction switched off)"
    else:
        auc, what = history["val_auc"][best - 1], f"the selected epoch {best}"
    if auc is None or not math.isfinite(auc) or auc >= 0.5:
        return None
    message = (f"phase 2 kept {what}, whose validation AUC is {auc:.3f} (below chance): DiffMIC-3D ranks the "
               "scans against the labels. Known causes: weak, overconfident out-of-fold priors under DiffMIC-v2's "
               "label-dependent loss weights (error_weighting='label'), DCGs that rank validation below chance, "
               "or too few validation scans to select on (README, Model)")
    log.warning(message)
    return message
