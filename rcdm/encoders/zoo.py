"""The frozen SSL encoder zoo: each entry says what it is, its dims per level, its preprocessing and
where its weights come from. Registry keys are the ``encoder=`` config choices."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from rcdm.device import autocast
from rcdm.encoders.backbones import ARCHES
from rcdm.encoders.card import EncoderCard
from rcdm.encoders.layouts import LAYOUTS
from rcdm.encoders.weights import WeightsRecord, fetch, load_file, sha256sum, url_cache_name
from rcdm.errors import UserError
from rcdm.preprocess import Preprocess

log = logging.getLogger(__name__)
LEVELS = ("backbone", "patch_mean", "projector")  # patch_mean: ViTs only
VIT_PREPROCESS = Preprocess(size=224, crop="center", normalize="imagenet", resize=256)  # their eval transform


def _vicreg_head(d: int, wide: int, depth: int = 2, bias: bool = True) -> nn.Sequential:
    # Linear-BN-ReLU ``depth`` times, then a bias-free Linear (VICReg's "8192-8192-8192": depth 2).
    layers, n = [], d
    for _ in range(depth):
        layers += [nn.Linear(n, wide, bias=bias), nn.BatchNorm1d(wide), nn.ReLU(True)]
        n = wide
    return nn.Sequential(*layers, nn.Linear(n, wide, bias=False))


def _barlow_head(d: int, wide: int) -> nn.Sequential:
    # As VICReg's but every Linear is bias-free (VISSL's Barlow Twins head).
    return _vicreg_head(d, wide, bias=False)


def _dino_head(d: int, hidden: int, out: int) -> nn.Sequential:
    # DINO's 2-layer MLP before its L2 bottleneck and weight-normed last layer (which RCDM does not use).
    return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))


def _dino_vit_head(d: int) -> nn.Sequential:
    # DINO's ViT head (no BN): 3 Linear layers with GELUs down to the 256-d bottleneck before its L2 norm and
    # weight-normed last layer; the bottleneck is the projector level.
    return nn.Sequential(nn.Linear(d, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 256))


def _simclr_head(d: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(True), nn.Linear(d, out))


@dataclass(frozen=True)
class EncoderSpec:
    """One method: its projector per arch, the release's file layout and URL."""

    name: str
    description: str
    projector: dict[str, tuple[int, Callable[[int], nn.Module]]]  # arch -> (output dim, factory(trunk dim));
    # empty = no projector
    layout: str
    url: str | None  # the released weights (ResNet-50, or the ViT of ``arch``)
    preprocess: Preprocess = Preprocess()
    arch: str | None = None  # a ViT release: its own architecture, whatever arch= asks of the ResNet methods
    licence: str = ""

    def levels(self, arch: str) -> list[str]:
        """The levels this encoder has on ``arch`` (the spec's own arch when it fixes one)."""
        arch = self.arch or arch
        vit = arch.startswith("vit_")
        return ["backbone", *(["patch_mean"] if vit else []), *(["projector"] if arch in self.projector else [])]


