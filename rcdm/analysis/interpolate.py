"""Interpolation between two images' embeddings (the paper's finding 4): samples along a path from A's embedding
to B's, one row per noise with the noise fixed along the row; numbers: each path point's cosine to both ends,
the re-encoded samples' cosine to both ends and the share of steps along which the samples move towards B;
with known factors, the factor reader's share of A's and B's values along the path."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcdm.analysis.base import Inputs, Result
from rcdm.analysis.factors import synthetic_reader
from rcdm.analysis.faithfulness import reencode
from rcdm.device import autocast
from rcdm.diffusion.gaussian import Process
from rcdm.errors import UserError
from rcdm.grids import cells_png
from rcdm.sampling import Sampling, guided
from rcdm.config import READER_STEPS

NAME = "interpolate"


@dataclass
class Options:
    points: int = 8  # path points, ends included
    rows: int = 3  # noises, one row each
    mode: str = "linear"  # linear | spherical (slerp of the directions, norms interpolated)
    reader_steps: int = READER_STEPS  # training steps of the synthetic-factor reader (cached once trained)


def embedding_path(h0: torch.Tensor, h1: torch.Tensor, alphas: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """[K, D] points from h0 (alpha 0) to h1 (alpha 1). ``spherical``: slerp of the directions with the
    norm interpolated linearly (embeddings of different norms stay on their scale)."""
    a = alphas.to(h0)[:, None]
    if mode == "linear":
        return (1 - a) * h0 + a * h1
    if mode != "spherical":
        raise ValueError(f"unknown interpolation {mode!r}; choose linear or spherical")
    n0, n1 = h0.norm(), h1.norm()
    u0, u1 = h0 / n0, h1 / n1
    omega = torch.arccos((u0 * u1).sum().clamp(-1, 1))
    if omega < 1e-6:
        direction = u0.expand(len(a), -1)
    else:
        direction = (torch.sin((1 - a) * omega) * u0 + torch.sin(a * omega) * u1) / torch.sin(omega)
    return direction * ((1 - a) * n0 + a * n1)


def sample_fixed_noise(model, process: Process, cond: torch.Tensor, how: Sampling,
                       seed: int | None = None) -> torch.Tensor:
    """One sample per row of ``cond`` [K, D], every row from the same noise (seeded by ``seed``, else
    ``how.seed``): the same x_T and, for DDPM, the same per-step noise (each row is drawn with an identically
    seeded generator)."""
    diffusion = process.build(str(how.steps))
    size = model.cfg.image_size
    model = guided(model, how.guidance)
    sampler, batch_size, seed = how.kind, how.batch_size, how.seed if seed is None else seed
    device = cond.device
    x_t = torch.randn((1, 3, size, size), generator=torch.Generator(device="cpu").manual_seed(seed)).to(device)
    out = []
    with autocast(device):
        if sampler == "ddim":  # deterministic given x_T: batch the rows
            for chunk in cond.split(batch_size):
                out.append(diffusion.sample(model, chunk, (len(chunk), 3, size, size), "ddim",
                                            noise=x_t.expand(len(chunk), -1, -1, -1).clone()).float())
        else:
            for row in cond.split(1):
                gen = torch.Generator(device=device).manual_seed(seed + 1)
                out.append(diffusion.sample(model, row, (1, 3, size, size), sampler, generator=gen,
                                            noise=x_t.clone()).float())
    return torch.cat(out).clamp(-1, 1)


def interpolate(inputs: Inputs, opts: Options) -> tuple[torch.Tensor, dict]:
    """Samples [rows, points, 3, S, S] along the path between ``inputs``' two embeddings (a row = one noise) and
    the numbers: how similar each path point is to both ends, and how similar the re-encoded samples are to both
    ends."""
    h0, h1 = inputs.embeddings.to(inputs.device)
    points, rows, mode, how = opts.points, opts.rows, opts.mode, inputs.sampling
    alphas = torch.linspace(0, 1, points)
    path = embedding_path(h0, h1, alphas, mode)
    grid = torch.stack([sample_fixed_noise(inputs.loaded.model, inputs.loaded.process, path, how, how.seed + r)
                        for r in range(rows)])  # [rows, points, 3, S, S]
    g = reencode(inputs.encoder, inputs.level, grid.flatten(0, 1)).view(rows, points, -1)
    cos = lambda x, y: F.cosine_similarity(x, y.expand_as(x), dim=-1)  # noqa: E731
    numbers = {
        "alphas": alphas.tolist(), "mode": mode, "rows": rows,
        "path_cosine_to_a": cos(path, h0).tolist(), "path_cosine_to_b": cos(path, h1).tolist(),
        "sample_cosine_to_a": cos(g, h0).mean(0).tolist(), "sample_cosine_to_b": cos(g, h1).mean(0).tolist(),
    }
    # the samples should move from A to B: share of consecutive path points whose samples get closer to B
    d = torch.tensor(numbers["sample_cosine_to_b"]) - torch.tensor(numbers["sample_cosine_to_a"])
    numbers["monotone_fraction"] = float((d[1:] >= d[:-1]).float().mean())
    return grid, numbers


def factor_path(net, grid: torch.Tensor, factors_a: dict, factors_b: dict) -> dict:
    """The factor reader on the path's samples ``grid`` [rows, points, 3, S, S]: for each generative factor that
    differs between A and B, the share of samples (over rows) at each point that show A's value and B's value,
    and their means over those factors (``shows_a``/``shows_b``): a path that moves from A to B goes from
    (1, 0) to (0, 1)."""
    from rcdm.analysis.factors import predict, true_factors

    truth = true_factors([factors_a, factors_b])
    rows, points = grid.shape[:2]
    pred = {k: v.view(rows, points) for k, v in predict(net, grid.flatten(0, 1)).items()}
    differ = [k for k, (y, m) in truth.items() if bool(m.all()) and int(y[0]) != int(y[1])]
    out = {"differing": differ, "per_factor": {}}
    for k in differ:
        y = truth[k][0]
        out["per_factor"][k] = {"shows_a": (pred[k] == y[0]).float().mean(0).tolist(),
                                "shows_b": (pred[k] == y[1]).float().mean(0).tolist()}
    for end in ("shows_a", "shows_b"):
        out[end] = ([float(sum(out["per_factor"][k][end][p] for k in differ) / len(differ)) for p in range(points)]
                    if differ else [])
    return out


def interpolation_png(a: torch.Tensor, b: torch.Tensor, grid: torch.Tensor) -> bytes:
    """Rows: image A, the samples along the path, image B (all in [-1, 1])."""
    rows, points = grid.shape[:2]
    cells = torch.cat([a.cpu()[None, None].expand(rows, 1, -1, -1, -1), grid.cpu(),
                       b.cpu()[None, None].expand(rows, 1, -1, -1, -1)], 1)
    return cells_png(cells.flatten(0, 1), points + 2)


def run(inputs: Inputs, opts: Options) -> Result:
    if len(inputs.names) != 2:
        raise UserError(f"interpolate takes exactly 2 images, got {len(inputs.names)}: images=[a.png,b.png]")
    shown = inputs.images
    grid, numbers = interpolate(inputs, opts)
    metrics = {"interpolate_monotone_fraction": numbers["monotone_fraction"]}
    if inputs.factors is not None:  # read the generative factors off the path's samples
        reader, report = inputs.reader_or(synthetic_reader, opts.reader_steps)
        numbers["factors"] = factor_path(reader, grid.cpu(), *inputs.factors)
        numbers["factor_predictor"] = report["test_accuracy"]
        ends = numbers["factors"]["shows_b"]
        if ends:
            metrics["interpolate_shows_b_at_a"], metrics["interpolate_shows_b_at_b"] = ends[0], ends[-1]
    return Result(numbers, metrics, {"": interpolation_png(shown[0], shown[1], grid)})
