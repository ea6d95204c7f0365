"""The one scale-wise generation loop (Algorithm: next-scale prediction with a pluggable token policy).

Per stage: the tokenizer builds the stage input from the canvas -> the policy selects positions -> the
transformer steps over those tokens with the per-call KV cache -> head -> guidance -> the policy fills
the positions it skipped -> sampler -> tokenizer update. Nothing here knows which family it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidOption
from ..interfaces import Selection, StageHead, Tokenizer, TokenPolicy, Transformer, materialize
from .guidance import Guidance
from .heads import CategoricalHead
from .sampling import SamplerConfig
from .timing import SpanClock


@dataclass
class StageInfo:
    """What the callback receives after each stage. ``seconds`` is host time: on a GPU, the time to queue
    the stage (the engine does not wait for the device; GenerationOutput.stage_seconds has device time)."""

    stage: int
    num_stages: int
    grid: tuple[int, int]
    seconds: float
    tokens_computed: list[int]


@dataclass
class GenerationOutput:
    """Images in [0, 1] plus everything bench/conformance need, so they need no hooks of their own."""

    images: torch.Tensor
    labels: torch.Tensor | None  # None when a prebuilt (e.g. text) condition was given
    tokens: list[torch.Tensor]
    canvas: torch.Tensor
    stage_seconds: list[float]
    decode_seconds: float
    tokens_computed: list[list[int]]
    grids: list[tuple[int, int]]
    logits: list[torch.Tensor] | None = None
    policy_stats: list[dict] = field(default_factory=list)
    policy_state: Any = None

    @property
    def transformer_seconds(self) -> float:
        return float(sum(self.stage_seconds))


class DensePolicy:
    """Identity policy: every position of every stage is computed."""

    name = "dense"

    def begin(self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device) -> None:
        return None

    def select(self, stage: int, state: Any) -> Selection:
        return Selection()

    def fill(self, stage: int, selection: Selection, logits_BnV: torch.Tensor, out: Any, state: Any):
        return logits_BnV, None

    def stats(self, state: Any) -> list[dict]:
        return []


def draw_labels(num_classes: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random class labels, drawn first from the call's generator (upstream's order)."""
    device = generator.device if generator is not None else "cpu"
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device)
    return torch.multinomial(uniform, num_samples=batch, replacement=True, generator=generator).view(batch)


@torch.no_grad()
def generate(
    transformer: Transformer,
    tokenizer: Tokenizer,
    *,
    labels: torch.Tensor | None = None,
    batch: int | None = None,
    num_classes: int | None = None,
    guidance: Guidance | None = None,
    sampler: SamplerConfig | None = None,
    policy: TokenPolicy | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StageInfo], None] | None = None,
    record_logits: bool = False,
    head: StageHead | None = None,
    condition: Any = None,
) -> GenerationOutput:
    """Generate a batch of images; ``labels`` None draws ``batch`` random labels from ``generator``.

    ``head`` defaults to categorical codebook logits (VAR) built from ``guidance`` and ``sampler``;
    other token kinds pass their own head. ``condition``: a prebuilt condition object (anything with
    ``batch`` and ``guided``, e.g. text features) used instead of ``transformer.condition(labels)``.
    """
    guidance = guidance or Guidance()
    head = head or CategoricalHead(transformer, guidance, sampler or SamplerConfig())
    policy = policy or DensePolicy()
    device = next(transformer.parameters()).device  # type: ignore[attr-defined]
    if condition is not None:
        labels = None
    elif labels is None:
        if batch is None or batch < 1:
            raise InvalidOption(f"batch must be >= 1, got {batch}")
        if num_classes is None:
            raise InvalidOption("num_classes is needed to draw random labels")
        labels = draw_labels(num_classes, batch, generator)
    if labels is not None:
        labels = labels.to(device)
    B = labels.shape[0] if labels is not None else int(condition.batch)
    if B < 1:
        raise InvalidOption("batch must be >= 1")
    grids = tokenizer.stage_grids()
    S = len(grids)
    doubled = guidance.enabled if condition is None else bool(condition.guided)
    cond = transformer.condition(labels, doubled) if condition is None else condition
    R = B * (2 if doubled else 1)
    cache = transformer.new_cache(R, torch.float32, device)
    canvas = tokenizer.init_canvas(B, device)
    pstate = policy.begin(grids, B, transformer.depth, device)
    tokens, logits_rec, computed = [], [], []
    clock = SpanClock(device)  # no wait for the device between stages (engine/timing.py)
    for k in range(_stages_to_run(policy, S)):
        host0, mark = time.perf_counter(), clock.start()
        stage_tok = None if k == 0 else tokenizer.next_input(canvas, k)
        observe = getattr(policy, "observe_input", None)
        if observe is not None and stage_tok is not None:
            observe(k, stage_tok, pstate)  # optional hook: policies that score the stage input (FastVAR)
        sel = policy.select(k, pstate)
        if stage_tok is not None and sel.index is not None:
            stage_tok = stage_tok.gather(1, sel.index.unsqueeze(-1).expand(-1, -1, stage_tok.shape[-1]))
        x = transformer.stage_input(cond, stage_tok, sel.index, k)
        if cache is not None:  # None: a backbone that recomputes every stage in full (FAR)
            cache.begin_stage(x.shape[1], None if sel.valid is None else sel.valid.repeat(R // B, 1))
        out = transformer.step(x, cond, cache, sel.taps)
        if cache is not None:
            cache.end_stage()
        guided = head.guide(head.predict(out.hidden, cond), B, k, S)
        full, keep_Bl = policy.fill(k, sel, guided, out, pstate)
        if record_logits:
            logits_rec.append(materialize(full).clone())
        drawn = head.sample(full, k, S, generator)
        canvas = tokenizer.update(canvas, tokenizer.token_vectors(drawn), k, keep_Bl)
        observe_out = getattr(policy, "observe_output", None)
        if observe_out is not None:
            observe_out(k, canvas, pstate)  # optional hook: policies that score the new canvas (farskip)
        tokens.append(drawn.idx if drawn.idx is not None else drawn.values)
        clock.stop(mark)
        n = grids[k][0] * grids[k][1]
        counts = [n] * B if sel.valid is None and sel.index is None else _counts(sel, B)
        computed.append(counts)
        if callback is not None:
            callback(StageInfo(k, S, grids[k], time.perf_counter() - host0, counts))
    mark = clock.start()
    images = tokenizer.decode(canvas)
    clock.stop(mark)
    *stage_s, decode_s = clock.seconds()
    return GenerationOutput(
        images=images,
        labels=labels,
        tokens=tokens,
        canvas=canvas,
        stage_seconds=stage_s,
        decode_seconds=decode_s,
        tokens_computed=computed,
        grids=grids,
        logits=logits_rec if record_logits else None,
        policy_stats=policy.stats(pstate),
        policy_state=pstate,
    )


def _stages_to_run(policy: Any, num_stages: int) -> int:
    """Optional hook ``stages_to_run(S)``: scale skipping stops the loop early. Guidance, sampling and the
    policy still see the full schedule S, so the stages that run are exactly those of the full run."""
    hook = getattr(policy, "stages_to_run", None)
    n = num_stages if hook is None else int(hook(num_stages))
    if not 1 <= n <= num_stages:
        raise InvalidOption(f"policy '{policy.name}' runs {n} stages; the schedule has 1..{num_stages}")
    return n


def _counts(sel: Selection, batch: int) -> list[int]:
    if sel.valid is not None:
        return [int(c) for c in sel.valid.sum(dim=1).tolist()]
    assert sel.index is not None
    return [sel.index.shape[1]] * batch
