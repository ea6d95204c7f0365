"""``farskip``: SparseVAR-style token exclusion carried over to FAR's frequency levels (beyond both papers).

FAR predicts the *full* latent at every level, so a token whose prediction has stopped moving need not be
predicted again. From level P on, per sample:

- Score (the "previous prediction" variant of SparseVAR's ΔF): Δ_k = mean over channels of
  (x̂_{k-1} − x̂_{k-2})², the change of the canvas between the two previous levels. Chosen over a probe
  block because FAR has no per-level residual stream to tap (every level is a fresh encoder–decoder pass),
  because it measures directly the quantity the exclusion bets on (this token's value will not change),
  and because it costs nothing: the canvases exist anyway. Hence P >= 2.
- Threshold mode: a token is excluded when Δ_k < τ·max(Δ_k). An excluded token keeps its value, so its
  Δ at the next level is 0 and it stays excluded (monotone, as SparseVAR's Eq. 2 rule).
  In a batch every sample computes the batch's largest count (the extra tokens are the next-highest Δ,
  computed for real): FAR's encoder drops the same number of tokens per row and needs no padding.
- Keep-budget mode (``keep``): exactly round(keep·l) tokens per sparse level (at least 1), highest Δ
  first, so the cost is fixed in advance (benchmarks at fixed budgets).
- Excluded tokens are dropped from the encoder (MAR-style: mask tokens fill their places in the decoder),
  the diffusion head samples only the computed rows (the policy returns a row map, ``StagePrediction``),
  and the tokenizer keeps their previous-level value (``keep_Bl`` False).
- Disabled (τ = 0 without a budget, keep = 1, or P past the last level): exactly dense generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidOption
from ..interfaces import Selection, StagePrediction, StepOutput
from .sparsevar import row_of_position, selection_from_mask


@dataclass(frozen=True)
class FARSkipConfig:
    """``tau`` threshold on Δ relative to its per-sample max; ``start_stage`` P (0-based, default: half the
    levels, rounded down, at least 2); ``keep`` a fixed fraction of tokens per sparse level instead of τ."""

    tau: float = 0.1
    start_stage: int | None = None
    keep: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise InvalidOption(f"farskip tau must be in [0, 1], got {self.tau}")
        if self.start_stage is not None and (
            int(self.start_stage) != self.start_stage or self.start_stage < 2
        ):
            raise InvalidOption(
                f"farskip start stage must be an integer >= 2 (Δ needs two earlier predictions), "
                f"got {self.start_stage}"
            )
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise InvalidOption(f"farskip keep budget must be in (0, 1], got {self.keep}")

    def resolve(self, num_levels: int) -> int:
        return max(2, num_levels // 2) if self.start_stage is None else int(self.start_stage)

    def disabled(self, num_levels: int) -> bool:
        if self.resolve(num_levels) >= num_levels:
            return True
        return self.keep == 1.0 if self.keep is not None else self.tau == 0.0


@dataclass
class FARSkipState:
    grids: list[tuple[int, int]]
    batch: int
    P: int
    off: bool
    prev: torch.Tensor | None = None  # canvas after level k-2
    last: torch.Tensor | None = None  # canvas after level k-1
    computed_Bl: torch.Tensor | None = None
    stats: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)  # per sparse level (B, h, w) bool computed


class FARSkipPolicy:
    """Token policy for FAR (continuous tokens, diffusion head) on the engine's select/fill contract."""

    name = "farskip"

    def __init__(self, cfg: FARSkipConfig | None = None) -> None:
        self.cfg = cfg or FARSkipConfig()

    def begin(
        self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device
    ) -> FARSkipState:
        S = len(grids)
        return FARSkipState(grids, batch, self.cfg.resolve(S), self.cfg.disabled(S))

    def observe_output(self, stage: int, canvas: torch.Tensor, st: FARSkipState) -> None:
        """Engine hook after each level's update: remember the last two canvases (for Δ)."""
        if st.off or stage < st.P - 2:
            return
        st.prev, st.last = st.last, canvas

    def scores(self, st: FARSkipState) -> torch.Tensor:
        """Δ (B, l): mean over channels of the squared change between the last two predictions."""
        assert st.prev is not None and st.last is not None
        B = st.last.shape[0]
        return (st.last - st.prev).float().square().mean(dim=1).reshape(B, -1)

    def select(self, stage: int, st: FARSkipState) -> Selection:
        st.computed_Bl = None
        if st.off or stage < st.P:
            return Selection()
        dF = self.scores(st)
        B, l = dF.shape
        if self.cfg.keep is None:
            low = dF < self.cfg.tau * dF.amax(dim=1, keepdim=True)
            n = max(1, int((~low).sum(dim=1).max()))
        else:
            n = min(l, max(1, round(self.cfg.keep * l)))
        computed = torch.zeros(B, l, dtype=torch.bool, device=dF.device)
        computed.scatter_(1, dF.topk(n, dim=1).indices, True)
        st.computed_Bl = computed
        if n == l:
            return Selection()
        index, valid = selection_from_mask(computed, n)  # topk: every row holds exactly n
        return Selection(index=index, valid=valid)

    def fill(
        self, stage: int, sel: Selection, pred_RnC: torch.Tensor, out: StepOutput, st: FARSkipState
    ) -> tuple[torch.Tensor | StagePrediction, torch.Tensor | None]:
        """Computed rows as a row map for the head; ``keep_Bl`` False = keep the previous value."""
        if st.off or stage < st.P:
            return pred_RnC, None
        h, w = st.grids[stage]
        l = h * w
        computed = st.computed_Bl
        assert computed is not None
        n = computed.sum(dim=1)
        st.stats.append(
            {"stage": stage, "grid": [h, w], "computed": n.tolist(), "excluded": (l - n).tolist()}
        )
        st.masks.append(computed.view(-1, h, w).cpu())
        if sel.dense:
            return pred_RnC, None
        return StagePrediction(pred_RnC, row_of_position(sel, l)), computed

    def stats(self, st: FARSkipState) -> list[dict]:
        """Per sparse level and sample: tokens computed and excluded."""
        return st.stats
