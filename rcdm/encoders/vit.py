"""Vision Transformer trunks for the zoo, built with timm's ``VisionTransformer``.

timm's parameter names are those of the DINO, DINOv2 and MAE releases (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``), so their files load strictly with no renaming; rcdm writes no attention of its own. A trunk
returns every token after the final norm; the encoder reads its levels off them: ``backbone`` = the CLS
token, ``patch_mean`` = the mean of the patch tokens.

Position embeddings are kept at the size each release trained with (DINOv2: 518 px, a 37 x 37 grid) and
resampled (bicubic, by timm) to the input's grid at run time, as DINOv2's own code does.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from rcdm.encoders.vit_arches import VIT_ARCHES, ViTArch


class ViTTrunk(VisionTransformer):
    """timm's VisionTransformer with no head (so its state dict has the releases' names, under the encoder's
    ``backbone.``): [N, 3, H, W] -> every token after the final norm [N, 1 + P, D]."""

    def __init__(self, arch: ViTArch):
        super().__init__(img_size=arch.img_size, patch_size=arch.patch, embed_dim=arch.dim, depth=arch.depth,
                         num_heads=arch.heads, mlp_ratio=4.0, qkv_bias=True, init_values=arch.layer_scale,
                         num_classes=0, global_pool="", dynamic_img_size=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def vit_trunk(name: str) -> tuple[nn.Module, int]:
    trunk = ViTTrunk(VIT_ARCHES[name])
    return trunk, trunk.embed_dim
