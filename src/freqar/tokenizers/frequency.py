"""FAR's frequency levels: the low-pass of a continuous latent and the canvas the engine updates per level.

A level is a "core size" s: the latent is area-downsampled to s×s and bicubically upsampled back (upstream's
resampling, not an FFT mask); s = 0 is the all-zero input that carries only the class. Every level predicts
the full latent, so the canvas is simply the latest prediction, low-passed with the next level's core size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from ..interfaces import StageSample
from .kl import AutoencoderKL

UPSTREAM_LEVELS_16 = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def lowpass(latent_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """``up_bicubic(down_area(z, size), H)``; size 0 gives zeros, size H gives z itself."""
    H, W = latent_BCHW.shape[-2:]
    if size == 0:
        return torch.zeros_like(latent_BCHW)
    small = F.interpolate(latent_BCHW, size=(size, size), mode="area")
    return F.interpolate(small, size=(H, W), mode="bicubic")


def to_tokens(latent_BCHW: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,H·W,C), token index = row·W + col (upstream patchify with p = 1)."""
    B, C = latent_BCHW.shape[:2]
    return latent_BCHW.reshape(B, C, -1).transpose(1, 2)


def to_latent(tokens_BnC: torch.Tensor, side: int) -> torch.Tensor:
    B, n, C = tokens_BnC.shape
    return tokens_BnC.transpose(1, 2).reshape(B, C, side, side)


def default_levels(side: int) -> tuple[int, ...]:
    """Upstream's 10 levels for a 16×16 latent; for other sides every core size 0..side−1 up to 10 levels."""
    if side == 16:
        return UPSTREAM_LEVELS_16
    if side <= 10:
        return tuple(range(side))
    top = max(2, round(0.65 * side))
    return tuple(sorted({0, *(round(2 + (top - 2) * i / 8) for i in range(9))}))


def validate_levels(levels: tuple[int, ...] | list[int], side: int) -> tuple[int, ...]:
    """Core sizes must be strictly increasing integers in [0, side−1]."""
    lv = tuple(int(s) for s in levels)
    if not lv:
        raise InvalidOption("the level schedule is empty")
    if any(b <= a for a, b in zip(lv, lv[1:], strict=False)):
        raise InvalidOption(f"level schedule {list(lv)} is not strictly increasing")
    bad = [s for s in lv if not 0 <= s < side]
    if bad:
        raise InvalidOption(f"level {bad[0]} is beyond the latent side {side} (core sizes are 0..{side - 1})")
    return lv


class FrequencyTokenizer:
    """The engine's tokenizer for FAR: canvas = latest full-latent prediction (B,C,side,side), scaled."""

    def __init__(self, vae: AutoencoderKL, levels: tuple[int, ...] | list[int] | None = None) -> None:
        self.vae = vae
        self.side = vae.cfg.latent_side
        self.channels = vae.cfg.embed_dim
        self.levels = validate_levels(default_levels(self.side) if levels is None else levels, self.side)

    def stage_grids(self) -> list[tuple[int, int]]:
        return [(self.side, self.side)] * len(self.levels)

    def init_canvas(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch, self.channels, self.side, self.side, device=device)

    def next_input(self, canvas: torch.Tensor, stage: int) -> torch.Tensor:
        """Level ``stage``'s input tokens: the previous prediction low-passed with this level's core size."""
        return to_tokens(lowpass(canvas, self.levels[stage]))

    def token_vectors(self, sample: StageSample) -> torch.Tensor:
        if sample.values is None:
            raise InvalidOption("the FAR tokenizer needs continuous token values from its head")
        return sample.values

    def update(
        self, canvas: torch.Tensor, h_BlC: torch.Tensor, stage: int, keep_Bl: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replace the canvas by the new prediction; positions with ``keep_Bl`` False keep their old value."""
        new = to_latent(h_BlC, self.side)
        if keep_Bl is None:
            return new
        keep = keep_Bl.view(keep_Bl.shape[0], 1, self.side, self.side)
        return torch.where(keep, new, canvas)

    def decode(self, canvas: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]."""
        return self.vae.decode(canvas).add(1).div(2).clamp(0, 1)

    # nn-like conveniences so a pipeline can treat it as a module
    def to(self, device: str | torch.device) -> FrequencyTokenizer:
        self.vae.to(device)
        return self

    def eval(self) -> FrequencyTokenizer:
        self.vae.eval()
        return self
