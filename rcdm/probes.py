"""Linear probes of frozen embeddings: how much of each generative factor of the synthetic data, and of
each random variable of the SSL colour jitter, an embedding level still carries (chance = 1 / number of
classes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rcdm import synthetic
from rcdm.encoders import embed_in_chunks
from rcdm.preprocess import to_uint8_tensor
from rcdm.ssl.augment import AugmentConfig, adjust_colour, jitter_ranges

N_BINS = 3  # continuous factors (scale, x, y) are probed as terciles of their range


def factor_labels(factors: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """factor -> (labels [N], mask [N] of the samples where the factor is visible)."""
    n = len(factors)
    every = torch.ones(n, dtype=torch.bool)
    colour_visible = torch.tensor([not f["grayscale"] for f in factors])  # a grey object has no hue
    lo, hi = synthetic.SCALE_RANGE

    def bins(values: list[float], a: float, b: float) -> torch.Tensor:
        return ((torch.tensor(values) - a) / (b - a) * N_BINS).long().clamp(0, N_BINS - 1)

    return {
        "shape": (torch.tensor([synthetic.SHAPES.index(f["shape"]) for f in factors]), every),
        "colour": (torch.tensor([list(synthetic.COLOURS).index(f["colour"]) for f in factors]), colour_visible),
        "background": (torch.tensor([list(synthetic.BACKGROUNDS).index(f["background"]) for f in factors]), every),
        "scale": (bins([f["scale"] for f in factors], lo, hi), every),
        "x": (bins([f["x"] for f in factors], 0, 1), every),
        "y": (bins([f["y"] for f in factors], 0, 1), every),
        "grayscale": (torch.tensor([int(f["grayscale"]) for f in factors]), every),
    }


def synthetic_set(count: int, seed: int, split: str, size: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """[count, 3, size, size] uint8 images and their factors."""
    pairs = [synthetic.sample(seed, split, i, size) for i in range(count)]
    return torch.stack([to_uint8_tensor(img) for img, _ in pairs]), [f for _, f in pairs]


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, weight_decay: float = 1e-3, iters: int = 200,
                     classes: int | None = None) -> tuple[torch.Tensor, ...]:
    """Multinomial logistic regression (L-BFGS) on standardised features -> (mean, std, w, b):
    logits = ((x - mean) / std) @ w + b."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = (train_x - mean) / std
    classes = classes or int(train_y.max()) + 1
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, w.detach(), b.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-3, iters: int = 200) -> float:
    """Test accuracy of ``fit_linear_probe`` on standardised features."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std, w, b = fit_linear_probe(train_x, train_y, weight_decay, iters, classes)
    return (((test_x - mean) / std @ w + b).argmax(1) == test_y).float().mean().item()


def _embed(encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{level: [N, dim] float} for uint8 images."""
    return embed_in_chunks(encoder, images, encoder.preprocess.normalize_uint8)


@torch.no_grad()
def probe_encoder(encoder, images: torch.Tensor, factors: list[dict], train_fraction: float = 0.7
                  ) -> dict[str, dict[str, float]]:
    """{level: {factor: test accuracy}} for every level of ``encoder``; also the chance levels."""
    feats = _embed(encoder, images)
    labels = factor_labels(factors)
    n_train = int(len(images) * train_fraction)
    out: dict[str, dict[str, float]] = {level: {} for level in feats}
    out["chance"] = {}
    for name, (y, mask) in labels.items():
        idx = torch.nonzero(mask).flatten()
        tr, te = idx[idx < n_train], idx[idx >= n_train]
        out["chance"][name] = 1.0 / int(y[mask].max() + 1)
        for level, f in feats.items():
            out[level][name] = linear_probe(f[tr], y[tr], f[te], y[te])
    return out


JITTER_VARIABLES = ("brightness", "contrast", "saturation", "hue")


def probe_jitter(encoder, images: torch.Tensor, factors: list[dict], levels: int = 5,
                 jitter: tuple[float, float, float, float] = AugmentConfig().jitter, train_fraction: float = 0.7
                 ) -> dict[str, dict[str, float]]:
    """How much of the colour jitter each level carries: every coloured image at ``levels`` settings,
    evenly spaced over the augmentation's range, of one jitter variable (the others at the middle of
    their range, which leaves the image as it is); a linear probe predicts the setting. Train and test
    images are disjoint (all settings of an image fall on one side).
    -> {level: {variable: test accuracy}, "chance": {...}}"""
    coloured = torch.tensor([not f["grayscale"] for f in factors])  # hue and saturation act on colour only
    x = (images[coloured].float() / 255).repeat(levels, 1, 1, 1)  # every image at setting 0, then 1...
    n = len(x) // levels
    y = torch.arange(levels).repeat_interleave(n)
    is_train = (torch.arange(n) < int(n * train_fraction)).repeat(levels)
    ranges = jitter_ranges(jitter)
    out: dict[str, dict[str, float]] = {"chance": {v: 1.0 / levels for v in JITTER_VARIABLES}}
    for i, variable in enumerate(JITTER_VARIABLES):
        settings = [torch.full((len(x),), (lo + hi) / 2) for lo, hi in ranges]
        settings[i] = torch.linspace(*ranges[i], levels)[y]
        feats = _embed(encoder, (adjust_colour(x, *settings) * 255).round().to(torch.uint8))
        for level, v in feats.items():
            out.setdefault(level, {})[variable] = linear_probe(v[is_train], y[is_train], v[~is_train], y[~is_train])
    return out


def _entropy(labels: torch.Tensor) -> float:
    p = torch.bincount(labels).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def assignment_information(assignment: torch.Tensor, factors: list[dict]) -> dict[str, float]:
    """How much of each generative factor a clustering carries: I(assignment; factor) / H(factor), plug-in
    estimates over the images where the factor is visible (0: independent, 1: the clusters determine it)."""
    out = {}
    for name, (y, mask) in factor_labels(factors).items():
        a, f = assignment[mask], y[mask]
        joint = a * (int(f.max()) + 1) + f
        out[name] = (_entropy(a) + _entropy(f) - _entropy(joint)) / _entropy(f)
    return out


@torch.no_grad()
def dino_prototype_assignment(encoder, checkpoint: dict, images: torch.Tensor) -> torch.Tensor:
    """The DINO prototype each image falls on: argmax over the release's ``head.last_layer`` (weight-normed,
    norm fixed to 1) of the L2-normalised projector output, the teacher's view before centring. [N] long."""
    v = checkpoint["teacher"]["head.last_layer.weight_v"]
    prototypes = F.normalize(v.float(), dim=1)
    z = _embed(encoder, images)["projector"]
    return (F.normalize(z, dim=1) @ prototypes.T).argmax(1)
