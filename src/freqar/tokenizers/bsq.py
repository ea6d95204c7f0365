"""Infinity's BSQ VAE: a conv autoencoder whose latent is quantised bit by bit on the unit sphere.

Bitwise spherical quantisation has no learned parameters: a d-channel latent vector is L2-normalised and
each channel snaps to ±1/√d (bit 1 = positive). Encoding is multi-scale and residual: area-downsample the
residual to a scale, quantise, trilinear-upsample the codes back to the full latent grid and subtract. The
decoder reads the sum of all upsampled codes. ``BSQStages`` binds the VAE to one scale schedule (any h/w
template) and is what the generation engine drives.

Spatial patchify (Infinity-8B: factor p = 2): the transformer's schedule is the template's, the VAE works on
every grid scaled by p, and one transformer token carries the p×p latent cells below it as p²·d bits. The
token layout is PyTorch's ``pixel_unshuffle``: channel ``c·p² + i·p + j`` of token (y, x) is VAE channel c at
cell (p·y + i, p·x + j); ``pixel_shuffle`` inverts it. Every method that takes a ``patchify`` factor takes
the transformer's schedule and token layout; the default 1 is the plain (2B) case.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch, InvalidOption
from ..interfaces import StageSample
from .convnet import Decoder, Encoder

# Wrapper levels of upstream's ``Conv``/``Normalize`` modules, removed in the "plain" (flux-style) layout.
_WRAPPED_SUFFIXES = (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias")
# Integer buffers some checkpoints carry (2**arange(d-1..0)); they hold no information.
_MASK_BUFFERS = ("quantizer.lfq.mask", "quantize.lfq.mask")


@dataclass(frozen=True)
class BSQConfig:
    """BSQ VAE hyper-parameters; defaults are ``infinity_vae_d32reg.pth`` (d=32, stride 16)."""

    codebook_dim: int = 32
    base_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = tuple(int(m) for m in getattr(self, name))
            object.__setattr__(self, name, mult)
            if 2 ** (len(mult) - 1) != self.patch_size:
                raise InvalidOption(
                    f"BSQ {name} {list(mult)} gives stride {2 ** (len(mult) - 1)}, "
                    f"not patch_size {self.patch_size}"
                )
            for m in mult:
                c = self.base_ch * m
                if c % 32 and c % 24:
                    raise InvalidOption(f"BSQ width {c} is a multiple of neither 32 nor 24 GroupNorm groups")
        if self.codebook_dim < 1 or self.num_res_blocks < 1:
            raise InvalidOption("BSQ codebook_dim and num_res_blocks must be >= 1")

    @property
    def codebook_scale(self) -> float:
        return 1.0 / math.sqrt(self.codebook_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def _groupnorm_rule(module: nn.Module) -> None:
    """Upstream's per-width GroupNorm: 32 groups when the width allows it, else 24."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = 32 if m.num_channels % 32 == 0 else 24


def to_plain_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept both upstream key spellings: drop the ``.conv``/``.norm`` wrapper level of the module layout.

    The layout is detected from ``encoder.conv_in``: ``...conv_in.conv.weight`` (module) vs
    ``...conv_in.weight`` (plain). Mixing both in one file is rejected by the strict load that follows.
    """
    if "encoder.conv_in.conv.weight" not in state and "decoder.conv_in.conv.weight" not in state:
        return dict(state)
    out = {}
    for k, v in state.items():
        for suf in _WRAPPED_SUFFIXES:
            if k.endswith(suf):
                k = k[: -len(suf)] + "." + suf.rsplit(".", 1)[1]
                break
        out[k] = v
    return out


def bsq_quantize(r_BdN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale of BSQ over channel dim 1: (codes ±1/√d, bits int64); sign(0) quantises to bit 0."""
    d = r_BdN.shape[1]
    u = F.normalize(r_BdN, dim=1, eps=1e-12)
    s = 1.0 / math.sqrt(d)
    zhat = torch.where(u > 0, torch.full_like(u, s), torch.full_like(u, -s))
    q = u + (zhat - u)  # upstream's straight-through value, kept so codes round like theirs
    return q, (q > 0).long()


def bits_to_codes(bits_BlD: torch.Tensor, scale: float) -> torch.Tensor:
    """Bit labels (..., d) -> unit-norm codes (..., d): (2b-1)·scale, then L2-normalised as upstream."""
    codes = bits_BlD.float() * scale * 2 - scale
    return F.normalize(codes, dim=-1)


