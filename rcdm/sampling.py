"""Draw samples conditioned on the embeddings of given images and write them as one PNG grid."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rcdm.device import autocast, pick_device
from rcdm.diffusion.gaussian import Process
from rcdm.diffusion.schedules import sampler_for
from rcdm.encoders import build_recorded_encoder, embed_in_chunks
from rcdm.errors import UserError
from rcdm.grids import samples_png
from rcdm.model_files import conditioning_dim_check, load_checkpoint
from rcdm.preprocess import Preprocess, center_crop, find_images, load_rgb, to_model_range
from rcdm.storage import StorageOptions, write_local

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    checkpoint: str
    images: Any  # a file, a folder, or a list of files
    num_samples: int = 4
    steps: str = "100"  # respacing: "100", "ddim50", "10,10,10", "" = all training steps
    sampler: str | None = None  # ddpm | ddim; None = ddim for "ddimN" steps, else ddpm
    seed: int = 0
    batch_size: int = 16  # samples per network call
    device: str = "auto"
    download: bool = True
    allow_url: str | None = None  # fetch the encoder weights from this URL, which the checkpoint records (else refused)
    endpoint_url: str | None = None  # S3-compatible endpoint for s3:// checkpoints
    output: str = "grid.png"
    guidance: float = 1.0  # classifier-free guidance scale; 1 = the plain conditional model


def encode_images(paths: list[Path], encoder, preprocess: Preprocess, level: str, image_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (embeddings [N, D] float32, training-resolution images [N, 3, S, S] in [-1, 1])."""
    return encode_pil(load_images(paths), encoder, preprocess, level, image_size, device)


def load_images(paths) -> list:
    """PIL RGB images; an unreadable file is a UserError naming it."""
    imgs = []
    for p in paths:
        try:
            imgs.append(load_rgb(p))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
            raise UserError(f"cannot read image {p}: {e}") from None
    return imgs


def encode_pil(imgs: list, encoder, preprocess: Preprocess, level: str, image_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB images -> (embeddings [N, D] float32, images [N, 3, S, S] in [-1, 1] at ``image_size``)."""
    enc_in = [preprocess(img) for img in imgs]
    shown = [to_model_range(center_crop(img, image_size)) for img in imgs]
    h = embed_in_chunks(encoder, torch.stack(enc_in))[level]  # [N, D]
    return h, torch.stack(shown)


class Guided(torch.nn.Module):
    """Classifier-free guidance through the learned null embedding (Ho & Salimans 2022, with the condition
    a representation as in RCDM): out = u + scale * (c - u), c conditioned on the embedding, u on the null
    one, both from one batched forward. scale 1 is the plain conditional model."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale, self.cfg = model, scale, model.cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = len(x)
        drop = torch.arange(2 * n, device=x.device) >= n  # the second half on the null embedding
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop)  # [2N, C', H, W]
        c, u = out[:n], out[n:]
        guided = u + self.scale * (c - u)
        if self.cfg.out_channels == 2 * self.cfg.in_channels:  # learned variance: the conditional one, unguided
            return torch.cat([guided[:, :self.cfg.in_channels], c[:, self.cfg.in_channels:]], 1)
        return guided


def guided(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """``model`` with classifier-free guidance at ``scale`` (1: the model itself)."""
    if scale == 1:
        return model
    if not model.cfg.null_embedding:
        raise UserError(f"guidance={scale:g} needs a model trained with representation dropout (a recipe with "
                        f"cond_drop > 0, such as recipe=vpred); this one has no null embedding: use guidance=1")
    return Guided(model, scale)


@dataclass
class Sampling:
    """How samples are drawn, recorded beside every number they give."""

    steps: str = "ddim25"  # respacing: "100", "ddim50", ...
    sampler: str | None = None  # ddpm | ddim; None: ddim for "ddimN" steps, else ddpm
    guidance: float = 1.0  # classifier-free guidance scale; 1 = the plain conditional model
    seed: int = 0
    batch_size: int = 64

    @property
    def kind(self) -> str:
        return sampler_for(str(self.steps), self.sampler)

    def describe(self) -> dict:
        return {"steps": str(self.steps), "sampler": self.kind, "guidance": self.guidance, "seed": self.seed}


def draw(model, process: Process, cond: torch.Tensor, how: Sampling,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples [len(cond), 3, S, S] in [-1, 1], one per conditioning row, in batches of ``how.batch_size``;
    ``generator``: one seeded with ``how.seed`` on ``cond``'s device unless given."""
    diffusion = process.build(str(how.steps))
    net = guided(model, how.guidance)
    size = model.cfg.image_size
    gen = generator or torch.Generator(device=cond.device).manual_seed(how.seed)
    out = []
    with autocast(cond.device):
        for chunk in cond.split(how.batch_size):
            out.append(diffusion.sample(net, chunk, (len(chunk), 3, size, size), how.kind,
                                        generator=gen).float().clamp(-1, 1))
    return torch.cat(out)


def load_with_encoder(checkpoint: str, device: torch.device, download: bool = True,
                      endpoint_url: str | None = None, allow_url: str | None = None):
    """An RCDM (released or rcdm's own) and the frozen encoder it was trained with, on ``device``; encoder
    weights a checkpoint records as a URL are fetched only from the registry or ``allow_url``."""
    loaded = load_checkpoint(checkpoint, download=download, storage=StorageOptions(endpoint_url=endpoint_url))
    encoder = build_recorded_encoder(loaded.card.encoder, download, allow_url)  # its recorded preprocessing too
    conditioning_dim_check(loaded, encoder.dims)
    loaded.model.to(device).eval()
    return loaded, encoder.to(device)


def sample_grid(cfg: SampleConfig) -> dict:
    """Encode ``cfg.images``, draw ``num_samples`` per image, save the grid; returns a summary."""
    if cfg.num_samples < 1:
        raise UserError("num_samples must be at least 1")
    how = Sampling(str(cfg.steps), cfg.sampler, cfg.guidance, cfg.seed, cfg.batch_size)
    sampler = how.kind  # an unknown sampler fails here, before any model is loaded
    paths = find_images(cfg.images)
    device = pick_device(cfg.device)
    loaded, encoder = load_with_encoder(cfg.checkpoint, device, cfg.download, cfg.endpoint_url, cfg.allow_url)

    t0 = time.perf_counter()
    h, originals = encode_images(paths, encoder, encoder.preprocess, loaded.level, loaded.model.cfg.image_size, device)
    samples = draw(loaded.model, loaded.process, h.repeat_interleave(cfg.num_samples, 0).to(device), how)
    seconds = time.perf_counter() - t0
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_local(out, samples_png(originals, samples))
    log.info("wrote %s: %d images x %d samples, %s steps (%s) in %.1f s on %s",
             out, len(paths), cfg.num_samples, cfg.steps or "all", sampler, seconds, device)
    return {"output": str(out), "images": [str(p) for p in paths], "encoder": loaded.card.encoder.name,
            "level": loaded.level, "steps": str(cfg.steps), "sampler": sampler, "guidance": cfg.guidance,
            "seconds": seconds}
