"""RCDM models to sample from: the official release's ``rcdm_ema_*.pt`` files (found by path or by name
in the torch.hub cache; their card follows from the name: preset, encoder, level, the official input), the
EMA weights of rcdm's own training checkpoints and the shipped demo models (both carry their card)."""
from __future__ import annotations

import re
from pathlib import Path

from rcdm import demo_release, train_checkpoints
from rcdm.diffusion.gaussian import RELEASED
from rcdm.encoders import EncoderCard, encoder_spec
from rcdm.encoders.weights import WeightsRecord, fetch, load_file
from rcdm.errors import UserError
from rcdm.model_card import LoadedRCDM, ModelCard
from rcdm.presets import build_unet, preset_config
from rcdm.storage import StorageOptions, open_fs

RELEASE_URL = "https://dl.fbaipublicfiles.com/rcdm/"
RELEASED_NAME = re.compile(r"^rcdm_ema_(?P<encoder>[a-z0-9]+?)(?:_(?P<part>trunk|head))?\.pt$")
PART_TO_LEVEL = {"trunk": "backbone", "head": "projector", None: "backbone"}


def parse_released_name(name: str) -> tuple[str, str]:
    """``rcdm_ema_dino_trunk.pt`` -> ("dino", "backbone"); ``rcdm_ema_supervised.pt`` -> ("supervised", "backbone")."""
    m = RELEASED_NAME.match(Path(name).name)
    if not m:
        raise UserError(f"{name!r} is not named like a released RCDM checkpoint "
                        f"(rcdm_ema_<encoder>_<trunk|head>.pt or rcdm_ema_supervised.pt)")
    encoder_spec(m["encoder"])  # unknown encoder -> error listing the valid ones
    return m["encoder"], PART_TO_LEVEL[m["part"]]


def released_url(ref: str) -> str | None:
    """Where a released file named bare (``rcdm_ema_dino_trunk.pt``, no folder) is fetched from; None for a path."""
    return RELEASE_URL + ref if Path(ref).name == ref and RELEASED_NAME.match(ref) else None


def resolve(ref: str, download: bool = True) -> Path:
    """A path as given, else a released file name looked up (and fetched) in the torch.hub cache."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    url = released_url(ref)
    if url is None:
        raise UserError(f"checkpoint {ref!r} not found; give a path, or a released file name such as "
                        f"rcdm_ema_dino_trunk.pt placed in the torch.hub cache")
    return fetch(url, download=download)


def load_released_rcdm(ref: str, download: bool = True) -> LoadedRCDM:
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
    card = ModelCard("adm128", embed_dim, 128, RELEASED,
                     EncoderCard(encoder, "resnet50", level, WeightsRecord("released")))  # the official input
    return LoadedRCDM(model, card, str(path))


def load_trained(ref: str, storage: StorageOptions | None = None) -> LoadedRCDM:
    """An rcdm training checkpoint (file or run root, local or s3://): its EMA weights and self-description."""
    url = ref
    fs, path = open_fs(ref, storage)
    if not fs.exists(path):
        demos = ", ".join(demo_release.PREFIX + n for n in demo_release.available()) or "demo:<encoder>-<level>"
        raise UserError(f"checkpoint {ref!r} not found; give a checkpoint file, a run root, a demo model ({demos}) "
                        f"or a released file name such as rcdm_ema_dino_trunk.pt placed in the torch.hub cache")
    if fs.isdir(path):
        url = train_checkpoints.latest_path(ref, storage)
        if url is None:
            raise UserError(f"{ref} holds no checkpoint yet (no checkpoints/latest.json)")
    try:
        state = train_checkpoints.load(url, storage)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not (isinstance(state.get("meta"), dict) and isinstance(state.get("ema"), dict)):
        raise UserError(f"{url} holds no model card and EMA weights (meta, ema): it is not a training checkpoint of "
                        f"rcdm, or it was altered")
    card = ModelCard.from_dict(state["meta"], url)
    model = card.build_for(state["ema"], url)
    steps, seconds = state.get("step"), state.get("train_seconds")
    return LoadedRCDM(model, card, url, {"steps": steps if isinstance(steps, int) else None,
                                         "train_seconds": seconds if isinstance(seconds, (int, float)) else None})


def load_checkpoint(ref: str, download: bool = True, storage: StorageOptions | None = None) -> LoadedRCDM:
    """A demo model that ships with rcdm (``demo:vicreg-backbone``), a released ``rcdm_ema_*.pt`` (by path or
    by name in the hub cache) or an rcdm training checkpoint."""
    if demo_release.is_demo_ref(ref):
        return demo_release.load_demo(ref)
    if RELEASED_NAME.match(Path(ref).name) or (Path(ref).name.startswith("rcdm_ema_") and "/" not in ref):
        return load_released_rcdm(ref, download)
    return load_trained(ref, storage)


def conditioning_dim_check(loaded: LoadedRCDM, dims: dict[str, int]) -> None:
    want, name = loaded.model.cfg.embed_dim, loaded.card.encoder.name
    if loaded.level not in dims:
        raise UserError(f"encoder {name} has no {loaded.level} level (it has {sorted(dims)})")
    if dims[loaded.level] != want:
        raise UserError(f"{loaded.source} expects {want}-d conditioning but {name} "
                        f"{loaded.level} gives {dims[loaded.level]}-d; pick the matching encoder/level")
