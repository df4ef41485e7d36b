"""Variability: many samples from one embedding against samples across embeddings. The per-pixel spread of one
embedding's samples is what the embedding leaves free; near 0 the embedding fixes the image, near 1 a sample
varies as much as images of different embeddings do."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rcdm.analysis.base import Inputs, Result
from rcdm.errors import UserError
from rcdm.grids import cells_png

NAME = "variability"


@dataclass
class Options:
    samples: int = 8  # draws per embedding


def variability(samples: torch.Tensor) -> dict:
    """``samples`` [N images, M samples, 3, S, S]: what varies when the embedding is fixed.

    within: per-pixel std over the M samples of one embedding (averaged over channels) [N, S, S];
    between: per-pixel std over the N embeddings of one sample each, averaged over the M draws [S, S];
    ratio per image = mean within / mean between: near 0, the embedding fixes the image; near 1, a sample
    varies as much as images of different embeddings do."""
    if samples.shape[1] < 2 or samples.shape[0] < 2:
        raise ValueError("variability needs at least 2 images and 2 samples per image")
    within = samples.float().std(1).mean(1)  # [N, S, S]
    between = samples.float().std(0).mean(1).mean(0)  # [S, S]
    ratio = within.mean((1, 2)) / between.mean()
    return {"within": within, "between": between, "ratio": ratio.tolist(), "ratio_mean": float(ratio.mean()),
            "within_mean": within.mean((1, 2)).tolist(), "between_mean": float(between.mean())}


def variability_png(originals: torch.Tensor, samples: torch.Tensor, within: torch.Tensor) -> bytes:
    """Rows: the original, its samples, then the per-pixel std heatmap (one scale for all rows)."""
    import matplotlib

    cmap = matplotlib.colormaps["magma"]
    heat = within / within.max().clamp_min(1e-8)
    heat_rgb = torch.from_numpy(cmap(heat.cpu().numpy())[..., :3]).permute(0, 3, 1, 2).float() * 2 - 1
    n, m = samples.shape[:2]
    cells = torch.cat([originals.cpu()[:, None], samples.cpu(), heat_rgb[:, None]], 1)
    return cells_png(cells.flatten(0, 1), m + 2)


def run(inputs: Inputs, opts: Options) -> Result:
    inputs.need(2, NAME)
    if opts.samples < 2:
        raise UserError("variability needs variability.samples >= 2")
    h, shown = inputs.embeddings, inputs.images
    n, m = len(h), opts.samples
    samples = inputs.draw(h.repeat_interleave(m, 0)).view(n, m, *shown.shape[1:])
    v = variability(samples)
    numbers = {k: v[k] for k in ("ratio", "ratio_mean", "within_mean", "between_mean")}
    numbers["samples_per_image"] = m
    return Result(numbers, {"variability_ratio_mean": numbers["ratio_mean"]},
                  {"": variability_png(shown, samples, v["within"])})
