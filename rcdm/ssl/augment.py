"""The standard SSL augmentations at the demo images' resolution, drawn per sample.

Two global views (random resized crop, flip, colour jitter, grayscale, blur, and solarisation on the
second view as in BYOL/VICReg/Barlow Twins) and, for DINO, small local crops (multi-crop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # per global view
    solarize_p: tuple[float, float] = (0.0, 0.2)
    local_crops: int = 0  # DINO multi-crop
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.4)


def _colour(cfg: AugmentConfig) -> list:
    return [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p)]


def view_transforms(cfg: AugmentConfig) -> tuple[list, list]:
    """(global view transforms, local view transforms) on uint8 [3, H, W] tensors."""
    globals_ = []
    for blur_p, sol_p in zip(cfg.blur_p, cfg.solarize_p):
        ops = [T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, antialias=True), *_colour(cfg),
               T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 1.0))], p=blur_p)]
        if sol_p > 0:
            ops.append(T.RandomSolarize(128, p=sol_p))
        globals_.append(T.Compose(ops))
    local = T.Compose([T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, antialias=True), *_colour(cfg),
                       T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.5)])
    return globals_, [local] * cfg.local_crops


class TwoViewDataset(Dataset):
    """Images [N, 3, H, W] uint8 -> per index a list of augmented uint8 views (globals first)."""

    def __init__(self, images: torch.Tensor, cfg: AugmentConfig):
        self.images = images
        self.globals, self.locals = view_transforms(cfg)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        img = self.images[i]
        return [t(img) for t in self.globals] + [t(img) for t in self.locals]
