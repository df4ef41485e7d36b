"""Faithfulness, the RCDM protocol: does a sample carry its conditioning embedding?

One image is generated per held-out conditioning embedding h_i; every generated image is re-encoded
with the same frozen encoder and preprocessing, giving g_j. For each h_i all g_j are ranked by cosine
similarity to h_i; the sample generated from h_i should come first. Ties count against the model
(a tie with another sample puts h_i's own sample behind it), so a collapsed model that makes the same
image for every h gets rank N, not 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rcdm.analysis.base import Inputs, Result
from rcdm.encoders import embed_in_chunks
from rcdm.grids import samples_png
from rcdm.stats import Estimate, bootstrap, finite, mapping

NAME = "faithfulness"


@dataclass
class Options:
    boot: int = 1000  # bootstrap resamples of the intervals


def ranks(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[N] rank (1 = best) of g_i among all g_j by cosine similarity to h_i; ties are pessimistic."""
    if h.shape != g.shape:
        raise ValueError(f"conditioning {tuple(h.shape)} and re-encoded {tuple(g.shape)} embeddings differ in shape")
    sim = F.normalize(h.double(), dim=1) @ F.normalize(g.double(), dim=1).T  # [N, N]
    own = sim.diagonal()[:, None]
    # floating-point noise below 1e-12 is a tie, not an order
    better_or_tied = (sim >= own - 1e-12).sum(1)  # includes the sample itself
    return better_or_tied.long()


def chance_levels(n: int) -> dict[str, float]:
    """The metrics of a ranking that carries no information: the own sample's rank uniform on 1..n."""
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    return {"mean_rank": (n + 1) / 2, "median_rank": (n + 1) / 2, "mrr": harmonic / n, "top1": 1.0 / n}


def summarise(r: torch.Tensor, boot: int = 1000, seed: int = 0) -> dict:
    """Mean and median rank, MRR and top-1 rate with bootstrap 95 % intervals over images."""
    r = r.double().cpu().numpy()
    n = len(r)

    def stats(x: np.ndarray) -> np.ndarray:  # [..., n] -> [..., 4]
        return np.stack([x.mean(-1), np.median(x, -1), (1 / x).mean(-1), (x == 1).mean(-1)], -1)

    lo, hi = bootstrap(r, stats, boot, seed)
    point = stats(r)
    names = ["mean_rank", "median_rank", "mrr", "top1"]
    out = {"n": n}
    for i, k in enumerate(names):
        out[k] = float(point[i])
        out[f"{k}_ci95"] = [float(lo[i]), float(hi[i])]
    out["chance"] = chance_levels(n)
    return out


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[N, 3, S, S] in [-1, 1] -> PIL RGB images, quantised as a saved sample would be."""
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in u8]


def reencode(encoder, level: str, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embed generated images [N, 3, S, S] in [-1, 1] through the encoder's own preprocessing."""
    def prepare(chunk: torch.Tensor) -> torch.Tensor:
        return torch.stack([encoder.preprocess(p) for p in to_pil(chunk)])

    return embed_in_chunks(encoder, images, prepare, batch_size)[level]


def faithfulness(h: torch.Tensor, generated: torch.Tensor, encoder, level: str, boot: int = 1000,
                 seed: int = 0) -> dict:
    """The protocol's numbers for conditioning ``h`` [N, D] and one generated image per row [N, 3, S, S]."""
    if len(h) < 2:
        raise ValueError("faithfulness needs at least 2 conditioning embeddings")
    g = reencode(encoder, level, generated)
    r = ranks(h.to(g.device).float(), g)
    out = summarise(r, boot, seed)
    out["ranks"] = r.tolist()
    out["cosine_own"] = float(F.cosine_similarity(h.to(g.device).float(), g).mean())
    return out


# the columns this analysis gives a results table (the sweep report), and how its numbers fill them
TABLE_HEAD = ["faithfulness MRR [95 % CI]", "top-1 [95 % CI]", "chance MRR / top-1", "n"]


@dataclass(frozen=True)
class Faithfulness:
    """What ``faithfulness.json`` says that other rooms read (the run's log line, the sweep report, export), read
    in one place. The file is anyone's word who may log to the run: a malformed one is a ValueError naming the
    field."""

    mrr: Estimate
    top1: Estimate
    chance_mrr: float
    chance_top1: float
    n: int
    keys: tuple[str, ...] = ()  # the held-out images' names, in order

    @classmethod
    def of(cls, d) -> Faithfulness:
        d = mapping(d, NAME)
        try:
            est = {k: Estimate.checked(d, k) for k in ("mrr", "top1")}
            chance = {k: finite(mapping(d["chance"], "chance")[k], f"chance.{k}") for k in ("mrr", "top1")}
            if isinstance(d["n"], bool) or not isinstance(d["n"], int):
                raise ValueError("n is not a count")
            keys = d.get("keys", [])
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise ValueError("keys is not a list of names")
        except KeyError as e:
            raise ValueError(f"no {e.args[0]!r}") from None
        return cls(est["mrr"], est["top1"], chance["mrr"], chance["top1"], d["n"], tuple(keys))

    def cells(self) -> list[str]:
        """The cells of ``TABLE_HEAD``."""
        return [self.mrr.format(3), self.top1.format(3), f"{self.chance_mrr:.3f} / {self.chance_top1:.3f}",
                str(self.n)]

    def headline(self) -> str:
        """One line for logs and command output."""
        return f"MRR {self.mrr.format(3)}, top-1 {self.top1.value:.3f} (chance MRR {self.chance_mrr:.3f})"


def headline(numbers: dict) -> str:
    """The registry's headline of a run's numbers (rcdm.evaluation's log line)."""
    return Faithfulness.of(numbers).headline()


def flat_metrics(result: dict, prefix: str = "faithfulness_") -> dict[str, float]:
    """The scalar numbers of ``faithfulness`` for an MLflow run."""
    keys = ["mean_rank", "median_rank", "mrr", "top1", "cosine_own"]
    out = {f"{prefix}{k}": result[k] for k in keys}
    out.update({f"{prefix}{k}_chance": v for k, v in result["chance"].items()})
    out[f"{prefix}mrr_ci95_lo"], out[f"{prefix}mrr_ci95_hi"] = result["mrr_ci95"]
    out[f"{prefix}top1_ci95_lo"], out[f"{prefix}top1_ci95_hi"] = result["top1_ci95"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def run(inputs: Inputs, opts: Options) -> Result:
    """One sample per image's embedding (shared with the other analyses of these inputs), re-encoded and ranked."""
    inputs.need(2, NAME)
    samples = inputs.own_samples()
    numbers = faithfulness(inputs.embeddings.cpu(), samples, inputs.encoder, inputs.level, boot=opts.boot,
                           seed=inputs.sampling.seed)
    return Result(numbers, flat_metrics(numbers), {"": samples_png(inputs.images[:64], samples[:64])})
