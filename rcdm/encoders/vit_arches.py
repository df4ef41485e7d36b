"""The Vision Transformer shapes of the DINO, DINOv2 and MAE releases: what the registry lists, without timm
(rcdm.encoders.vit builds them, importing timm only then)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTArch:
    patch: int
    dim: int
    depth: int
    heads: int
    img_size: int = 224  # the grid of the released position embeddings
    layer_scale: float | None = None  # DINOv2's LayerScale (ls1, ls2)


VIT_ARCHES: dict[str, ViTArch] = {
    "vit_small_patch16": ViTArch(16, 384, 12, 6),
    "vit_base_patch16": ViTArch(16, 768, 12, 12),
    "vit_small_patch14_dinov2": ViTArch(14, 384, 12, 6, img_size=518, layer_scale=1e-5),
    "vit_base_patch14_dinov2": ViTArch(14, 768, 12, 12, img_size=518, layer_scale=1e-5),
}
