"""The ADM UNet (Dhariwal & Nichol 2021) conditioned on an SSL embedding, as RCDM uses it.

Module names and nesting follow the released RCDM checkpoints exactly (``time_embed``, ``ssl_emb``,
``input_blocks.i.j``, ``middle_block``, ``output_blocks``, ``out``), so a released ``rcdm_ema_*.pt``
state dict loads with ``strict=True``. The embedding enters once: ``ssl_emb`` maps it to the width of
the timestep embedding and the two are summed; every ResBlock turns that sum into a scale and shift
applied after its second GroupNorm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters; the defaults are the official RCDM 128 px flags."""

    image_size: int = 128
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6  # learned sigma: epsilon (3) + variance interpolation (3)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 8, 16)  # downsample factors with attention (= 32, 16, 8 px at 128)
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_heads: int = 4
    num_head_channels: int = -1  # > 0 fixes channels per head instead of the head count
    legacy_attention_order: bool = True  # qkv channels grouped per head (guided-diffusion's default)
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    dropout: float = 0.0
    embed_dim: int = 2048  # conditioning vector size (backbone 2048, projector 8192/256/128, ...)
    # Conditioning options of the newer recipes (the released models have neither):
    normalize_embeddings: bool = False  # per-dimension (h - mean) / std with buffers set from the training split
    whiten_embeddings: bool = False  # with normalize_embeddings: (h - mean) @ W, W the split's ZCA matrix
    null_embedding: bool = False  # a learned "no representation" vector: dropout in training, guidance in sampling


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [N] -> [N, dim], cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast dtype: its statistics are fragile in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # [N, C, 2H, 2W]
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv (key ``op``) or a 2x2 average pool."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # [N, C, H/2, W/2]


class ResBlock(nn.Module):
    """Residual block with the conditioning applied as scale-shift after the second GroupNorm."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_scale_shift_norm: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the activation and the conv, on both paths
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))  # [N, C_out, H', W']
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)  # [N, C_out, H, W]
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # [N, 2*C_out or C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention through ``scaled_dot_product_attention``.

    ``legacy_order`` reads qkv channels as [head][q|k|v][ch] (the released checkpoints); otherwise as
    [q|k|v][head][ch]. Both give softmax(q.k / sqrt(ch)) v per head.
    """

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, legacy_order: bool):
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)  # [N, C, L]
        qkv = self.qkv(self.norm(x_flat))  # [N, 3C, L]
        heads, ch, length = self.num_heads, c // self.num_heads, x_flat.shape[-1]
        if self.legacy_order:
            qkv = qkv.reshape(b, heads, 3, ch, length)  # [N, heads, q|k|v, ch, L]
        else:
            qkv = qkv.reshape(b, 3, heads, ch, length).transpose(1, 2)  # [N, heads, q|k|v, ch, L]
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))  # each [N, heads, L, ch]
        h = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, ch]
        h = h.transpose(-1, -2).reshape(b, c, length)  # [N, C, L], heads concatenated
        return (x_flat + self.proj_out(h)).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the conditioning embedding to the blocks that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class RCDMUNet(nn.Module):
    """ADM UNet predicting [epsilon, variance interpolation] from (x_t, t, embedding)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_ch, ch_out, cfg.dropout, cfg.use_scale_shift_norm, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels, cfg.legacy_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.ssl_emb = nn.Linear(cfg.embed_dim, emb_ch)
        if cfg.normalize_embeddings:  # statistics of the training split, saved with the weights
            self.register_buffer("emb_mean", torch.zeros(cfg.embed_dim))
            self.register_buffer("emb_std", torch.ones(cfg.embed_dim))
            if cfg.whiten_embeddings:
                self.register_buffer("emb_white", torch.eye(cfg.embed_dim))
        if cfg.null_embedding:
            self.null_emb = nn.Parameter(torch.zeros(cfg.embed_dim))

        ch = in_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)))

    def condition(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding as the network reads it: [N, D] normalised, rows where ``drop`` [N] is True replaced
        by the null embedding."""
        cond = cond.float()
        if self.cfg.normalize_embeddings and self.cfg.whiten_embeddings:
            cond = (cond - self.emb_mean) @ self.emb_white
        elif self.cfg.normalize_embeddings:
            cond = (cond - self.emb_mean) / self.emb_std
        if drop is not None:
            if not self.cfg.null_embedding:
                raise ValueError("this model has no null embedding: it was trained without representation dropout")
            cond = torch.where(drop[:, None], self.null_emb.float().expand_as(cond), cond)
        return cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: [N, 3, H, W] noisy image, t: [N] timesteps, cond: [N, embed_dim], drop: [N] bool (rows to condition
        on the null embedding instead) -> [N, out_channels, H, W]."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))  # [N, 4*mc]
        if self.cfg.normalize_embeddings or drop is not None:
            cond = self.condition(cond, drop)
        emb = emb + self.ssl_emb(cond.to(emb.dtype))  # the only place the embedding enters
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)  # [N, C_max, H/ds_max, W/ds_max]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
