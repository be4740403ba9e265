"""Conv pixel decoders: quantized feature grid [B, width, H, W] -> image [B, 3, S, S] in [0, 1] space.

`PixelDecoder` ("small", the tiny default): a stem conv, then per stage residual block(s) and a 2x nearest
upsample + conv, and a GroupNorm/SiLU/conv output head. `channels` has one entry per upsampling stage, so
the output side is H * 2**len(channels); when that is not the image size (27 x 16 = 432 for the 384 px /
patch 14 preset) a final bilinear resize lands on it exactly.

`RQVAEDecoder` ("rqvae", the paper presets): RQ-VAE's decoder capacity (the VQGAN decoder it uses: ch=128,
ch_mult (1, 1, 2, 2, 4), num_res_blocks=2, i.e. three residual blocks per level, self-attention after each
block at the lowest resolution and in the middle block), behind a 1x1 projection from the code width to
its latent channels, as the released VILA-U tower has it. Module names follow that layout (post_quant_conv,
conv_in, mid.block_1/attn_1/block_2, up[level].block/attn/upsample, norm_out, conv_out), so released weights
map onto it name for name. A grid that does not upsample to the image size (27 -> 432 at 384 px) is first
resized to one that does (24), as the released 384 px model does.

`build_decoder(config)` picks one from `VisionTowerConfig.decoder`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Upsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    def __init__(self, in_channels: int, channels: tuple[int, ...], image_size: int, res_blocks: int = 1):
        super().__init__()
        self.image_size = image_size
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        stages = []
        prev = channels[0]
        for ch in channels:
            blocks = [ResBlock(prev) for _ in range(res_blocks)]
            stages.append(nn.Sequential(*blocks, Upsample(prev, ch)))
            prev = ch
        self.stages = nn.Sequential(*stages)
        self.out_norm = _norm(prev)
        self.out_conv = nn.Conv2d(prev, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last conv: the VQGAN adaptive GAN weight balances gradients at this layer."""
        return self.out_conv.weight

    def shard_units(self) -> list[nn.Module]:
        """The submodules worth an FSDP unit each: the upsampling stages. The stem and the output head
        stay with the parent's unit, so that the adaptive GAN weight's gradient at `last_layer`, taken
        inside the parent's forward, crosses no unit boundary (whose backward hooks would fire)."""
        return list(self.stages)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(grid))
        x = self.out_conv(F.silu(self.out_norm(x)))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        # Centre the unconstrained output on mid-grey; callers clamp to [0, 1] for display only, so the
        # training loss keeps gradients everywhere.
        return x + 0.5


# -- RQ-VAE capacity --------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels, eps=1e-6)


class RQVAEResBlock(nn.Module):
    """GroupNorm/SiLU/conv twice, with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class RQVAEAttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # [B, 1, HW, C] per projection: one head over all positions
        q, k, v = (proj(h).reshape(b, 1, c, hgt * wid).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class RQVAEDecoder(nn.Module):
    """The VQGAN/RQ-VAE decoder: latent grid -> image, len(ch_mult) - 1 doublings.

    in_channels: the code width (fed through a 1x1 `post_quant_conv` to z_channels); num_res_blocks as in
    RQ-VAE's config (each level holds num_res_blocks + 1 blocks, as its code builds them).
    """

    def __init__(self, in_channels: int, image_size: int, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256):
        super().__init__()
        self.image_size = image_size
        self.levels = len(ch_mult)
        scale = 2 ** (self.levels - 1)
        if image_size % scale:
            raise ValueError(f"image_size {image_size} is not a multiple of the decoder's upsampling {scale}")
        self.latent_size = image_size // scale
        self.post_quant_conv = nn.Conv2d(in_channels, z_channels, 1)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = RQVAEResBlock(block_in, block_in)
        self.mid.attn_1 = RQVAEAttnBlock(block_in)
        self.mid.block_2 = RQVAEResBlock(block_in, block_in)
        # up[level] for level 0 (full resolution) .. levels-1 (the latent grid), run from the last to the first
        up = []
        for level in reversed(range(self.levels)):
            stage = nn.Module()
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(RQVAEResBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
                if level == self.levels - 1:  # attention at the lowest resolution
                    attns.append(RQVAEAttnBlock(block_in))
            stage.block = nn.ModuleList(blocks)
            stage.attn = nn.ModuleList(attns)
            if level != 0:
                stage.upsample = Upsample(block_in, block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def shard_units(self) -> list[nn.Module]:
        """The submodules worth an FSDP unit each: every residual, attention and upsampling block (the
        levels are containers, never called whole). The projections in and the output head stay with the
        parent's unit (see `PixelDecoder.shard_units`)."""
        units = [self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for stage in self.up:
            units += [*stage.block, *stage.attn] + ([stage.upsample] if hasattr(stage, "upsample") else [])
        return units

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[-1] != self.latent_size or grid.shape[-2] != self.latent_size:
            grid = F.interpolate(grid, size=(self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
        h = self.conv_in(self.post_quant_conv(grid))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        # RQ-VAE's decoder speaks [-1, 1]; this tower's images are [0, 1]
        return h * 0.5 + 0.5


def build_decoder(config) -> nn.Module:
    """The pixel decoder a `VisionTowerConfig` names: "small" (PixelDecoder) or "rqvae" (RQVAEDecoder)."""
    if config.decoder == "rqvae":
        return RQVAEDecoder(config.width, config.image_size, ch=config.decoder_ch, ch_mult=config.decoder_ch_mult,
                            num_res_blocks=config.decoder_res_blocks, z_channels=config.decoder_z_channels)
    return PixelDecoder(config.width, config.decoder_channels, config.image_size, config.decoder_res_blocks)
