"""HART transformer (mit-han-lab/hart ``HARTForT2I``): VAR with a text prefix, Llama blocks, residual head.

Module and parameter names follow the released ``llm/`` checkpoint so its state dict loads key for key. What
upstream does with a CUDA extension (RMSNorm, RoPE) is plain PyTorch here. As in ``models/var.py`` no cache,
RNG or flag lives on a module: the KV cache is an argument of ``step``, and the per-stage RoPE tables travel
on the per-call condition object (``stage_input`` computes them for exactly the positions being run,
which is how a token policy can run a subset of a scale at its true 2-D positions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import KVCache
from ..errors import CheckpointMismatch, InvalidOption
from ..heads.diffusion_mlp import DiffusionMLP, DiffusionMLPConfig
from ..interfaces import StepOutput
from ..tokenizers.msvq import validate_patch_nums


@dataclass(frozen=True)
class HARTConfig:
    """Transformer hyper-parameters (upstream ``HARTForT2IConfig`` names); the llama/no-cross-attn variant."""

    context_token: int = 300
    context_dim: int = 1536
    depth: int = 16
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = False
    sep_aln_pooling_mode: str = "max"
    use_context_norm: bool = False
    context_norm_scale: float = 1.0
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    vocab_size: int = 4096
    z_channels: int = 32
    rope_theta: float = 10000.0
    diffusion_steps: int = 1000
    vae_scale: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        object.__setattr__(self, "num_sampling_steps", str(self.num_sampling_steps))
        validate_patch_nums(self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise InvalidOption(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise InvalidOption(
                f"head_dim {self.embed_dim // self.num_heads} must be a multiple of 4 (2-D RoPE)"
            )
        if self.sep_aln_pooling_mode not in ("max", "avg"):
            raise InvalidOption(
                f"sep_aln_pooling_mode must be 'max' or 'avg', got {self.sep_aln_pooling_mode!r}"
            )
        if min(self.depth, self.context_token, self.context_dim) < 1:
            raise InvalidOption("depth, context_token and context_dim must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """Upstream's SwiGLU width: int(C*mlp*2/3 + 255) // 256 * 256."""
        return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def seq_len(self) -> int:
        return self.context_token + self.L - 1

    @property
    def diffusion(self) -> DiffusionMLPConfig:
        return DiffusionMLPConfig(
            token_channels=self.z_channels,
            cond_channels=self.embed_dim,
            width=self.diff_width,
            depth=self.diff_depth,
            diffusion_steps=self.diffusion_steps,
        )

    def to_dict(self) -> dict:
        return asdict(self)


_UNSUPPORTED = {
    "attn_type": "llama",
    "mlp_type": "llama",
    "shared_aln": False,
    "disable_aln": False,
    "use_cross_attn": False,
    "use_timestep_embed": False,
}


def hart_config_from_upstream(c: dict, *, vocab_size: int, z_channels: int, source: str) -> HARTConfig:
    """Our config from an upstream ``config.json`` (``HARTForT2IConfig`` fields); other variants refused."""
    for key, want in _UNSUPPORTED.items():
        if key in c and c[key] != want:
            raise InvalidOption(f"'{source}': {key}={c[key]!r} is not supported (only {want!r})")
    if c.get("sampler", "iddpm") != "iddpm":
        raise InvalidOption(f"'{source}': sampler {c['sampler']!r} is not supported (only 'iddpm')")
    d = HARTConfig()
    try:
        return HARTConfig(
            context_token=int(c.get("context_token", d.context_token)),
            context_dim=int(c.get("context_dim", d.context_dim)),
            depth=int(c.get("depth", d.depth)),
            embed_dim=int(c.get("embed_dim", d.embed_dim)),
            num_heads=int(c.get("num_heads", d.num_heads)),
            mlp_ratio=float(c.get("mlp_ratio", d.mlp_ratio)),
            norm_eps=float(c.get("norm_eps", d.norm_eps)),
            attn_l2_norm=bool(c.get("attn_l2_norm", d.attn_l2_norm)),
            sep_aln_pooling_mode=str(c.get("sep_aln_pooling_mode", d.sep_aln_pooling_mode)),
            use_context_norm=bool(c.get("use_context_norm", d.use_context_norm)),
            context_norm_scale=float(c.get("context_norm_scale", d.context_norm_scale)),
            diff_width=int(c.get("diff_width", d.diff_width)),
            diff_depth=int(c.get("diff_depth", d.diff_depth)),
            num_sampling_steps=str(c.get("num_sampling_steps", d.num_sampling_steps)),
            patch_nums=tuple(c.get("patch_nums", d.patch_nums)),
            vocab_size=vocab_size,
            z_channels=z_channels,
        )
    except (TypeError, ValueError) as e:
        raise InvalidOption(f"'{source}': bad HART config value ({e})") from None


