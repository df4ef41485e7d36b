"""RCDM model checkpoints: the official release's ``rcdm_ema_*.pt`` files, found by path or by name
in the torch.hub cache, and what they imply (preset, encoder, level, preprocessing)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rcdm.encoders import encoder_spec
from rcdm.encoders.weights import fetch, load_file
from rcdm.errors import UserError
from rcdm.presets import build_unet, preset_config
from rcdm.unet import RCDMUNet

RELEASE_URL = "https://dl.fbaipublicfiles.com/rcdm/"
RELEASED_NAME = re.compile(r"^rcdm_ema_(?P<encoder>[a-z0-9]+?)(?:_(?P<part>trunk|head))?\.pt$")
PART_TO_LEVEL = {"trunk": "backbone", "head": "projector", None: "backbone"}


@dataclass
class LoadedRCDM:
    """A UNet with its weights and everything needed to condition and sample it."""

    model: RCDMUNet
    encoder: str
    level: str
    encoder_arch: str
    encoder_weights: str
    schedule: str
    num_steps: int
    source: str


def parse_released_name(name: str) -> tuple[str, str]:
    """``rcdm_ema_dino_trunk.pt`` -> ("dino", "backbone"); ``rcdm_ema_supervised.pt`` -> ("supervised", "backbone")."""
    m = RELEASED_NAME.match(Path(name).name)
    if not m:
        raise UserError(f"{name!r} is not named like a released RCDM checkpoint "
                        f"(rcdm_ema_<encoder>_<trunk|head>.pt or rcdm_ema_supervised.pt)")
    encoder_spec(m["encoder"])  # unknown encoder -> error listing the valid ones
    return m["encoder"], PART_TO_LEVEL[m["part"]]


def resolve(ref: str, download: bool = True) -> Path:
    """A path as given, else a released file name looked up (and fetched) in the torch.hub cache."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if path.name != ref or not RELEASED_NAME.match(ref):
        raise UserError(f"checkpoint {ref!r} not found; give a path, or a released file name such as "
                        f"rcdm_ema_dino_trunk.pt placed in the torch.hub cache")
    return fetch(RELEASE_URL + ref, download=download)


def load_released(ref: str, download: bool = True) -> LoadedRCDM:
    """A released RCDM file: adm128, linear schedule over 1000 steps, ResNet-50 encoder, released weights."""
    encoder, level = parse_released_name(Path(ref).name)  # a bad name fails before any lookup
    path = resolve(ref, download)
    sd = load_file(path)
    if not isinstance(sd, dict) or "ssl_emb.weight" not in sd:
        raise UserError(f"{path} is not an RCDM state dict (no ssl_emb.weight)")
    embed_dim = sd["ssl_emb.weight"].shape[1]
    model = build_unet("adm128", embed_dim)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise UserError(f"{path} does not match the adm128 preset ({preset_config('adm128', embed_dim)}): "
                        f"{detail}") from None
    return LoadedRCDM(model=model, encoder=encoder, level=level, encoder_arch="resnet50",
                      encoder_weights="released", schedule="linear", num_steps=1000, source=str(path))


def load_checkpoint(ref: str, download: bool = True) -> LoadedRCDM:
    """Any checkpoint rcdm can sample from; today the released files."""
    return load_released(ref, download)


def conditioning_dim_check(loaded: LoadedRCDM, dims: dict[str, int]) -> None:
    want = loaded.model.cfg.embed_dim
    if loaded.level not in dims:
        raise UserError(f"encoder {loaded.encoder} has no {loaded.level} level (it has {sorted(dims)})")
    if dims[loaded.level] != want:
        raise UserError(f"{loaded.source} expects {want}-d conditioning but {loaded.encoder} "
                        f"{loaded.level} gives {dims[loaded.level]}-d; pick the matching encoder/level")
