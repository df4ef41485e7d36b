"""Gaussian KL and the discretised decoder likelihood used by the variational bound."""
from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit images x in [-1, 1] under N(mean, e^(2 log_scale)).

    Each pixel value owns the bin [x - 1/255, x + 1/255]; the outermost bins extend to -inf and +inf.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=tiny))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=tiny))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def quartile_means(values: torch.Tensor, t: torch.Tensor, num_steps: int, prefix: str) -> dict[str, float]:
    """Mean of per-sample ``values`` [N] within each quarter of [0, num_steps): ``{prefix}_q0`` .. ``_q3``."""
    quarter = (t * 4 // num_steps).clamp(max=3)
    out = {}
    for q in range(4):
        sel = quarter == q
        if sel.any():
            out[f"{prefix}_q{q}"] = values[sel].mean().item()
    return out
