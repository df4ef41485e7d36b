"""Gaussian diffusion with epsilon prediction and a learned-range variance (Nichol & Dhariwal 2021).

Notation: ``acp`` = alpha_bar_t = prod_{s<=t} (1 - beta_s). The model outputs [eps, v] with v in [-1, 1]
interpolating the log-variance between the clipped posterior variance (v = -1) and beta_t (v = +1).
A respaced process keeps a subset of the original steps; ``timestep_map`` turns its indices back
into the original timesteps that the network was trained on.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from rcdm.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from rcdm.diffusion.schedules import get_betas, space_timesteps

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [N,C,H,W], t [N], cond [N,D])


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """Forward process, posterior, variational bound, hybrid loss and the two samplers."""

    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None):
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
    def model_output(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network on respaced index t, fed the original timestep it was trained on; float32 out."""
        return model(x, self.timestep_map.to(t.device)[t], cond).float()

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = True) -> dict:
        """p(x_{t-1} | x_t) from the network output ``out`` [N, 2C, H, W]."""
        eps, v = out.chunk(2, dim=1)
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(torch.log(self.betas), t, xt)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_acp, t, xt) * xt - self._at(self.sqrt_recipm1_acp, t, xt) * eps
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_var": log_var, "pred_x0": pred_x0, "eps": eps}

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
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The hybrid loss, per sample: ``mse`` on epsilon plus ``vb`` (L_t scaled by T/1000).

        The VLB term sees the mean through a stop-gradient, so it trains only the variance and the MSE
        alone trains the mean, as the released models were trained.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = self.model_output(model, xt, t, cond)
        eps, v = out.chunk(2, dim=1)
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

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


def create_diffusion(schedule: str = "linear", num_steps: int = 1000, respacing: str | int = "") -> GaussianDiffusion:
    """The ``schedule`` process over ``num_steps``, optionally respaced (see ``space_timesteps``).

    Respacing keeps alpha_bar at the kept steps and recomputes each kept step's beta from it, so the
    shorter chain has the same marginals q(x_t | x_0) at the steps it keeps.
    """
    betas = get_betas(schedule, num_steps)
    kept = space_timesteps(num_steps, respacing)
    if len(kept) == num_steps:
        return GaussianDiffusion(betas)
    acp = torch.cumprod(1.0 - betas, 0)
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1.0 - acp[i].item() / last)
        last = acp[i].item()
    return GaussianDiffusion(torch.tensor(new_betas, dtype=torch.float64), timestep_map=kept)
