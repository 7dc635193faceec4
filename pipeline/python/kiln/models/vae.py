"""AutoencoderKL (the Flux / SD VAE) for torch.export: the decoder, and the encoder for make_tiny.

Built from a diffusers `AutoencoderKL` config.json dict. Parameter names equal the checkpoint
names (`decoder.up_blocks.0.resnets.0.conv1.weight`, `decoder.mid_block.attentions.0.to_q.weight`,
...). Only the `UpDecoderBlock2D` / `DownEncoderBlock2D` block types with group norm are supported,
which is what the Flux, SD and SDXL VAEs use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESNET_EPS = 1e-6


def _check_config(config: dict) -> None:
    for key, allowed in (("up_block_types", "UpDecoderBlock2D"),
                         ("down_block_types", "DownEncoderBlock2D")):
        for t in config.get(key, [allowed] * len(config["block_out_channels"])):
            if t != allowed:
                raise ValueError(f"vae: {key} entry {t!r} is not supported (only {allowed})")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"vae: act_fn {config['act_fn']!r} is not supported (only silu)")


def downscale_factor(config: dict) -> int:
    """Pixels per latent along each side: 2 per resampling level."""
    return 2 ** (len(config["block_out_channels"]) - 1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 conv when channels change) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=RESNET_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=RESNET_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=RESNET_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(seq)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = self.to_out[0](out)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (no conv padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] -> image [B, out_channels, h*f, w*f], f = 2^(levels-1)."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        chans = [int(c) for c in config["block_out_channels"]]
        groups = int(config.get("norm_num_groups", 32))
        layers = int(config.get("layers_per_block", 1)) + 1
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(int(config.get("latent_channels", 4)), rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, bool(config.get("mid_block_add_attention", True)))
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], rev[i], layers, groups, upsample=i < len(rev) - 1)
            for i in range(len(rev)))
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(chans[0], int(config.get("out_channels", 3)), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*latent_channels, H/f, W/f] (mean, logvar)."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        chans = [int(c) for c in config["block_out_channels"]]
        groups = int(config.get("norm_num_groups", 32))
        layers = int(config.get("layers_per_block", 1))
        self.conv_in = nn.Conv2d(int(config.get("in_channels", 3)), chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], chans[i], layers, groups,
                      downsample=i < len(chans) - 1)
            for i in range(len(chans)))
        self.mid_block = MidBlock(chans[-1], groups,
                                  bool(config.get("mid_block_add_attention", True)))
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * int(config.get("latent_channels", 4)), 3,
                                  padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VaeDecoder(nn.Module):
    """The decode half of AutoencoderKL: optional post_quant_conv, then the decoder.

    forward takes latents in the model (transformer) space and returns the decoder's raw output;
    the `z / scaling_factor + shift_factor` and clamp belong to the export wrapper.
    """

    def __init__(self, config: dict):
        super().__init__()
        latent = int(config.get("latent_channels", 4))
        self.scaling_factor = float(config.get("scaling_factor", 0.18215))
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        self.post_quant_conv = (nn.Conv2d(latent, latent, 1)
                                if config.get("use_post_quant_conv", True) else None)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VaeEncoder(nn.Module):
    """The encode half of AutoencoderKL (encoder + optional quant_conv): used by make_tiny to
    write a complete checkpoint and by tests; not exported."""

    def __init__(self, config: dict):
        super().__init__()
        latent = int(config.get("latent_channels", 4))
        self.encoder = Encoder(config)
        self.quant_conv = (nn.Conv2d(2 * latent, 2 * latent, 1)
                           if config.get("use_quant_conv", True) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments
