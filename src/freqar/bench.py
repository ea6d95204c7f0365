"""``freqar bench``: dense vs SparseVAR vs FastVAR on random-weight scenarios, interleaved, same seeds.

Random weights make SparseVAR's ΔF maps meaningless, so besides the τ sweep every sparse method also
runs at fixed keep budgets (fraction of tokens computed in the sparse stages): those runs measure how
much of the ideal (FLOP-count) speed-up the engine turns into wall-clock time. Latency is the
transformer part of generation (stages, policy, sampling, tokenizer updates), not the VAE decode.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import resource
import statistics
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .engine.generate import GenerationOutput, generate
from .engine.heads import BitwiseHead
from .engine.timing import SpanClock
from .errors import InvalidOption
from .eval.fidelity import finite as _finite
from .eval.fidelity import psnr, ssim, token_agreement
from .io import atomic_write, write_json
from .models.hart import EXCLUDED_OPTIONS, HARTConfig, HARTHead, TextFeatures
from .models.infinity import Infinity, InfinityConfig, schedule_for
from .models.var import VARConfig
from .pipeline import Pipeline, SamplingDefaults, build_pipeline
from .policies import make_policy
from .policies.sparsevar import SIGNALS
from .tokenizers.bsq import BSQVAE, BSQConfig
from .tokenizers.hybrid import HART_1024
from .tokenizers.msvq import MSVQConfig

INFINITY_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class Scenario:
    """A random-weight model shape plus the sampling settings the benchmark uses."""

    name: str
    description: str
    patch_nums: tuple[int, ...]
    depth: int
    embed_dim: int
    num_heads: int
    vocab_size: int = 4096
    z_channels: int = 32
    vae_ch: int = 160
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_groups: int = 32
    num_classes: int = 1000
    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95
    family: str = "var"

    def runner(self, device: str, batch: int, seed: int) -> _VARRunner:
        return _VARRunner(self, device, batch, seed)

    def build(self) -> Pipeline:
        vae = MSVQConfig(
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
            ch=self.vae_ch,
            ch_mult=self.vae_ch_mult,
            patch_nums=self.patch_nums,
            groupnorm_groups=self.vae_groups,
        )
        var = VARConfig(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_classes=self.num_classes,
            patch_nums=self.patch_nums,
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
        )
        defaults = SamplingDefaults(cfg=self.cfg, top_k=self.top_k, top_p=self.top_p)
        return build_pipeline(self.name, vae, var, defaults, init_seed=0)


@dataclass(frozen=True)
class InfinityScenario:
    """Infinity layers (cosine self-attention with 2-D RoPE, text cross-attention, bitwise head) with random
    weights on an aspect template, conditioned on random text features of a fixed length, CFG on logits."""

    name: str
    description: str
    depth: int = 1
    full_depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    codebook_dim: int = 32
    text_channels: int = 2048
    text_len: int = 64
    h_div_w: float = 1.0
    resolution: str = "1M"
    vae_ch: int = 24
    vae_ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1)
    vae_res_blocks: int = 1
    cfg: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    family: str = "infinity"

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(h for h, _ in schedule_for(self.h_div_w, self.resolution)[0])

    def config(self, depth: int | None = None) -> InfinityConfig:
        return InfinityConfig(
            depth=depth or self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            block_chunks=1,
            text_channels=self.text_channels,
            codebook_dim=self.codebook_dim,
        )

    def runner(self, device: str, batch: int, seed: int) -> _InfinityRunner:
        return _InfinityRunner(self, device, batch, seed)


@dataclass(frozen=True)
class HARTScenario:
    """HART layers (Llama blocks, text prefix, codebook head) plus the residual diffusion MLP at the last
    scale, random weights, random text features; every sparse setting runs once per excluded-token option."""

    name: str
    description: str
    depth: int = 2
    full_depth: int = 16
    embed_dim: int = 1536
    num_heads: int = 24
    context_token: int = 300
    context_dim: int = 1536
    text_len: int = 32
    patch_nums: tuple[int, ...] = HART_1024
    vocab_size: int = 4096
    z_channels: int = 32
    diff_width: int = 1024
    diff_depth: int = 6
    sampling_steps: str = "8"
    vae_ch: int = 16
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_groups: int = 8
    cfg: float = 4.5
    excluded: tuple[str, ...] = EXCLUDED_OPTIONS
    family: str = "hart"

    def config(self, depth: int | None = None) -> HARTConfig:
        return HARTConfig(
            context_token=self.context_token,
            context_dim=self.context_dim,
            depth=depth or self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            diff_width=self.diff_width,
            diff_depth=self.diff_depth,
            num_sampling_steps=self.sampling_steps,
            patch_nums=self.patch_nums,
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
        )

    def runner(self, device: str, batch: int, seed: int) -> _HARTRunner:
        return _HARTRunner(self, device, batch, seed)


def scenarios() -> dict[str, Scenario | InfinityScenario | HARTScenario]:
    """Registered benchmark scenarios by name."""
    items: list[Scenario | InfinityScenario | HARTScenario] = [
        Scenario(
            "var-d16",
            "VAR-d16 architecture (16 blocks, width 1024), 256px 10-scale schedule, official tokenizer shape",
            VAR_256,
            depth=16,
            embed_dim=1024,
            num_heads=16,
        ),
        Scenario(
            "infinity-1024",
            "width-512 8-block VAR transformer, 1024px Infinity schedule (13 scales to 64x64), 16x tokenizer",
            INFINITY_1024,
            depth=8,
            embed_dim=512,
            num_heads=8,
            vae_ch=16,
            vae_groups=8,
        ),
        Scenario(
            "tiny",
            "tiny smoke scenario (2 blocks, width 64, 6 scales up to 8x8) for tests",
            (1, 2, 3, 4, 6, 8),
            depth=2,
            embed_dim=64,
            num_heads=4,
            vocab_size=64,
            z_channels=8,
            vae_ch=16,
            vae_ch_mult=(1, 2),
            vae_groups=8,
            num_classes=10,
            cfg=1.5,
            top_k=0,
            top_p=0.0,
        ),
        InfinityScenario(
            "infinity-2b",
            "Infinity-2B layers (width 2048, 16 heads, text cross-attention, bitwise head d=32), 1M 1:1 "
            "template (13 scales to 64x64), 64 random text tokens, CFG 3 on logits; DEPTH CUT to 1 of 32 "
            "blocks (speed-up per layer; full-depth estimate reported), small random BSQ decoder",
        ),
        InfinityScenario(
            "infinity-tiny",
            "tiny Infinity smoke scenario (2 blocks, width 64, d=8, 0.06M: 7 scales to 16x16) for tests",
            depth=2,
            full_depth=2,
            embed_dim=64,
            num_heads=4,
            codebook_dim=8,
            text_channels=128,
            text_len=8,
            resolution="0.06M",
            vae_ch_mult=(1, 2, 1),
        ),
        HARTScenario(
            "hart-1024",
            "HART-0.7B layers (width 1536, 24 heads, 300 text tokens), 1024px 14-scale schedule, residual "
            "diffusion MLP (1024 x 6, 8 steps) in the timing; DEPTH CUT to 2 of 16 blocks (full-depth "
            "estimate reported), small random VQ decoder",
        ),
        HARTScenario(
            "hart-tiny",
            "tiny HART smoke scenario (2 blocks, width 64, 6 scales to 8x8, diffusion MLP 32 x 1) for tests",
            full_depth=2,
            embed_dim=64,
            num_heads=2,
            context_token=16,
            context_dim=32,
            text_len=6,
            patch_nums=(1, 2, 3, 4, 6, 8),
            vocab_size=640,
            z_channels=8,
            diff_width=32,
            diff_depth=1,
            sampling_steps="4",
            vae_ch=32,
            vae_ch_mult=(1, 1, 2),
            cfg=4.5,
        ),
    ]
    from .bench_far import far_scenarios

    items += far_scenarios()  # type: ignore[arg-type]
    return {s.name: s for s in items}


def get_scenario(name: str) -> Scenario | InfinityScenario | HARTScenario:
    reg = scenarios()
    if name not in reg:
        raise InvalidOption(f"unknown scenario '{name}' (run `freqar bench --list`: {', '.join(reg)})")
    return reg[name]


# ----- cost model --------------------------------------------------------------------------------------
def with_depth(scenario: Any, depth: int | None) -> Any:
    """``scenario`` running ``depth`` of its blocks (``--depth``): only scenarios that carry a depth cut
    (a ``full_depth``) take one, between 1 and that full depth; at the full depth no estimate is needed."""
    if depth is None:
        return scenario
    full = getattr(scenario, "full_depth", None)
    if full is None or scenario.family == "far":
        raise InvalidOption(
            f"--depth applies to the depth-cut scenarios (infinity-2b, hart-1024), not '{scenario.name}'"
        )
    if not 1 <= depth <= full:
        raise InvalidOption(f"--depth must be in [1, {full}] for '{scenario.name}', got {depth}")
    text = re.sub(
        r"DEPTH CUT to \d+ of (\d+) blocks(?: \([^)]*\))?",
        rf"{depth} of \1 blocks run (--depth)",
        scenario.description,
    )
    return replace(scenario, depth=depth, description=text)


def transformer_flops(cfg: VARConfig, tokens_per_stage: list[float], rows: int) -> float:
    """FLOPs of the transformer for the given computed tokens per stage (one sample, ``rows`` CFG rows).

    Per block: 24·d²·n linear (qkv, proj, FFN x4) + 4·d·n·K attention (QKᵀ and AV over the K keys in the
    cache, which holds only computed tokens); plus the head 2·d·V·n.
    """
    d, V = cfg.embed_dim, cfg.vocab_size
    total, keys = 0.0, 0.0
    for n in tokens_per_stage:
        keys += n
        total += cfg.depth * (24 * d * d * n + 4 * d * n * keys) + 2 * d * V * n
    return total * rows


def infinity_flops(
    cfg: InfinityConfig, tokens_per_stage: list[float], rows: int, text_len: int, attention: bool = True
) -> float:
    """FLOPs of the Infinity transformer (one sample, ``rows`` CFG rows), d = width, F = FFN width, T = text.

    Per block and stage of n computed tokens with K keys in the self-attention cache: self-attention
    8·d²·n (qkv, proj) + 4·d·n·K; cross-attention 4·d²·n (q, proj) + 4·d·n·T, plus 4·T·d² for the text
    keys/values, which every block recomputes at every stage whatever n is; FFN 4·d·F·n. Bitwise head
    2·d·(2·bits)·n. Once per call: the text projection for cross-attention and the pooling keys/values.
    ``attention`` False leaves out the score/value products (4·d·n·K, 4·d·n·T): the matmul part alone.
    """
    d, Fh, V, T, Ct = cfg.embed_dim, cfg.ffn_hidden, cfg.vocab, text_len, cfg.text_channels
    total, keys = 0.0, 0.0
    for n in tokens_per_stage:
        keys += n
        block = (12 * d * d + 4 * d * Fh) * n + attention * 4 * d * n * (keys + T) + 4 * T * d * d
        total += cfg.depth * block + 2 * d * V * n
    total += 2 * T * (Ct * d + d * d) + 2 * T * Ct * 2 * d
    return total * rows


def diffusion_token_flops(cfg: HARTConfig) -> float:
    """FLOPs of HART's residual head for one token row over all sampling steps (W = MLP width, D = depth):
    per step input 2·C·W, time MLP 2·256·W + 2·W², condition 2·d·W, D res blocks of 10·W², final 4·W² +
    4·W·C; once, the condition decoder_norm(h + word_embed(code)) 2·C·d."""
    dm = cfg.diffusion
    W, C, d = dm.width, dm.token_channels, cfg.embed_dim
    step = 2 * C * W + 2 * dm.frequency_embedding_size * W + 2 * W * W + 2 * d * W
    step += dm.depth * 10 * W * W + 4 * W * W + 4 * W * C
    return _respaced_steps(cfg) * step + 2 * C * d


def _respaced_steps(cfg: HARTConfig) -> int:
    from .diffusion import space_timesteps

    return len(space_timesteps(cfg.diffusion_steps, cfg.num_sampling_steps))


def hart_flops(
    cfg: HARTConfig, tokens_per_stage: list[float], rows: int, head_tokens: float, attention: bool = True
) -> float:
    """FLOPs of HART (one sample, ``rows`` CFG rows): transformer, codebook head and residual diffusion head.

    Per block and stage: 8·d²·m (qkv, proj) + 6·d·F·m (SwiGLU) + 4·d·m·K, with m = the computed tokens
    (stage 0: the whole text prefix) and K the keys cached so far; head 2·d·V per computed token (stage 0:
    the last text position only); ``head_tokens`` last-scale tokens run the diffusion MLP (all 2·N CFG rows).
    ``attention`` False leaves out the score/value products 4·d·m·K.
    """
    d, Fh, V, T = cfg.embed_dim, cfg.ffn_hidden, cfg.vocab_size, cfg.context_token
    total, keys = 0.0, 0.0
    for k, n in enumerate(tokens_per_stage):
        m = T if k == 0 else n
        keys += m
        total += cfg.depth * ((8 * d * d + 6 * d * Fh) * m + attention * 4 * d * m * keys)
        total += 2 * d * V * (1 if k == 0 else n)
    total += head_tokens * diffusion_token_flops(cfg)
    return total * rows


# ----- timing ------------------------------------------------------------------------------------------
class TimedPolicy:
    """Wraps a policy and accumulates the time of its own work (selection overhead), on the device's
    clock: no wait for the device inside a run (engine/timing.py)."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner = inner
        self.name = inner.name
        self.clock = SpanClock(device)
        if hasattr(inner, "observe_input"):
            self.observe_input = lambda *a: self._timed(inner.observe_input, *a)
        if hasattr(inner, "observe_output"):
            self.observe_output = lambda *a: self._timed(inner.observe_output, *a)

    @property
    def seconds(self) -> float:
        return self.clock.total()

    def _timed(self, fn: Any, *args: Any) -> Any:
        mark = self.clock.start()
        out = fn(*args)
        self.clock.stop(mark)
        return out

    def begin(self, *args: Any) -> Any:
        return self._timed(self.inner.begin, *args)

    def select(self, *args: Any) -> Any:
        return self._timed(self.inner.select, *args)

    def fill(self, *args: Any) -> Any:
        return self._timed(self.inner.fill, *args)

    def stats(self, state: Any) -> list[dict]:
        return self.inner.stats(state)


