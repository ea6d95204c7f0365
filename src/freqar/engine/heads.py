"""Stage heads: prediction, guidance and sampling of one stage, per kind of token.

The engine loop calls ``predict -> guide -> (policy fill) -> sample`` and never branches on the family.
"""

from __future__ import annotations

from typing import Any

import torch

from ..interfaces import StageSample
from .guidance import Guidance
from .sampling import SamplerConfig, sample_categorical


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
        idx, soft = sample_categorical(full, self.sampler, generator, stage / (num_stages - 1))
        return StageSample(idx=idx, soft=soft)
