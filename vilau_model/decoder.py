"""Conv pixel decoder: quantized feature grid [B, width, H, W] -> image [B, 3, S, S] in [0, 1] space.

VQGAN-style: a stem conv, then per stage a residual block and a 2x nearest upsample + conv, and a
GroupNorm/SiLU/conv output head. `channels` has one entry per upsampling stage, so the output side is
H * 2**len(channels); when that is not the image size (27 x 16 = 432 for the 384 px / patch 14
preset) a final bilinear resize lands on it exactly.
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

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(grid))
        x = self.out_conv(F.silu(self.out_norm(x)))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        # Centre the unconstrained output on mid-grey; callers clamp to [0, 1] for display only, so the
        # training loss keeps gradients everywhere.
        return x + 0.5
