"""Noise schedules (a registry, append-only), the training timesteps' distribution and timestep respacing."""
from __future__ import annotations

import math
from typing import Callable

import torch


def _linear(num_steps: int) -> torch.Tensor:
    # Ho et al.'s 1e-4..0.02 for 1000 steps, scaled so that other step counts keep the same total noise.
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def _cosine(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {"linear": _linear, "cosine": _cosine}


TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")


def training_timesteps(n: int, num_steps: int, device, distribution: str = "uniform", mean: float = 0.0,
                       std: float = 1.0) -> torch.Tensor:
    """[n] int64 timesteps in [0, num_steps) for a training batch, from the global torch generator.

    ``uniform``: every step alike (DDPM, ADM; the released recipe). ``logit_normal``: t / num_steps =
    sigmoid(mean + std * N(0, 1)) (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 3.1: fewer steps
    at the two ends, where the loss is nearly given; a positive ``mean`` moves them towards the noise, where the
    object's shape and colour are decided)."""
    if distribution == "uniform":
        return torch.randint(0, num_steps, (n,), device=device)
    if distribution == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, device=device))
        return (u * num_steps).long().clamp_(0, num_steps - 1)
    raise ValueError(f"unknown timestep distribution {distribution!r}; choose one of {TIMESTEP_DISTRIBUTIONS}")


def get_betas(name: str, num_steps: int) -> torch.Tensor:
    """[num_steps] float64 betas of the named schedule."""
    if name not in SCHEDULES:
        raise KeyError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_steps)


def space_timesteps(num_steps: int, spacing: str | int) -> list[int]:
    """The original timesteps to keep when sampling with fewer steps, sorted ascending.

    ``spacing`` is a step count (``"100"``), ``"ddimN"`` (a constant stride giving exactly N steps, as
    DDIM uses), or comma-separated counts (``"10,15,20"``) that split [0, num_steps) into equal
    sections and take that many evenly spaced steps from each, first and last step of a section included.

    Example: ``space_timesteps(300, "10,15,20")`` keeps 10 steps of [0, 100), 15 of [100, 200) and 20 of
    [200, 300). An empty string or ``num_steps`` itself keeps every step.
    """
    spacing = str(spacing).strip()
    if spacing == "":
        return list(range(num_steps))
    if spacing.startswith("ddim"):
        want = int(spacing[len("ddim"):])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        if want == num_steps:
            return list(range(num_steps))
        raise ValueError(f"no constant stride over {num_steps} steps gives exactly {want} steps; "
                         f"pick another ddim count")
    counts = [int(c) for c in spacing.split(",")]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps from a section of {section} steps")
        if count < 1:
            raise ValueError(f"each section needs at least one step, got {spacing!r}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += section
    return sorted(set(kept))


def sampler_for(steps: str, sampler: str | None = None) -> str:
    """The sampler a respacing string implies unless one is named: "ddimN" -> ddim, anything else -> ddpm."""
    return sampler or ("ddim" if steps.startswith("ddim") else "ddpm")
