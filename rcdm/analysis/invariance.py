"""Invariance probe: is an embedding level invariant to the augmentations SSL trains with?

For each augmentation family, every image is compared with an augmented view of itself:
- in embedding space, at every level of the encoder: cosine(h(x), h(aug x)), and an invariance index
  that puts levels on one scale: (cos_aug - cos_other) / (1 - cos_other), with cos_other the mean cosine
  between different images (1 = the view embeds exactly like its image, 0 = like another image);
- in samples, for each RCDM given (one per level): with the synthetic data the factors are known, and a
  supervised factor predictor reads them off each sample. ``preserved`` is the fraction of samples,
  conditioned on the augmented view, that show the original image's factor; ``follows_view``, among
  the images whose factor the augmentation changed (as the predictor reads the view), the fraction of
  samples that show the view's value instead: an invariant level gives low ``follows_view``.
The paper's findings 1 and 2: the backbone follows colour jitter and grayscale, the projector does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from rcdm.analysis.base import Inputs, Result
from rcdm.analysis.factors import predict, synthetic_reader, true_factors
from rcdm.errors import UserError
from rcdm.grids import cells_png
from rcdm.encoders import embed_in_chunks
from rcdm.ssl.augment import AugmentConfig, _gray, colour_jitter
from rcdm.stats import finite, mapping, wilson
from rcdm.config import READER_STEPS

# the factors each augmentation can change
CHANGES = {"colour_jitter": ("colour", "background"), "grayscale": ("grayscale",),
           "crop_scale": ("scale",), "crop_position": ("x", "y"), "flip": ("x",)}
FAMILIES = tuple(CHANGES)
NAME = "invariance"


@dataclass
class Options:
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    sample: bool = True  # also draw from the views' embeddings, per level (false: the embedding index alone)
    reader_steps: int = READER_STEPS  # training steps of the synthetic-factor reader (cached once trained)


def _crop(x: torch.Tensor, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Square crops (side and centre as fractions of the image) resampled to the image size."""
    b, _, h, w = x.shape
    half = side * w / 2
    cx, cy = cx * w, cy * h
    boxes = torch.stack([torch.arange(b, dtype=torch.float), cx - half, cy - half, cx + half, cy + half], 1)
    return roi_align(x, boxes.to(x), output_size=(h, w), aligned=True, sampling_ratio=2)


