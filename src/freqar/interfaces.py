"""The small contracts between the engine, model families, tokenizers and token policies.

A family plugs in by providing a ``Pipeline`` whose transformer and tokenizer satisfy the protocols
below; the engine loop in ``engine/generate.py`` never branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .engine.cache import KVCache


@dataclass
class Selection:
    """Positions of one stage that are computed, per sample.

    ``index`` (B, n) holds row-major positions in the stage grid (None = every position, in order);
    ``valid`` (B, n) marks real entries when samples keep different counts (None = all real). The
    conditional and unconditional CFG rows of a sample share its selection.
    """

    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    taps: tuple[int, ...] = ()

    @property
    def dense(self) -> bool:
        return self.index is None


@dataclass
class StepOutput:
    """Hidden states of the computed tokens and the (input, output) of each tapped block."""

    hidden: torch.Tensor
    taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class StagePrediction:
    """A stage's per-token predictions as distinct ``rows`` (B, m, ...) plus ``src`` (B, l): the row each grid
    position takes.

    A token policy returns this instead of a full (B, l, ...) tensor when many positions share a row
    (SparseVAR's copied tokens take their anchor's logits): the sampler then masks and normalises only
    the distinct rows, so its cost follows the computed tokens while the draws stay those of the full grid.
    ``src`` is also the policy's anchor map: a head with per-token state beyond logits (HART's residual
    diffusion) gives an excluded token its anchor's row of that state too.
    """

    rows: torch.Tensor
    src: torch.Tensor

    def full(self) -> torch.Tensor:
        B, l = self.src.shape
        idx = self.src.view(B, l, *([1] * (self.rows.dim() - 2))).expand(B, l, *self.rows.shape[2:])
        return self.rows.gather(1, idx)


def materialize(pred: torch.Tensor | StagePrediction) -> torch.Tensor:
    """The full-grid tensor of a prediction (a plain tensor is returned as is)."""
    return pred.full() if isinstance(pred, StagePrediction) else pred


@dataclass
class StageSample:
    """What a head's sampler drew for one stage over the full grid.

    ``idx`` (B, l, ...) discrete codes (VAR indices, Infinity bits); ``soft`` (B, l, V) optional soft code
    weights (VAR's Gumbel smoothing); ``values`` (B, l, C) optional continuous tokens (diffusion heads).
    """

    idx: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    values: torch.Tensor | None = None


class StageHead(Protocol):
    """Turns hidden states into per-token predictions, applies guidance and samples a stage.

    Logit heads guide before sampling (``guide`` returns the B guided rows); a diffusion head keeps all
    rows in ``guide`` and applies guidance inside its denoising loop in ``sample``.
    """

    def predict(self, hidden_RnC: torch.Tensor, cond: Any) -> torch.Tensor: ...
    def guide(self, pred: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor: ...
    def sample(
        self, full: torch.Tensor, stage: int, num_stages: int, generator: torch.Generator | None
    ) -> StageSample: ...


class Tokenizer(Protocol):
    """Image <-> per-stage tokens plus the running canvas (f_hat) that generation updates."""

    def stage_grids(self) -> list[tuple[int, int]]: ...
    def init_canvas(self, batch: int, device: torch.device | str) -> torch.Tensor: ...
    def next_input(self, canvas: torch.Tensor, stage: int) -> torch.Tensor: ...
    def token_vectors(self, sample: StageSample) -> torch.Tensor: ...
    def update(
        self, canvas: torch.Tensor, h_BlC: torch.Tensor, stage: int, keep_Bl: torch.Tensor | None = None
    ) -> torch.Tensor: ...
    def decode(self, canvas: torch.Tensor) -> torch.Tensor: ...


class Transformer(Protocol):
    """A stage-wise backbone: conditioning, stage inputs at explicit positions, steps and a head.

    ``new_cache`` may return None for a backbone without a KV cache (FAR recomputes each level in full);
    the engine then passes None to ``step``. ``logits`` is only needed by logit heads.
    """

    depth: int

    def condition(self, labels_B: torch.Tensor, guided: bool) -> Any: ...
    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> KVCache | None: ...
    def stage_input(
        self, cond: Any, tokens_BnCv: torch.Tensor | None, positions_Bn: torch.Tensor | None, stage: int
    ) -> torch.Tensor: ...
    def step(
        self, x_RnC: torch.Tensor, cond: Any, cache: KVCache | None, taps: tuple[int, ...] = ()
    ) -> StepOutput: ...
    def logits(self, hidden_RnC: torch.Tensor, cond: Any) -> torch.Tensor: ...


class PolicyState(Protocol):
    """Per-call mutable state of a token policy (never stored on the policy object)."""


class TokenPolicy(Protocol):
    """Decides which positions each stage computes and fills the rest (SparseVAR, FastVAR, dense).

    A policy may also define ``observe_input(stage, tokens_BlC, state)``: the engine then calls it with
    the full stage input (tokens from the canvas, stages >= 1) before ``select``, for scores that need it,
    and ``observe_output(stage, canvas, state)``: called with the updated canvas after each stage, and
    ``stages_to_run(num_stages)``: how many stages run at all (scale skipping; the canvas is then decoded).
    """

    name: str

    def begin(self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device) -> Any: ...
    def select(self, stage: int, state: Any) -> Selection: ...
    def fill(
        self, stage: int, selection: Selection, logits_BnV: torch.Tensor, out: StepOutput, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def stats(self, state: Any) -> list[dict]: ...