ENCODERS: dict[str, EncoderSpec] = {
    "vicreg": EncoderSpec(
        "vicreg", "VICReg ResNet-50 (Bardes et al. 2022), projector 8192",
        {"resnet50": (8192, lambda d: _vicreg_head(d, 8192)), "tiny": (256, lambda d: _vicreg_head(d, 256))},
        "vicreg", "https://dl.fbaipublicfiles.com/vicreg/resnet50_fullckpt.pth"),
    "dino": EncoderSpec(
        "dino", "DINO ResNet-50 (Caron et al. 2021), projector 256 (head MLP before the last layer)",
        {"resnet50": (256, lambda d: _dino_head(d, 4096, 256)), "tiny": (64, lambda d: _dino_head(d, 256, 64))},
        "dino", "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
                "dino_resnet50_pretrain_full_checkpoint.pth"),
    "barlow": EncoderSpec(
        "barlow", "Barlow Twins ResNet-50 (Zbontar et al. 2021, VISSL release), projector 8192",
        {"resnet50": (8192, lambda d: _barlow_head(d, 8192)), "tiny": (256, lambda d: _barlow_head(d, 256))},
        "vissl_barlow", "https://dl.fbaipublicfiles.com/vissl/model_zoo/barlow_twins/"
                        "barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch"),
    "simclr": EncoderSpec(
        "simclr", "SimCLR ResNet-50 (Chen et al. 2020, VISSL release), projector 128",
        {"resnet50": (128, lambda d: _simclr_head(d, 128)), "tiny": (32, lambda d: _simclr_head(d, 32))},
        "vissl_simclr", "https://dl.fbaipublicfiles.com/vissl/model_zoo/"
                        "simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/"
                        "model_final_checkpoint_phase999.torch"),
    "supervised": EncoderSpec(
        "supervised", "torchvision ResNet-50 trained with labels (IMAGENET1K_V1); backbone level only",
        {}, "torchvision", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    # Vision Transformers: each release its own arch and preprocessing; CLS (backbone), mean patch token
    # (patch_mean) and, for DINO, the head's 256-d bottleneck (projector)
    "dino_vits16": EncoderSpec(
        "dino_vits16", "DINO ViT-S/16 (Caron et al. 2021), full checkpoint: teacher CLS, patch mean, head bottleneck",
        {"vit_small_patch16": (256, _dino_vit_head)}, "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth",
        VIT_PREPROCESS, "vit_small_patch16", "Apache-2.0"),
    "dino_vitb16": EncoderSpec(
        "dino_vitb16", "DINO ViT-B/16 (Caron et al. 2021), full checkpoint: teacher CLS, patch mean, head bottleneck",
        {"vit_base_patch16": (256, _dino_vit_head)}, "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain_full_checkpoint.pth",
        VIT_PREPROCESS, "vit_base_patch16", "Apache-2.0"),
    "dinov2_vits14": EncoderSpec(
        "dinov2_vits14", "DINOv2 ViT-S/14 (Oquab et al. 2024), backbone file: CLS, patch mean", {}, "dinov2",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        VIT_PREPROCESS, "vit_small_patch14_dinov2", "Apache-2.0"),
    "dinov2_vitb14": EncoderSpec(
        "dinov2_vitb14", "DINOv2 ViT-B/14 (Oquab et al. 2024), backbone file: CLS, patch mean", {}, "dinov2",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        VIT_PREPROCESS, "vit_base_patch14_dinov2", "Apache-2.0"),
    "mae_vitb16": EncoderSpec(
        "mae_vitb16", "MAE ViT-B/16 (He et al. 2022), pretrain file: CLS, patch mean", {}, "mae",
        "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
        VIT_PREPROCESS, "vit_base_patch16", "CC BY-NC 4.0"),
}

# The tiny arch sees the small demo images as they are, scaled to [-1, 1] like the official input.
ARCH_PREPROCESS = {"tiny": Preprocess(size=32)}


class SSLEncoder(nn.Module):
    """A frozen trunk plus its projector; one forward yields every level: {level: [N, dim]}."""

    def __init__(self, name: str, arch: str, trunk: nn.Module, dims: dict[str, int], projector: nn.Module | None,
                 preprocess: Preprocess):
        super().__init__()
        self.name, self.arch, self.preprocess = name, arch, preprocess
        self.backbone = trunk
        self.projector = projector
        self.dims = dims  # {level: embedding dim}, as the registry declares them
        self.weights = WeightsRecord("random", seed=0)

    @property
    def weights_source(self) -> str:
        return str(self.weights)

    @property
    def weights_sha256(self) -> str | None:
        return self.weights.sha256

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)  # [N, trunk_dim], or a ViT's tokens [N, 1 + P, D]
        if h.dim() == 3:  # CLS token, and the mean of the patch tokens
            out = {"backbone": h[:, 0], "patch_mean": h[:, self.backbone.num_prefix_tokens:].mean(1)}
        else:
            out = {"backbone": h}
        if self.projector is not None:
            out["projector"] = self.projector(out["backbone"])  # [N, projector dim], reusing the trunk's output
        return out

    def describe(self) -> dict:
        """What a manifest or checkpoint records about this encoder."""
        return {"name": self.name, "arch": self.arch, "dims": dict(self.dims),
                "preprocess": self.preprocess.to_dict(), "weights": self.weights.to_dict()}


