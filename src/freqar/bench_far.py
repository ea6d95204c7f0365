"""FAR scenarios of ``freqar bench``: dense FAR against ``farskip`` (token exclusion on frequency levels).

Random weights, the real architecture and latent grid: ``far-b`` is FAR-B (12+12 blocks of width 768, the
6×1024 diffusion MLP) at 256 px with MAR's KL-16 decoder and upstream's 10 levels. Latency is split into the
transformer (encoder–decoder), the diffusion head (steps × computed tokens, the dominant cost) and the VAE
decode; the FLOP model counts the transformer over the kept tokens and the MLP over steps × kept tokens.
``far-emoji`` runs the bundled trained model instead (loaded as ``freqar generate --model far-emoji`` does,
at its own levels, guidance and diffusion steps), so exclusion is measured where predictions settle as a
trained model's do, not on random weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .diffusion import space_timesteps
from .engine.diffusion_head import far_guidance
from .engine.generate import GenerationOutput
from .models.far import FARConfig, far_preset
from .policies.levels import FARSkipConfig
from .tokenizers.frequency import default_levels
from .tokenizers.kl import KLConfig


@dataclass(frozen=True)
class FARScenario:
    """A FAR preset with random weights, its KL decoder shape and the sampling settings of the benchmark."""

    name: str
    description: str
    preset: str = "far-b"
    steps: str = "25"
    cfg: float = 3.0
    vae_ch: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_res_blocks: int = 2
    resolution: int = 256
    levels: tuple[int, ...] | None = None
    family: str = "far"
    model: str | None = None  # a saved/bundled FAR model loaded with create_far_model (None: random)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        """The level schedule (core sizes), one entry per engine stage."""
        return self.levels or default_levels(far_preset(self.preset).seq_h)

    def vae(self) -> KLConfig:
        return KLConfig(
            ch=self.vae_ch,
            ch_mult=self.vae_ch_mult,
            num_res_blocks=self.vae_res_blocks,
            resolution=self.resolution,
        )

    def runner(self, device: str, batch: int, seed: int) -> FARRunner:
        return FARRunner(self, device, batch, seed)


def model_scenario(name: str, description: str) -> FARScenario | None:
    """A scenario on a bundled trained FAR model, its settings read from the model's config (None when its
    weights are not installed, as ``far_presets`` leaves it out then)."""
    from .io import read_json
    from .registry import bundled_dir

    d = bundled_dir(name)
    if d is None:
        return None
    cfg = read_json(d / "config.json")
    tok, dflt = cfg["tokenizer"], cfg.get("defaults", {})
    seq_h = int(cfg["transformer"]["seq_h"])
    levels = dflt.get("levels")
    return FARScenario(
        name,
        description,
        preset=name,
        steps=str(dflt.get("steps", "100")),
        cfg=float(dflt.get("cfg", 3.0)),
        vae_ch=int(tok["ch"]),
        vae_ch_mult=tuple(tok["ch_mult"]),
        vae_res_blocks=int(tok["num_res_blocks"]),
        resolution=int(tok["resolution"]),
        levels=tuple(levels) if levels is not None else default_levels(seq_h),
        model=name,
    )


def far_scenarios() -> list[FARScenario]:
    emoji = model_scenario(
        "far-emoji",
        "the bundled trained FAR emoji model (enc 3 + dec 3 blocks of width 128, diffusion MLP 3 x 256, "
        "128px, 8x8x16 latent, levels 0..7, its ddim25 spacing and CFG 3 linear)",
    )
    return [
        FARScenario(
            "far-b",
            "FAR-B architecture (12+12 blocks, width 768, diffusion MLP 6 x 1024), 256px, 10 levels, "
            "25 diffusion steps, CFG 3 linear, MAR KL-16 decoder; random weights",
        ),
        FARScenario(
            "far-b-100",
            "as far-b with upstream's 100 diffusion steps per level",
            steps="100",
        ),
        FARScenario(
            "far-tiny",
            "tiny FAR smoke scenario (far-tiny: 2+2 blocks, width 32, 16x16 latent, 10 levels, 4 steps)",
            preset="far-tiny",
            steps="4",
            cfg=2.0,
            vae_ch=32,
            vae_ch_mult=(1, 1, 1),
            vae_res_blocks=1,
            resolution=64,
        ),
        *([emoji] if emoji is not None else []),
    ]


def diffusion_row_step_flops(cfg: FARConfig) -> float:
    """FLOPs of one pass of FAR's diffusion MLP for one token row (W = width, D = depth, C = token channels):
    input 2·C·W, timestep MLP 2·256·W + 2·W², condition 2·Cd·W, level index 2·W, D res blocks of 10·W²
    (adaLN 6·W², MLP 4·W²), final adaLN 4·W² + output 4·W·C (ε and variance channels)."""
    W, C, Cd, D = cfg.diffloss_w, cfg.token_channels, cfg.decoder_embed_dim, cfg.diffloss_d
    return 2 * C * W + 2 * 256 * W + 2 * W * W + 2 * Cd * W + 2 * W + D * 10 * W * W + 4 * W * W + 4 * W * C


def far_transformer_flops(cfg: FARConfig, kept: float, rows: int, attention: bool = True) -> float:
    """One level's encoder over buffer + ``kept`` tokens and the decoder over buffer + all tokens (MAR: the
    dropped tokens are mask tokens there): 24·d²·m + 4·d·m² per block, plus z_proj and decoder_embed."""
    Ce, Cd, buf, l = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.buffer_size, cfg.seq_len
    m, M = buf + kept, buf + l
    enc = (
        cfg.encoder_depth * (24 * Ce * Ce * m + attention * 4 * Ce * m * m)
        + 2 * cfg.token_channels * Ce * kept
    )
    dec = cfg.decoder_depth * (24 * Cd * Cd * M + attention * 4 * Cd * M * M) + 2 * Ce * Cd * m
    return (enc + dec) * rows


def far_flops(
    cfg: FARConfig,
    tokens_per_level: list[float],
    head_rows: list[int],
    steps: int,
    rows: int = 2,
    attention: bool = True,
) -> tuple[float, float]:
    """(transformer FLOPs, diffusion-head FLOPs) of one sample: ``rows`` transformer rows (cond + uncond),
    ``head_rows[k]`` MLP rows per token at level k (1 where the guidance scale is 1, upstream runs the cond
    rows only there), ``steps`` sampling steps over the kept tokens. ``attention`` False leaves out the score
    and value products (the matmul part alone)."""
    step = diffusion_row_step_flops(cfg)
    tf = sum(far_transformer_flops(cfg, n, rows, attention) for n in tokens_per_level)
    head = sum(steps * n * r * step for n, r in zip(tokens_per_level, head_rows, strict=True))
    return tf, head


class FARRunner:
    """Class-conditional FAR generation through ``FARPipeline.generate`` with random labels."""

    def __init__(self, sc: FARScenario, device: str, batch: int, seed: int) -> None:
        from .models.far_pipeline import FARDefaults, build_far_pipeline, create_far_model

        self.sc = sc
        if sc.model is not None:  # trained weights; the scenario's steps/cfg/levels override the defaults
            self.pipe = create_far_model(sc.model, device=device)
            self.pipe.defaults = dataclasses.replace(
                self.pipe.defaults, cfg=sc.cfg, steps=sc.steps, levels=sc.patch_nums
            )
            self.cfg = self.pipe.transformer.cfg
        else:
            self.cfg = far_preset(sc.preset)
            defaults = FARDefaults(cfg=sc.cfg, steps=sc.steps, levels=sc.patch_nums)
            with torch.random.fork_rng(devices=[]):
                self.pipe = build_far_pipeline(sc.name, sc.vae(), self.cfg, defaults, init_seed=0).to(device)
        self.device = self.pipe.device
        self.labels = torch.randint(
            0, self.pipe.num_classes, (batch,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        S = len(sc.patch_nums)
        self.depth = self.full_depth = self.cfg.encoder_depth + self.cfg.decoder_depth
        self.sparse_start = FARSkipConfig().resolve(S)
        self.steps = len(space_timesteps(self.cfg.diffusion_steps, sc.steps))
        g = far_guidance(sc.cfg, S, self.pipe.defaults.guidance_schedule)
        self.head_rows = [2 if g.scale(k, S) != 0 else 1 for k in range(S)]

    def generate(self, s: Any, seed: int, policy: Any) -> tuple[GenerationOutput, Any, float]:
        from .bench import _Probe

        probe = _Probe(self.pipe.transformer)
        self.pipe.transformer = probe  # type: ignore[assignment]
        try:
            out = self.pipe.generate(self.labels, seed=seed, policy=policy)
        finally:
            self.pipe.transformer = probe.inner
        return out, probe, float(sum(out.head_seconds))  # type: ignore[attr-defined]

    def flops_split(self, per_stage: list[float]) -> tuple[float, float]:
        return far_flops(self.cfg, per_stage, self.head_rows, self.steps)

    def flops(self, s: Any, per_stage: list[float], depth: int | None = None) -> float:
        return sum(self.flops_split(per_stage))
