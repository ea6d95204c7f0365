"""A StageHead for continuous tokens sampled by a per-token diffusion MLP (FAR; HART's residual head later).

``predict`` returns the per-token conditions of all rows, ``guide`` keeps every CFG row (guidance acts on ε
inside each denoising step), and ``sample`` runs the respaced diffusion sampler for the stage and returns
``StageSample(values=...)``. Given a ``StagePrediction`` (a token policy's computed rows + row map), it
samples the computed rows only (the cost is steps × computed tokens) and spreads them over the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..diffusion import GaussianDiffusion, space_timesteps
from ..errors import InvalidOption
from ..heads.diffusion_mlp import DiffusionMLP
from ..interfaces import StagePrediction, StageSample
from .guidance import Guidance
from .timing import SpanClock


@dataclass(frozen=True)
class DiffusionSamplerConfig:
    """Per-token diffusion sampling knobs.

    ``steps``: respacing string or count (``"100"``, ``"ddim25"``, ``"10,5"``). ``temperature`` multiplies the
    injected noise; with ``temperature_ramp`` it multiplies FAR's ramp τ_k = 0.8 + 0.2·(1 − cos(π/2·(k+1)/K))
    (upstream uses the ramp and ignores its temperature flag; here the flag always has an effect). ``ddim``
    uses deterministic DDIM updates (``eta`` > 0 adds noise back). ``upstream_noise`` replays MAR/FAR's RNG
    stream (per-step noise drawn for the doubled CFG batch) so a seed gives upstream's samples.
    """

    steps: str = "100"
    temperature: float = 1.0
    temperature_ramp: bool = True
    ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = False
    upstream_noise: bool = True

    def __post_init__(self) -> None:
        space_timesteps(1000, self.steps)  # validates the string (steps >= 1, well formed)
        if not self.temperature >= 0:
            raise InvalidOption(f"temperature must be >= 0, got {self.temperature}")
        if self.eta < 0:
            raise InvalidOption(f"eta must be >= 0, got {self.eta}")

    def temperature_at(self, stage: int, num_stages: int) -> float:
        if not self.temperature_ramp:
            return self.temperature
        return self.temperature * (0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (stage + 1) / num_stages)))


def far_guidance(cfg: float, num_levels: int, schedule: str = "linear") -> Guidance:
    """FAR's CFG as a per-stage list: g_k = 1 + (cfg − 1)·k/K (linear) or cfg (constant); Guidance holds g −
    1.
    """
    if cfg < 1:
        raise InvalidOption(f"FAR's cfg is a guidance scale >= 1 (1 = none), got {cfg}")
    if schedule == "linear":
        ts = tuple((cfg - 1) * k / num_levels for k in range(num_levels))
    elif schedule == "constant":
        ts = (float(cfg - 1),) * num_levels
    else:
        raise InvalidOption(f"unknown FAR guidance schedule '{schedule}' (linear, constant)")
    return Guidance(cfg=cfg - 1, schedule="list", per_stage=ts)


class DiffusionHead:
    """Diffusion-MLP stage head; ``levels[k]`` is fed to the MLP as its level index (None: no level input)."""

    def __init__(
        self,
        mlp: DiffusionMLP,
        guidance: Guidance,
        sampler: DiffusionSamplerConfig,
        levels: tuple[int, ...] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.mlp = mlp
        self.guidance = guidance
        self.sampler = sampler
        self.levels = levels
        self.on_step = on_step
        self.process = GaussianDiffusion.respaced(mlp.cfg.diffusion, sampler.steps)
        self.clock: SpanClock | None = None  # diffusion time per stage (bench splits transformer vs head)

    def predict(self, hidden_RnC: torch.Tensor, cond: Any) -> torch.Tensor:
        return hidden_RnC

    def guide(self, pred: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor:
        return pred  # all rows stay: guidance is applied to ε in every denoising step

    def sample(
        self, full: torch.Tensor, stage: int, num_stages: int, generator: torch.Generator | None
    ) -> StageSample:
        if self.clock is None:
            self.clock = SpanClock(full.rows.device if isinstance(full, StagePrediction) else full.device)
        mark = self.clock.start()
        src = None
        if isinstance(full, StagePrediction):  # a policy's row map: sample the computed rows only
            full, src = full.rows, full.src
        R, n, Cd = full.shape
        B = R // 2 if self.guidance.enabled else R
        g = 1.0 + self.guidance.scale(stage, num_stages)
        level = None
        if self.levels is not None:
            level = torch.full((R * n, 1), float(self.levels[stage]), device=full.device)
        cb = None
        if self.on_step is not None:
            on_step = self.on_step

            def cb(i: int, total: int) -> None:
                on_step(stage, i, total)

        s = self.sampler
        values = self.mlp.sample(
            full.reshape(R * n, Cd),
            steps=s.steps,
            batch=B * n,
            cfg=g,
            temperature=s.temperature_at(stage, num_stages),
            level=level,
            generator=generator,
            ddim=s.ddim,
            eta=s.eta,
            clip_denoised=s.clip_denoised,
            upstream_noise=s.upstream_noise,
            on_step=cb,
            diffusion=self.process,
        )
        values = values.view(B, n, -1)
        if src is not None:  # rows back on the grid; positions not computed get row 0 (keep_Bl drops them)
            values = values.gather(1, src.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
        self.clock.stop(mark)
        return StageSample(values=values)

    @property
    def seconds(self) -> list[float]:
        """Diffusion time of each stage sampled so far."""
        return [] if self.clock is None else self.clock.seconds()
