"""Plain sampling functions over logits; every random draw goes through an explicit torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import InvalidOption
from ..interfaces import StagePrediction


@dataclass(frozen=True)
class SamplerConfig:
    """Categorical sampling knobs.

    ``top_k`` 0 = off; ``top_p`` 0 = off; ``temperature`` divides the logits (1 = upstream VAR, which has
    none); ``smooth`` = VAR's Gumbel-softmax "more_smooth" mode (soft code mixtures, for visualisation).
    ``late_from`` > 0 with ``late_temperature`` set uses that temperature from stage ``late_from`` on: on
    the bundled emoji model the structure stages want broad sampling and the detail stages a sharp one.
    """

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    smooth: bool = False
    late_from: int = 0
    late_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise InvalidOption(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidOption(f"top_p must be in [0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise InvalidOption(f"temperature must be > 0, got {self.temperature}")
        if self.late_from < 0:
            raise InvalidOption(f"late_from must be >= 0 (0 = off), got {self.late_from}")
        if self.late_temperature is not None and not self.late_temperature > 0:
            raise InvalidOption(f"late_temperature must be > 0, got {self.late_temperature}")

    def at_stage(self, stage: int) -> SamplerConfig:
        """The settings that apply at ``stage`` (the late temperature from ``late_from`` on)."""
        if 0 < self.late_from <= stage and self.late_temperature is not None:
            return replace(self, temperature=self.late_temperature, late_from=0)
        return self


def mask_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """In place: -inf below the k-th largest logit (ties kept), then outside the top-p nucleus.

    The nucleus keeps the largest token always and removes tokens whose ascending cumulative
    probability is <= 1 - top_p (upstream VAR's rule).
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    return logits_BlV


def sample_categorical(
    logits_BlV: torch.Tensor | StagePrediction,
    cfg: SamplerConfig,
    generator: torch.Generator | None,
    progress: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one code per position; returns (idx (B,l), soft mixture weights (B,l,V) or None).

    ``progress`` = k/(K-1) drives the Gumbel temperature of the smooth mode. Draw order matches
    upstream: one multinomial over all B*l rows, then (smooth only) the Gumbel noise. A
    :class:`StagePrediction` is masked and normalised per distinct row only; its draws are the same.
    """
    if isinstance(logits_BlV, StagePrediction):
        return _sample_rows(logits_BlV, cfg, generator, progress)
    B, l, V = logits_BlV.shape
    if cfg.temperature != 1.0:
        logits_BlV = logits_BlV / cfg.temperature
    mask_top_k_top_p_(logits_BlV, cfg.top_k, cfg.top_p)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    idx_Bl = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)
    if not cfg.smooth:
        return idx_Bl, None
    tau = max(0.27 * (1 - 0.95 * progress), 0.005)
    gumbel = -torch.empty_like(logits_BlV).exponential_(generator=generator).log()
    soft = ((logits_BlV * (1 + progress) + gumbel) / tau).softmax(dim=-1)
    return idx_Bl, soft


def _sample_rows(
    pred: StagePrediction, cfg: SamplerConfig, generator: torch.Generator | None, progress: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample_categorical` for shared rows, with the exact draws of ``torch.multinomial``.

    A one-sample multinomial draws Exp(1) noise q of shape (N, V) and returns argmax(p / q); drawing q
    for the full grid here keeps the generator stream, and so every token's draw, identical to dense
    sampling, while top-k/top-p/softmax run on the distinct rows only.
    """
    rows = pred.rows
    B, l = pred.src.shape
    V = rows.shape[-1]
    if cfg.temperature != 1.0:
        rows = rows / cfg.temperature
    mask_top_k_top_p_(rows, cfg.top_k, cfg.top_p)
    probs = StagePrediction(rows.softmax(dim=-1), pred.src).full().view(B * l, V)
    q = torch.empty(B * l, V, dtype=probs.dtype, device=probs.device).exponential_(generator=generator)
    idx_Bl = probs.div_(q).argmax(dim=-1).view(B, l)
    if not cfg.smooth:
        return idx_Bl, None
    masked = StagePrediction(rows, pred.src).full()
    tau = max(0.27 * (1 - 0.95 * progress), 0.005)
    gumbel = -torch.empty_like(masked).exponential_(generator=generator).log()
    return idx_Bl, ((masked * (1 + progress) + gumbel) / tau).softmax(dim=-1)