class _Probe:
    """Stands in for an engine transformer: keeps the call's KV cache (for its size) and times ``step``
    (the blocks), everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cache: Any = None
        self.clock: SpanClock | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def step_seconds(self) -> float:
        return 0.0 if self.clock is None else self.clock.total()

    def new_cache(self, rows: int, dtype: torch.dtype, device: Any) -> Any:
        self.cache = self.inner.new_cache(rows, dtype, device)
        return self.cache

    def step(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.clock is None:
            self.clock = SpanClock(x.device)
        mark = self.clock.start()
        out = self.inner.step(x, *args, **kwargs)
        self.clock.stop(mark)
        return out

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes of keys/values the cache holds at the end, bytes it allocated)."""
        c = self.cache
        if c is None:
            return 0, 0
        alloc = sum(t.element_size() * t.numel() for t in c.k + c.v)
        return alloc * c.length // c.max_len, alloc


class _TimedHARTHead(HARTHead):
    """HART's head that also times its residual diffusion (the per-token MLP over all sampling steps)."""

    clock: SpanClock | None = None

    @property
    def head_seconds(self) -> float:
        return 0.0 if self.clock is None else self.clock.total()

    def last_scale_residual(
        self, idx_Bl: torch.Tensor, stage: int, num_stages: int, rows_Bl: torch.Tensor | None = None
    ) -> Any:
        if self.clock is None:
            self.clock = SpanClock(idx_Bl.device)
        mark = self.clock.start()
        out = super().last_scale_residual(idx_Bl, stage, num_stages, rows_Bl)
        self.clock.stop(mark)
        return out


