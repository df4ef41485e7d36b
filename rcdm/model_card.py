"""One description of an RCDM, written once and read by everything that loads one: the UNet (preset, conditioning
size, the recipe's UNet options), the diffusion it reverses, the encoder that made its conditioning (with its
weights record and exact preprocessing), and how it was trained. Training checkpoints carry it as their
``meta``, the demo models' records as ``card``, and the released ``rcdm_ema_*.pt`` files imply it from their
name. Sampling and every analysis read it and guess nothing."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from rcdm.diffusion.gaussian import Process
from rcdm.diffusion.schedules import SCHEDULES
from rcdm.encoders import EncoderCard, recorded_weights
from rcdm.errors import UserError
from rcdm.manifest import MAX_EMBED_DIM
from rcdm.preprocess import Preprocess
from rcdm.presets import PRESETS, preset_config
from rcdm.unet import RCDMUNet, UNetConfig

FORMAT = "rcdm-model-card"
VERSION = 1
MAX_DIFFUSION_STEPS = 100_000  # a card's word sizes the schedule's tensors: bounded like every other number in it
# what a recipe may change in a preset's UNet (rcdm.config.RecipeConfig.unet_options), and the values it can take
UNET_OPTIONS = {"out_channels": (3, 6), "normalize_embeddings": (False, True), "whiten_embeddings": (False, True),
                "null_embedding": (False, True)}


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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

    def check(self, where: str) -> None:
        """Every number that sizes the model within what rcdm builds, before anything is allocated: a card is the
        word of whoever wrote the file (``where``), and one forged number must cost one error line, not memory."""
        def bad(what: str) -> UserError:
            return UserError(f"{where}: its model card {what}; the file was altered or is not an rcdm model")
        if self.preset not in PRESETS:
            raise bad(f"names UNet preset {str(self.preset)[:40]!r} (rcdm has {', '.join(sorted(PRESETS))})")
        if not (_count(self.embed_dim) and 1 <= self.embed_dim <= MAX_EMBED_DIM):
            raise bad(f"gives embed_dim {str(self.embed_dim)[:40]} (1 to {MAX_EMBED_DIM})")
        if self.image_size != PRESETS[self.preset].image_size:
            raise bad(f"gives image_size {str(self.image_size)[:40]} for preset {self.preset} "
                      f"({PRESETS[self.preset].image_size} px)")
        for k, v in self.unet.items():
            allowed = UNET_OPTIONS.get(k, ())
            if not any(v is a or (_count(v) and v == a and not isinstance(a, bool)) for a in allowed):
                raise bad(f"sets UNet option {str(k)[:40]}={str(v)[:40]} (a recipe sets only "
                          f"{', '.join(f'{o} {list(a)}' for o, a in UNET_OPTIONS.items())})")
        p = self.process
        if not (p.schedule in SCHEDULES and _count(p.num_steps) and 2 <= p.num_steps <= MAX_DIFFUSION_STEPS
                and p.prediction in ("epsilon", "v", "x0") and isinstance(p.learn_sigma, bool)):
            raise bad(f"describes a diffusion rcdm does not train ({str(p)[:120]})")

    def build_for(self, weights: Mapping[str, torch.Tensor], where: str) -> RCDMUNet:
        """The UNet this card describes with ``weights`` loaded, after checking the card (``check``) and that it
        fits the weights tensor by tensor on the meta device (no memory): a card that does not fit its weights is
        one error line naming the first difference."""
        self.check(where)
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in RCDMUNet(self.unet_config()).state_dict().items()}
        have = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
        differ = ([f"{k} missing" for k in sorted(want.keys() - have.keys())] +
                  [f"{k} unexpected" for k in sorted(have.keys() - want.keys())] +
                  [f"{k} {list(have[k])} (the card's model: {list(want[k])})"
                   for k in sorted(want.keys() & have.keys()) if want[k] != have[k]])
        if differ:
            raise UserError(f"{where}: its model card ({self.preset}, {self.embed_dim}-d conditioning, "
                            f"{self.unet}) does not fit its weights ({len(differ)} tensors differ, first: "
                            f"{'; '.join(differ[:3])[:300]}); the card or the weights were altered, or belong to "
                            f"another model")
        model = self.build()
        model.load_state_dict(dict(weights), strict=True)
        return model

    def with_device(self, device: str) -> ModelCard:
        return replace(self, device=device)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "process": self.process.to_dict(), "encoder": self.encoder.to_dict(),
                "unet": dict(self.unet), "recipe": self.recipe, "dataset": self.dataset, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict, where: str = "a model file") -> ModelCard:
        """A card as written now, or the self-description of checkpoints from before cards (rcdm 0.1-0.3:
        flat encoder fields; rcdm 0.1: no process, a string weights record beside its sha256). A card that is
        neither is a UserError naming ``where`` and what it lacks."""
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:160]}"
            raise UserError(f"{where} does not hold an rcdm model card ({what}); the file was altered or is not "
                            f"an rcdm model") from None

    @classmethod
    def _from_dict(cls, d: dict) -> ModelCard:
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