def token_codes(bits_BlD: torch.Tensor, scale: float, p: int = 1) -> torch.Tensor:
    """Bits in token layout (B, l, p²·d) -> codes in that layout, unit-norm per latent cell (d bits)."""
    if p == 1:
        return bits_to_codes(bits_BlD, scale)
    B, l, D = bits_BlD.shape  # channel c·p² + s: put the d channels of each sub-cell s last
    cells = bits_BlD.reshape(B, l, D // (p * p), p * p).transpose(-1, -2)
    return bits_to_codes(cells, scale).transpose(-1, -2).reshape(B, l, D)


def depth_to_space(tokens_BlD: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Tokens (B, h·w, p²·d) row-major -> latent map (B, d, p·h, p·w) (``pixel_shuffle``; p = 1: reshape)."""
    x = tokens_BlD.transpose(1, 2).reshape(tokens_BlD.shape[0], -1, *grid)
    return x if p == 1 else F.pixel_shuffle(x, p)


def space_to_depth(x_BdHW: torch.Tensor, p: int) -> torch.Tensor:
    """Latent map (B, d, p·h, p·w) -> tokens (B, h·w, p²·d) row-major (``pixel_unshuffle``)."""
    if p != 1:
        x_BdHW = F.pixel_unshuffle(x_BdHW, p)
    return x_BdHW.flatten(2).transpose(1, 2)


def _check_patchify(p: int) -> int:
    if int(p) != p or p < 1:
        raise InvalidOption(f"spatial patchify factor must be a positive integer, got {p}")
    return int(p)


def _resize(x_BdHW: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Upstream works on 5-D (B,d,1,H,W) tensors; resize through the same op (trilinear/area with T=1)."""
    return F.interpolate(x_BdHW.unsqueeze(2), size=(1, *size), mode=mode).squeeze(2)


def validate_schedule(schedule: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A schedule is >= 1 positive (h, w) grids, non-decreasing on both axes."""
    grids = [(int(h), int(w)) for h, w in schedule]
    if not grids or any(h < 1 or w < 1 for h, w in grids):
        raise InvalidOption(f"invalid scale schedule {grids}: grids must be positive")
    for (h0, w0), (h1, w1) in zip(grids, grids[1:], strict=False):
        if h1 < h0 or w1 < w0:
            raise InvalidOption(f"invalid scale schedule {grids}: grids must not shrink")
    return grids


class BSQVAE(nn.Module):
    """Encoder + parameter-free multi-scale BSQ + decoder, with upstream's (plain-layout) module names."""

    def __init__(self, cfg: BSQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        common = dict(
            ch=cfg.base_ch,
            num_res_blocks=cfg.num_res_blocks,
            z_channels=cfg.codebook_dim,
            using_sa=False,
            using_mid_sa=False,
            groups=1,  # placeholder: the per-width rule is applied right after construction
        )
        self.encoder = Encoder(in_channels=cfg.in_channels, ch_mult=cfg.encoder_ch_mult, **common)
        self.decoder = Decoder(out_channels=cfg.in_channels, ch_mult=cfg.decoder_ch_mult, **common)
        _groupnorm_rule(self)

    @property
    def d(self) -> int:
        return self.cfg.codebook_dim

    # ----- image <-> bits ----------------------------------------------------------------------------
    def encode_raw(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> continuous latent (B, d, H/p, W/p)."""
        return self.encoder(img_B3HW)

    def quantize(
        self, h_BdHW: torch.Tensor, schedule: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Multi-scale residual BSQ: (summed upsampled codes (B,d,H,W), bits per scale (B, h·w, d))."""
        B, d, H, W = h_BdHW.shape
        residual = h_BdHW.float()
        summed = torch.zeros_like(residual)
        bits = []
        for h, w in schedule:
            r = residual if (h, w) == (H, W) else _resize(residual, (h, w), "area")
            q, b = bsq_quantize(r)
            if (h, w) != (H, W):
                q = _resize(q, (H, W), "trilinear")
            residual = residual - q
            summed = summed + q
            bits.append(b.flatten(2).transpose(1, 2))
        return summed, bits

    def encode(
        self, img_B3HW: torch.Tensor, schedule: list[tuple[int, int]], patchify: int = 1
    ) -> list[torch.Tensor]:
        """Image in [-1, 1] -> bit labels per scale, each (B, h·w, p²·d) for the transformer's grids."""
        p = _check_patchify(patchify)
        vae_grids = [(h * p, w * p) for h, w in schedule]
        bits = self.quantize(self.encode_raw(img_B3HW), vae_grids)[1]
        if p == 1:
            return bits
        return [space_to_depth(depth_to_space(b, g, 1), p) for b, g in zip(bits, vae_grids, strict=True)]

    def codes_map(self, bits_BlD: torch.Tensor, grid: tuple[int, int], patchify: int = 1) -> torch.Tensor:
        """Bits (B, h·w, p²·d) row-major -> codes laid out (B, d, p·h, p·w), each code unit-norm over d."""
        p = _check_patchify(patchify)
        return depth_to_space(token_codes(bits_BlD, self.cfg.codebook_scale, p), grid, p)

    def summed_from_bits(
        self, bits: list[torch.Tensor], schedule: list[tuple[int, int]], patchify: int = 1
    ) -> torch.Tensor:
        """Σ trilinear-up(codes of each scale) at the last VAE grid (upstream ``decode_from_indices``)."""
        p = patchify
        H, W = schedule[-1][0] * p, schedule[-1][1] * p
        out = None
        for b, grid in zip(bits, schedule, strict=True):
            c = self.codes_map(b, grid, p)
            c = c if c.shape[-2:] == (H, W) else _resize(c, (H, W), "trilinear")
            out = c if out is None else out + c
        assert out is not None
        return out

    def teacher_forcing_input(
        self, bits: list[torch.Tensor], schedule: list[tuple[int, int]], patchify: int = 1
    ) -> torch.Tensor:
        """Transformer inputs of scales 1..S-1: running code sum resized (trilinear) to each next grid."""
        p = _check_patchify(patchify)
        H, W = schedule[-1][0] * p, schedule[-1][1] * p
        summed = None
        outs = []
        for k in range(len(schedule) - 1):
            c = _resize(self.codes_map(bits[k], schedule[k], p), (H, W), "trilinear")
            summed = c if summed is None else summed + c
            nh, nw = schedule[k + 1]
            outs.append(space_to_depth(_resize(summed, (nh * p, nw * p), "trilinear"), p))
        return torch.cat(outs, dim=1)

    def decode_latent(self, z_BdHW: torch.Tensor) -> torch.Tensor:
        """Summed codes -> image in [-1, 1]."""
        return self.decoder(z_BdHW).clamp_(-1, 1)

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load ``{"vae": ...}`` contents in either key layout (``lfq.mask`` buffers: checked, dropped)."""
        from ..io import load_state_dict_strict

        state = to_plain_layout(state)
        expect = 2 ** torch.arange(self.d - 1, -1, -1)
        for k in _MASK_BUFFERS:
            if k in state and not torch.equal(state[k].long().cpu(), expect):
                raise CheckpointMismatch(
                    f"'{source}': buffer {k} {tuple(state[k].shape)} does not fit codebook_dim {self.d}"
                )
        load_state_dict_strict(self, state, source=source, ignore=lambda k: k in _MASK_BUFFERS)

    def stages(self, schedule: list[tuple[int, int]], patchify: int = 1) -> BSQStages:
        return BSQStages(self, schedule, patchify)


class BSQStages:
    """The VAE bound to one scale schedule: the engine's tokenizer (canvas = summed codes (B,d,pH,pW)).

    ``schedule`` is the transformer's; with ``patchify`` p the VAE grids are p times larger and a token
    holds the p×p cells under it (module docstring). The engine and token policies only see token grids.
    """

    def __init__(self, vae: BSQVAE, schedule: list[tuple[int, int]], patchify: int = 1) -> None:
        self.vae = vae
        self.schedule = validate_schedule(schedule)
        self.patchify = p = _check_patchify(patchify)
        self.vae_schedule = [(h * p, w * p) for h, w in self.schedule]

    def stage_grids(self) -> list[tuple[int, int]]:
        return list(self.schedule)

    def init_canvas(self, batch: int, device: torch.device | str) -> torch.Tensor:
        H, W = self.vae_schedule[-1]
        return torch.zeros(batch, self.vae.d, H, W, device=device)

    def next_input(self, canvas: torch.Tensor, stage: int) -> torch.Tensor:
        """Input of ``stage``: the running sum trilinear-resized to its VAE grid, as tokens (B, h·w, p²·d)."""
        return space_to_depth(_resize(canvas, self.vae_schedule[stage], "trilinear"), self.patchify)

    def token_vectors(self, sample: StageSample) -> torch.Tensor:
        """Sampled bits (B, l, p²·d) -> codes (B, l, p²·d), unit-norm per latent cell (over its d bits)."""
        assert sample.idx is not None
        return token_codes(sample.idx, self.vae.cfg.codebook_scale, self.patchify)

    def update(
        self, canvas: torch.Tensor, h_BlC: torch.Tensor, stage: int, keep_Bl: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Add a stage's upsampled codes; ``keep_Bl`` False = zero contribution (a code is never zero);
        an excluded token zeroes all p×p cells it carries."""
        if keep_Bl is not None:
            h_BlC = h_BlC * keep_Bl.unsqueeze(-1).to(h_BlC.dtype)
        codes = depth_to_space(h_BlC, self.schedule[stage], self.patchify)
        if stage != len(self.schedule) - 1:
            codes = _resize(codes, self.vae_schedule[-1], "trilinear")
        return canvas.add_(codes)

    def decode(self, canvas: torch.Tensor) -> torch.Tensor:
        """Summed codes -> image in [0, 1]."""
        return self.vae.decode_latent(canvas).add_(1).mul_(0.5)
