"""Manipulation by nearest-neighbour attribute transfer in embedding space (the RCDM paper's recipe).

The k nearest neighbours of a source image among a folder's embeddings share what makes them close
to it (its background, its colour...). The dimensions they share most are found as those where the
neighbours sit furthest from the folder's mean, in units of the folder's spread, with one sign
(|mean z-score| over the neighbours, the top ``fraction`` of dimensions). Those dimensions of a target
image's embedding are replaced by the neighbours' mean; the RCDM then draws from the edited embedding.
Nothing here needs a GPU.

The number that says whether it worked: on the transferred dimensions, re-encoded samples of the edited
embedding should sit closer to the neighbours' values than re-encoded samples of the target's own
embedding do: ``transfer`` = 1 - distance(edited samples) / distance(target samples) on those
dimensions (0 = nothing carried over, 1 = all of it), with the distance on the other dimensions
reported beside it (what the edit left alone).

Where the images' factors are known (the demo's synthetic images), ``attribute=<factor>`` edits one named
factor instead: the direction from the pool's images with the target's value of that factor to those with the
source's value (the difference of their mean embeddings, the attribute vector of latent arithmetic; Upchurch et
al., "Deep Feature Interpolation", CVPR 2017), added to the target's embedding ``strength`` times. Its number is
the factor reader's: the share of edited samples showing the source's value minus the share among the target's
own samples, and for every other factor that differs, whether the edited samples kept the target's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcdm.analysis.base import Inputs, Result
from rcdm.analysis.factors import FACTORS, predict, synthetic_reader, true_factors
from rcdm.analysis.faithfulness import reencode
from rcdm.errors import UserError
from rcdm.grids import cells_png
from rcdm.config import READER_STEPS

NAME = "manipulate"


@dataclass
class Options:
    source: str | None = None  # the image whose neighbours (among the analysed images) define the attribute
    target: str | None = None  # the image that receives it
    neighbours: int = 10
    fraction: float = 0.1  # share of the dimensions carried over
    samples: int = 8  # draws per embedding
    attribute: str | None = None  # a factor (shape, colour, ...): edit it along its mean difference (factors known)
    strength: float = 1.0  # multiples of that mean difference added to the target
    reader_steps: int = READER_STEPS  # training steps of the synthetic-factor reader (cached once trained)


def shared_dimensions(pool: torch.Tensor, source: torch.Tensor, k: int, fraction: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pool [M, D] embeddings, source [D] -> (neighbour indices [k], chosen dims [n], neighbour mean [D])."""
    if len(pool) < k + 1:
        raise ValueError(f"manipulation needs a pool of more than k={k} images, got {len(pool)}")
    sim = F.normalize(pool, dim=1) @ F.normalize(source, dim=0)
    nn_idx = sim.topk(k + 1).indices
    nn_idx = nn_idx[~torch.isclose(sim[nn_idx], torch.tensor(1.0, dtype=sim.dtype), atol=1e-6)][:k]  # not itself
    mean, std = pool.mean(0), pool.std(0) + 1e-6
    z = (pool[nn_idx] - mean) / std  # [k, D]
    score = z.mean(0).abs()
    n = max(1, int(round(fraction * pool.shape[1])))
    return nn_idx, score.topk(n).indices, pool[nn_idx].mean(0)


