"""The standard SSL augmentations at the demo images' resolution, batched with per-sample parameters.

Two global views (random resized crop, flip, colour jitter, grayscale, Gaussian blur, and
solarisation on the second view as in BYOL/VICReg/Barlow Twins) and, for DINO, small local crops
(multi-crop). Everything runs as a few tensor ops on the whole batch: per-image PIL or torchvision
transforms cost ~35 ms a view here, more than the tiny encoder's step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


@dataclass
class AugmentConfig:
    size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # per global view
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    local_crops: int = 0  # DINO multi-crop
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.4)


# Random draws come from a CPU generator and then move to the images' device: the same seed gives the
# same views on CPU and GPU, and a batch already on the GPU is augmented there.
def _u(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _bernoulli(n: int, p: float, g: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def resized_crop(x: torch.Tensor, size: int, scale: tuple, ratio: tuple, g: torch.Generator) -> torch.Tensor:
    """Per-sample random area/aspect crops resampled bilinearly to size x size. x: [B, 3, H, W] float."""
    b, _, h, w = x.shape
    area = _u(b, *scale, g) * h * w
    log_r = _u(b, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    x0 = torch.rand(b, generator=g) * (w - cw)
    y0 = torch.rand(b, generator=g) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float), x0, y0, x0 + cw, y0 + ch], 1)
    return roi_align(x, boxes.to(x), output_size=size, aligned=True, sampling_ratio=2)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # [B, 1, H, W]


def adjust_colour(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                  hue: torch.Tensor) -> torch.Tensor:
    """Colour jitter with given per-sample factors [B] (1, 1, 1, 0 leave an image as it is): brightness,
    contrast and saturation scale, hue rotates chroma around the grey axis (YIQ) by ``hue`` turns. x in [0, 1]."""
    def per_sample(f: torch.Tensor) -> torch.Tensor:
        return f.to(x)[:, None, None, None]

    y = x * per_sample(brightness)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * per_sample(contrast) + mean
    gray = _gray(y)
    y = (y - gray) * per_sample(saturation) + gray
    theta = hue.float().cpu() * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(len(x), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), -torch.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(theta), torch.cos(theta)
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m.to(x), y).clamp(0, 1)


def jitter_ranges(jitter: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """(low, high) of each of ``adjust_colour``'s factors for the jitter amounts (brightness, contrast,
    saturation, hue); the middle of each range leaves an image as it is."""
    br, co, sa, hue = jitter
    return [(1 - br, 1 + br), (1 - co, 1 + co), (1 - sa, 1 + sa), (-hue, hue)]


def colour_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each with its own factor drawn per sample from
    ``cfg.jitter``'s ranges; applied with probability jitter_p. x in [0, 1]."""
    b = len(x)
    on = _bernoulli(b, cfg.jitter_p, g, x.device)[:, None, None, None]
    factors = [_u(b, lo, hi, g) for lo, hi in jitter_ranges(cfg.jitter)]
    return torch.where(on, adjust_colour(x, *factors), x)


def blur(x: torch.Tensor, p: float, sigma: tuple, g: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    s = _u(b, *sigma, g)
    k1 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0])[None] ** 2 / (2 * s[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # [B, 3]
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [B*C, 1, 3, 3]
    y = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="reflect"), k2.to(x), groups=b * c)
    return torch.where(_bernoulli(b, p, g, x.device)[:, None, None, None], y.reshape(b, c, h, w), x)


def view(x: torch.Tensor, size: int, scale: tuple, cfg: AugmentConfig, blur_p: float, solarize_p: float,
         g: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch: uint8 [B, 3, H, W] -> float [B, 3, size, size] in [0, 1]."""
    b, dev = len(x), x.device
    y = resized_crop(x.float() / 255.0, size, scale, cfg.crop_ratio, g)
    y = torch.where(_bernoulli(b, 0.5, g, dev)[:, None, None, None], y.flip(3), y)
    y = colour_jitter(y, cfg, g)
    y = torch.where(_bernoulli(b, cfg.grayscale_p, g, dev)[:, None, None, None], _gray(y).expand_as(y), y)
    y = blur(y, blur_p, cfg.blur_sigma, g)
    if solarize_p > 0:
        y = torch.where(_bernoulli(b, solarize_p, g, dev)[:, None, None, None] & (y >= 0.5), 1 - y, y)
    return y.clamp(0, 1)


def views(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> list[torch.Tensor]:
    """The global views then the local ones, each [B, 3, s, s] in [0, 1]."""
    out = [view(x, cfg.size, cfg.crop_scale, cfg, bp, sp, g) for bp, sp in zip(cfg.blur_p, cfg.solarize_p)]
    out += [view(x, cfg.local_size, cfg.local_scale, cfg, 0.5, 0.0, g) for _ in range(cfg.local_crops)]
    return out
