"""Procedural images with known generative factors: the embedded demo data and the invariance probes'
ground truth.

Each factor matches something SSL augmentations touch: object and background colour (colour jitter),
grayscale (random grayscale), scale and position (random resized crop). Shape is what the
augmentations keep, and serves as the label. Sample i of (seed, split) is the same on every machine.
"""
from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 205, 40),
           "purple": (150, 60, 200), "orange": (245, 130, 30)}
BACKGROUNDS = {"dark": (25, 25, 30), "light": (225, 225, 220), "teal": (30, 110, 115), "brown": (115, 80, 50)}
SCALE_RANGE = (0.3, 0.7)  # object size as a fraction of the image side
GRAYSCALE_P = 0.2
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges at 32 px


def factors(seed: int, split: str, index: int) -> dict:
    """The generative factors of sample ``index``; discrete ones by name, continuous ones in [0, 1]."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    scale = float(rng.uniform(*SCALE_RANGE))
    half = scale / 2
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "scale": scale,
        "x": float(rng.uniform(half, 1 - half)),  # object centre, fraction of the width
        "y": float(rng.uniform(half, 1 - half)),
        "grayscale": bool(rng.random() < GRAYSCALE_P),
    }


def render(f: dict, size: int) -> Image.Image:
    """An RGB image of ``size`` x ``size`` showing the factors ``f``."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[f["background"]])
    draw = ImageDraw.Draw(img)
    cx, cy, r = f["x"] * big, f["y"] * big, f["scale"] * big / 2
    colour = COLOURS[f["colour"]]
    if f["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif f["shape"] == "square":
        s = r * 0.85  # similar area to the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif f["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    else:  # cross
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    img = img.resize((size, size), resample=Image.BOX)
    if f["grayscale"]:
        img = img.convert("L").convert("RGB")
    return img


def sample(seed: int, split: str, index: int, size: int) -> tuple[Image.Image, dict]:
    f = factors(seed, split, index)
    return render(f, size), f
