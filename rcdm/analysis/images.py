"""The ``images=`` of the analyses: files, a folder, single synthetic images by name, or ``synthetic:N`` (the demo
generator's images of a split no encoder, RCDM or factor reader trained on, with their factors known)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from rcdm import synthetic
from rcdm.errors import UserError
from rcdm.preprocess import find_images
from rcdm.sampling import load_images

SYNTHETIC_SEED, SYNTHETIC_SPLIT = 23, "analysis"  # images no encoder, RCDM or factor predictor trained on


@dataclass
class Images:
    pils: list
    names: list[str]
    factors: list[dict] | None  # known for synthetic images only


SYNTHETIC_NAME = re.compile(rf"^synthetic/{SYNTHETIC_SPLIT}/(\d+)$")


def load_inputs(spec, size: int) -> Images:
    """``images=`` of the analyses: "synthetic:N" (the first N labelled demo images of a split no model
    trained on), a folder, a file, or a list of files and single synthetic images by name
    (``[synthetic/analysis/3,synthetic/analysis/7]``: factors known); resized to the checkpoint's ``size``."""
    if isinstance(spec, str) and spec.startswith("synthetic:") or spec == "synthetic":
        _, _, n = spec.partition(":")
        try:
            count = int(n or 64)
        except ValueError:
            raise UserError(f"images={spec!r}: write synthetic:<count>, e.g. synthetic:64") from None
        return _synthetic(list(range(count)), size)
    items = list(spec) if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    named = [SYNTHETIC_NAME.match(str(i)) for i in items]
    if items and all(named):
        return _synthetic([int(m[1]) for m in named], size)
    if any(named):
        raise UserError(f"images={spec!r} mixes synthetic images and files: give one kind")
    paths = find_images(spec)
    return Images(load_images(paths), [str(p) for p in paths], None)


def _synthetic(indices: list[int], size: int) -> Images:
    pairs = [synthetic.sample(SYNTHETIC_SEED, SYNTHETIC_SPLIT, i, size) for i in indices]
    return Images([p for p, _ in pairs], [f"synthetic/{SYNTHETIC_SPLIT}/{i}" for i in indices], [f for _, f in pairs])
