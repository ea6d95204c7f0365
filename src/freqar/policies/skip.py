"""Scale skipping (FastVAR as released, SkipVAR): the last k scales never run, and a wrapper that composes it
with a token policy, so ``sparsevar+skip`` and ``fastvar+skip`` are single methods.

Facts from FastVAR's released Infinity code (shared/reference/peers.md §1.2): the loop stops before the
last two scales and the summed code map is interpolated to the full latent and decoded. Here the engine's
optional ``stages_to_run`` hook stops the loop; VAR's and Infinity's canvases already hold every stage's
residual upsampled to the full latent grid, so decoding the canvas is that interpolation. Everything that
does run is the full run's: guidance and sampling see the full schedule and the wrapped policy is given
every grid, so its P and ΔF stages mean the same with and without skipping, and the effect of skipping is
measurable on its own (``skip`` alone) apart from token exclusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidOption
from ..interfaces import Selection, StepOutput
from .fastvar import FastVARConfig
from .sparsevar import SparseVARConfig


@dataclass(frozen=True)
class SkipConfig:
    """How many of the last scales are not run (0 = none: exactly the wrapped policy)."""

    skip: int = 1

    def __post_init__(self) -> None:
        if int(self.skip) != self.skip or self.skip < 0:
            raise InvalidOption(f"skip (scales not run) must be an integer >= 0, got {self.skip}")


@dataclass
class SkipState:
    inner: Any
    num_stages: int


class SkipPolicy:
    """Runs ``inner`` (dense when None) on the first S − k scales; the engine then decodes the canvas."""

    def __init__(self, cfg: SkipConfig | None = None, inner: Any = None) -> None:
        self.cfg = cfg or SkipConfig()
        self.inner = inner
        self.name = "skip" if inner is None else f"{inner.name}+skip"
        # optional engine hooks exist only when the wrapped policy has them
        if inner is not None and hasattr(inner, "observe_input"):
            self.observe_input = lambda k, tok, st: inner.observe_input(k, tok, st.inner)
        if inner is not None and hasattr(inner, "observe_output"):
            self.observe_output = lambda k, canvas, st: inner.observe_output(k, canvas, st.inner)

    def stages_to_run(self, num_stages: int) -> int:
        """S − k; at least one stage must run."""
        if self.cfg.skip >= num_stages:
            raise InvalidOption(
                f"skip {self.cfg.skip} leaves no stage to run (the schedule has {num_stages} stages)"
            )
        return num_stages - self.cfg.skip

    def begin(self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device) -> SkipState:
        S = len(grids)
        self.stages_to_run(S)
        inner = None if self.inner is None else self.inner.begin(grids, batch, depth, device)
        first = _first_sparse_stage(self.inner, S, depth)
        if first is not None and first >= S - self.cfg.skip > 0 and self.cfg.skip > 0:
            raise InvalidOption(
                f"{self.name}: the first accelerated stage {first} is skipped (skip {self.cfg.skip} of "
                f"{S} stages runs 0..{S - self.cfg.skip - 1}); lower start_stage or skip"
            )
        return SkipState(inner, S)

    def select(self, stage: int, st: SkipState) -> Selection:
        return Selection() if self.inner is None else self.inner.select(stage, st.inner)

    def fill(
        self, stage: int, sel: Selection, logits_BnV: torch.Tensor, out: StepOutput, st: SkipState
    ) -> tuple[Any, torch.Tensor | None]:
        if self.inner is None:
            return logits_BnV, None
        return self.inner.fill(stage, sel, logits_BnV, out, st.inner)

    def stats(self, st: SkipState) -> list[dict]:
        return [] if self.inner is None else self.inner.stats(st.inner)


def _first_sparse_stage(policy: Any, num_stages: int, depth: int) -> int | None:
    """The first stage a token policy accelerates (None: dense or another policy)."""
    cfg = getattr(policy, "cfg", None)
    if isinstance(cfg, SparseVARConfig):
        return cfg.resolve(num_stages, depth)[0]
    if isinstance(cfg, FastVARConfig):
        return cfg.resolve(num_stages)[0]
    return None


# ----- one front door for accelerated methods (eval --accel, study) -----------------------------------
BASE_METHODS = ("dense", "sparsevar", "fastvar")


def split_method(method: str) -> tuple[str, bool]:
    """``'sparsevar+skip'`` -> ('sparsevar', True); ``'skip'`` -> ('dense', True); checked."""
    parts = method.split("+")
    skip = "skip" in parts
    rest = [p for p in parts if p != "skip"]
    ok = (
        all(parts)
        and len(parts) == len(set(parts))
        and len(rest) <= 1
        and (not rest or rest[0] in BASE_METHODS)
    )
    if not ok or (rest == ["dense"] and not skip and len(parts) > 1):
        choices = ", ".join([*BASE_METHODS, "skip", "sparsevar+skip", "fastvar+skip"])
        raise InvalidOption(f"unknown accelerated method '{method}' (choose from {choices})")
    return (rest[0] if rest else "dense"), skip


def build_accel(method: str, knobs: dict[str, Any]) -> Any:
    """The policy for ``method`` with ``knobs`` (None = dense); ``skip`` is the skipping knob, the
    others go to the token policy, and a knob no part of the method takes is a one-line error."""
    from . import make_policy  # the registry imports this module's siblings; import late

    base, skip = split_method(method)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    k = knobs.pop("skip", None)
    if k is not None and not skip:
        raise InvalidOption(f"knob skip={k} needs a '+skip' method (e.g. {base}+skip), not '{method}'")
    inner = None if base == "dense" else make_policy(base, **knobs)
    if base == "dense" and knobs:
        raise InvalidOption(f"method '{method}' takes no token-policy knobs, got {', '.join(sorted(knobs))}")
    if not skip:
        return inner
    return SkipPolicy(SkipConfig(1 if k is None else k), inner)
