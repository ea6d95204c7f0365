"""VAR's multi-scale residual VQ tokenizer (the VQVAE of ``vae_ch160v4096z32.pth``).

Encoding walks the scale schedule: area-downsample the residual, snap to the nearest code, bicubic-upsample
the codes to the full latent grid, refine with the scale's Phi conv, add to ``f_hat`` and subtract from the
residual. Generation runs the same update one scale at a time on sampled codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption
from ..interfaces import StageSample
from .convnet import Decoder, Encoder

# self-correction's hook into ``encode``: (scale, nearest codes (B, l), distances (B*l, V)) -> codes used
SlipFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MSVQConfig:
    """Configuration of the multi-scale VQVAE; defaults are the official ``vae_ch160v4096z32``."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    groupnorm_groups: int = 32
    # decoder depth when it differs from the encoder's (None = the same): a deeper decoder trained on the
    # frozen encoder and codebook renders the same codes better, so a VAR model trained on them stays valid
    decoder_num_res_blocks: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.decoder_num_res_blocks is not None and self.decoder_num_res_blocks < 0:
            raise InvalidOption(f"decoder_num_res_blocks must be >= 0, got {self.decoder_num_res_blocks}")
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        validate_patch_nums(self.patch_nums)
        for m in self.ch_mult:
            if (self.ch * m) % self.groupnorm_groups:
                raise InvalidOption(
                    f"vae width ch*ch_mult = {self.ch * m} is not a multiple of "
                    f"{self.groupnorm_groups} groups"
                )
        if self.vocab_size < 1 or self.z_channels < 1:
            raise InvalidOption("vae vocab_size and z_channels must be >= 1")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """Fields as JSON; ``decoder_num_res_blocks`` left at None is omitted, so the configs (and the
        fingerprints that key cached codes) of tokenizers without it are unchanged."""
        d = asdict(self)
        if d["decoder_num_res_blocks"] is None:
            del d["decoder_num_res_blocks"]
        return d


def validate_patch_nums(patch_nums: tuple[int, ...]) -> None:
    """A schedule needs >= 2 strictly increasing positive scales (the last is the latent side)."""
    if len(patch_nums) < 2:
        raise InvalidOption(f"invalid scale schedule {list(patch_nums)}: need at least 2 scales")
    if any(p < 1 for p in patch_nums) or any(
        b <= a for a, b in zip(patch_nums, patch_nums[1:], strict=False)
    ):
        raise InvalidOption(
            f"invalid scale schedule {list(patch_nums)}: sides must be positive and strictly increasing"
        )


def phi_index_table(num_scales: int, num_phi: int) -> list[int]:
    """Which Phi conv each scale uses: nearest tick of ``si/(S-1)`` in upstream's float64 tick table.

    Reproduced with numpy float64 on purpose: for S=5 the middle scale is an exact tie in real
    arithmetic and float rounding picks index 2, as upstream does.
    """
    K = num_phi
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1))).item()) for si in range(num_scales)]


class Phi(nn.Conv2d):
    """Refinement conv: ``(1-r)*h + r*conv(h)`` with r = |quant_resi|."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiTable(nn.Module):
    """The per-scale Phi convs with upstream's three sharing layouts (keys ``qresi``/``qresi_ls.k``/``k``)."""

    def __init__(self, channels: int, ratio: float, share: int, num_scales: int) -> None:
        super().__init__()
        self.identity = abs(ratio) < 1e-6
        self.share = share
        if self.identity:
            self.table = [0] * num_scales
            return
        if share == 1:
            self.qresi = Phi(channels, ratio)
            self.table = [0] * num_scales
        elif share == 0:
            for k in range(num_scales):
                self.add_module(str(k), Phi(channels, ratio))
            self.table = phi_index_table(num_scales, num_scales)
        else:
            self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(share)])
            self.table = phi_index_table(num_scales, share)

    def forward(self, h: torch.Tensor, si: int) -> torch.Tensor:
        if self.identity:
            return h
        if self.share == 1:
            return self.qresi(h)
        if self.share == 0:
            return getattr(self, str(self.table[si]))(h)
        return self.qresi_ls[self.table[si]](h)


