"""Encoder trunks: torchvision's ResNet-50, a small ResNet with the same parameter naming, and the Vision
Transformers of the DINO, DINOv2 and MAE releases (rcdm.encoders.vit, timm; imported when one is built)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import BasicBlock

from rcdm.encoders.vit_arches import VIT_ARCHES


def _resnet50() -> tuple[nn.Module, int]:
    net = resnet50(weights=None)
    net.fc = nn.Identity()  # the trunk ends at global average pooling: 2048-d
    return net, 2048


class TinyResNet(nn.Module):
    """A 4-stage BasicBlock ResNet for 32-64 px inputs, named like torchvision's (conv1, bn1, layerK)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 1):
        # blocks: BasicBlocks per stage (the shipped encoders: 1; ResNet-18's layout is 2)
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)  # no stem pooling at 32 px
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, ch = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or ch != w:
                down = nn.Sequential(nn.Conv2d(ch, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
            stage = [BasicBlock(ch, w, stride=stride, downsample=down)] + [BasicBlock(w, w) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [N, w0, H, W]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, w3, H/8, W/8]
        return x.mean(dim=(2, 3))  # [N, w3]


def _tiny() -> tuple[nn.Module, int]:
    net = TinyResNet()
    return net, net.out_dim


def _vit(name: str) -> Callable[[], tuple[nn.Module, int]]:
    def make() -> tuple[nn.Module, int]:
        from rcdm.encoders.vit import vit_trunk

        return vit_trunk(name)

    return make


# arch name -> factory returning (trunk, output dim)
ARCHES: dict[str, Callable[[], tuple[nn.Module, int]]] = {"resnet50": _resnet50, "tiny": _tiny,
                                                          **{name: _vit(name) for name in VIT_ARCHES}}
