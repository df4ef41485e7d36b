"""Gaussian diffusion: the released models' epsilon prediction with a learned-range variance (Nichol &
Dhariwal 2021), and the v- and x_0-prediction targets with a fixed variance of the newer recipes.

Notation: ``acp`` = alpha_bar_t = prod_{s<=t} (1 - beta_s). With ``learn_sigma`` the model outputs
[prediction, v] with v in [-1, 1] interpolating the log-variance between the clipped posterior variance
(v = -1) and beta_t (v = +1); without, it outputs the prediction and the variance is the posterior's.
``prediction``: "epsilon" (the noise), "v" (sqrt(acp) eps - sqrt(1 - acp) x_0; Salimans & Ho 2022) or "x0".
A respaced process keeps a subset of the original steps; ``timestep_map`` turns its indices back
into the original timesteps that the network was trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rcdm.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from rcdm.diffusion.schedules import get_betas, space_timesteps

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [N,C,H,W], t [N], cond [N,D])


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


PREDICTIONS = ("epsilon", "v", "x0")
WEIGHTINGS = ("uniform", "min_snr")


class GaussianDiffusion:
    """Forward process, posterior, variational bound, training losses and the two samplers."""

    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None, prediction: str = "epsilon",
                 learn_sigma: bool = True):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.prediction, self.learn_sigma = prediction, learn_sigma
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-d tensor in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))
        self.betas = betas
        alphas = 1.0 - betas
        self.acp = torch.cumprod(alphas, 0)
        self.acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.acp[:-1]])
        self.sqrt_acp = self.acp.sqrt()
        self.sqrt_one_minus_acp = (1.0 - self.acp).sqrt()
        self.sqrt_recip_acp = (1.0 / self.acp).sqrt()
        self.sqrt_recipm1_acp = (1.0 / self.acp - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.acp_prev) / (1.0 - self.acp)
        # The variance is 0 at t = 0; clip the log to the t = 1 value there.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.acp_prev.sqrt() / (1.0 - self.acp)
        self.posterior_mean_coef2 = (1.0 - self.acp_prev) * alphas.sqrt() / (1.0 - self.acp)

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32, broadcastable to ``like`` ([N] -> [N, 1, 1, 1])."""
        out = arr.to(t.device)[t].float()
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # Forward process ----------------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        return self._at(self.sqrt_acp, t, x0) * x0, self._at(1.0 - self.acp, t, x0).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_acp, t, x0) * x0 + self._at(self.sqrt_one_minus_acp, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    # Reverse process ----------------------------------------------------------------------------
    def model_output(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     drop: torch.Tensor | None = None) -> torch.Tensor:
        """The network on respaced index t, fed the original timestep it was trained on; float32 out."""
        t_model = self.timestep_map.to(t.device)[t]
        return (model(x, t_model, cond) if drop is None else model(x, t_model, cond, drop)).float()

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = True) -> dict:
        """p(x_{t-1} | x_t) from the network output ``out`` ([N, 2C, H, W] with learn_sigma, else [N, C, H, W])."""
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        if self.learn_sigma:
            pred, v = out.chunk(2, dim=1)
            max_log = self._at(torch.log(self.betas), t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            pred, log_var = out, min_log.expand_as(xt)
        pred_x0 = self.x0_from_prediction(pred, xt, t)
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_var": log_var, "pred_x0": pred_x0}

    def x0_from_prediction(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return self._at(self.sqrt_recip_acp, t, xt) * xt - self._at(self.sqrt_recipm1_acp, t, xt) * pred
        if self.prediction == "v":  # x_0 = sqrt(acp) x_t - sqrt(1 - acp) v
            return self._at(self.sqrt_acp, t, xt) * xt - self._at(self.sqrt_one_minus_acp, t, xt) * pred
        return pred

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output (its first C channels) for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v":
            return self._at(self.sqrt_acp, t, x0) * noise - self._at(self.sqrt_one_minus_acp, t, x0) * x0
        return x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio acp / (1 - acp) at t [N] -> [N] float32."""
        return (self.acp / (1.0 - self.acp)).to(t.device)[t].float()

    def loss_weight(self, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
        """Per-sample weight [N] of the prediction MSE. ``min_snr`` (Hang et al. 2023, "Efficient Diffusion
        Training via Min-SNR Weighting Strategy"): the x_0-space weight min(SNR, gamma), expressed for the
        prediction target: / SNR for epsilon, / (SNR + 1) for v."""
        if weighting == "uniform":
            return torch.ones(len(t), device=t.device)
        if weighting != "min_snr":
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.prediction == "epsilon":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._at(self.sqrt_recip_acp, t, xt) * xt - x0) / self._at(self.sqrt_recipm1_acp, t, xt)

    # Training -----------------------------------------------------------------------------------
    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term L_t in bits per dimension: KL to the true posterior, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t, clip=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_var"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_var"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                        noise: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                        weighting: str = "uniform", min_snr_gamma: float = 5.0) -> dict[str, torch.Tensor]:
        """Per-sample losses: ``mse`` of the prediction target, weighted by ``weighting``, plus with learn_sigma
        ``vb`` (L_t scaled by T/1000): the released models' hybrid loss (epsilon, uniform, learned sigma).

        The VLB term sees the mean through a stop-gradient, so it trains only the variance and the MSE
        alone trains the mean, as the released models were trained. ``drop`` [N] bool: rows conditioned on
        the null embedding (representation dropout).
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = self.model_output(model, xt, t, cond, drop)
        pred = out.chunk(2, dim=1)[0] if self.learn_sigma else out
        mse = _mean_flat((self.target(x0, noise, t) - pred) ** 2)
        loss = mse * self.loss_weight(t, weighting, min_snr_gamma) if weighting != "uniform" else mse
        if not self.learn_sigma:
            return {"loss": loss, "mse": mse}
        frozen = torch.cat([pred.detach(), out.chunk(2, dim=1)[1]], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
        return {"loss": loss + vb, "mse": mse, "vb": vb}

    # Sampling -----------------------------------------------------------------------------------
    def _indices(self) -> Iterator[int]:
        return reversed(range(self.num_timesteps))

    @torch.no_grad()
    def ddpm_sample(self, model: Model, cond: torch.Tensor, shape: tuple[int, ...],
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral sampling x_T -> x_0; returns [N, C, H, W] in [-1, 1]."""
        device = cond.device
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        for i in self._indices():
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            p = self.p_mean_variance(self.model_output(model, x, t, cond), x, t)
            z = torch.randn(shape, generator=generator, device=device) if i > 0 else 0.0
            x = p["mean"] + torch.exp(0.5 * p["log_var"]) * z
        return x

    @torch.no_grad()
    def ddim_sample(self, model: Model, cond: torch.Tensor, shape: tuple[int, ...], eta: float = 0.0,
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021): deterministic for eta = 0; returns [N, C, H, W] in [-1, 1]."""
        device = cond.device
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        for i in self._indices():
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            p = self.p_mean_variance(self.model_output(model, x, t, cond), x, t)
            eps = self.eps_from_x0(x, t, p["pred_x0"])  # consistent with the clipped x_0
            ab, ab_prev = self._at(self.acp, t, x), self._at(self.acp_prev, t, x)
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = p["pred_x0"] * ab_prev.sqrt() + (1 - ab_prev - sigma ** 2).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return x

    def sample(self, model: Model, cond: torch.Tensor, shape: tuple[int, ...], sampler: str = "ddpm",
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        if sampler == "ddpm":
            return self.ddpm_sample(model, cond, shape, generator=generator, noise=noise)
        if sampler == "ddim":
            return self.ddim_sample(model, cond, shape, generator=generator, noise=noise)
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")


@dataclass(frozen=True)
class Process:
    """What a model was trained to reverse and how its output reads: all that sampling it needs."""

    schedule: str = "linear"
    num_steps: int = 1000
    prediction: str = "epsilon"
    learn_sigma: bool = True

    def build(self, respacing: str | int = "") -> GaussianDiffusion:
        return create_diffusion(self.schedule, self.num_steps, respacing, self.prediction, self.learn_sigma)

    def to_dict(self) -> dict:
        return {"schedule": self.schedule, "num_steps": self.num_steps, "prediction": self.prediction,
                "learn_sigma": self.learn_sigma}


RELEASED = Process()  # the official RCDM release: linear over 1000 steps, epsilon, learned sigma


def create_diffusion(schedule: str = "linear", num_steps: int = 1000, respacing: str | int = "",
                     prediction: str = "epsilon", learn_sigma: bool = True) -> GaussianDiffusion:
    """The ``schedule`` process over ``num_steps``, optionally respaced (see ``space_timesteps``).

    Respacing keeps alpha_bar at the kept steps and recomputes each kept step's beta from it, so the
    shorter chain has the same marginals q(x_t | x_0) at the steps it keeps.
    """
    betas = get_betas(schedule, num_steps)
    kept = space_timesteps(num_steps, respacing)
    if len(kept) == num_steps:
        return GaussianDiffusion(betas, prediction=prediction, learn_sigma=learn_sigma)
    acp = torch.cumprod(1.0 - betas, 0)
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1.0 - acp[i].item() / last)
        last = acp[i].item()
    return GaussianDiffusion(torch.tensor(new_betas, dtype=torch.float64), timestep_map=kept, prediction=prediction,
                             learn_sigma=learn_sigma)