# ----- plain-PyTorch replacements of upstream's CUDA kernels ----------------------------------------------
class RMSNorm(nn.Module):
    """``LlamaRMSNormFused``: x * rsqrt(mean(x^2) + eps) * weight (a weight even when 'non-affine')."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def rope_inv_freq(head_dim: int, step: int, theta: float) -> torch.Tensor:
    """Inverse frequencies as upstream builds them: 1 / theta^(arange(0, d, step)/d) in float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, step, dtype=torch.int64).float() / head_dim))


def rope_1d(pos_RN: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 1-D RoPE tables (R, N, d) for integer positions: angles [f ‖ f] (half-split layout)."""
    inv = rope_inv_freq(head_dim, 2, theta).to(pos_RN.device)
    ang = pos_RN.float().unsqueeze(-1) * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def image_coords(pn: int, side: int, device: torch.device | str) -> torch.Tensor:
    """(pn*pn, 2) fp32 coordinates (i/pn*side, j/pn*side) of a pn x pn grid, row-major (upstream's order)."""
    ar = torch.arange(pn, device=device)
    grid = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), dim=-1)
    return (grid / pn * side).reshape(-1, 2)


def rope_2d(coords_RN2: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HART's 2-D RoPE tables (R, N, d): [row angles x2 | col angles x2], inverse frequencies theta^(-4m/d).

    Applied with the usual ``rotate_half`` this pairs a row-angle slot with a column-angle slot (upstream's
    layout, kept so released weights work).
    """
    inv = rope_inv_freq(head_dim, 4, theta).to(coords_RN2.device)
    ang = coords_RN2.float().unsqueeze(-1) * inv  # R, N, 2, d/4
    emb = torch.cat((ang, ang), dim=-1)  # R, N, 2, d/2
    emb = emb.reshape(*emb.shape[:-2], head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x_RHNd: torch.Tensor, cos_RNd: torch.Tensor, sin_RNd: torch.Tensor) -> torch.Tensor:
    return x_RHNd * cos_RNd.unsqueeze(1) + rotate_half(x_RHNd) * sin_RNd.unsqueeze(1)


# ----- blocks ---------------------------------------------------------------------------------------------
class LlamaAttention(nn.Module):
    """q/v biases with a zero k bias, optional cosine attention, RoPE on q/k, softmax scale 0.25/sqrt(d)."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        R, N, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv_proj.weight, bias).view(R, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(mul)
            k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v, mask = cache.append_and_get(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(R, N, C))


class SwiGLU(nn.Module):
    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(C, hidden, bias=False)
        self.up_proj = nn.Linear(C, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HARTBlock(nn.Module):
    """x += g1*Attn(norm(x)(1+s1)+b1); x += g2*FFN(norm(x)(1+s2)+b2), modulation from the pooled text."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = LlamaAttention(cfg)
        self.ffn = SwiGLU(C, cfg.ffn_hidden)
        self.ln_wo_grad = RMSNorm(C, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, pooled_RC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (R, 1, C)."""
        return tuple(self.ada_lin(pooled_RC.unsqueeze(1)).view(-1, 1, 6, self.C).unbind(2))

    def forward(
        self,
        x: torch.Tensor,
        mods: tuple[torch.Tensor, ...],
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = mods
        a = self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(b1), rope, mask=mask, cache=cache, layer=layer)
        x = x + a.mul_(g1)
        return x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(b2)).mul(g2)


class HeadNorm(nn.Module):
    """``head_nm``: RMSNorm modulated by SiLU->Linear of the max-pooled projected text."""

    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = RMSNorm(C, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, pooled_max_RC: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(pooled_max_RC.unsqueeze(1)).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# ----- conditioning ---------------------------------------------------------------------------------------
@dataclass
class TextFeatures:
    """Prompts as the text encoder saw them: features (B, T, Cctx), mask (B, T), position ids (B, T).

    ``mask`` is 1 on prompt tokens (right padding); ``position_ids`` default to cumsum(mask) - 1, as
    upstream's ``encode_prompts`` (pads repeat the last id).
    Pad features are used as given: upstream never masks them.
    """

    features: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise InvalidOption(f"text features must be (B, T, C), got shape {tuple(self.features.shape)}")
        if tuple(self.mask.shape) != tuple(self.features.shape[:2]):
            raise InvalidOption(
                f"text mask {tuple(self.mask.shape)} does not match features {tuple(self.features.shape)}"
            )
        if self.position_ids is None:
            self.position_ids = self.mask.long().cumsum(1) - 1

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> TextFeatures:
        assert self.position_ids is not None
        return TextFeatures(self.features.to(device), self.mask.to(device), self.position_ids.to(device))


@dataclass
class HARTCondition:
    """Per-call conditioning rows ([cond; uncond] when guided) plus the RoPE tables of the stage being run."""

    ctx_RTC: torch.Tensor
    pooled_blocks: torch.Tensor
    pooled_head: torch.Tensor
    ctx_pos: torch.Tensor
    batch: int
    guided: bool
    mods: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    stage: int = 0
    positions: torch.Tensor | None = None  # (B, n) grid positions run at ``stage`` (None = all)


def pool_context(ctx_RTC: torch.Tensor, mask_RT: torch.Tensor, mode: str) -> torch.Tensor:
    """Upstream ``context_pooling``: max over tokens (pads included), or the mask-weighted mean."""
    if mode == "max":
        return ctx_RTC.max(1).values
    m = mask_RT.unsqueeze(-1)
    x = ctx_RTC * m.to(ctx_RTC.dtype)
    x = x / m.sum(1).clamp_(1).unsqueeze(1)
    return x.sum(1)


class HARTTransformer(nn.Module):
    """The HART backbone, its head, ``decoder_norm`` and the residual diffusion head (``diffloss``)."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.depth = cfg.depth
        self.patch_nums = cfg.patch_nums
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        nn.init.trunc_normal_(self.context_embed.weight, mean=0, std=init_std)
        self.context_norm: nn.Module = (
            RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        )
        if cfg.use_context_norm:
            with torch.no_grad():
                self.context_norm.weight.fill_(cfg.context_norm_scale)  # type: ignore[union-attr]
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)
        self.blocks = nn.ModuleList([HARTBlock(cfg) for _ in range(cfg.depth)])
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = DiffusionMLP(cfg.diffusion)
        lvl = torch.cat(
            [torch.zeros(cfg.context_token, dtype=torch.long)]
            + [torch.full((p * p,), i + 1) for i, p in enumerate(cfg.patch_nums[1:])]
        )
        self.register_buffer("lvl_1L", lvl.view(1, -1), persistent=False)
        self.offsets = [0]
        for p in cfg.patch_nums:
            self.offsets.append(self.offsets[-1] + p * p)

    # ----- text ---------------------------------------------------------------------------------------
    def project_context(self, features_BTC: torch.Tensor) -> torch.Tensor:
        """context_norm (if any) then context_embed: the prefix tokens and the AdaLN pooling source."""
        return self.context_embed(self.context_norm(features_BTC.float()))

    def check_text(self, text: TextFeatures) -> None:
        B, T, Cc = text.features.shape
        if Cc != self.cfg.context_dim:
            raise InvalidOption(f"text features have width {Cc}, the model expects {self.cfg.context_dim}")
        if T != self.cfg.context_token:
            raise InvalidOption(
                f"text features have {T} tokens, the model expects context_token={self.cfg.context_token}"
            )

    def condition(self, text: TextFeatures, guided: bool) -> HARTCondition:
        """Rows [0:B] prompts; guided, [B:2B] zero features, zero position ids, mask = position 0."""
        self.check_text(text)
        feats, mask, pos = text.features.float(), text.mask.long(), text.position_ids
        assert pos is not None
        B = feats.shape[0]
        if guided:
            feats = torch.cat((feats, torch.zeros_like(feats)))
            umask = torch.zeros_like(mask)
            umask[:, 0] = 1
            mask = torch.cat((mask, umask))
            pos = torch.cat((pos, torch.zeros_like(pos)))
        ctx = self.project_context(feats)
        pooled = pool_context(ctx, mask, self.cfg.sep_aln_pooling_mode)
        pooled_head = pooled if self.cfg.sep_aln_pooling_mode == "max" else ctx.max(1).values
        cond = HARTCondition(ctx, pooled, pooled_head, pos.long(), B, guided)
        cond.mods = [blk.modulation(pooled) for blk in self.blocks]
        return cond

    # ----- positions ----------------------------------------------------------------------------------
    def stage_rope(
        self, cond: HARTCondition, stage: int, positions_Bn: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (R, n, d) of a stage: 1-D text ids at stage 0, else 2-D grid + last text id."""
        hd, theta = self.cfg.head_dim, self.cfg.rope_theta
        if stage == 0:
            return rope_1d(cond.ctx_pos, hd, theta)
        pn = self.patch_nums[stage]
        coords = image_coords(pn, self.patch_nums[-1], cond.ctx_pos.device)  # l, 2
        R = cond.ctx_pos.shape[0]
        if positions_Bn is None:
            c = coords.unsqueeze(0).expand(R, -1, -1)
        else:
            c = coords[positions_Bn.repeat(R // positions_Bn.shape[0], 1)]
        c = c + cond.ctx_pos[:, -1].view(R, 1, 1)
        return rope_2d(c, hd, theta)

    def teacher_forcing_rope(self, ctx_pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE over the whole sequence [text; scales 1..S-1] (upstream si = -1)."""
        hd, theta = self.cfg.head_dim, self.cfg.rope_theta
        side = self.patch_nums[-1]
        coords = torch.cat([image_coords(p, side, ctx_pos_BT.device) for p in self.patch_nums[1:]])
        B = ctx_pos_BT.shape[0]
        c = coords.unsqueeze(0).expand(B, -1, -1) + ctx_pos_BT[:, -1].view(B, 1, 1)
        cos_i, sin_i = rope_2d(c, hd, theta)
        cos_t, sin_t = rope_1d(ctx_pos_BT, hd, theta)
        return torch.cat((cos_t, cos_i), 1), torch.cat((sin_t, sin_i), 1)

    # ----- inference ---------------------------------------------------------------------------------
    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return KVCache(
            depth=self.depth,
            rows=rows,
            heads=self.cfg.num_heads,
            head_dim=self.cfg.head_dim,
            max_len=self.cfg.seq_len,
            dtype=dtype,
            device=device,
        )

    def stage_input(
        self,
        cond: HARTCondition,
        tokens_BnCv: torch.Tensor | None,
        positions_Bn: torch.Tensor | None,
        stage: int,
    ) -> torch.Tensor:
        """Input rows (R, n, C); stage 0 is the whole text prefix (its last position predicts scale 0)."""
        cond.stage = stage
        cond.positions = positions_Bn
        cond.rope = self.stage_rope(cond, stage, positions_Bn)
        if stage == 0:
            return cond.ctx_RTC + self.lvl_embed.weight[0]
        assert tokens_BnCv is not None
        x = self.word_embed(tokens_BnCv) + self.lvl_embed.weight[stage]
        R = cond.ctx_RTC.shape[0]
        return x.repeat(R // x.shape[0], 1, 1)

    def step(
        self, x_RnC: torch.Tensor, cond: HARTCondition, cache: KVCache, taps: tuple[int, ...] = ()
    ) -> StepOutput:
        """Run every block over this stage's tokens with the cache; stage 0 returns the last text position."""
        assert cond.rope is not None, "stage_input must run before step"
        tapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, blk in enumerate(self.blocks):
            x_in = x_RnC
            x_RnC = blk(x_RnC, cond.mods[i], cond.rope, cache=cache, layer=i)
            if i in taps:
                tapped[i] = (x_in, x_RnC)
        if cond.stage == 0:
            x_RnC = x_RnC[:, -1:]
        return StepOutput(x_RnC, tapped)

    def logits(self, hidden_RnC: torch.Tensor, cond: HARTCondition) -> torch.Tensor:
        return self.head(self.head_nm(hidden_RnC.float(), cond.pooled_head).float()).float()

    def diffusion_condition(self, hidden_RnC: torch.Tensor, idx_Bn: torch.Tensor, codebook: nn.Embedding):
        """decoder_norm(h + word_embed(emb(idx))), the sampled codes shared by the cond and uncond rows."""
        e = self.word_embed(codebook(idx_Bn))
        return self.decoder_norm(hidden_RnC + e.repeat(hidden_RnC.shape[0] // e.shape[0], 1, 1))

    # ----- training / teacher forcing ----------------------------------------------------------------
    def block_causal_mask(self, device: torch.device | str) -> torch.Tensor:
        """(T+L-1,)^2 bool: level(j) <= level(i); the text prefix is level 0 and bidirectional."""
        lvl = self.lvl_1L[0].to(device)
        return lvl[:, None] >= lvl[None, :]

    def forward_hidden(
        self, text: TextFeatures, x_BLCv_wo_first_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced last-block hidden states (B, T+L-1, C), projected context and the head pooling."""
        self.check_text(text)
        ctx = self.project_context(text.features)
        assert text.position_ids is not None
        x = torch.cat((ctx, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(x.shape[0], -1))
        rope = self.teacher_forcing_rope(text.position_ids.long())
        mask = self.block_causal_mask(x.device)
        pooled = pool_context(ctx, text.mask.long(), self.cfg.sep_aln_pooling_mode)
        for blk in self.blocks:
            x = blk(x, blk.modulation(pooled), rope, mask=mask)
        return x, ctx, ctx.max(1).values

    def forward(
        self, text: TextFeatures, x_BLCv_wo_first_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V) from the last text position on, last-scale hidden states (B, h*w, C))."""
        x, _, pooled_max = self.forward_hidden(text, x_BLCv_wo_first_l)
        T = self.cfg.context_token
        logits = self.head(self.head_nm(x[:, T - 1 :].float(), pooled_max).float()).float()
        return logits, x[:, -(self.patch_nums[-1] ** 2) :]

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_official(self, state: dict[str, Any], source: str) -> None:
        """Load an upstream ``HARTForT2I`` state dict; derived buffers are checked or ignored."""
        from ..io import load_state_dict_strict

        lvl = state.get("lvl_1L")
        if lvl is not None and not torch.equal(lvl.long().cpu(), self.lvl_1L.cpu()):
            raise CheckpointMismatch(
                f"'{source}': buffer lvl_1L {tuple(lvl.shape)} does not match context_token="
                f"{self.cfg.context_token} and the scale schedule {list(self.patch_nums)}"
            )
        if any(k.startswith(("class_emb.", "pos_1LC", "mat_qkv")) or ".attn.mat_qkv." in k for k in state):
            raise CheckpointMismatch(
                f"'{source}' is a VAR checkpoint, not HART (it has class/absolute embeddings)"
            )
        own = self.state_dict()
        state = {k: v for k, v in state.items() if not k.endswith("attn.zero_k_bias")}
        for k in own:
            if k.endswith("attn.zero_k_bias"):
                state[k] = own[k]

        def derived(k: str) -> bool:
            return k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("inv_freq")

        load_state_dict_strict(self, state, source=source, ignore=derived)


# ----- generation: HART's schedules and the stage head ----------------------------------------------------
def hart_ratio(stage: int, num_stages: int) -> float:
    """Upstream's ``ratio`` at a stage: si/(S-1), except that the last stage reuses (S-2)/(S-1)."""
    return min(stage, num_stages - 2) / (num_stages - 1)


def hart_guidance_scales(cfg: float, num_stages: int) -> tuple[float, ...]:
    """t per stage for (1+t)c - t*u: cfg * ratio (0 at scale 0; the last reuses the previous ratio)."""
    return tuple(cfg * hart_ratio(k, num_stages) for k in range(num_stages))


def hart_top_k(stage: int) -> int:
    """Upstream ignores its ``top_k`` argument: 600 below stage 7, 300 from stage 7 on (the last included)."""
    return 600 if stage < 7 else 300


EXCLUDED_OPTIONS = ("skip", "anchor", "cond")
"""What the last-scale residual does for tokens a token policy did not compute (they have no hidden state):
``skip`` no residual (their code only); ``anchor`` they take the code and residual of their anchor; ``cond``
the per-token head runs for them on their anchor's hidden state (with their own code). The anchor is the
policy's: the row a :class:`~freqar.interfaces.StagePrediction` maps the token to (SparseVAR: the most
similar anchor of Eq. 3). A policy that fills a plain tensor instead (FastVAR) gives no map; the nearest
computed token stands in."""


def nearest_computed(positions_Bn: torch.Tensor, side: int) -> torch.Tensor:
    """For each position of a side x side grid, the column (0..n-1) of the nearest computed one (B, l)."""
    ar = torch.arange(side * side, device=positions_Bn.device)
    gy, gx = (ar // side).float(), (ar % side).float()
    py, px = (positions_Bn // side).float(), (positions_Bn % side).float()
    d = (gy[None, :, None] - py[:, None, :]).square() + (gx[None, :, None] - px[:, None, :]).square()
    return d.argmin(dim=2)


@dataclass(frozen=True)
class ResidualConfig:
    """The last-scale residual diffusion: on/off (upstream ``final_stage``) and its temperature."""

    enabled: bool = True
    temperature: float = 1.0
    excluded: str = "skip"

    def __post_init__(self) -> None:
        if self.excluded not in EXCLUDED_OPTIONS:
            raise InvalidOption(
                f"unknown excluded-token option {self.excluded!r} ({', '.join(EXCLUDED_OPTIONS)})"
            )


class HARTHead:
    """Codebook logits with HART's guidance/top-k/smoothing schedules, plus the residual diffusion at the last
    scale, conditioned per token on ``decoder_norm(h + word_embed(emb(idx)))``.

    One head per generation call (it keeps the last hidden states between ``predict`` and ``sample`` and, when
    asked, records the diffusion inputs and outputs). ``diffusion_generator`` drives the diffusion noise, the
    categorical draws use the engine's generator, as upstream's two RNG streams.
    """

    def __init__(
        self,
        transformer: HARTTransformer,
        codebook: nn.Embedding,
        guidance: Any,
        *,
        top_p: float = 0.0,
        smooth: bool = False,
        top_k: Any = hart_top_k,
        temperature: float = 1.0,
        residual: ResidualConfig = ResidualConfig(),
        diffusion_generator: torch.Generator | None = None,
        record: bool = False,
    ) -> None:
        from ..diffusion import GaussianDiffusion

        self.transformer = transformer
        self.codebook = codebook
        self.guidance = guidance
        self.top_p = top_p
        self.smooth = smooth
        self.top_k = top_k
        self.temperature = temperature
        self.residual = residual
        self.diffusion_generator = diffusion_generator
        self.records: dict[str, torch.Tensor] | None = {} if record else None
        cfg = transformer.cfg
        self.process = GaussianDiffusion.respaced(cfg.diffusion.diffusion, cfg.num_sampling_steps)
        self._hidden: torch.Tensor | None = None
        self._cond: HARTCondition | None = None

    def predict(self, hidden_RnC: torch.Tensor, cond: HARTCondition) -> torch.Tensor:
        self._hidden, self._cond = hidden_RnC, cond
        return self.transformer.logits(hidden_RnC, cond)

    def guide(self, pred: torch.Tensor, batch: int, stage: int, num_stages: int) -> torch.Tensor:
        return self.guidance.combine(pred, batch, stage, num_stages)

    def sample(
        self, full: torch.Tensor, stage: int, num_stages: int, generator: torch.Generator | None
    ) -> Any:
        from ..engine.sampling import SamplerConfig, sample_categorical
        from ..interfaces import StagePrediction, StageSample

        ratio = hart_ratio(stage, num_stages)
        sampler = SamplerConfig(
            top_k=int(self.top_k(stage)), top_p=self.top_p, temperature=self.temperature, smooth=self.smooth
        )
        idx, soft = sample_categorical(full, sampler, generator, ratio)
        values = None
        if stage == num_stages - 1 and self.residual.enabled:
            rows = full.src if isinstance(full, StagePrediction) else None
            values, remap = self.last_scale_residual(idx, stage, num_stages, rows)
            if remap is not None:  # "anchor": excluded tokens take their anchor's code
                idx = idx.gather(1, remap)
                if soft is not None:
                    soft = soft.gather(1, remap[..., None].expand(-1, -1, soft.shape[-1]))
        return StageSample(idx=idx, soft=soft, values=values)

    def last_scale_residual(
        self, idx_Bl: torch.Tensor, stage: int, num_stages: int, rows_Bl: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual (B, l, Cvae) of every last-scale token (times ``vae_scale``) and, for the "anchor" option,
        the position each token's code is copied from (None = its own).

        ``rows_Bl``: the policy's map from grid position to computed row (``StagePrediction.src``); without
        it a subset run falls back to the nearest computed token. Positions whose row is not their own
        (excluded, or padding of a ragged selection) follow ``residual.excluded``.
        """
        assert self._hidden is not None and self._cond is not None
        hidden = self._hidden
        B, l = idx_Bl.shape
        pos = self._cond.positions
        src = own = None
        if hidden.shape[1] != l:  # a token policy computed a subset: see EXCLUDED_OPTIONS
            assert pos is not None
            src = rows_Bl if rows_Bl is not None else nearest_computed(pos, self.transformer.patch_nums[-1])
            own = pos.gather(1, src) == torch.arange(l, device=src.device)  # (B, l) computed itself
            R = hidden.shape[0]
            if self.residual.excluded == "cond":
                hidden = hidden.gather(1, src.repeat(R // B, 1)[..., None].expand(-1, -1, hidden.shape[-1]))
                src = None
            else:
                idx_Bl = idx_Bl.gather(1, pos)
        z = self.transformer.diffusion_condition(hidden, idx_Bl, self.codebook)
        z = z.reshape(-1, z.shape[-1])
        t = self.guidance.scale(stage, num_stages) if self._cond.guided else 0.0
        res = sample_residual(
            self.transformer.diffloss,
            self.process,
            z,
            t,
            guided=self._cond.guided,
            temperature=self.residual.temperature,
            generator=self.diffusion_generator,
        )
        n = idx_Bl.shape[1]
        out = res[: B * n].view(B, n, -1) * self.transformer.cfg.vae_scale
        remap = None
        if src is not None and pos is not None and own is not None:
            out = out.gather(1, src[..., None].expand(-1, -1, out.shape[-1]))
            if self.residual.excluded == "anchor":
                remap = pos.gather(1, src)
            else:  # skip: residual only where the token was computed
                out = out * own[..., None].to(out.dtype)
        if self.records is not None:
            self.records["diff_cond"] = z
            self.records["diff_residual"] = out
        return out, remap


def sample_residual(
    diffloss: DiffusionMLP,
    process: Any,
    z_NC: torch.Tensor,
    t: float,
    *,
    guided: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HART's ``DiffLoss.sample`` (before the vae_scale factor) on the shared diffusion process.

    Guided (``z`` = [cond; uncond] rows, t != 1): x_T = [n; n], the net sees [x[:N]; x[:N]], and
    ε = (1+t)·ε_c − t·ε_u goes to both halves (each half keeps its own variance output and state). Every step
    draws noise for all rows. t == 1 runs both halves unguided, as upstream's ``cfg == 1.0`` branch. Unguided
    rows (no uncond half) replay the guided stream: noise for 2N rows, first half kept.
    """
    net = diffloss.net
    C = diffloss.cfg.token_channels
    dev, dt = z_NC.device, z_NC.dtype

    def randn(rows: int) -> torch.Tensor:
        return torch.randn((rows, C), generator=generator, device=dev, dtype=dt)

    if guided and t != 1.0:
        half = z_NC.shape[0] // 2
        n = randn(half)
        x_T = torch.cat((n, n))

        def model(x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            h = x[:half]
            out = net(torch.cat((h, h)), ts, z_NC)
            eps_c, eps_u = out[:half, :C], out[half:, :C]
            e = eps_c * (1 + t) - t * eps_u
            return torch.cat((torch.cat((e, e)), out[:, C:]), dim=1)

        return process.sample(
            model, x_T, temperature=temperature, clip_denoised=True, draw=lambda x: randn(x.shape[0])
        )
    if guided:
        return process.sample(
            lambda x, ts: net(x, ts, z_NC),
            randn(z_NC.shape[0]),
            temperature=temperature,
            clip_denoised=True,
            draw=lambda x: randn(x.shape[0]),
        )
    N = z_NC.shape[0]
    return process.sample(
        lambda x, ts: net(x, ts, z_NC),
        randn(N),
        temperature=temperature,
        clip_denoised=True,
        draw=lambda x: randn(2 * N)[:N],
    )