class _VARRunner:
    """Class-conditional VAR generation with random labels."""

    def __init__(self, sc: Scenario, device: str, batch: int, seed: int) -> None:
        self.pipe = sc.build().to(device)
        self.device = self.pipe.device
        self.labels = torch.randint(
            0, self.pipe.num_classes, (batch,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        self.cfg = self.pipe.transformer.cfg
        self.rows = 2 if sc.cfg > 0 else 1
        self.depth = self.full_depth = self.cfg.depth

    def generate(self, s: Setting, seed: int, policy: Any) -> tuple[GenerationOutput, _Probe, float]:
        probe = _Probe(self.pipe.transformer)
        self.pipe.transformer = probe  # type: ignore[assignment]
        try:
            out = self.pipe.generate(self.labels, seed=seed, policy=policy)
        finally:
            self.pipe.transformer = probe.inner
        return out, probe, 0.0

    def flops(self, s: Setting, per_stage: list[float], depth: int | None = None) -> float:
        return transformer_flops(self.cfg, per_stage, self.rows)


class _InfinityRunner:
    """Infinity generation (as ``InfinityPipeline.generate``: constant CFG and tau on logits) from fixed
    random text features, so the bench can hold the bound transformer and its cache."""

    def __init__(self, sc: InfinityScenario, device: str, batch: int, seed: int) -> None:
        grids, ref = schedule_for(sc.h_div_w, sc.resolution)
        mult = sc.vae_ch_mult
        vae_cfg = BSQConfig(
            codebook_dim=sc.codebook_dim,
            base_ch=sc.vae_ch,
            encoder_ch_mult=mult,
            decoder_ch_mult=mult,
            num_res_blocks=sc.vae_res_blocks,
            patch_size=2 ** (len(mult) - 1),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.vae = BSQVAE(vae_cfg).eval().to(device)
            self.model = Infinity(sc.config()).eval().to(device)
        self.sc = sc
        self.device = next(self.model.parameters()).device
        self.run = self.model.bind(grids, ref)
        self.stages = self.vae.stages(grids)
        g = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(batch, sc.text_len, sc.text_channels, generator=g).to(self.device)
        self.lens = torch.full((batch,), sc.text_len, dtype=torch.long)
        self.labels = None
        self.rows = 2 if sc.cfg != 1 else 1
        self.depth, self.full_depth = sc.depth, sc.full_depth

    @torch.no_grad()
    def generate(self, s: Setting, seed: int, policy: Any) -> tuple[GenerationOutput, _Probe, float]:
        sc, S = self.sc, len(self.run.schedule)
        probe = _Probe(self.run)
        cfg_l = [sc.cfg] * S
        cond = self.model.condition_text(self.feats, self.lens, guided=self.rows == 2, cfg=tuple(cfg_l))
        head = BitwiseHead(probe, cfg_l, [sc.tau] * S, top_k=sc.top_k, top_p=sc.top_p)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(probe, self.stages, condition=cond, head=head, policy=policy, generator=gen)
        return out, probe, 0.0

    def flops(self, s: Setting, per_stage: list[float], depth: int | None = None) -> float:
        return infinity_flops(self.sc.config(depth), per_stage, self.rows, self.sc.text_len)


class _HARTRunner:
    """HART generation through ``HARTPipeline.generate`` from fixed random text features (``text_len`` real
    tokens, the rest padding as upstream pads to ``context_token``)."""

    def __init__(self, sc: HARTScenario, device: str, batch: int, seed: int) -> None:
        from .models.hart_pipeline import HARTSpec, build_hart_pipeline

        tok = MSVQConfig(
            vocab_size=sc.vocab_size,
            z_channels=sc.z_channels,
            ch=sc.vae_ch,
            ch_mult=sc.vae_ch_mult,
            patch_nums=sc.patch_nums,
            groupnorm_groups=sc.vae_groups,
        )
        with torch.random.fork_rng(devices=[]):
            self.pipe = build_hart_pipeline(HARTSpec(sc.name, sc.description, tok, sc.config())).to(device)
        self.sc = sc
        self.device = self.pipe.device
        g = torch.Generator().manual_seed(seed)
        feats = torch.randn(batch, sc.context_token, sc.context_dim, generator=g)
        mask = (torch.arange(sc.context_token) < sc.text_len).long().expand(batch, -1).clone()
        self.text = TextFeatures(feats, mask).to(self.device)
        self.labels = None
        self.rows = 2 if sc.cfg > 0 else 1
        self.depth, self.full_depth = sc.depth, sc.full_depth

    def generate(self, s: Setting, seed: int, policy: Any) -> tuple[GenerationOutput, _Probe, float]:
        probe = _Probe(self.pipe.transformer)
        heads: list[_TimedHARTHead] = []

        def factory(*args: Any, **kwargs: Any) -> _TimedHARTHead:
            heads.append(_TimedHARTHead(*args, **kwargs))
            return heads[-1]

        self.pipe.transformer = probe  # type: ignore[assignment]
        try:
            out = self.pipe.generate(
                text=self.text,
                seed=seed,
                cfg=self.sc.cfg,
                excluded=s.options.get("excluded", "skip"),
                policy=policy,
                head_factory=factory,
            )
        finally:
            self.pipe.transformer = probe.inner
        return out, probe, heads[0].head_seconds

    def flops(self, s: Setting, per_stage: list[float], depth: int | None = None) -> float:
        l = self.sc.patch_nums[-1] ** 2
        head_tokens = l if s.options.get("excluded") == "cond" else per_stage[-1]
        return hart_flops(self.sc.config(depth), per_stage, self.rows, head_tokens)


@dataclass
class Setting:
    """One method at one setting of its knobs (``options``: family-level options, e.g. HART's excluded)."""

    method: str
    label: str
    knobs: dict[str, Any] = field(default_factory=dict)
    mode: str = "default"  # "dense", "disabled", "threshold", "budget" or "default"
    options: dict[str, Any] = field(default_factory=dict)


def plan_settings(
    methods: list[str], taus: list[float], budgets: list[float], signal: str = "dF"
) -> list[Setting]:
    """Dense first, then SparseVAR (disabled check, τ sweep, budgets) and FastVAR (paper ratios, budgets).

    ``signal`` is SparseVAR's exclusion signal for every setting: the probe block's ΔF (the paper) or the
    previous stage's entropy, which taps no block but takes a softmax over the vocabulary per token.
    """
    if signal not in SIGNALS:
        raise InvalidOption(f"--signal must be one of {', '.join(SIGNALS)}, got '{signal}'")
    if signal != "dF" and "sparsevar" not in methods:
        raise InvalidOption(
            f"--signal {signal} applies to the sparsevar method, which --methods does not name"
        )
    sv = {} if signal == "dF" else {"signal": signal}
    tag = "" if signal == "dF" else f" signal={signal}"
    known = {"dense", "sparsevar", "fastvar", "farskip"}
    bad = [m for m in methods if m not in known]
    if bad:
        raise InvalidOption(f"unknown bench method {', '.join(bad)} (choose from dense, sparsevar, fastvar)")
    for t in taus:
        if not 0 <= t <= 1:
            raise InvalidOption(f"--taus values must be in [0, 1], got {t}")
    for b in budgets:
        if not 0 < b <= 1:
            raise InvalidOption(f"--budgets values must be in (0, 1], got {b}")
    out = [Setting("dense", "dense", mode="dense")]
    if "sparsevar" in methods:
        out.append(Setting("sparsevar", f"sparsevar tau=0{tag} (disabled)", {"tau": 0.0, **sv}, "disabled"))
        out += [
            Setting("sparsevar", f"sparsevar tau={t:g}{tag}", {"tau": t, **sv}, "threshold") for t in taus
        ]
        out += [
            Setting("sparsevar", f"sparsevar keep={b:g}{tag}", {"keep": b, **sv}, "budget") for b in budgets
        ]
    if "farskip" in methods:
        out.append(Setting("farskip", "farskip tau=0 (disabled)", {"tau": 0.0}, "disabled"))
        out += [Setting("farskip", f"farskip tau={t:g}", {"tau": t}, "threshold") for t in taus]
        out += [Setting("farskip", f"farskip keep={b:g}", {"keep": b}, "budget") for b in budgets]
    if "fastvar" in methods:
        out.append(Setting("fastvar", "fastvar (paper ratios)", {}, "default"))
        out += [Setting("fastvar", f"fastvar keep={b:g}", {"keep": b}, "budget") for b in budgets]
    return out


def expand_excluded(settings: list[Setting], options: tuple[str, ...]) -> list[Setting]:
    """Every sparse setting once per excluded-token option (HART); dense and the disabled check once."""
    out = []
    for s in settings:
        if s.mode in ("dense", "disabled"):
            out.append(s)
            continue
        out += [Setting(s.method, f"{s.label} [{o}]", s.knobs, s.mode, {"excluded": o}) for o in options]
    return out


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakMemory:
    """Peak memory of one run: CUDA's max allocated, or on CPU the process RSS sampled every 5 ms from a
    helper thread (freed heap trimmed first, so the previous run's peak does not carry over)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "run_peak_rss_sampled"
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        base = _rss_bytes()
        if base is None:
            self.kind = "process_peak_rss"
            return self
        self.base = self.peak = base
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(
    scenario: Scenario | InfinityScenario | HARTScenario,
    *,
    methods: list[str],
    taus: list[float],
    budgets: list[float],
    runs: int = 3,
    seed: int = 0,
    batch: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 1,
    log: Any = None,
    signal: str = "dF",
) -> dict:
    """Run every setting ``runs`` times, interleaved (run r of every setting before run r+1), same seed."""
    if runs < 1:
        raise InvalidOption(f"--runs must be >= 1, got {runs}")
    if batch < 1:
        raise InvalidOption(f"--batch must be >= 1, got {batch}")
    if threads is not None:
        if threads < 1:
            raise InvalidOption(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    settings = plan_settings(methods, taus, budgets, signal)
    far = scenario.family == "far"
    wrong = [m for m in methods if m != "dense" and (m == "farskip") != far]
    if wrong:
        raise InvalidOption(
            f"method {', '.join(wrong)} does not apply to the {scenario.family} scenario '{scenario.name}' "
            f"(FAR scenarios take dense,farskip; the others dense,sparsevar,fastvar)"
        )
    if isinstance(scenario, HARTScenario):
        settings = expand_excluded(settings, scenario.excluded)
    runner = scenario.runner(device, batch, seed)
    dev = runner.device
    S = len(scenario.patch_nums)

    def once(s: Setting) -> tuple[Any, _Probe, float, float]:
        pol = None if s.method == "dense" else TimedPolicy(make_policy(s.method, **s.knobs), dev)
        out, probe, head_s = runner.generate(s, seed, pol)
        return out, probe, head_s, (pol.seconds if pol is not None else 0.0)

    for _ in range(warmup):
        once(settings[0])
    n_set = range(len(settings))
    lat: dict[int, list[float]] = {i: [] for i in n_set}
    stage_lat: dict[int, list[list[float]]] = {i: [] for i in n_set}
    over: dict[int, list[float]] = {i: [] for i in n_set}
    step_s: dict[int, list[float]] = {i: [] for i in n_set}
    head_s: dict[int, list[float]] = {i: [] for i in n_set}
    dec_s: dict[int, list[float]] = {i: [] for i in n_set}
    last: dict[int, Any] = {}
    kv: dict[int, tuple[int, int]] = {}
    peaks: dict[int, tuple[float, float]] = {}
    mem_kind = ""
    for r in range(runs):
        for i, s in enumerate(settings):
            with _PeakMemory(dev) as mem:
                out, probe, hs, ov = once(s)
            lat[i].append(out.transformer_seconds)
            stage_lat[i].append(out.stage_seconds)
            over[i].append(ov)
            step_s[i].append(probe.step_seconds)
            head_s[i].append(hs)
            dec_s[i].append(out.decode_seconds)
            peaks[i] = (mem.peak / 2**20, (mem.peak - mem.base) / 2**20)
            mem_kind = mem.kind
            kv[i] = probe.kv_bytes()
            if r == runs - 1:
                last[i] = out
            if log is not None:
                log(f"run {r + 1}/{runs} {s.label}: {out.transformer_seconds:.3f}s")

    dense_out = last[0]
    dense_med = statistics.median(lat[0])
    grids = [h * w for h, w in dense_out.grids]
    P = getattr(runner, "sparse_start", max(1, S - 4))
    full = runner.full_depth
    cut = full != runner.depth
    dense_flops = runner.flops(settings[0], [float(g) for g in grids])
    dense_flops_full = runner.flops(settings[0], [float(g) for g in grids], full)

    def full_depth_latency(i: int) -> float:
        """Latency with the blocks' time scaled from the cut depth to the full one (the rest unchanged)."""
        blocks = statistics.median(step_s[i])
        return statistics.median(lat[i]) + blocks * (full / runner.depth - 1)

    results = []
    for i, s in enumerate(settings):
        out = last[i]
        per_stage = [sum(c) / len(c) for c in out.tokens_computed]  # mean over samples
        med = statistics.median(lat[i])
        flops = runner.flops(s, per_stage)
        speed = dense_med / med
        ideal = dense_flops / flops
        row: dict[str, Any] = {
            "method": s.method,
            "setting": s.label,
            "mode": s.mode,
            "knobs": s.knobs,
            "options": s.options,
            "latency_median_s": med,
            "latency_runs_s": lat[i],
            "speedup_vs_dense": speed,
            "ideal_speedup": ideal,
            "efficiency": speed / ideal,
            "flops": flops,
            "tokens_computed_fraction": sum(per_stage) / sum(grids),
            "tokens_computed_fraction_sparse_stages": sum(per_stage[P:]) / sum(grids[P:]),
            "stage_latency_median_s": [statistics.median(x) for x in zip(*stage_lat[i], strict=True)],
            "stage_tokens": per_stage,
            "blocks_seconds": statistics.median(step_s[i]),
            "peak_memory_mb": peaks[i][0],
            "peak_memory_delta_mb": peaks[i][1],
            "kv_cache_mb": kv[i][0] / 2**20,
            "kv_cache_allocated_mb": kv[i][1] / 2**20,
            "selection_overhead_s": statistics.median(over[i]),
            "selection_overhead_fraction_of_dense": statistics.median(over[i]) / dense_med,
            "psnr_db": _finite(psnr(out.images, dense_out.images)),
            "ssim": ssim(out.images, dense_out.images),
            "token_agreement": token_agreement(out.tokens, dense_out.tokens),
        }
        if isinstance(scenario, HARTScenario):
            row["diffusion_head_seconds"] = statistics.median(head_s[i])
        if scenario.family == "far":  # split: blocks, diffusion head, VAE decode; end-to-end speed-up
            tf_fl, head_fl = runner.flops_split(per_stage)
            e2e = [a + b for a, b in zip(lat[i], dec_s[i], strict=True)]
            e2e_dense = statistics.median([a + b for a, b in zip(lat[0], dec_s[0], strict=True)])
            row["diffusion_head_seconds"] = statistics.median(head_s[i])
            row["decode_seconds"] = statistics.median(dec_s[i])
            row["latency_end_to_end_s"] = statistics.median(e2e)
            row["speedup_end_to_end"] = e2e_dense / statistics.median(e2e)
            row["flops_transformer"], row["flops_diffusion_head"] = tf_fl, head_fl
        if cut:
            speed_full = full_depth_latency(0) / full_depth_latency(i)
            ideal_full = dense_flops_full / runner.flops(s, per_stage, full)
            row["latency_full_depth_est_s"] = full_depth_latency(i)
            row["speedup_full_depth_est"] = speed_full
            row["ideal_speedup_full_depth"] = ideal_full
            row["efficiency_full_depth_est"] = speed_full / ideal_full
        if s.mode == "disabled":
            row["bit_identical_to_dense"] = bool(torch.equal(out.images, dense_out.images)) and all(
                torch.equal(a, b) for a, b in zip(out.tokens, dense_out.tokens, strict=True)
            )
            row["latency_delta_vs_dense"] = med / dense_med - 1.0
        results.append(row)
    return {
        "scenario": {**asdict(scenario), "patch_nums": list(scenario.patch_nums)},
        "family": scenario.family,
        "depth": runner.depth,
        "full_depth": full,
        "sparse_start_stage": P,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "batch": batch,
        "labels": runner.labels,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "peak_memory_kind": mem_kind,
        "dense_flops": dense_flops,
        "dense_flops_full_depth": dense_flops_full,
        "results": results,
    }


# ----- writers -----------------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 2) -> str:
    return "inf" if x is None else f"{x:.{nd}f}"


def markdown_table(report: dict) -> str:
    """The bench results as a Markdown table (one row per method setting)."""
    sc = report["scenario"]
    cut = "full_depth" in report and report["full_depth"] != report.get("depth", report["full_depth"])
    hart = report.get("family") == "hart"
    far = report.get("family") == "far"
    lines = [
        f"### `{sc['name']}`: {sc['description']}",
        "",
        f"{report['runs']} runs (median), batch {report['batch']}, device {report['device']}, "
        f"{report['threads']} thread(s), torch {report['torch']}; "
        f"sparse stages >= {report['sparse_start_stage']} (0-based). "
        "Latency = transformer part (stages + policy + sampling"
        + (" + residual diffusion head" if hart else "")
        + (" + diffusion head; FAR has no KV cache" if far else "")
        + "), decode excluded. KV = keys/values the cache holds at the end; peak = "
        + f"{report.get('peak_memory_kind', '')} during the run.",
        "",
    ]
    head = (
        "| method | setting | latency (s) | speed-up | ideal | efficiency | tokens | sparse-stage tokens "
        "| overhead | KV (MB) | peak mem (MB) | PSNR (dB) | SSIM | token agree |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    if hart:
        head += " head (s) |"
        sep += "---|"
    if far:
        head += " transformer (s) | diffusion head (s) | VAE decode (s) | end-to-end (s) | e2e speed-up |"
        sep += "---|---|---|---|---|"
    if cut:
        D = report["full_depth"]
        head += f" est. speed-up @{D} | ideal @{D} | eff. @{D} |"
        sep += "---|---|---|"
    lines += [head, sep]
    for r in report["results"]:
        line = (
            f"| {r['method']} | {r['setting']} | {r['latency_median_s']:.3f} | {r['speedup_vs_dense']:.2f}x "
            f"| {r['ideal_speedup']:.2f}x | {r['efficiency']:.2f} "
            f"| {100 * r['tokens_computed_fraction']:.1f}% "
            f"| {100 * r['tokens_computed_fraction_sparse_stages']:.1f}% "
            f"| {100 * r['selection_overhead_fraction_of_dense']:.1f}% "
            f"| {r.get('kv_cache_mb', 0.0):.1f} | {r['peak_memory_mb']:.0f} | {_fmt(r['psnr_db'])} "
            f"| {r['ssim']:.3f} | {r['token_agreement']:.3f} |"
        )
        if hart:
            line += f" {r['diffusion_head_seconds']:.2f} |"
        if far:
            line += (
                f" {r['blocks_seconds']:.2f} | {r['diffusion_head_seconds']:.2f} | {r['decode_seconds']:.2f} "
                f"| {r['latency_end_to_end_s']:.2f} | {r['speedup_end_to_end']:.2f}x |"
            )
        if cut:
            line += (
                f" {r['speedup_full_depth_est']:.2f}x | {r['ideal_speedup_full_depth']:.2f}x "
                f"| {r['efficiency_full_depth_est']:.2f} |"
            )
        lines.append(line)
    if cut:
        lines += [
            "",
            f"Depth cut: {report['depth']} of {report['full_depth']} blocks. The @{report['full_depth']} "
            "columns scale the measured block time to the full depth (everything else as measured) and "
            "count the FLOPs of the full depth.",
        ]
    for r in report["results"]:
        if "bit_identical_to_dense" in r:
            lines += [
                "",
                f"Disabled {r['method']} (τ = 0): bit-identical to dense = {r['bit_identical_to_dense']}, "
                f"latency delta {100 * r['latency_delta_vs_dense']:+.1f}%.",
            ]
    return "\n".join(lines) + "\n"


def plot_png(report: dict, path: str | os.PathLike[str]) -> None:
    """Speed-fidelity scatter: speed-up vs token agreement (PSNR is infinite for identical images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dense": "black", "sparsevar": "tab:red", "fastvar": "tab:blue", "farskip": "tab:green"}
    for r in report["results"]:
        c = colours.get(r["method"], "grey")
        marker = "s" if r["mode"] == "budget" else "o"
        y = 60.0 if r["psnr_db"] is None else min(r["psnr_db"], 60.0)
        axes[0].scatter(r["speedup_vs_dense"], y, color=c, marker=marker)
        axes[0].annotate(r["setting"].replace(r["method"] + " ", ""), (r["speedup_vs_dense"], y), fontsize=7)
        axes[1].scatter(r["ideal_speedup"], r["speedup_vs_dense"], color=c, marker=marker)
    top = max(r["ideal_speedup"] for r in report["results"]) * 1.05
    axes[1].plot([1, top], [1, top], "k:", lw=1, label="efficiency 1")
    axes[1].plot([1, top], [0.85, 0.85 * top], "g:", lw=1, label="efficiency 0.85")
    axes[0].set_xlabel("measured speed-up vs dense")
    axes[0].set_ylabel("PSNR vs same-seed dense (dB, capped at 60)")
    axes[1].set_xlabel("ideal speed-up (FLOPs)")
    axes[1].set_ylabel("measured speed-up")
    axes[1].legend(fontsize=8)
    for m, c in colours.items():
        axes[0].scatter([], [], color=c, label=m)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"freqar bench: {report['scenario']['name']} (squares = keep budgets)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """DIR/bench.json, DIR/bench.md and (if matplotlib is installed) DIR/bench.png, each atomically."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "bench.json", report)
    md = markdown_table(report)
    atomic_write(d / "bench.md", lambda p: p.write_text(md))
    paths = [d / "bench.json", d / "bench.md"]
    if plot:
        try:
            plot_png(report, d / "bench.png")
            paths.append(d / "bench.png")
        except ImportError:
            pass
    return paths
