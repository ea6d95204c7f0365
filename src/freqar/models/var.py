"""VAR transformer (FoundationVision/VAR): AdaLN blocks over next-scale token maps.

Module and parameter names follow the official checkpoints so ``var_d*.pth`` load key for key. Unlike
upstream, no KV cache, RNG or flag lives on a module: the cache is an argument of ``step``, and the
block-causal mask is built only for the teacher-forced forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import KVCache
from ..errors import InvalidOption
from ..interfaces import StepOutput
from ..tokenizers.msvq import validate_patch_nums


@dataclass(frozen=True)
class VARConfig:
    """Transformer hyper-parameters; official models use head_dim 64, depth = heads."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    z_channels: int = 32
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        validate_patch_nums(self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise InvalidOption(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1 or self.num_classes < 1:
            raise InvalidOption("depth and num_classes must be >= 1")

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def stage_offsets(patch_nums: tuple[int, ...]) -> list[int]:
    """Start offset of every stage in the concatenated token sequence (plus the total at the end)."""
    out = [0]
    for p in patch_nums:
        out.append(out[-1] + p * p)
    return out


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head temperature (scale 1)."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B,H,L,hd
        if self.l2_norm:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, _, L, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """x += g1*Attn(LN(x)(1+s1)+b1); x += g2*FFN(LN(x)(1+s2)+b2), modulation from the class condition."""

    def __init__(self, cfg: VARConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.shared_aln = cfg.shared_aln
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.drop_path = drop_path

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (R,1,C)."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)  # cond is the shared (R,1,6,C)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def _residual(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path <= 0:
            return branch
        keep = torch.rand(branch.shape[0], 1, 1, device=branch.device) >= self.drop_path
        return branch * keep / (1 - self.drop_path)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        q, k, v = self.attn.qkv(self.ln(x).mul(s1.add(1)).add_(b1))
        if cache is not None:
            k, v, mask = cache.append_and_get(layer, k, v)
        x = x + self._residual(self.attn.attend(q, k, v, mask).mul_(g1))
        return x + self._residual(self.ffn(self.ln(x).mul(s2.add(1)).add_(b2)).mul(g2))


class HeadNorm(nn.Module):
    """AdaLN before the head (``head_nm``): always conditioned on the raw class embedding."""

    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.C = C
        self.ln = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, cond_RD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_RD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln(x).mul(scale.add(1)).add_(shift)


@dataclass
class VARCondition:
    """Conditioning rows for one call: class embeddings (R, C) and, if shared, the AdaLN (R,1,6,C)."""

    cond_RD: torch.Tensor
    block_cond: torch.Tensor
    batch: int
    guided: bool


class VARTransformer(nn.Module):
    """The VAR backbone; rows [0:B] are conditional, [B:2B] unconditional when guided."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.depth = cfg.depth
        self.num_classes = cfg.num_classes
        self.patch_nums = cfg.patch_nums
        self.offsets = stage_offsets(cfg.patch_nums)
        self.word_embed = nn.Linear(cfg.z_channels, C)
        init_std = math.sqrt(1 / C / 3)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, cfg.first_l, C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, cfg.L, C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, cfg.L)
        self.register_buffer("lvl_1L", lvl, persistent=False)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([AdaLNBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

    # ----- conditioning ------------------------------------------------------------------------------
    def condition(self, labels_B: torch.Tensor, guided: bool) -> VARCondition:
        """Class rows; with guidance the null class is appended as the unconditional half."""
        B = labels_B.shape[0]
        if guided:
            labels_B = torch.cat((labels_B, torch.full_like(labels_B, self.num_classes)))
        cond = self.class_emb(labels_B)
        return VARCondition(cond, self._block_cond(cond), B, guided)

    def _block_cond(self, cond_RD: torch.Tensor) -> torch.Tensor:
        if self.cfg.shared_aln:
            return self.shared_ada_lin(cond_RD).view(-1, 1, 6, self.cfg.embed_dim)
        return cond_RD

    def level_pos(self, stage: int) -> torch.Tensor:
        """lvl_embed + pos_1LC over one stage's positions: (1, l, C)."""
        a, b = self.offsets[stage], self.offsets[stage + 1]
        return self.lvl_embed(self.lvl_1L[:, a:b]) + self.pos_1LC[:, a:b]

    # ----- inference ---------------------------------------------------------------------------------
    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        hd = self.cfg.embed_dim // self.cfg.num_heads
        return KVCache(
            depth=self.depth,
            rows=rows,
            heads=self.cfg.num_heads,
            head_dim=hd,
            max_len=self.cfg.L,
            dtype=dtype,
            device=device,
        )

    def stage_input(
        self,
        cond: VARCondition,
        tokens_BnCv: torch.Tensor | None,
        positions_Bn: torch.Tensor | None,
        stage: int,
    ) -> torch.Tensor:
        """Input rows (R, n, C) of a stage at the given positions (None = all, in order)."""
        lp_1lC = self.level_pos(stage)
        R = cond.cond_RD.shape[0]
        if stage == 0:
            B = cond.batch
            x = cond.cond_RD.unsqueeze(1).expand(R, self.cfg.first_l, -1) + self.pos_start
            if positions_Bn is None:
                return x + lp_1lC
            idx = positions_Bn.repeat(R // B, 1)
            return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + lp_1lC[0][idx]
        assert tokens_BnCv is not None
        if positions_Bn is None:
            x = self.word_embed(tokens_BnCv) + lp_1lC
        else:
            x = self.word_embed(tokens_BnCv) + lp_1lC[0][positions_Bn]
        return x.repeat(R // x.shape[0], 1, 1)

    def step(
        self, x_RnC: torch.Tensor, cond: VARCondition, cache: KVCache, taps: tuple[int, ...] = ()
    ) -> StepOutput:
        """Run every block on this stage's tokens, appending their keys/values to ``cache``."""
        tapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, blk in enumerate(self.blocks):
            x_in = x_RnC
            x_RnC = blk(x_RnC, cond.block_cond, cache=cache, layer=i)
            if i in taps:
                tapped[i] = (x_in, x_RnC)
        return StepOutput(x_RnC, tapped)

    def logits(self, hidden_RnC: torch.Tensor, cond: VARCondition) -> torch.Tensor:
        return self.head(self.head_nm(hidden_RnC.float(), cond.cond_RD)).float()

    # ----- training ----------------------------------------------------------------------------------
    def block_causal_mask(self, device: torch.device | str) -> torch.Tensor:
        """(L, L) bool: a token sees its own scale and all earlier ones."""
        lvl = self.lvl_1L[0].to(device)
        return lvl[:, None] >= lvl[None, :]

    def forward(self, labels_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) over all scales with the block-causal mask.

        Labels are used as given: label dropout for CFG training is the trainer's job.
        """
        B = labels_B.shape[0]
        cond = self.class_emb(labels_B)
        sos = cond.unsqueeze(1).expand(B, self.cfg.first_l, -1) + self.pos_start
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        mask = self.block_causal_mask(x.device)
        bc = self._block_cond(cond)
        for blk in self.blocks:
            x = blk(x, bc, mask=mask)
        return self.head(self.head_nm(x.float(), cond)).float()

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load an upstream VAR state dict, checking its buffers against our schedule."""
        from ..errors import CheckpointMismatch
        from ..io import load_state_dict_strict

        if "lvl_1L" in state and not torch.equal(state["lvl_1L"].long().cpu(), self.lvl_1L.cpu()):
            raise CheckpointMismatch(
                f"'{source}': buffer lvl_1L {tuple(state['lvl_1L'].shape)} does not match the scale schedule "
                f"{list(self.patch_nums)} (L={self.cfg.L})"
            )
        amask = state.get("attn_bias_for_masking")
        if amask is not None and amask.shape[-1] != self.cfg.L:
            raise CheckpointMismatch(
                f"'{source}': buffer attn_bias_for_masking {tuple(amask.shape)} does not match L={self.cfg.L}"
            )

        def derived_buffer(k: str) -> bool:
            return k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("attn.zero_k_bias")

        load_state_dict_strict(self, state, source=source, ignore=derived_buffer)
