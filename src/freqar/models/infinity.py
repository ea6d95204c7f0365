"""Infinity (FoundationVision/Infinity): bitwise next-scale text-to-image transformer.

Text features (T5) are RMS-normalised, pooled by a learned query into the start token and the shared AdaLN
condition, and projected into the cross-attention memory of every block. Blocks run cosine self-attention
with a 2-D rotary embedding whose positions are normalised to the template's largest grid, then
cross-attention over the prompt (key-padding mask, so prompts of any length share a batch), then an FFN.
The head predicts two logits per bit. Parameter names follow the released checkpoints (``block_chunks``
layout) so ``infinity_2b_reg.pth`` loads key for key; no cache, RNG or schedule lives on a module —
``InfinityStages`` binds the model to one scale schedule for one call.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import KVCache
from ..errors import CheckpointMismatch, InvalidOption
from ..interfaces import StepOutput
from ..tokenizers.bsq import validate_schedule
from .var import FFN, HeadNorm

# Aspect templates (h/w -> 13 grids of the "1M" schedule, VAE stride 16), as in upstream's dynamic_resolution.
_BASE_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16),
            (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16),
            (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15),
            (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14),
            (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12),
            (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11),
            (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10),
            (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9),
            (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}  # fmt: skip
RESOLUTIONS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def templates() -> dict[float, tuple[tuple[int, int], ...]]:
    """All 15 templates: the 8 above plus each non-square one transposed (key ``int(1/r*1000)/1000``)."""
    out = dict(_BASE_TEMPLATES)
    for r, grids in _BASE_TEMPLATES.items():
        if r != 1.0:
            out[int(1 / r * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


def nearest_template(h_div_w: float) -> float:
    """The template closest to the requested height/width ratio (upstream's argmin rule)."""
    if not (h_div_w > 0 and math.isfinite(h_div_w)):
        raise InvalidOption(f"h/w ratio must be a positive number, got {h_div_w}")
    keys = list(templates())
    return min(keys, key=lambda t: abs(h_div_w - t))


def schedule_for(h_div_w: float, resolution: str = "1M", exact: bool = False) -> tuple[list, tuple[int, int]]:
    """(scale schedule [(h, w)...], RoPE reference grid) of a template and resolution preset.

    ``exact`` requires ``h_div_w`` to be a template key (within 1e-3) instead of snapping to the nearest.
    """
    if resolution not in RESOLUTIONS:
        raise InvalidOption(f"unknown resolution '{resolution}' (choose from: {', '.join(RESOLUTIONS)})")
    t = nearest_template(h_div_w)
    if exact and abs(t - h_div_w) > 1e-3:
        keys = ", ".join(f"{k:g}" for k in sorted(templates()))
        raise InvalidOption(f"unknown h/w template {h_div_w:g} (templates: {keys})")
    grids = templates()[t]
    return list(grids[: RESOLUTIONS[resolution]]), grids[-1]


@dataclass(frozen=True)
class InfinityConfig:
    """Transformer hyper-parameters; defaults are Infinity-2B (32 x 2048, 16 heads, d=32 bits)."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    block_chunks: int = 8
    text_channels: int = 2048
    text_maxlen: int = 512
    codebook_dim: int = 32  # bits per token: the VAE's d (x4 with 8B's 2x2 spatial patchify)
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_max_grid: int = 128
    lvl_embed_rows: int = 15

    def __post_init__(self) -> None:
        if self.depth < 1 or self.embed_dim < 1 or self.num_heads < 1:
            raise InvalidOption("infinity depth, embed_dim and num_heads must be >= 1")
        if self.embed_dim % self.num_heads or self.head_dim % 4:
            raise InvalidOption(
                f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head dim divisible by 4"
            )
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            raise InvalidOption(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.pool_heads < 1 or self.embed_dim % self.pool_heads:
            raise InvalidOption(
                f"text_channels {self.text_channels} gives {self.pool_heads} pooling heads; they must "
                f"divide embed_dim {self.embed_dim}"
            )
        if self.ffn_hidden < 1:
            raise InvalidOption(f"FFN width round({self.embed_dim}*{self.mlp_ratio}/256)*256 is 0")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def pool_heads(self) -> int:
        return self.text_channels // (64 if self.embed_dim > 4096 else 128)

    @property
    def vocab(self) -> int:
        return 2 * self.codebook_dim

    def to_dict(self) -> dict:
        return asdict(self)


# ----- rotary embedding ------------------------------------------------------------------------------
def rope_angles(cfg: InfinityConfig, grid: tuple[int, int], ref: tuple[int, int]) -> torch.Tensor:
    """Angles (h·w, head_dim/2) of one scale: row angles then column angles per token, positions
    ``round(i·H_ref/h)`` in float32 (half-to-even), exactly as upstream's cached grid map."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    h, w = grid
    H, W = ref
    ys = (torch.arange(h) * (H / h)).round().int()
    xs = (torch.arange(w) * (W / w)).round().int()
    if int(ys.max()) >= cfg.rope_max_grid or int(xs.max()) >= cfg.rope_max_grid:
        raise InvalidOption(f"RoPE reference grid {ref} exceeds the {cfg.rope_max_grid}-cell rope table")
    fy = torch.outer(ys.float(), inv_freq)  # (h, half/2)
    fx = torch.outer(xs.float(), inv_freq)  # (w, half/2)
    return torch.cat((fy[:, None, :].expand(h, w, -1), fx[None, :, :].expand(h, w, -1)), dim=-1).reshape(
        h * w, -1
    )


def apply_rope(x_RHnc: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2p], x[2p+1]) by angle p."""
    x = x_RHnc.reshape(*x_RHnc.shape[:-1], -1, 2)
    a, b = x[..., 0], x[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).reshape(x_RHnc.shape)


# ----- modules -----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x·rsqrt(mean x² + eps)·w (upstream's pure-PyTorch FastRMSNorm), computed in float32."""

    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