class MultiScaleQuantizer(nn.Module):
    """Codebook, Phi table and the residual multi-scale procedures (keys under ``quantize.``)."""

    def __init__(self, cfg: MSVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiTable(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi, len(cfg.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(cfg.patch_nums), cfg.vocab_size), 0.0))

    @property
    def side(self) -> int:
        return self.patch_nums[-1]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code per row (squared L2, or cosine when ``using_znorm``)."""
        return self._code_distance(z_NC).argmin(dim=1)

    def _code_distance(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, V) distance of each row to every code: squared L2, or negative cosine with ``using_znorm``."""
        w_VC = self.embedding.weight.detach()
        if self.cfg.using_znorm:
            return -(F.normalize(z_NC, dim=-1) @ F.normalize(w_VC, dim=-1).T)
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + w_VC.square().sum(dim=1)
        return d_NV.addmm_(z_NC, w_VC.T, alpha=-2, beta=1)

    def codes_to_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Code indices (B, pn*pn) row-major -> code vectors laid out channel-first (B, C, pn, pn)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)

    def residual(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """A scale's share of f_hat: bicubic-upsample to the latent grid (not the last scale), then Phi."""
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(self.side, self.side), mode="bicubic")
        return self.quant_resi(h_BChw, si)

    def encode(
        self, f_BChw: torch.Tensor, slip: SlipFn | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latent -> (indices per scale (B, pn^2), running f_hat after each scale).

        ``slip(si, idx_Bl, d_NV)`` (self-correction) may swap a scale's codes, given its distances to
        every code, before they build f_hat; the indices returned stay the nearest codes, so each later
        scale's index is the quantised residual left after the slip. The last scale is never slipped.
        """
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, fhat_list = [], []
        S = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != S - 1 else f_rest
            d_NV = self._code_distance(z.permute(0, 2, 3, 1).reshape(-1, C))
            idx_Bl = d_NV.argmin(dim=1).view(B, pn * pn)
            used = slip(si, idx_Bl, d_NV) if slip is not None and si != S - 1 else idx_Bl
            h = self.residual(self.codes_to_map(used, pn), si)
            f_hat.add_(h)
            f_rest.sub_(h)
            idx_list.append(idx_Bl)
            fhat_list.append(f_hat.clone())
        return idx_list, fhat_list

    @torch.no_grad()
    def self_correction_batch(
        self, f_BChw: torch.Tensor, rate_B: torch.Tensor, near: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with corrupted history (Infinity's bitwise self-correction, for a codebook).

        Why: at sampling time the transformer conditions on its own, imperfect, earlier scales, but
        teacher forcing only ever shows it the exact codes. Here each scale's codes are replaced, with
        probability ``rate_B[b]`` per token, by one of the ``near`` next-nearest codes of that token's
        residual (a uniformly random code when ``near`` is 0) -- the kind of slip a sampler makes. The
        corrupted codes build f_hat, so every later scale's target is the quantised residual *left after
        the slip*: the model learns to correct earlier mistakes instead of compounding them.
        Returns (targets (B, L), inputs (B, L - l_0, C)); with all rates 0 it is exact teacher forcing.
        """
        V = self.cfg.vocab_size

        def slip(si: int, idx_Bl: torch.Tensor, d_NV: torch.Tensor) -> torch.Tensor:
            B, n = idx_Bl.shape
            hit = torch.rand(B, n, generator=generator) < rate_B.view(B, 1)
            if near > 0:  # rank 1..near among the codes sorted by distance (rank 0 is the target)
                k = min(near, V - 1)
                rank = torch.randint(1, k + 1, (B * n, 1), generator=generator)
                order = d_NV.topk(k + 1, dim=1, largest=False).indices
                alt = order.gather(1, rank.to(order.device)).view(B, n)
            else:
                alt = torch.randint(0, V, (B, n), generator=generator).to(idx_Bl.device)
            return torch.where(hit.to(idx_Bl.device), alt, idx_Bl)

        idx_list, fhat_list = self.encode(f_BChw, slip)
        inputs = [self.next_input(fh, si + 1) for si, fh in enumerate(fhat_list[:-1])]
        return torch.cat(idx_list, dim=1), torch.cat(inputs, dim=1)

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Rebuild f_hat from per-scale indices (upstream ``embed_to_fhat`` with all_to_max_scale)."""
        B = idx_list[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.cfg.z_channels, self.side, self.side)
        for si, (idx, pn) in enumerate(zip(idx_list, self.patch_nums, strict=True)):
            f_hat.add_(self.residual(self.codes_to_map(idx, pn), si))
        return f_hat

    def teacher_forcing_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Next-scale inputs for scales 1..S-1 from ground-truth codes: (B, L - l_0, C)."""
        B = idx_list[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.cfg.z_channels, self.side, self.side)
        outs = []
        for si in range(len(self.patch_nums) - 1):
            f_hat.add_(self.residual(self.codes_to_map(idx_list[si], self.patch_nums[si]), si))
            outs.append(self.next_input(f_hat, si + 1))
        return torch.cat(outs, dim=1)

    def next_input(self, f_hat: torch.Tensor, si: int) -> torch.Tensor:
        """Input tokens of scale ``si``: f_hat area-resized to its grid, flattened to (B, pn^2, C)."""
        pn = self.patch_nums[si]
        z = F.interpolate(f_hat, size=(pn, pn), mode="area") if pn != self.side else f_hat
        return z.flatten(2).transpose(1, 2)


class VQVAE(nn.Module):
    """The multi-scale VQVAE with upstream's module layout; also the engine's tokenizer for VAR."""

    def __init__(self, cfg: MSVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kw = dict(
            ch=cfg.ch,
            ch_mult=cfg.ch_mult,
            num_res_blocks=cfg.num_res_blocks,
            z_channels=cfg.z_channels,
            dropout=cfg.dropout,
            using_sa=cfg.using_sa,
            using_mid_sa=cfg.using_mid_sa,
            groups=cfg.groupnorm_groups,
        )
        self.encoder = Encoder(in_channels=cfg.in_channels, **kw)
        if cfg.decoder_num_res_blocks is not None:
            kw["num_res_blocks"] = cfg.decoder_num_res_blocks
        self.decoder = Decoder(out_channels=cfg.in_channels, **kw)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.quantize = MultiScaleQuantizer(cfg)

    # ----- image <-> tokens -------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] -> continuous latent ``quant_conv(encoder(img))``."""
        return self.quant_conv(self.encoder(img))

    def encode(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Image in [-1,1] -> code indices per scale, each (B, pn^2)."""
        return self.quantize.encode(self.encode_latent(img))[0]

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def decode_indices(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Code indices per scale -> image in [-1, 1]."""
        return self.decode_fhat(self.quantize.idx_to_fhat(idx_list))

    # ----- engine interface -------------------------------------------------------------------------
    def stage_grids(self) -> list[tuple[int, int]]:
        return [(p, p) for p in self.patch_nums]

    def init_canvas(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """The running f_hat, zeros (B, Cvae, h, h)."""
        return torch.zeros(batch, self.cfg.z_channels, self.quantize.side, self.quantize.side, device=device)

    def next_input(self, canvas: torch.Tensor, stage: int) -> torch.Tensor:
        return self.quantize.next_input(canvas, stage)

    def token_vectors(self, sample: StageSample) -> torch.Tensor:
        """Code vectors (B, l, C) for sampled indices, or the soft mixture ``soft @ codebook``."""
        if sample.soft is not None:
            return sample.soft @ self.quantize.embedding.weight.unsqueeze(0)
        assert sample.idx is not None
        return self.quantize.embedding(sample.idx)

    def update(
        self, canvas: torch.Tensor, h_BlC: torch.Tensor, stage: int, keep_Bl: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Add this stage's residual to f_hat (in place); ``keep_Bl`` False = zero residual at that token."""
        if keep_Bl is not None:
            h_BlC = h_BlC * keep_Bl.unsqueeze(-1).to(h_BlC.dtype)
        pn = self.patch_nums[stage]
        h_BChw = h_BlC.transpose(1, 2).reshape(h_BlC.shape[0], -1, pn, pn)
        return canvas.add_(self.quantize.residual(h_BChw, stage))

    def decode(self, canvas: torch.Tensor) -> torch.Tensor:
        """f_hat -> image in [0, 1]."""
        return self.decode_fhat(canvas).add_(1).mul_(0.5)

    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load an upstream VQVAE state dict; ``ema_vocab_hit_SV`` may have another number of scales."""
        from ..io import load_state_dict_strict

        state = dict(state)
        key = "quantize.ema_vocab_hit_SV"
        if key in state and state[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            if state[key].shape[-1] == self.quantize.ema_vocab_hit_SV.shape[-1]:
                state[key] = self.quantize.ema_vocab_hit_SV.clone()
        if key not in state:
            state[key] = self.quantize.ema_vocab_hit_SV.clone()
        load_state_dict_strict(self, state, source=source)
