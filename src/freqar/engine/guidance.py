"""Classifier-free guidance on logits: schedules of the guidance strength over stages and the combine rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOption


@dataclass(frozen=True)
class Guidance:
    """CFG strength per stage.

    ``schedule`` is ``"linear"`` (VAR: t = cfg * k/(K-1), 0 at the first stage and cfg at the last),
    ``"constant"`` (Infinity-style: t = cfg at every stage) or ``"list"`` (``per_stage`` gives t directly).
    ``late_from`` > 0 with ``late_cfg`` set overrides t from that stage on: the detail stages of a small
    model sample better with weak guidance (see :class:`~freqar.engine.sampling.SamplerConfig`).
    Guided logits are ``(1+t)*cond - t*uncond``.
    """

    cfg: float = 1.5
    schedule: str = "linear"
    per_stage: tuple[float, ...] = ()
    late_from: int = 0
    late_cfg: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "constant", "list"):
            raise InvalidOption(f"unknown guidance schedule '{self.schedule}' (linear, constant, list)")
        if self.cfg < 0:
            raise InvalidOption(f"cfg must be >= 0, got {self.cfg}")
        if self.late_from < 0:
            raise InvalidOption(f"late_from must be >= 0 (0 = off), got {self.late_from}")
        if self.late_cfg is not None and self.late_cfg < 0:
            raise InvalidOption(f"late_cfg must be >= 0, got {self.late_cfg}")

    @property
    def enabled(self) -> bool:
        late = self.late_from > 0 and self.late_cfg is not None and self.late_cfg != 0
        if self.schedule == "list":
            return late or any(t != 0 for t in self.per_stage)
        return late or self.cfg != 0

    def scale(self, stage: int, num_stages: int) -> float:
        if 0 < self.late_from <= stage and self.late_cfg is not None:
            return float(self.late_cfg)
        if self.schedule == "list":
            return float(self.per_stage[stage])
        if self.schedule == "constant":
            return float(self.cfg)
        return self.cfg * stage / (num_stages - 1)

    def combine(self, logits_RnV: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor:
        """Rows [0:B] conditional, [B:2B] unconditional -> guided (B, n, V)."""
        if logits_RnV.shape[0] == batch:
            return logits_RnV
        t = self.scale(stage, num_stages)
        return (1 + t) * logits_RnV[:batch] - t * logits_RnV[batch:]
