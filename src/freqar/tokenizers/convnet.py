"""Taming/LDM-style convolutional encoder and decoder shared by the multi-scale tokenizers.

Module names follow the upstream checkpoints (``down.{i}.block.{j}``, ``mid.attn_1``...) so
official state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the upstream setting (32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block; a 1x1 ``nin_shortcut`` exists only when the width changes."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 qkv conv (channel blocks q, k, v)."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.C = channels
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.C, H * W).unbind(1)  # each B,C,HW
        w_BNN = torch.bmm(q.transpose(1, 2), k).mul_(self.C**-0.5).softmax(dim=2)
        h = torch.bmm(v, w_BNN.transpose(1, 2)).view(B, self.C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom (upstream's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _attn(channels: int, enabled: bool, groups: int) -> nn.Module:
    return AttnBlock(channels, groups) if enabled else nn.Identity()


class MidBlock(nn.Module):
    """Middle of the U: block, attention (any module, or Identity), block."""

    def __init__(self, c: int, dropout: float, attn: nn.Module, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout, groups)
        self.attn_1 = attn
        self.block_2 = ResnetBlock(c, c, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ResLevel(nn.Module):
    """One resolution level: ``block``/``attn`` lists and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for j, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class DownPath(nn.Module):
    """Forward of an LDM-style encoder (``conv_in``, ``down`` levels, ``mid``, ``norm_out``, ``conv_out``),
    shared by every encoder whose modules differ only in how they are built."""

    conv_in: nn.Module
    down: nn.ModuleList
    mid: nn.Module
    norm_out: nn.Module
    conv_out: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level.run(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class UpPath(nn.Module):
    """Forward of an LDM-style decoder; ``up.{i}`` is indexed by level and run from the deepest."""

    conv_in: nn.Module
    mid: nn.Module
    up: nn.ModuleList
    norm_out: nn.Module
    conv_out: nn.Module

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i].run(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Encoder(DownPath):
    """Image (B,3,H,W) in [-1,1] -> latent (B,z,H/2^(n-1),W/2^(n-1)); attention only at the lowest level."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        groups: int = 32,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        c_out = ch
        for i in range(n):
            c_in, c_out = ch * in_mult[i], ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, dropout, groups))
                c_in = c_out
                if i == n - 1 and using_sa:
                    attns.append(AttnBlock(c_out, groups))
            level = ResLevel(blocks, attns)
            if i != n - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = MidBlock(c_out, dropout, _attn(c_out, using_mid_sa, groups), groups)
        self.norm_out = group_norm(c_out, groups)
        self.conv_out = nn.Conv2d(c_out, z_channels, 3, 1, 1)


class Decoder(UpPath):
    """Latent -> image; ``up.{i}`` is indexed by level (``up.0`` is full resolution) and run in reverse."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        out_channels: int = 3,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        groups: int = 32,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = MidBlock(c_in, dropout, _attn(c_in, using_mid_sa, groups), groups)
        levels: list[nn.Module] = [nn.Module()] * n
        for i in reversed(range(n)):
            c_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, dropout, groups))
                c_in = c_out
                if i == n - 1 and using_sa:
                    attns.append(AttnBlock(c_out, groups))
            level = ResLevel(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, 1, 1)
