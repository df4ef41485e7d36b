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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
