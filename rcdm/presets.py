"""Named UNet presets; the registry keys are the ``model=`` config choices."""
from __future__ import annotations

from dataclasses import replace

from rcdm.unet import RCDMUNet, UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # CPU tests and the embedded demo: ~1.4 M parameters at 32 px.
    "tiny": UNetConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                       attention_ds=(4,), num_heads=2),
    # guided-diffusion's ImageNet 64 px flags.
    "adm64": UNetConfig(image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                        attention_ds=(2, 4, 8), num_head_channels=64, legacy_attention_order=False),
    # The official RCDM 128 px flags: the released rcdm_ema_*.pt checkpoints load into this.
    "adm128": UNetConfig(),
    # guided-diffusion's ImageNet 256 px flags.
    "adm256": UNetConfig(image_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                         attention_ds=(8, 16, 32), num_head_channels=64, legacy_attention_order=False),
}


def preset_config(name: str, embed_dim: int, **options) -> UNetConfig:
    """``options``: a recipe's output channels and conditioning options (``UNetConfig`` fields)."""
    if name not in PRESETS:
        raise KeyError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], embed_dim=embed_dim, **options)


def build_unet(name: str, embed_dim: int, **options) -> RCDMUNet:
    """The preset ``name`` conditioned on ``embed_dim``-d vectors (``options``: see ``preset_config``)."""
    return RCDMUNet(preset_config(name, embed_dim, **options))
