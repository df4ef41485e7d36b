"""What samples keep, factor by factor: a reader reads each generative factor (shape, colour, background, scale,
x, y, grayscale) off samples drawn from held-out embeddings, and the share read as the original's value is set
beside three references:

- ``originals``: the reader on the held-out images themselves (its own ceiling);
- ``bound``: what the embedding holds about the factor: a k-nearest-neighbour vote among labelled reference
  embeddings (the training split's, or labelled images the encoder embeds), predicting the held-out images'
  factor from their embeddings. A sample cannot be expected to show what its embedding does not hold;
- ``chance``: 1 / the number of values the factor takes.

Faithfulness MRR ranks samples by what the encoder holds most (on the demo: colour); this table says which
factors a sample actually draws. Proportions carry Wilson 95 % intervals. Continuous factors (scale, x, y) are
read as terciles of their range; colour only where the object is coloured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcdm.analysis.base import Inputs, Reference, Result
from rcdm.analysis.factors import FACTORS, predict, synthetic_reader, true_factors
from rcdm.stats import Estimate, finite, mapping, wilson
from rcdm.config import FactorReadOptions
from rcdm.grids import samples_png
from rcdm.probes import N_BINS
from rcdm.synthetic import BACKGROUNDS, COLOURS, SHAPES

CLASSES = {"shape": len(SHAPES), "colour": len(COLOURS), "background": len(BACKGROUNDS), "scale": N_BINS, "x": N_BINS,
           "y": N_BINS, "grayscale": 2}


NAME = "factor_reads"
REFERENCE_SEED, REFERENCE_SPLIT = 29, "factor-reference"  # labelled images for the bound, seen by no model


Options = FactorReadOptions  # kept in rcdm.config, so that training's config does not import every analysis


@torch.no_grad()
def knn_predict(ref_h: torch.Tensor, ref_y: torch.Tensor, query_h: torch.Tensor, k: int) -> torch.Tensor:
    """Majority vote of the ``k`` nearest reference embeddings (cosine, after standardising each dimension by
    the reference's statistics) -> predicted class [Q]."""
    mean, std = ref_h.mean(0), ref_h.std(0) + 1e-6
    a = F.normalize((ref_h - mean) / std, dim=1)
    b = F.normalize((query_h - mean) / std, dim=1)
    idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices  # [Q, k]
    votes = F.one_hot(ref_y[idx], int(ref_y.max()) + 1).sum(1)  # [Q, classes]
    return votes.argmax(1)


def embedding_bound(ref_h: torch.Tensor, ref_factors: list[dict], held_h: torch.Tensor, held_factors: list[dict],
                    k: int = 10) -> dict[str, float]:
    """{factor: k-NN accuracy of the held-out embeddings' factor from labelled reference embeddings}."""
    ref, held = true_factors(ref_factors), true_factors(held_factors)
    out = {}
    for name, (y, mask) in held.items():
        ry, rmask = ref[name]
        if not mask.any() or not rmask.any():
            continue
        pred = knn_predict(ref_h[rmask].float(), ry[rmask], held_h[mask].float(), k)
        out[name] = float((pred == y[mask]).float().mean())
    return out


def read_table(samples: torch.Tensor, originals: torch.Tensor, factors: list[dict], reader,
               bound: dict[str, float] | None = None) -> dict[str, dict]:
    """Per factor: the share of ``samples`` [N*m, 3, S, S] (m per held-out image, in order) read as their
    original's value, with its interval and count, beside the reader on ``originals`` [N, 3, S, S], the
    embedding's bound and chance."""
    truth = true_factors(factors)
    per = len(samples) // len(originals)
    read_s, read_o = predict(reader, samples), predict(reader, originals)
    table = {}
    for name in FACTORS:
        if name not in truth:
            continue
        y, mask = truth[name]
        ys, ms = y.repeat_interleave(per), mask.repeat_interleave(per)
        n = int(ms.sum())
        if n == 0:
            continue
        hits = int((read_s[name][ms] == ys[ms]).sum())
        table[name] = {"samples": hits / n, "samples_ci95": wilson(hits, n), "n": n,
                       "originals": float((read_o[name][mask] == y[mask]).float().mean()),
                       "bound": (bound or {}).get(name), "chance": 1.0 / CLASSES[name]}
    return table


def flat_metrics(table: dict[str, dict]) -> dict[str, float]:
    """``factor_<name>`` (samples), ``factor_<name>_bound`` and ``factor_<name>_originals`` as run metrics."""
    out = {}
    for name, row in table.items():
        out[f"factor_{name}"] = row["samples"]
        out[f"factor_{name}_originals"] = row["originals"]
        if row["bound"] is not None:
            out[f"factor_{name}_bound"] = row["bound"]
    return out


def synthetic_reference(inputs: Inputs, count: int) -> Reference:
    """``count`` labelled images of the demo generator (a split no model trained on), embedded as the inputs."""
    from rcdm import synthetic

    pairs = [synthetic.sample(REFERENCE_SEED, REFERENCE_SPLIT, i, inputs.image_size) for i in range(count)]
    h, _ = inputs.encode([p for p, _ in pairs])
    return Reference(h, [f for _, f in pairs], f"{count} images of the demo generator's {REFERENCE_SPLIT!r} split")


def run(inputs: Inputs, opts: Options) -> Result:
    factors = inputs.need_factors(NAME)
    inputs.need(2, NAME)
    reader, report = inputs.reader_or(synthetic_reader, opts.reader_steps)
    ref = inputs.reference or synthetic_reference(inputs, opts.reference_images)
    bound = embedding_bound(ref.embeddings, ref.factors, inputs.embeddings.cpu(), factors, opts.k)
    samples = inputs.own_samples()
    table = read_table(samples, inputs.images, factors, reader, bound)
    numbers = {"factors": table, "images": len(inputs.names), "samples_per_image": len(samples) // len(inputs.names),
               "reader": {"held_out_accuracy": report.get("test_accuracy"), "what": report.get("what", "the "
                          "synthetic-factor reader (rcdm.analysis.factors)")},
               "bound": {"method": f"{opts.k}-nearest-neighbour vote, cosine on standardised embeddings",
                         "reference": ref.source, "reference_images": len(ref.factors)}}
    return Result(numbers, flat_metrics(table), {"": samples_png(inputs.images[:16], samples[:16])})


@dataclass(frozen=True)
class FactorRead:
    """One factor of ``factor_reads.json``: the share of samples read as the original's value, what the embedding
    holds (None where no bound was measured) and chance."""

    samples: Estimate
    bound: float | None
    chance: float


@dataclass(frozen=True)
class FactorReads:
    """What ``factor_reads.json`` says that other rooms read (the run's log line, the sweep report), read in one
    place; a malformed file is a ValueError naming the field."""

    factors: dict[str, FactorRead]

    @classmethod
    def of(cls, d) -> FactorReads:
        d = mapping(d, NAME)
        try:
            return cls({name: FactorRead(Estimate.checked(mapping(v, f"factors.{name}"), "samples", f"{name}."),
                                         finite(v.get("bound"), f"{name}.bound", optional=True),
                                         finite(v["chance"], f"{name}.chance"))
                        for name, v in mapping(d["factors"], "factors").items()})
        except KeyError as e:
            raise ValueError(f"no {e.args[0]!r}") from None

    def headline(self) -> str:
        """One line: each factor's read of the samples beside its embedding's bound."""
        return ", ".join(f"{k} {v.samples.value:.2f} (bound {v.bound if v.bound is None else round(v.bound, 2)})"
                         for k, v in self.factors.items())


def headline(numbers: dict) -> str:
    """The registry's headline of a run's numbers (rcdm.evaluation's log line)."""
    return FactorReads.of(numbers).headline()