def augment(family: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One augmented view per image of ``x`` [N, 3, S, S] in [0, 1], at SSL strength, always applied."""
    n = len(x)
    if family == "colour_jitter":
        return colour_jitter(x, AugmentConfig(jitter_p=1.0), g)
    if family == "grayscale":
        return _gray(x).expand_as(x).contiguous()
    if family == "crop_scale":  # zoom on the centre: 30-60 % of the area, the object looks bigger
        side = (torch.rand(n, generator=g) * 0.3 + 0.3).sqrt()
        return _crop(x, side, torch.full((n,), 0.5), torch.full((n,), 0.5)).clamp(0, 1)
    if family == "crop_position":  # a fixed 60 %-area window moved around: the object moves
        side = torch.full((n,), 0.6 ** 0.5)
        lo, hi = side / 2, 1 - side / 2
        cx, cy = (lo + torch.rand(n, generator=g) * (hi - lo) for _ in range(2))
        return _crop(x, side, cx, cy).clamp(0, 1)
    if family == "flip":
        return x.flip(3)
    raise ValueError(f"unknown augmentation family {family!r}; choose one of {', '.join(FAMILIES)}")


def embed(encoder, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """images [N, 3, S, S] in [0, 1] -> {level: [N, D]} on the CPU, resized to the encoder's input size if needed."""
    size = encoder.preprocess.size

    def prepare(chunk: torch.Tensor) -> torch.Tensor:
        if chunk.shape[-1] != size:
            chunk = F.interpolate(chunk, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        return encoder.preprocess.normalize_uint8((chunk * 255).round().to(torch.uint8))

    return {k: v.cpu() for k, v in embed_in_chunks(encoder, images, prepare, batch_size).items()}


def embedding_invariance(clean: dict[str, torch.Tensor], views: dict[str, dict[str, torch.Tensor]]) -> dict:
    """{family: {level: {cosine, invariance_index}}} and the cross-image baseline per level."""
    out: dict = {"cosine_other": {}}
    for level, h in clean.items():
        hn = F.normalize(h, dim=1)
        sim = hn @ hn.T
        n = len(h)
        out["cosine_other"][level] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    for family, by_level in views.items():
        out[family] = {}
        for level, hv in by_level.items():
            cos = float(F.cosine_similarity(clean[level], hv, dim=1).mean())
            other = out["cosine_other"][level]
            out[family][level] = {"cosine": cos, "invariance_index": (cos - other) / max(1 - other, 1e-8)}
    return out


def factor_table(net, factors: list[dict], originals: torch.Tensor, views: dict[str, torch.Tensor],
                 samples_clean: torch.Tensor, samples_view: dict[str, torch.Tensor]) -> dict:
    """Factors read off samples of one level. All images in [-1, 1].

    -> {"clean": {factor: preserved}, family: {"preserved": {factor: ...}, "follows_view": {factor: ...}}}"""
    truth = true_factors(factors)

    def frac(mask: torch.Tensor) -> float | None:
        return float(mask.float().mean()) if mask.numel() else None

    def ci(mask: torch.Tensor) -> list[float] | None:
        return wilson(int(mask.sum()), mask.numel()) if mask.numel() else None

    p_clean = predict(net, samples_clean)
    hits = {k: (p_clean[k] == y)[m] for k, (y, m) in truth.items()}
    out: dict = {"clean": {k: frac(v) for k, v in hits.items()}, "clean_ci95": {k: ci(v) for k, v in hits.items()}}
    p_orig = predict(net, originals)
    for family, view in views.items():
        p_view, p_sample = predict(net, view), predict(net, samples_view[family])
        kept = {k: (p_sample[k] == y)[m] for k, (y, m) in truth.items()}
        entry = {"preserved": {k: frac(v) for k, v in kept.items()},
                 "preserved_ci95": {k: ci(v) for k, v in kept.items()},
                 "follows_view": {}, "follows_view_ci95": {}, "changed": {},
                 "shape_and_follows_view": {}, "shape_and_follows_view_ci95": {}}
        shape_y, shape_m = truth["shape"]
        keeps_shape = p_sample["shape"] == shape_y
        for k in CHANGES[family]:
            changed = p_view[k] != p_orig[k]
            follows = (p_sample[k] == p_view[k])[changed]
            entry["changed"][k] = int(changed.sum())
            entry["follows_view"][k], entry["follows_view_ci95"][k] = frac(follows), ci(follows)
            # the paper's picture of a backbone sample: the original's object, in the view's colour / grayscale
            both = (keeps_shape & (p_sample[k] == p_view[k]))[changed & shape_m]
            entry["shape_and_follows_view"][k], entry["shape_and_follows_view_ci95"][k] = frac(both), ci(both)
        out[family] = entry
    return out


@dataclass(frozen=True)
class Invariance:
    """What ``invariance.json`` says that the sweep report reads: the embedding invariance index per augmentation
    family, read in one place; a malformed file is a ValueError naming the field."""

    index: dict[str, float]

    @classmethod
    def of(cls, d) -> Invariance:
        d = mapping(d, NAME)
        try:
            return cls({name: finite(mapping(v, f"families.{name}")["invariance_index"], f"{name}.invariance_index")
                        for name, v in mapping(d.get("families", {}), "families").items()})
        except KeyError as e:
            raise ValueError(f"no {e.args[0]!r}") from None


def run(inputs: Inputs, opts: Options) -> Result:
    """The embedding invariance index of every level of the encoder per family; with samples, for each model
    given (one per level, ``inputs.others`` beyond the first) samples from the views, and on images with known
    factors the factor reader's table."""
    inputs.need(2, NAME)
    runs = [(inputs.loaded, inputs.encoder), *inputs.others]
    name, sha = inputs.loaded.card.encoder.name, inputs.encoder.weights_sha256
    for lo, enc in inputs.others:
        if (lo.card.encoder.name, enc.weights_sha256) != (name, sha):
            raise UserError(f"invariance compares levels of one encoder: {inputs.loaded.source} is {name} and "
                            f"{lo.source} is {lo.card.encoder.name} ({enc.weights_source}); pick runs of the same one")
    if len({lo.level for lo, _ in runs}) != len(runs):
        raise UserError("invariance: give one checkpoint per level, e.g. checkpoint=[<backbone run>,<projector run>]")
    unknown = [f for f in opts.families if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown augmentation families {unknown}; choose from {', '.join(FAMILIES)}")
    shown, level = inputs.images, inputs.level
    x01 = (shown + 1) / 2
    g = torch.Generator().manual_seed(inputs.sampling.seed)
    views = {f: augment(f, x01, g) for f in opts.families}
    clean = embed(inputs.encoder, x01)
    view_emb = {f: embed(inputs.encoder, v) for f, v in views.items()}
    emb = embedding_invariance(clean, view_emb)
    numbers: dict = {"level": level, "images": len(shown), "families_sampled": list(opts.families), "embedding": emb,
                     "cosine_other": emb["cosine_other"][level], "families": {f: emb[f][level] for f in opts.families}}
    metrics = {f"invariance_{f}": emb[f][level]["invariance_index"] for f in opts.families}
    if "backbone" in clean and "projector" in clean:
        numbers["projector_more_invariant"] = {
            f: emb[f]["projector"]["invariance_index"] > emb[f]["backbone"]["invariance_index"] for f in opts.families}
    if not opts.sample:
        return Result(numbers, metrics)
    numbers["levels_sampled"] = [lo.level for lo, _ in runs]
    samples = {lo.level: {"clean": inputs.draw(clean[lo.level], lo),
                          **{f: inputs.draw(view_emb[f][lo.level], lo) for f in opts.families}} for lo, _ in runs}
    if inputs.factors is not None:
        reader, report = inputs.reader_or(synthetic_reader, opts.reader_steps)
        numbers["factor_predictor"] = report.get("test_accuracy")
        numbers["samples"] = {lv: factor_table(reader, inputs.factors, shown, {f: v * 2 - 1 for f, v in views.items()},
                                               sm["clean"], {f: sm[f] for f in opts.families})
                              for lv, sm in samples.items()}
        for lv, t in numbers["samples"].items():
            if "grayscale" in t and t["grayscale"]["follows_view"]["grayscale"] is not None:
                metrics[f"invariance_samples_follow_grayscale_{lv}"] = t["grayscale"]["follows_view"]["grayscale"]
    else:
        numbers["samples"] = "factors unknown for these images: use images=synthetic:N for the factor table"
    # figure: for the first 3 images, one row per family: image, view, a sample per level from the view
    rows = [torch.stack([shown[i], views[f][i] * 2 - 1] + [samples[lo.level][f][i] for lo, _ in runs])
            for i in range(min(3, len(shown))) for f in opts.families]
    return Result(numbers, metrics, {"": cells_png(torch.cat(rows), 2 + len(runs))})
