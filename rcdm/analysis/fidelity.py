"""FID, Inception Score and precision/recall between samples and reference images, via torch-fidelity.

Features come from torch-fidelity's Inception-v3 (the TF-FID port, as the FID literature uses) or, for
small offline runs, from the RCDM's own frozen encoder (FID and precision/recall only: it has no class
logits for an Inception Score; numbers in that space are not comparable with published FIDs). The
Inception weights are fetched into the torch.hub cache once (checked against the sha256 prefix their name
publishes); offline, the error names the file, the URL and where to put it. torch-fidelity unpickles the
file it is given, so it is never given the cached file: rcdm reads that with ``weights_only`` and hands
torch-fidelity a copy holding tensors only. Precision/recall are Kynkaenniemi et al. (2019), k = 3
neighbourhoods.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from rcdm.analysis.base import Inputs, Result
from rcdm.encoders.weights import fetch, load_file
from rcdm.errors import UserError
from rcdm.grids import samples_png
from rcdm.stats import finite, mapping

NAME = "fidelity"


@dataclass
class Options:
    features: str = "inception"  # inception (torch-fidelity's Inception-v3, fetched once) | encoder (offline)

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class InceptionFeatures:
    """[N, 3, H, W] images in [-1, 1] -> {"features": [N, 2048] pool3, "logits": [N, 1008]}."""

    def __init__(self, device: torch.device, download: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = fetch(INCEPTION_URL, download=download)  # UserError naming the file and cache path offline
        state = tensors_only(load_file(path), path)  # weights_only: a payload in the cache is refused here
        with tempfile.TemporaryDirectory(prefix="rcdm-inception-") as tmp:
            plain = Path(tmp) / "inception.pth"
            torch.save(state, plain)  # written by rcdm from tensors: the only file torch-fidelity unpickles
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(plain)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).to(self.device)
        feats, logits = self.net(x)  # resizes to 299 itself, as the TF reference does
        return {"features": feats.double().cpu(), "logits": logits.double().cpu()}


def tensors_only(state, path) -> dict[str, torch.Tensor]:
    """A flat state dict of tensors, or a UserError: what rcdm hands to a loader that unpickles."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path} is not a state dict of tensors (torch-fidelity's Inception weights are); "
                        f"delete it and download it again")
    return state


class EncoderFeatures:
    """The RCDM's frozen encoder as the feature space (``level``): no logits, so no Inception Score."""

    def __init__(self, encoder, level: str):
        self.encoder, self.level = encoder, level

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from rcdm.analysis.faithfulness import reencode

        return {"features": reencode(self.encoder, self.level, images).double().cpu(), "logits": None}


def extract(extractor, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor | None]:
    parts = [extractor(c) for c in images.split(batch_size)]
    return {k: torch.cat([p[k] for p in parts]) if parts[0][k] is not None else None for k in parts[0]}


def fidelity(samples: dict, reference: dict, is_splits: int = 10, neighbourhood: int = 3) -> dict:
    """FID, IS (of the samples, when logits exist) and precision/recall from extracted features."""
    n_s, n_r = len(samples["features"]), len(reference["features"])
    if min(n_s, n_r) < 2:
        raise ValueError("FID needs at least 2 samples and 2 reference images")
    fid = fid_statistics_to_metric(fid_features_to_statistics(samples["features"]),
                                   fid_features_to_statistics(reference["features"]), verbose=False)
    out = {"fid": float(fid["frechet_inception_distance"]), "samples": n_s, "reference": n_r,
           "feature_dim": int(samples["features"].shape[1])}
    if n_s > neighbourhood and n_r > neighbourhood:
        prc = prc_features_to_metric(samples["features"].float(), reference["features"].float(),
                                     prc_neighborhood=neighbourhood, prc_batch_size=10000, save_cpu_ram=False,
                                     verbose=False)
        out.update(precision=float(prc["precision"]), recall=float(prc["recall"]), f_score=float(prc["f_score"]))
    if samples["logits"] is not None:
        isc = isc_features_to_metric(samples["logits"], splits=min(is_splits, n_s))
        out.update(inception_score=isc["inception_score_mean"], inception_score_std=isc["inception_score_std"])
    else:
        out["inception_score"] = None
    if min(n_s, n_r) < 2 * out["feature_dim"]:
        out["warning"] = (f"{min(n_s, n_r)} images for {out['feature_dim']}-d features: the covariance is rank "
                          f"deficient and FID is biased upwards; use thousands of images for numbers to compare")
    return out


@dataclass(frozen=True)
class Fidelity:
    """What ``fidelity.json`` says that the sweep report reads, in one place; a malformed file is a ValueError naming
    the field."""

    fid: float | None
    precision: float | None
    recall: float | None
    features: str | None

    @classmethod
    def of(cls, d) -> Fidelity:
        d = mapping(d, NAME)
        f = d.get("features")
        return cls(*(finite(d.get(k), k, optional=True) for k in ("fid", "precision", "recall")),
                   None if f is None else str(f))


def run(inputs: Inputs, opts: Options) -> Result:
    """FID, precision/recall (and IS with Inception) of one sample per image against the images themselves."""
    inputs.need(2, NAME)
    if opts.features == "inception":
        extractor = InceptionFeatures(inputs.device, inputs.download)
    elif opts.features == "encoder":
        extractor = EncoderFeatures(inputs.encoder, inputs.level)
    else:
        raise UserError(f"unknown fidelity.features {opts.features!r}; choose inception or encoder")
    samples, originals = inputs.own_samples(), inputs.images
    numbers = fidelity(extract(extractor, samples, inputs.sampling.batch_size),
                       extract(extractor, originals.to(samples), inputs.sampling.batch_size))
    numbers["features"] = opts.features
    metrics = {f"fidelity_{k}": numbers[k] for k in ("fid", "precision", "recall", "inception_score")
               if numbers.get(k) is not None}
    return Result(numbers, metrics, {"": samples_png(originals[:16], samples[:16])})