@torch.no_grad()
def embed_in_chunks(encoder: SSLEncoder, images: torch.Tensor, prepare: Callable | None = None,
                    batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{level: [N, dim] float32, on the encoder's device} for ``images`` [N, ...], ``batch_size`` at a time;
    ``prepare`` turns a chunk into the encoder's input (resize, normalisation)."""
    device = next(encoder.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    for chunk in images.split(batch_size):
        x = (prepare(chunk) if prepare else chunk).to(device)
        with autocast(device):
            for level, v in encoder(x).items():
                out.setdefault(level, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name]


def weights_arg(weights: str) -> WeightsRecord:
    """A ``weights=`` value as typed (``released``, ``random``, a path or URL) -> the record it asks for."""
    if weights in ("released", "random"):
        return WeightsRecord(weights)
    return WeightsRecord("file", path=weights)


def recorded_weights(recorded: str | dict, encoder: str, sha256: str | None = None) -> WeightsRecord:
    """A weights record as written now (a dict), or as rcdm 0.1 wrote it: one string beside a separate sha256
    ("random (seed N)", "released tiny (...)", or the weights file's path)."""
    if isinstance(recorded, dict):
        return WeightsRecord.from_dict(recorded)
    m = re.fullmatch(r"random \(seed (\d+)\)", recorded)
    if m:
        return WeightsRecord("random", sha256, seed=int(m[1]))
    if recorded.startswith("released tiny"):
        return WeightsRecord("released", sha256)
    path = Path(recorded)
    if "://" not in recorded and not path.exists():
        released_url = encoder_spec(encoder).url
        if released_url and path.name == Path(urlparse(released_url).path).name:
            return WeightsRecord("released", sha256)  # the published file, cached elsewhere on the writer's machine
        if path.parent.name == "tiny_weights" and path.name == f"{encoder}.pt":
            return WeightsRecord("released", sha256)  # the tiny encoder shipped with rcdm, installed elsewhere
    return WeightsRecord("file", sha256, path=recorded)


def build_encoder(name: str, arch: str = "resnet50", weights: str | WeightsRecord = "released", download: bool = True,
                  seed: int = 0, preprocess: Preprocess | None = None) -> SSLEncoder:
    """The frozen encoder ``name`` on ``arch`` in eval mode.

    ``weights``: a ``WeightsRecord``, or as typed on a command line: "released" (for resnet50 the method's
    published file, through the torch.hub cache; for tiny the encoder trained with the method's objective
    that ships with rcdm), "random" (initialised from ``seed``: an explicit choice), or a path / URL to a file
    in the method's released layout. A URL other than the registry's is cached under a name of rcdm's choosing
    (``url_cache_name``); a record's sha256, when it has one, is checked before a download is kept.
    ``preprocess``: the input it was used with (default: the encoder's own).
    """
    rec = weights_arg(weights) if isinstance(weights, str) else weights
    spec = encoder_spec(name)
    arch = spec.arch or arch  # a ViT release is its own architecture
    if arch not in ARCHES:
        raise UserError(f"unknown encoder arch {arch!r}; choose one of {sorted(ARCHES)}")
    seed = rec.seed if rec.seed is not None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + zlib.crc32(name.encode()))  # each method its own random trunk
        trunk, dim = ARCHES[arch]()
        dims = {level: dim for level in spec.levels(arch) if level != "projector"}
        projector = None
        if "projector" in spec.levels(arch):
            dims["projector"], factory = spec.projector[arch]
            projector = factory(dim)
    enc = SSLEncoder(name, arch, trunk, dims, projector, preprocess or ARCH_PREPROCESS.get(arch, spec.preprocess))
    if rec.kind == "random":
        enc.weights = WeightsRecord("random", state_digest(enc), seed=seed)
    else:
        if rec.kind == "released" and arch == "tiny":
            path = shipped_tiny(name, rec.sha256)  # the recorded one when a file names it, else the current one
        elif rec.kind == "released" or rec.path == spec.url:
            path = fetch(spec.url, download=download, sha256=rec.sha256)
        elif "://" in rec.path:
            path = fetch(rec.path, download=download, sha256=rec.sha256, name=url_cache_name(rec.path))
        else:
            path = rec.path
        load_encoder_file(enc, spec.layout, path)
        if rec.kind == "released":  # where this machine keeps the file is no part of the record
            enc.weights = WeightsRecord("released", enc.weights.sha256)
    return enc.eval().requires_grad_(False)


def build_recorded_encoder(card: EncoderCard, download: bool = True, allow_url: str | None = None) -> SSLEncoder:
    """The encoder a manifest or checkpoint recorded, with its recorded preprocessing, checked to be the same
    weights (sha256).

    A record comes from whoever wrote the file, so it is trusted for its tensors only: weights recorded as a
    URL are fetched only from the registry's URL for the encoder, or from ``allow_url`` when the user names
    that URL explicitly; any other URL is refused before anything is downloaded."""
    name, weights = card.name, card.weights
    if weights.kind == "file" and "://" in (weights.path or ""):
        url = weights.path
        if url not in (encoder_spec(name).url, allow_url):
            raise UserError(f"the {name} weights this file records come from {url}, which is not the registry's "
                            f"URL for {name} ({encoder_spec(name).url}); rcdm does not fetch URLs a file names. "
                            f"Check that file yourself and pass allow_url={url}, or place it locally")
    elif weights.kind == "file" and not Path(weights.path).exists():
        raise UserError(f"the encoder weights this was made with ({weights.path}) are not here; "
                        f"place that file at the same path")
    enc = build_encoder(name, card.arch, weights, download=download, preprocess=card.preprocess)
    if weights.sha256 and enc.weights.sha256 != weights.sha256:
        raise UserError(f"encoder {name} weights {enc.weights} (sha256 {enc.weights.sha256[:12]}...) are not "
                        f"those recorded ({weights.sha256[:12]}...); use the same file")
    return enc


TINY_WEIGHTS = Path(__file__).parent / "tiny_weights"
# Tiny encoders shipped before the current ones, each in its own folder of TINY_WEIGHTS, kept while a shipped demo
# model or a user's dataset still records them (by sha256): what changed is said here and in their README.
EARLIER_TINY = {
    "v1": "half-strength colour jitter (0.4, 0.4, 0.4, 0.1) on 4096 images: their projectors kept colour, not shape",
}


def _shipped(name: str) -> list[tuple[str, Path, dict]]:
    """(version, file, record) of every shipped tiny ``name`` encoder: "current" first, then each ``EARLIER_TINY``
    folder that holds one."""
    out = []
    for version, folder in [("current", TINY_WEIGHTS), *((v, TINY_WEIGHTS / v) for v in EARLIER_TINY)]:
        path, record = folder / f"{name}.pt", folder / f"{name}.json"
        if path.exists() and record.exists():
            try:
                out.append((version, path, json.loads(record.read_text())))
            except (OSError, ValueError):
                raise UserError(f"{record} is unreadable; reinstall rcdm") from None
    return out


def shipped_version(name: str, sha256: str | None) -> str | None:
    """Which shipped tiny ``name`` encoder has ``sha256``: "current", a folder of ``EARLIER_TINY``, or None."""
    return next((v for v, _, r in _shipped(name) if sha256 and r.get("sha256") == sha256), None)


def shipped_tiny(name: str, sha256: str | None = None) -> Path:
    """The tiny encoder trained with ``name``'s own objective that ships with rcdm, checksum verified against the
    record written when it was trained (``launch/pretrain_encoder.py``): the current one, or, when ``sha256`` names
    an earlier one (a manifest or model made with it), that one from ``EARLIER_TINY`` -- a model is embedded and
    sampled with the exact file it was trained with."""
    found = _shipped(name)
    if not found:
        raise UserError(f"no trained tiny {name} encoder ships with rcdm (looked for {TINY_WEIGHTS / (name + '.pt')}); "
                        f"train one with `python launch/pretrain_encoder.py method={name}` and pass weights=<its file>, "
                        f"or choose weights=random explicitly")
    match = [(p, r) for v, p, r in found if (r.get("sha256") == sha256 if sha256 else v == "current")]
    if not match and sha256 is None:
        raise UserError(f"no current tiny {name} encoder ships with rcdm (looked for {TINY_WEIGHTS / (name + '.pt')}); "
                        f"reinstall rcdm")
    if not match:
        have = ", ".join(f"{p.parent.name}/{p.name} ({r.get('sha256', '?')[:12]}...)" for _, p, r in found)
        raise UserError(f"this was made with a tiny {name} encoder of sha256 {sha256[:12]}..., which this rcdm does "
                        f"not ship (it ships {have}); use the rcdm version that made it, or pass "
                        f"weights=<that encoder file>")
    path, record = match[0]
    if sha256sum(path) != record.get("sha256"):
        raise UserError(f"{path} does not match the sha256 in {path.with_suffix('.json').name}; reinstall rcdm")
    return path


def state_digest(module: nn.Module) -> str:
    """sha256 over the state dict's names and bytes: identifies weights that never lived in a file."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _misfit(model: dict, loaded: dict, show: int = 3) -> str:
    """What keeps ``loaded`` from loading strictly into ``model``: missing, unexpected and reshaped keys,
    counted, with the first few of each; "" when it fits."""
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (", ..." if len(keys) > show else "")

    missing = [k for k in model if k not in loaded]
    unexpected = [k for k in loaded if k not in model]
    shaped = [f"{k} {tuple(loaded[k].shape)} in the file, {tuple(model[k].shape)} here" for k in model
              if k in loaded and loaded[k].shape != model[k].shape]
    parts = [f"{len(missing)} missing ({some(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
             f"{len(shaped)} of another shape ({some(shaped)})" if shaped else ""]
    return "; ".join(p for p in parts if p)


def load_encoder_file(enc: SSLEncoder, layout: str, path) -> None:
    """Load a file in ``layout`` strictly into ``enc``; the error names the file and what differs."""
    try:
        sd, dropped = LAYOUTS[layout](load_file(path))
    except KeyError as e:
        raise UserError(f"{path} is not a {layout}-layout checkpoint for encoder {enc.name}: {e}") from None
    if dropped:
        log.info("%s: ignoring %d unused entries (%s ...)", path, len(dropped), dropped[0])
    misfit = _misfit(enc.state_dict(), sd)
    if misfit:
        raise UserError(f"{path} does not fit encoder {enc.name} (arch {enc.arch}): {misfit}; is it the right "
                        f"method and architecture?")
    enc.load_state_dict(sd, strict=True)
    enc.weights = WeightsRecord("file", sha256sum(path), path=str(path))