class SelfAttention(nn.Module):
    """Cosine attention (per-head learned log-scale, clamped at ln 100; softmax scale 1) with 2-D RoPE."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.H, self.c = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer(
            "zero_k_bias", torch.zeros(C)
        )  # a buffer upstream; checkpoints may hold any value
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100.0)
        self.proj = nn.Linear(C, C)

    def qkv(self, x_RnC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        R, n, C = x_RnC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_RnC, self.mat_qkv.weight, bias).view(R, n, 3, self.H, self.c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (R, H, n, c)
        mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(mul)
        k = F.normalize(k, dim=-1, eps=1e-12)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        R, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(R, n, -1))


class CrossAttention(nn.Module):
    """Softmax attention over text tokens (scale 1/√c); K has no bias, V has ``v_bias``.

    With ``pool`` the query is one learned vector per head (``mat_q`` parameter): the text pooling.
    """

    def __init__(self, q_dim: int, kv_dim: int, heads: int, pool: bool = False) -> None:
        super().__init__()
        self.H, self.c = heads, q_dim // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.c))
        else:
            self.mat_q = nn.Linear(q_dim, q_dim)
        self.pool = pool
        self.mat_kv = nn.Linear(kv_dim, 2 * q_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(q_dim))
        self.register_buffer("zero_k_bias", torch.zeros(q_dim))
        self.proj = nn.Linear(q_dim, q_dim)

    def forward(self, x_RnC: torch.Tensor | None, mem_RTD: torch.Tensor, mask_RT: torch.Tensor | None):
        R, T, _ = mem_RTD.shape
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        kv = F.linear(mem_RTD, self.mat_kv.weight, bias).view(R, T, 2, self.H, self.c)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (R, H, T, c)
        if self.pool:
            q = self.mat_q.unsqueeze(2).expand(R, -1, 1, -1)  # (R, H, 1, c)
        else:
            assert x_RnC is not None
            q = self.mat_q(x_RnC).view(R, -1, self.H, self.c).transpose(1, 2)
        mask = None if mask_RT is None else mask_RT[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.c))
        return self.proj(out.transpose(1, 2).reshape(R, q.shape[2], -1))


class TextAttentivePool(nn.Module):
    """Start token / AdaLN condition: a learned query per head attends over the prompt (``ca.*`` keys)."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.pool_heads, pool=True)

    def forward(self, kv_RTD: torch.Tensor, mask_RT: torch.Tensor | None) -> torch.Tensor:
        return self.ca(None, kv_RTD, mask_RT).squeeze(1)