def attribute_direction(pool: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, source_value: int,
                        target_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pool [M, D], labels [M] (one factor's values), known [M] -> (the mean embedding of the pool's images with
    ``source_value`` minus that of those with ``target_value`` [D], indices of the source-value images)."""
    src, tgt = known & (labels == source_value), known & (labels == target_value)
    if int(src.sum()) < 2 or int(tgt.sum()) < 2:
        raise ValueError(f"the pool holds {int(src.sum())} images with the source's value and {int(tgt.sum())} with "
                         f"the target's; each needs at least 2")
    return pool[src].mean(0) - pool[tgt].mean(0), src.nonzero().flatten()


def edit(target: torch.Tensor, dims: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = target.clone()
    out[dims] = values[dims]
    return out


def transfer_numbers(g_edit: torch.Tensor, g_target: torch.Tensor, dims: torch.Tensor, values: torch.Tensor,
                     scale: torch.Tensor) -> dict:
    """g_*: re-encoded samples [n, D]; distances in units of the pool's spread ``scale`` [D]."""
    rest = torch.ones(values.shape[0], dtype=torch.bool)
    rest[dims] = False

    def dist(g: torch.Tensor, sel: torch.Tensor, ref: torch.Tensor) -> float:
        return float((((g[:, sel] - ref[sel]) / scale[sel]) ** 2).mean(1).sqrt().mean())

    d_edit, d_target = dist(g_edit, dims, values), dist(g_target, dims, values)
    return {"distance_to_neighbours_edited": d_edit, "distance_to_neighbours_target": d_target,
            "transfer": 1 - d_edit / max(d_target, 1e-8),
            "other_dims_shift": dist(g_edit, rest, g_target.mean(0)) if rest.any() else 0.0}


def run(inputs: Inputs, opts: Options) -> Result:
    from rcdm.analysis.images import load_inputs

    if not opts.source or not opts.target:
        raise UserError("manipulate needs manipulate.source=<image> (whose neighbours define the attribute) and "
                        "manipulate.target=<image> (that receives it), and images=<folder> to find the neighbours in")
    pool, pool_shown = inputs.embeddings.cpu(), inputs.images
    pair = load_inputs([opts.source, opts.target], inputs.image_size)
    (h_src, h_tgt), shown = inputs.encode(pair.pils)
    if opts.attribute:
        return _attribute_edit(inputs, opts, pool, pool_shown, pair, h_tgt.cpu(), shown)
    try:
        nn_idx, dims, values = shared_dimensions(pool, h_src, opts.neighbours, opts.fraction)
    except ValueError as e:
        raise UserError(f"{e}: add images to the folder or lower manipulate.neighbours=") from None
    h_edit = edit(h_tgt, dims, values)
    m = opts.samples
    samples = inputs.draw(torch.stack([h_tgt, h_edit]).repeat_interleave(m, 0))
    g = reencode(inputs.encoder, inputs.level, samples).cpu()
    numbers = transfer_numbers(g[m:], g[:m], dims, values, pool.std(0) + 1e-6)
    numbers.update(source=opts.source, target=opts.target, neighbours=[inputs.names[i] for i in nn_idx.tolist()],
                   dims=dims.tolist(), embedding_dim=pool.shape[1], fraction=opts.fraction, samples_per_embedding=m)
    metrics = {"manipulate_transfer": numbers["transfer"]}
    if pair.factors is not None:  # read the factors off the samples: which of the source's values moved over?
        reader, _ = inputs.reader_or(synthetic_reader, opts.reader_steps)
        numbers["factor_transfer"] = factor_transfer(reader, pair.factors[0], pair.factors[1], samples[m:], samples[:m])
        for k, v in numbers["factor_transfer"].items():
            metrics[f"manipulate_{k}_transfer"] = v["transfer"]
    # rows: source and its neighbours; the target and samples of its own embedding; the target and edited samples
    return Result(numbers, metrics, {"": _grid(shown, pool_shown[nn_idx[:m]], samples, m)})


def _grid(shown: torch.Tensor, beside_source: torch.Tensor, samples: torch.Tensor, m: int) -> bytes:
    """Rows: the source and ``beside_source`` (what defines the edit); the target and its own samples; the target
    and the edited samples."""
    blank = torch.full_like(shown[0], -1)
    row1 = torch.cat([shown[:1], beside_source, blank[None].expand(m - len(beside_source), -1, -1, -1)])
    return cells_png(torch.cat([row1, shown[1:2], samples[:m], shown[1:2], samples[m:]]), m + 1)


def _attribute_edit(inputs: Inputs, opts: Options, pool, pool_shown, pair, h_tgt, shown) -> Result:
    """``attribute=<factor>``: the target moved along the pool's mean difference between the source's and the
    target's value of that factor; read by the factor reader."""
    factors = inputs.need_factors("manipulate.attribute")
    if opts.attribute not in FACTORS:
        raise UserError(f"manipulate.attribute={opts.attribute} is not a factor of the synthetic images; use one of "
                        f"{', '.join(FACTORS)}")
    if pair.factors is None:
        raise UserError("manipulate.attribute needs a source and target whose factors are known: synthetic/<split>/<i>")
    pair_labels = true_factors(pair.factors)[opts.attribute]
    if not bool(pair_labels[1].all()):
        raise UserError(f"the source or target has no {opts.attribute} (a grayscale image has no colour): pick another")
    ys, yt = (int(v) for v in pair_labels[0])
    if ys == yt:
        raise UserError(f"source and target share their {opts.attribute}: pick a pair that differs in it")
    labels, known = true_factors(factors)[opts.attribute]
    try:
        direction, src_idx = attribute_direction(pool, labels, known.bool(), ys, yt)
    except ValueError as e:
        raise UserError(f"{e}: add images to images= (synthetic:256 holds enough)") from None
    h_edit = h_tgt + opts.strength * direction
    m = opts.samples
    samples = inputs.draw(torch.stack([h_tgt, h_edit]).repeat_interleave(m, 0))
    g = reencode(inputs.encoder, inputs.level, samples).cpu()
    unit = direction / direction.norm().clamp_min(1e-8)
    along = float((g[m:].mean(0) - g[:m].mean(0)) @ unit) / max(float(opts.strength * direction.norm()), 1e-8)
    reader, _ = inputs.reader_or(synthetic_reader, opts.reader_steps)
    reads = factor_transfer(reader, pair.factors[0], pair.factors[1], samples[m:], samples[:m])
    numbers = {"attribute": opts.attribute, "strength": opts.strength, "source": opts.source, "target": opts.target,
               "source_value": ys, "target_value": yt, "group_size": len(src_idx),
               # re-encoded samples' movement along the edit, as a share of the edit's length (1: all of it)
               "embedding_along_edit": along,
               "transfer": reads[opts.attribute]["transfer"], "factor_transfer": reads,
               "samples_per_embedding": m}
    metrics = {"manipulate_transfer": numbers["transfer"], "manipulate_embedding_along_edit": along}
    # first row: the source and pool images that share its value
    return Result(numbers, metrics, {"": _grid(shown, pool_shown[src_idx[:m]], samples, m)})


def factor_transfer(reader, source: dict, target: dict, edited: torch.Tensor, own: torch.Tensor) -> dict:
    """For each factor where source and target differ: the share of the edited samples read as the source's value,
    the same share among the target's own samples, and ``transfer``, their difference (0: nothing carried over,
    1: every edited sample took the source's value)."""
    truth = true_factors([source, target])
    read_e, read_o = predict(reader, edited), predict(reader, own)
    out = {}
    for k, (y, m) in truth.items():
        if not bool(m.all()) or int(y[0]) == int(y[1]):
            continue
        e, o = float((read_e[k] == y[0]).float().mean()), float((read_o[k] == y[0]).float().mean())
        out[k] = {"edited_shows_source": e, "own_shows_source": o, "transfer": e - o,
                  "edited_keeps_target": float((read_e[k] == y[1]).float().mean())}
    return out
