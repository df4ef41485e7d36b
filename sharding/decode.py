"""Turn whatever bytes an input holds into an upright 8-bit RGB image, or a reason to reject it."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 16_000 ** 2  # ~256 MP; larger than any real photo, smaller than a bomb


class Rejected(Exception):
    """An input that cannot become a training image; the message is the reason recorded."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) grayscale: PIL's convert("RGB") clips at 255 instead of rescaling. Rescaled a band of
        # rows at a time, so a large image costs a float32 band, not a float64 copy of the whole.
        arr = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0)
        out = np.empty(arr.shape, dtype=np.uint8)
        band = max(1, (1 << 22) // max(1, arr.shape[1]))
        for r in range(0, arr.shape[0], band):
            chunk = arr[r:r + band].astype(np.float32)
            out[r:r + band] = np.clip(chunk * np.float32(255.0 / top) + 0.5, 0, 255)
        del arr
        img = Image.fromarray(out, "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite onto white: fully transparent pixels often hold arbitrary colour values
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, RGB


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied; raises ``Rejected`` with the reason."""
    if not data:
        raise Rejected("empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb check follows rcdm's limit (a decoding process' global)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:  # checked from the header, before any pixel is decoded
                raise Rejected(f"decompression bomb: {width}x{height} pixels exceeds max_pixels={max_pixels}")
            if width == 0 or height == 0:
                raise Rejected("image with no pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(f"truncated or corrupt image: {e}") from None
