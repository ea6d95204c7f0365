"""FastVAR's cached token pruning (arXiv 2503.23367) as a stage-level peer baseline.

Facts from the released code (see shared/reference/peers.md §1): tokens are ranked by the "pivotal"
score ‖x_i − mean(x)‖² and the top L − ⌊L·r⌋ are computed; a dense cache scale is stored, and a pruned
token's update is the cache scale's result area-resized to the current grid; only kept tokens enter the
KV cache. Adaptation to freqar's engine (it selects per stage, not per sub-layer):

- the score is taken once per stage on the stage input (the canvas tokens), shared by the CFG rows;
- pruning spans the whole stack, and a pruned token is restored with the cache stage's guided logits,
  area-resized — it then draws its own code, so it never contributes a zero residual;
- this is "FastVAR-prune-only": the as-released Infinity recipe also skips the last two scales outright.

Default ratios (fraction dropped) for the stages from ``start_stage`` (default ``max(1, S − 4)``) on:
(0.4, 0.5, 0.5, 0.75) — Infinity's released ratios for its first two pruned scales, HART's for the last
two. ``keep`` replaces them by one fixed kept fraction, for benchmarks at equal budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from ..interfaces import Selection, StepOutput


@dataclass(frozen=True)
class FastVARConfig:
    """FastVAR knobs: which stages prune, by how much, and the dense cache stage."""

    start_stage: int | None = None
    drop: tuple[float, ...] = (0.4, 0.5, 0.5, 0.75)
    keep: float | None = None
    cache_stage: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", tuple(float(r) for r in self.drop))
        if self.start_stage is not None and self.start_stage < 1:
            raise InvalidOption(f"fastvar start stage must be >= 1, got {self.start_stage}")
        if not self.drop or any(not 0.0 <= r < 1.0 for r in self.drop):
            raise InvalidOption(f"fastvar drop ratios must be in [0, 1), got {list(self.drop)}")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise InvalidOption(f"fastvar keep budget must be in (0, 1], got {self.keep}")
        if self.cache_stage is not None and self.cache_stage < 0:
            raise InvalidOption(f"fastvar cache stage must be >= 0, got {self.cache_stage}")

    def resolve(self, num_stages: int) -> tuple[int, int]:
        """(first pruned stage, cache stage) for a schedule of ``num_stages``."""
        P = max(1, num_stages - 4) if self.start_stage is None else self.start_stage
        c = P - 1 if self.cache_stage is None else self.cache_stage
        if c >= P:
            raise InvalidOption(f"fastvar cache stage {c} must come before the first pruned stage {P}")
        return P, c

    def kept(self, stage: int, P: int, l: int) -> int:
        """Tokens computed at a pruned stage: L − ⌊L·r⌋ (or round(keep·L)), at least one."""
        if self.keep is not None:
            return max(1, min(l, round(self.keep * l)))
        r = self.drop[min(stage - P, len(self.drop) - 1)]
        return max(1, l - int(l * r))


@dataclass
class FastVARState:
    grids: list[tuple[int, int]]
    batch: int
    P: int
    cache_stage: int
    score_Bl: torch.Tensor | None = None
    cache_BhwV: torch.Tensor | None = None
    stats: list[dict] = field(default_factory=list)


class FastVARPolicy:
    """Pivotal-token pruning with cached restoration (prune-only variant)."""

    name = "fastvar"

    def __init__(self, cfg: FastVARConfig | None = None) -> None:
        self.cfg = cfg or FastVARConfig()

    def begin(
        self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device
    ) -> FastVARState:
        P, c = self.cfg.resolve(len(grids))
        return FastVARState(grids, batch, P, c)

    def observe_input(self, stage: int, tokens_BlC: torch.Tensor, st: FastVARState) -> None:
        """Pivotal score of every position of a pruned stage: squared distance to the mean token."""
        if stage >= st.P and st.cache_BhwV is not None:
            mu = tokens_BlC.mean(dim=1, keepdim=True)
            st.score_Bl = (tokens_BlC - mu).float().square().sum(dim=-1)

    def select(self, stage: int, st: FastVARState) -> Selection:
        if stage < st.P or st.score_Bl is None or stage >= len(st.grids):
            return Selection()
        h, w = st.grids[stage]
        n = self.cfg.kept(stage, st.P, h * w)
        if n >= h * w:
            return Selection()
        index = st.score_Bl.topk(n, dim=1).indices.sort(dim=1).values
        return Selection(index=index)

    def fill(
        self, stage: int, sel: Selection, logits_BnV: torch.Tensor, out: StepOutput, st: FastVARState
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = st.grids[stage]
        B = st.batch
        if stage == st.cache_stage:
            st.cache_BhwV = logits_BnV.reshape(B, h, w, -1).clone()
        if sel.dense:
            if stage >= st.P:
                st.stats.append(
                    {"stage": stage, "grid": [h, w], "computed": [h * w] * B, "restored": [0] * B}
                )
            return logits_BnV, None
        assert st.cache_BhwV is not None and sel.index is not None
        # vocabulary-last (channels_last) layout: the area resize reads and writes contiguous rows
        up = F.interpolate(st.cache_BhwV.permute(0, 3, 1, 2), size=(h, w), mode="area")
        full = up.permute(0, 2, 3, 1).reshape(B, h * w, -1)
        n = sel.index.shape[1]
        full.scatter_(1, sel.index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), logits_BnV)
        st.stats.append({"stage": stage, "grid": [h, w], "computed": [n] * B, "restored": [h * w - n] * B})
        st.score_Bl = None
        return full, None

    def stats(self, st: FastVARState) -> list[dict]:
        """Per pruned stage and sample: tokens computed and tokens restored from the cache stage."""
        return st.stats
