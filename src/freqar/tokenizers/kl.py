"""MAR's KL autoencoder (``kl16.ckpt``: LDM conv encoder/decoder, 16 latent channels, stride 16).

Keys follow the official state dict (``encoder.down.{i}.block.{j}.*``,
``encoder.down.{i}.attn.{j}.{q,k,v}.*``, ``quant_conv``, ``post_quant_conv``...), so
``torch.load(f)["model"]`` loads key for key. Smaller configs (fewer levels, narrower) use the same classes,
which is how the conformance fixtures and the emoji model are built. FAR works on latents multiplied by
``scale_factor`` (0.2325 for kl16, ≈ unit std).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import CheckpointMismatch, InvalidOption
from .convnet import DownPath, Downsample, MidBlock, ResLevel, ResnetBlock, UpPath, Upsample, group_norm


@dataclass(frozen=True)
class KLConfig:
    """Autoencoder shape; defaults are MAR's KL-16 (256 px -> 16x16x16)."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    resolution: int = 256
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    groupnorm_groups: int = 32
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.2325
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    # Decoder shape when it differs from the encoder's (None = the same): a wider or deeper decoder trained
    # on a frozen encoder renders the same latents better, so a FAR model trained on them stays valid.
    decoder_ch: int | None = None
    decoder_num_res_blocks: int | None = None

    def __post_init__(self) -> None:
        for name in ("ch_mult", "encoder_attn_resolutions", "decoder_attn_resolutions", "logvar_clamp"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.ch_mult or self.ch < 1 or self.embed_dim < 1 or self.num_res_blocks < 0:
            raise InvalidOption("KL autoencoder needs ch >= 1, embed_dim >= 1 and a non-empty ch_mult")
        if self.decoder_ch is not None and (self.decoder_ch < 1 or self.decoder_ch % self.groupnorm_groups):
            raise InvalidOption(
                f"KL decoder_ch must be a positive multiple of groupnorm_groups ({self.groupnorm_groups}), "
                f"got {self.decoder_ch}"
            )
        if self.decoder_num_res_blocks is not None and self.decoder_num_res_blocks < 0:
            raise InvalidOption(f"KL decoder_num_res_blocks must be >= 0, got {self.decoder_num_res_blocks}")
        if self.resolution % self.downsample:
            raise InvalidOption(
                f"resolution {self.resolution} is not divisible by the stride {self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def dec_ch(self) -> int:
        return self.ch if self.decoder_ch is None else self.decoder_ch

    @property
    def dec_res_blocks(self) -> int:
        return self.num_res_blocks if self.decoder_num_res_blocks is None else self.decoder_num_res_blocks

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample

    def to_dict(self) -> dict:
        """Fields as JSON; decoder fields left at None are omitted, so configs (and the fingerprints that
        key cached latents) of autoencoders without them are unchanged."""
        d = asdict(self)
        for k in ("decoder_ch", "decoder_num_res_blocks"):
            if d[k] is None:
                del d[k]
        return d


class AttnBlock(nn.Module):
    """LDM spatial attention with separate 1x1 ``q``/``k``/``v`` convs (single head, scale C^-½)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)
        k = self.k(h).reshape(B, C, H * W)
        w = (torch.bmm(q, k) * (int(C) ** -0.5)).softmax(dim=2)
        v = self.v(h).reshape(B, C, H * W)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class KLEncoder(DownPath):
    """Image -> moments (2·embed_dim channels: mean, log-variance); attention where the map size is listed."""

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        g, ch, n = cfg.groupnorm_groups, cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        c = ch
        for i in range(n):
            c, c_out = ch * in_mult[i], ch * cfg.ch_mult[i]
            level = ResLevel([], [])
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c, c_out, cfg.dropout, g))
                c = c_out
                if res in cfg.encoder_attn_resolutions:
                    level.attn.append(AttnBlock(c, g))
            if i != n - 1:
                level.downsample = Downsample(c)
                res //= 2
            self.down.append(level)
        self.mid = MidBlock(c, cfg.dropout, AttnBlock(c, g), g)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.embed_dim, 3, 1, 1)


class KLDecoder(UpPath):
    """Latent -> image in about [-1, 1] (no tanh, no clamp); ``up.{i}`` indexed by level, run from the
    deepest.
    """

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        g, ch, n = cfg.groupnorm_groups, cfg.dec_ch, len(cfg.ch_mult)
        c = ch * cfg.ch_mult[-1]
        res = cfg.latent_side
        self.conv_in = nn.Conv2d(cfg.embed_dim, c, 3, 1, 1)
        self.mid = MidBlock(c, cfg.dropout, AttnBlock(c, g), g)
        levels: list[nn.Module] = [nn.Module()] * n
        for i in reversed(range(n)):
            c_out = ch * cfg.ch_mult[i]
            level = ResLevel([], [])
            for _ in range(cfg.dec_res_blocks + 1):
                level.block.append(ResnetBlock(c, c_out, cfg.dropout, g))
                c = c_out
                if res in cfg.decoder_attn_resolutions:
                    level.attn.append(AttnBlock(c, g))
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, 1, 1)


class AutoencoderKL(nn.Module):
    """Encoder/decoder plus the 1x1 ``quant_conv``/``post_quant_conv``; latents here are *unscaled*."""

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = KLEncoder(cfg)
        self.decoder = KLDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior parameters (B, 2·embed_dim, h, w): mean then log-variance (not clamped)."""
        return self.quant_conv(self.encoder(images))

    def posterior(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*self.cfg.logvar_clamp)

    def encode(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latent (× scale_factor): posterior mode, or one draw mean + σ·n when ``sample``."""
        mean, logvar = self.posterior(self.moments(images))
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
        return z * self.cfg.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1], not clamped (upstream divides by the scale first)."""
        return self.decoder(self.post_quant_conv(latent / self.cfg.scale_factor))

    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load MAR's ``kl16.ckpt`` state dict (the ``"model"`` entry, already unwrapped by the caller)."""
        from ..io import load_state_dict_strict

        if not any(k.startswith("encoder.") for k in state) or "quant_conv.weight" not in state:
            keys = ", ".join(sorted(state)[:4])
            raise CheckpointMismatch(
                f"'{source}' is not a KL autoencoder state dict (expected "
                f"encoder.*, quant_conv.*; found {keys} ...)"
            )
        load_state_dict_strict(self, state, source=source, ignore=lambda k: k.startswith("loss."))


def load_kl_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``kl16.ckpt`` holds ``{"model": state_dict}``; a plain state dict is accepted too."""
    from ..io import load_torch_file

    return load_torch_file(path, key="model")
