"""Stage heads: prediction, guidance and sampling of one stage, per kind of token.

The engine loop calls ``predict -> guide -> (policy fill) -> sample`` and never branches on the family.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidOption
from ..interfaces import StageSample, materialize
from .guidance import Guidance
from .sampling import SamplerConfig, mask_top_k_top_p_, sample_categorical


class CategoricalHead:
    """Codebook logits (VAR): CFG on logits, then top-k/top-p/temperature categorical sampling."""

    def __init__(self, transformer: Any, guidance: Guidance, sampler: SamplerConfig) -> None:
        self.transformer = transformer
        self.guidance = guidance
        self.sampler = sampler

    def predict(self, hidden_RnC: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.transformer.logits(hidden_RnC, cond)

    def guide(self, pred: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor:
        return self.guidance.combine(pred, batch, stage, num_stages)

    def sample(
        self, full: torch.Tensor, stage: int, num_stages: int, generator: torch.Generator | None
    ) -> StageSample:
        sampler = self.sampler.at_stage(stage)
        idx, soft = sample_categorical(full, sampler, generator, stage / (num_stages - 1))
        return StageSample(idx=idx, soft=soft)


class BitwiseHead:
    """Two logits per bit (Infinity): per-stage temperature, then CFG, then top-k/top-p per bit.

    Upstream order: logits·(1/tau_k) for all rows, then ``cfg_k·cond + (1-cfg_k)·uncond`` (cfg 1 = no
    guidance; with ``cfg_on_logits`` False the rows were already mixed on hidden states, so the conditional
    rows are used). Sampling draws one multinomial over every (sample, token, bit) row of the stage.
    """

    def __init__(
        self,
        transformer: Any,
        cfg: list[float] | tuple[float, ...],
        tau: list[float] | tuple[float, ...],
        *,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_on_logits: bool = True,
    ) -> None:
        if any(not t > 0 for t in tau):
            raise InvalidOption(f"tau must be > 0 at every stage, got {list(tau)}")
        if top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise InvalidOption(f"top_k must be >= 0 and top_p in [0, 1], got {top_k}, {top_p}")
        self.transformer = transformer
        self.cfg = tuple(float(c) for c in cfg)
        self.tau = tuple(float(t) for t in tau)
        self.top_k = min(int(top_k), 2)  # 2-way choices: only top_k = 1 (greedy) changes anything
        self.top_p = float(top_p)
        self.cfg_on_logits = cfg_on_logits

    def predict(self, hidden_RnC: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.transformer.logits(hidden_RnC, cond)

    def guide(self, pred: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor:
        logits = pred.mul(1 / self.tau[stage])
        if logits.shape[0] == batch:
            return logits
        w = self.cfg[stage]
        if w != 1 and self.cfg_on_logits:
            return w * logits[:batch] + (1 - w) * logits[batch:]
        return logits[:batch]

    def sample(
        self, full: torch.Tensor, stage: int, num_stages: int, generator: torch.Generator | None
    ) -> StageSample:
        full = materialize(full)
        B, l, V = full.shape
        pairs = full.reshape(B, l * V // 2, 2)
        mask_top_k_top_p_(pairs, self.top_k, self.top_p)
        probs = pairs.softmax(dim=-1).view(-1, 2)
        bits = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
        return StageSample(idx=bits.view(B, l, V // 2))