class CrossAttnBlock(nn.Module):
    """x += γ1·SA(LN(x)(1+s1)+β1); x += CA(LN_affine(x), text); x += γ2·FFN(LN(x)(1+s2)+β2)."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.sa = SelfAttention(cfg)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)

    def forward(
        self,
        x: torch.Tensor,
        cond: InfinityCondition,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond.gss).unbind(2)
        assert cond.rope is not None
        q, k, v = self.sa.qkv(self.ln(x).mul(s1.add(1)).add_(b1), *cond.rope)
        if cache is not None:
            k, v, mask = cache.append_and_get(layer, k, v)
        x = x + self.sa.attend(q, k, v, mask).mul_(g1)
        x = x + self.ca(self.ca_norm(x), cond.text_RTC, cond.text_mask)
        return x + self.ffn(self.ln(x).mul(s2.add(1)).add_(b2)).mul(g2)


class _Chunk(nn.Module):
    """``block_chunks.{c}.module.{j}``: the released checkpoints' grouping of blocks."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


@dataclass
class InfinityCondition:
    """Per-call conditioning rows ([0:B] prompts, [B:2B] null text when guided) and per-stage state.

    ``rope`` (cos, sin) of the tokens of the current stage is set by ``stage_input`` (it depends on the
    positions a token policy selected); ``cfg_layers``/``cfg`` drive CFG on hidden states (upstream's
    negative ``cfg_insertion_layer``).
    """

    batch: int
    guided: bool
    cond_RD: torch.Tensor
    gss: torch.Tensor
    text_RTC: torch.Tensor
    text_mask: torch.Tensor | None
    lens: torch.Tensor
    cfg: tuple[float, ...] = ()
    cfg_layers: tuple[int, ...] = ()
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    stage: int = 0
    extra: dict = field(default_factory=dict)


