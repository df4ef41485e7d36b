"""Image loading and the encoder / training-image preprocessing that every stage records and replays."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from rcdm.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes an encoder input.

    ``crop``: "center" = halve with a box filter while the short side is at least twice ``size``, bicubic
    resize of the short side to ``size``, centre crop (the official RCDM/ADM recipe).
    ``normalize``: "minus_one_one" = x / 127.5 - 1 (the official RCDM encoder input) or "imagenet"
    (mean/std of ImageNet on [0, 1] pixels). ``resize``: DINO's, DINOv2's and MAE's evaluation transform,
    Resize(256) then CenterCrop(224), is ``resize=256, size=224``; 0 = the short side to ``size``.
    """

    size: int = 224
    crop: str = "center"
    normalize: str = "minus_one_one"
    resize: int = 0  # > size: the short side goes to ``resize`` first, then the centre size x size (ViT evals)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["resize"]:  # as rcdm recorded it before ``resize`` existed: those manifests stay the same
            del d["resize"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**d)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> [3, size, size] float tensor."""
        return self.normalize_uint8(self.crop_uint8(img))

    def crop_uint8(self, img: Image.Image) -> torch.Tensor:
        """The geometric part, done where images are decoded: PIL RGB -> [3, size, size] uint8."""
        if self.crop != "center":
            raise ValueError(f"unknown crop {self.crop!r}; only 'center' is implemented")
        return to_uint8_tensor(center_crop(img, self.size, self.resize))

    def normalize_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The value part, done on the encoder's device: [..., 3, H, W] uint8 -> float32."""
        x = x.float()
        if self.normalize == "minus_one_one":
            return x / 127.5 - 1.0
        if self.normalize == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
            std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
            return (x / 255.0 - mean) / std
        raise ValueError(f"unknown normalisation {self.normalize!r}; choose 'minus_one_one' or 'imagenet'")


def center_crop(img: Image.Image, size: int, resize: int = 0) -> Image.Image:
    """Box-halve, bicubic-resize the short side to ``resize`` (``size`` when 0), then take the central
    size x size square."""
    short = max(resize, size)
    while min(img.size) >= 2 * short:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = short / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_model_range(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1], the range the diffusion model works in."""
    return to_uint8_tensor(img).float() / 127.5 - 1.0


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as upright 8-bit RGB (EXIF orientation applied)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def find_images(spec: str | list[str]) -> list[Path]:
    """Image files named by ``spec``: files, folders (searched recursively), or a comma-separated mix."""
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s.strip()]
    found: list[Path] = []
    for item in items:
        p = Path(str(item).strip()).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"no such image file or folder: {p}; pass images=<file, folder or a,b,c list>")
    if not found:
        raise UserError(f"no images found in {spec!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found
