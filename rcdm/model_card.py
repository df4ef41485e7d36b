"""One description of an RCDM, written once and read by everything that loads one: the UNet (preset, conditioning
size, the recipe's UNet options), the diffusion it reverses, the encoder that made its conditioning (with its
weights record and exact preprocessing), and how it was trained. Training checkpoints carry it as their
``meta``, the demo models' records as ``card``, and the released ``rcdm_ema_*.pt`` files imply it from their
name. Sampling and every analysis read it and guess nothing."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from rcdm.diffusion.gaussian import Process
from rcdm.encoders import EncoderCard, recorded_weights
from rcdm.preprocess import Preprocess
from rcdm.presets import preset_config
from rcdm.unet import RCDMUNet, UNetConfig

FORMAT = "rcdm-model-card"
VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    preset: str  # a UNet preset (rcdm.presets)
    embed_dim: int
    image_size: int
    process: Process
    encoder: EncoderCard
    unet: dict = field(default_factory=dict)  # the recipe's UNet options (out channels, normalisation, null embedding)
    recipe: dict | None = None  # the training recipe (rcdm.config.RecipeConfig as a dict)
    dataset: str | None = None
    device: str | None = None  # what trained it

    def unet_config(self) -> UNetConfig:
        return preset_config(self.preset, self.embed_dim, **self.unet)

    def build(self) -> RCDMUNet:
        """The UNet this card describes, randomly initialised (load its weights next)."""
        return RCDMUNet(self.unet_config())

    def with_device(self, device: str) -> ModelCard:
        return replace(self, device=device)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "process": self.process.to_dict(), "encoder": self.encoder.to_dict(),
                "unet": dict(self.unet), "recipe": self.recipe, "dataset": self.dataset, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        """A card as written now, or the self-description of checkpoints from before cards (rcdm 0.1-0.3:
        flat encoder fields; rcdm 0.1: no process, a string weights record beside its sha256)."""
        if d.get("format") == FORMAT:
            return cls(d["preset"], d["embed_dim"], d["image_size"], Process(**d["process"]),
                       EncoderCard.from_dict(d["encoder"]), dict(d.get("unet") or {}), d.get("recipe"),
                       d.get("dataset"), d.get("device"))
        weights = recorded_weights(d["encoder_weights"], d["encoder"], d.get("encoder_sha256"))
        pre = d.get("preprocess")
        enc = EncoderCard(d["encoder"], d["encoder_arch"], d["level"], weights, Preprocess.from_dict(pre) if pre else None)
        process = Process(**d["process"]) if "process" in d else Process(d["schedule"], d["num_steps"])
        return cls(d["preset"], d["embed_dim"], d["image_size"], process, enc, dict(d.get("unet") or {}),
                   d.get("recipe"), d.get("dataset"), d.get("device"))


@dataclass
class LoadedRCDM:
    """A UNet with its weights, and its card: everything needed to condition and sample it."""

    model: RCDMUNet
    card: ModelCard
    source: str
    # how it was trained, where its file says (rcdm checkpoints, demo models): steps, train_seconds, and for demo
    # models the weights file's sha256 and the device; None for the official release's files
    training: dict | None = None

    @property
    def level(self) -> str:
        return self.card.encoder.level

    @property
    def process(self) -> Process:
        return self.card.process