class Infinity(nn.Module):
    """The Infinity backbone (weights only); ``bind(schedule)`` gives the engine-facing transformer."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, Ct5 = cfg.embed_dim, cfg.text_channels
        self.depth = cfg.depth
        init_std = math.sqrt(1 / C / 3)
        g = torch.Generator().manual_seed(0)  # upstream's fixed init of the null text
        uncond = torch.empty(cfg.text_maxlen, Ct5)
        nn.init.trunc_normal_(uncond, std=1.2, generator=g)
        self.cfg_uncond = nn.Parameter(uncond / Ct5**0.5)
        self.text_norm = RMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(cfg.lvl_embed_rows, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)
        self.word_embed = nn.Linear(cfg.codebook_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        blocks = [CrossAttnBlock(cfg) for _ in range(cfg.depth)]
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            [_Chunk(blocks[i * per : (i + 1) * per]) for i in range(cfg.block_chunks)]
        )
        self.blocks_in_order = blocks  # plain list: the same modules, registered once under block_chunks
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab)

    # ----- conditioning ------------------------------------------------------------------------------
    def condition_text(
        self,
        features_BTC: torch.Tensor,
        lens_B: torch.Tensor,
        *,
        guided: bool,
        cfg: tuple[float, ...] = (),
        cfg_layers: tuple[int, ...] = (),
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> InfinityCondition:
        """Prompt features (B, T, Ct5), padded, with lengths (B,) -> conditioning rows for one call.

        Guided: the unconditional half is ``cfg_uncond[:len_b]`` per prompt (same length as the prompt),
        or the ``negative`` prompt's features.
        """
        feats, lens = self._check_text(features_BTC, lens_B, "prompt")
        B = feats.shape[0]
        if guided:
            if negative is None:
                un = torch.zeros_like(feats)
                for b, n in enumerate(lens.tolist()):
                    un[b, :n] = self.cfg_uncond[:n].to(un.dtype)
                un_lens = lens
            else:
                un, un_lens = self._check_text(*negative, "negative prompt")
                if un.shape[0] != B:
                    raise InvalidOption(f"{un.shape[0]} negative prompts for a batch of {B}")
            T = max(feats.shape[1], un.shape[1])
            feats = torch.cat(
                (F.pad(feats, (0, 0, 0, T - feats.shape[1])), F.pad(un, (0, 0, 0, T - un.shape[1])))
            )
            lens = torch.cat((lens, un_lens))
        T = feats.shape[1]
        mask = torch.arange(T, device=feats.device)[None, :] < lens[:, None]
        text_mask = None if bool(mask.all()) else mask
        kv = self.text_norm(feats)
        cond_RD = self.text_proj_for_sos(kv, text_mask)
        text = self.text_proj_for_ca(kv)
        gss = self.shared_ada_lin(cond_RD.float()).view(-1, 1, 6, self.cfg.embed_dim)
        return InfinityCondition(
            B, guided, cond_RD, gss, text, text_mask, lens, tuple(cfg), tuple(cfg_layers)
        )

    def _check_text(
        self, feats: torch.Tensor, lens: torch.Tensor, what: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.pos_start.device
        feats = feats.to(dev, torch.float32)
        lens = torch.as_tensor(lens, dtype=torch.long).to(dev).view(-1)
        if feats.ndim != 3 or feats.shape[-1] != self.cfg.text_channels:
            raise InvalidOption(
                f"{what} features must be (B, T, {self.cfg.text_channels}), got {tuple(feats.shape)}"
            )
        if lens.shape[0] != feats.shape[0] or feats.shape[0] < 1:
            raise InvalidOption(f"{lens.shape[0]} {what} lengths for {feats.shape[0]} feature rows")
        if bool((lens < 1).any()) or bool((lens > feats.shape[1]).any()):
            raise InvalidOption(f"{what} lengths {lens.tolist()} must be in [1, {feats.shape[1]}]")
        if int(lens.max()) > self.cfg.text_maxlen:
            raise InvalidOption(
                f"{what} of {int(lens.max())} tokens is longer than text_maxlen {self.cfg.text_maxlen}"
            )
        return feats, lens

    def bind(self, schedule: list[tuple[int, int]], rope_ref: tuple[int, int]) -> InfinityStages:
        return InfinityStages(self, schedule, rope_ref)

    def logits(self, hidden_RnC: torch.Tensor, cond_RD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(hidden_RnC.float(), cond_RD.float())).float()

    # ----- training / teacher forcing ----------------------------------------------------------------
    def forward(
        self,
        features_BTC: torch.Tensor,
        lens_B: torch.Tensor,
        x_BLd_wo_first: torch.Tensor,
        schedule: list[tuple[int, int]],
        rope_ref: tuple[int, int],
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, 2d) with the block-causal mask (prompt dropout: the trainer's job)."""
        run = self.bind(schedule, rope_ref)
        cond = self.condition_text(features_BTC, lens_B, guided=False)
        B = cond.batch
        sos = cond.cond_RD.unsqueeze(1) + self.pos_start
        x = torch.cat((sos, self.word_embed(x_BLd_wo_first.float())), dim=1)
        lvl = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(run.schedule)]).to(x.device)
        x = x + self.lvl_embed(lvl)[None]
        ang = torch.cat(run.angles, dim=0).to(x.device)
        cond.rope = (ang.cos()[None, None], ang.sin()[None, None])
        mask = lvl[:, None] >= lvl[None, :]
        for blk in self.blocks_in_order:
            x = blk(x, cond, mask=mask)
        return self.logits(x, cond.cond_RD[:B])

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load an upstream state dict: either block layout, ``scale_mul_1H11`` in either stored shape,
        ``cfg_uncond`` cut/padded to text_maxlen, derived buffers dropped."""
        from ..io import load_state_dict_strict

        if "cfg_uncond" not in state and "text_norm.weight" not in state:
            fam = (
                "a VAR checkpoint"
                if "class_emb.weight" in state
                else "not an Infinity text-to-image checkpoint"
            )
            raise CheckpointMismatch(f"'{source}' is {fam} (no cfg_uncond / text_norm keys)")
        per = self.cfg.depth // self.cfg.block_chunks
        out: dict[str, torch.Tensor] = {}
        H = self.cfg.num_heads
        for k, v in state.items():
            m = re.match(r"^(?:block_chunks\.(\d+)\.module\.(\d+)|blocks\.(\d+))\.(.*)$", k)
            if m:
                i = int(m.group(3)) if m.group(3) is not None else int(m.group(1)) * per + int(m.group(2))
                rest = m.group(4)
                if rest == "sa.scale_mul_1H11" and tuple(v.shape) == (1, 1, H, 1):
                    v = v.reshape(1, H, 1, 1)
                k = f"block_chunks.{i // per}.module.{i % per}.{rest}"
            elif k in (
                "lvl_1L",
                "attn_bias_for_masking",
                "Infinity_visible_kvlen",
                "Infinity_invisible_qlen",
            ):
                continue
            out[k] = v
        if "cfg_uncond" in out:
            old, new = out["cfg_uncond"], self.cfg_uncond.detach().cpu()
            if old.ndim == 2 and old.shape[1] == new.shape[1] and old.shape[0] != new.shape[0]:
                n = min(old.shape[0], new.shape[0])
                out["cfg_uncond"] = torch.cat((old[:n].to(new.dtype), new[n:]))
        load_state_dict_strict(self, out, source=source)


class InfinityStages:
    """The transformer bound to one scale schedule (the engine's ``Transformer``): RoPE angles per
    stage from the template's reference grid, cache sized to the schedule."""

    def __init__(self, model: Infinity, schedule: list[tuple[int, int]], rope_ref: tuple[int, int]) -> None:
        self.model = model
        self.cfg = model.cfg
        self.depth = model.depth
        self.schedule = validate_schedule(schedule)
        if len(self.schedule) > model.cfg.lvl_embed_rows:
            raise InvalidOption(
                f"{len(self.schedule)} scales exceed the {model.cfg.lvl_embed_rows} level embeddings"
            )
        self.rope_ref = (int(rope_ref[0]), int(rope_ref[1]))
        self.angles = [rope_angles(model.cfg, g, self.rope_ref) for g in self.schedule]
        self._trig: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.L = sum(h * w for h, w in self.schedule)

    def parameters(self):
        return self.model.parameters()

    def condition(self, labels_B: torch.Tensor, guided: bool) -> InfinityCondition:
        raise InvalidOption("Infinity is text-conditioned: pass prompts or text features, not class labels")

    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return KVCache(
            depth=self.depth,
            rows=rows,
            heads=self.cfg.num_heads,
            head_dim=self.cfg.head_dim,
            max_len=self.L,
            dtype=dtype,
            device=device,
        )

    def _stage_trig(self, stage: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._trig is None or self._trig[0][0].device != device:
            self._trig = [(a.to(device).cos(), a.to(device).sin()) for a in self.angles]
        return self._trig[stage]

    def stage_input(
        self,
        cond: InfinityCondition,
        tokens_BnD: torch.Tensor | None,
        positions_Bn: torch.Tensor | None,
        stage: int,
    ) -> torch.Tensor:
        """Input rows (R, n, C) of a stage at the given positions; also sets the stage's RoPE on ``cond``."""
        m = self.model
        R, B = cond.cond_RD.shape[0], cond.batch
        lvl = m.lvl_embed.weight[stage]
        cos, sin = self._stage_trig(stage, cond.cond_RD.device)
        if positions_Bn is None:
            cond.rope = (cos[None, None], sin[None, None])
        else:
            idx = positions_Bn.repeat(R // B, 1)
            cond.rope = (cos[idx].unsqueeze(1), sin[idx].unsqueeze(1))
        cond.stage = stage
        if stage == 0:
            x = cond.cond_RD.unsqueeze(1) + m.pos_start
            if positions_Bn is not None:
                x = x.expand(R, positions_Bn.shape[1], -1)
            return x + lvl
        assert tokens_BnD is not None
        x = m.word_embed(tokens_BnD.float())
        return x.repeat(R // x.shape[0], 1, 1) + lvl

    def step(
        self, x_RnC: torch.Tensor, cond: InfinityCondition, cache: KVCache, taps: tuple[int, ...] = ()
    ) -> StepOutput:
        """All blocks over this stage's tokens (keys/values appended to ``cache``); CFG on hidden states
        after the blocks listed in ``cond.cfg_layers``."""
        tapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        B = cond.batch
        w = cond.cfg[cond.stage] if cond.cfg else 1.0
        for i, blk in enumerate(self.model.blocks_in_order):
            x_in = x_RnC
            x_RnC = blk(x_RnC, cond, cache=cache, layer=i)
            if w != 1 and cond.guided and i in cond.cfg_layers:
                mixed = w * x_RnC[:B] + (1 - w) * x_RnC[B:]
                x_RnC = torch.cat((mixed, mixed), dim=0)
            if i in taps:
                tapped[i] = (x_in, x_RnC)
        return StepOutput(x_RnC, tapped)

    def logits(self, hidden_RnC: torch.Tensor, cond: InfinityCondition) -> torch.Tensor:
        """Bit logits (R, n, 2d): pair (2j, 2j+1) = bit j being 0 / 1."""
        return self.model.logits(hidden_RnC, cond.cond_RD)
