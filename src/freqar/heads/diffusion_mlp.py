"""MAR's per-token diffusion MLP (``SimpleMLPAdaLN``) and the loss/sampler wrapper around it.

Parameter names follow the official checkpoints (``diffloss.net.*`` in FAR, MAR and HART), so their state
dicts load key for key. FAR adds the level index as a raw scalar through ``index_cond_embed``; HART and MAR
have none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..diffusion import DiffusionConfig, GaussianDiffusion, guide_eps
from ..errors import InvalidOption


@dataclass(frozen=True)
class DiffusionMLPConfig:
    """Width/depth of the MLP and the diffusion process it is trained with."""

    token_channels: int = 16
    cond_channels: int = 768
    width: int = 1024
    depth: int = 6
    level_input: bool = False
    noise_schedule: str = "cosine"
    diffusion_steps: int = 1000
    learn_sigma: bool = True
    frequency_embedding_size: int = 256
    max_period: float = 10000.0

    def __post_init__(self) -> None:
        if min(self.token_channels, self.cond_channels, self.width, self.depth) < 1:
            raise InvalidOption("diffusion MLP channels, width and depth must be >= 1")
        if self.frequency_embedding_size % 2:
            raise InvalidOption("frequency_embedding_size must be even")

    @property
    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(self.noise_schedule, self.diffusion_steps, self.learn_sigma)

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: [cos(t·f), sin(t·f)] (float32, cosines first) -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, freq_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_size, self.max_period = freq_size, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_size, width), nn.SiLU(), nn.Linear(width, width))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs.to(t.device)[None]
        return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate·MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from SiLU→Linear of the condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """ε/v network over single tokens: input x (N,C), original timestep t (N,), condition c (N,Cc), level
    (N,1).
    """

    def __init__(self, cfg: DiffusionMLPConfig) -> None:
        super().__init__()
        W, C = cfg.width, cfg.token_channels
        self.out_channels = 2 * C if cfg.learn_sigma else C
        self.time_embed = TimestepEmbedder(W, cfg.frequency_embedding_size, cfg.max_period)
        self.cond_embed = nn.Linear(cfg.cond_channels, W)
        self.index_cond_embed = nn.Linear(1, W) if cfg.level_input else None
        self.input_proj = nn.Linear(C, W)
        self.res_blocks = nn.ModuleList([ResBlock(W) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(W, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier linears with zero bias, N(0, 0.02) time MLP, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, level: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        if self.index_cond_embed is not None:
            if level is None:
                raise InvalidOption("this diffusion MLP needs a level index")
            y = y + self.index_cond_embed(level.to(x.dtype))
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        cfg_scale: float,
        level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upstream-compatible CFG call on 2N rows: the network sees [x[:N]; x[:N]]; both halves get the
        guided ε.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat((half, half)), t, c, level)
        g = guide_eps(out, len(half), cfg_scale, x.shape[1])
        return torch.cat((g, torch.cat((g[:, : x.shape[1]], out[len(half) :, x.shape[1] :]), dim=1)))


class DiffusionMLP(nn.Module):
    """The per-token diffusion head as a module (upstream ``DiffLoss``): ``net`` plus loss and sampling."""

    def __init__(self, cfg: DiffusionMLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg)
        self.train_diffusion = GaussianDiffusion(cfg.diffusion)

    def loss(
        self,
        target: torch.Tensor,
        cond: torch.Tensor,
        level: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over rows of mse + vb; draws t (randint) then the noise (randn), as upstream."""
        N = target.shape[0]
        T = self.train_diffusion.num_timesteps
        t = torch.randint(0, T, (N,), generator=generator, device=target.device)
        noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        terms = self.train_diffusion.training_losses(
            lambda x, tt: self.net(x, tt, cond, level), target, t, noise
        )
        loss = terms["loss"]
        if weight is not None:
            loss = loss * weight
        return loss.mean()

    def sample(
        self,
        cond: torch.Tensor,
        *,
        steps: str | int,
        batch: int,
        cfg: float = 1.0,
        temperature: float = 1.0,
        level: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        ddim: bool = False,
        eta: float = 0.0,
        clip_denoised: bool = False,
        upstream_noise: bool = True,
        on_step: Callable[[int, int], None] | None = None,
        diffusion: GaussianDiffusion | None = None,
    ) -> torch.Tensor:
        """Sample ``batch`` tokens; ``cond`` has ``batch`` rows, or 2·batch ([cond; uncond]) for CFG.

        With ``upstream_noise`` the RNG stream is MAR/FAR's: x_T is drawn for ``batch`` rows, then each step
        draws noise for 2·batch rows (the discarded uncond copy included) and keeps the first half, so a seed
        gives upstream's samples whether or not guidance is on. A guidance of exactly 1 runs the cond rows
        only.
        """
        C = self.cfg.token_channels
        proc = diffusion or GaussianDiffusion.respaced(self.cfg.diffusion, steps)
        guided = cond.shape[0] == 2 * batch and cfg != 1.0
        c_rows = cond if guided else cond[:batch]
        lv = None
        if level is not None:
            lv = level if guided else level[:batch]
        x_T = torch.randn((batch, C), generator=generator, device=cond.device).to(cond.dtype)

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.net(x, t, c_rows, lv)
            out = self.net(torch.cat((x, x)), torch.cat((t, t)), c_rows, lv)
            return guide_eps(out, batch, cfg, C)

        def draw(x: torch.Tensor) -> torch.Tensor:
            rows = 2 * x.shape[0] if upstream_noise else x.shape[0]
            return torch.randn((rows, C), generator=generator, device=x.device)[: x.shape[0]].to(x.dtype)

        return proc.sample(
            model,
            x_T,
            temperature=temperature,
            clip_denoised=clip_denoised,
            ddim=ddim,
            eta=eta,
            draw=draw,
            on_step=on_step,
        )
