"""FAR transformer (yuhuUSTC/FAR, a fork of MAR): a bidirectional encoder–decoder ViT over one frequency
level.

Per level the model sees the low-passed latent (all tokens, plus ``buffer_size`` class-embedding positions)
and returns a per-token condition for the diffusion MLP, which samples the *full* latent. There is no sequence
of levels and no KV cache: the engine's "stage" is a level and ``new_cache`` returns None. Parameter names
follow the official checkpoints (``encoder_blocks.{i}.attn.qkv``, ``diffloss.net.*``...), so they load key for
key.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch, InvalidOption, WeightsNotFound
from ..heads.diffusion_mlp import DiffusionMLP, DiffusionMLPConfig
from ..interfaces import StepOutput
from ..tokenizers.frequency import lowpass, to_latent, to_tokens


@dataclass(frozen=True)
class FARConfig:
    """Transformer + diffusion-MLP hyper-parameters (defaults: FAR-B at 256 px, a 16×16×16 latent)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    num_classes: int = 1000
    class_emb_rows: int = 1000
    label_drop_prob: float = 0.1
    diffloss_d: int = 6
    diffloss_w: int = 1024
    token_channels: int = 16
    seq_h: int = 16
    norm_eps: float = 1e-6
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffusion_batch_mul: int = 4
    noise_schedule: str = "cosine"
    diffusion_steps: int = 1000
    mask: bool = False

    def __post_init__(self) -> None:
        for w, h, name in (
            (self.encoder_embed_dim, self.encoder_num_heads, "encoder"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder"),
        ):
            if h < 1 or w % h:
                raise InvalidOption(f"{name}_embed_dim {w} is not divisible by {name}_num_heads {h}")
        if min(self.encoder_depth, self.decoder_depth, self.seq_h, self.token_channels, self.num_classes) < 1:
            raise InvalidOption("FAR depths, seq_h, token_channels and num_classes must be >= 1")
        if self.class_emb_rows < self.num_classes:
            raise InvalidOption(f"class_emb_rows {self.class_emb_rows} < num_classes {self.num_classes}")
        if self.buffer_size < 0 or self.diffusion_batch_mul < 1:
            raise InvalidOption("buffer_size must be >= 0 and diffusion_batch_mul >= 1")

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def diffusion_mlp(self) -> DiffusionMLPConfig:
        return DiffusionMLPConfig(
            token_channels=self.token_channels,
            cond_channels=self.decoder_embed_dim,
            width=self.diffloss_w,
            depth=self.diffloss_d,
            level_input=True,
            noise_schedule=self.noise_schedule,
            diffusion_steps=self.diffusion_steps,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def far_preset(name: str) -> FARConfig:
    """Official sizes (``far_base``/``far_large``/``far_huge``) and a tiny test model."""
    presets = {
        "far-b": FARConfig(),
        "far-l": FARConfig(1024, 16, 16, 1024, 16, 16, diffloss_d=3),
        "far-h": FARConfig(1280, 20, 16, 1280, 20, 16, diffloss_d=3),
        "far-tiny": FARConfig(32, 2, 2, 32, 2, 2, buffer_size=8, num_classes=10, diffloss_d=2, diffloss_w=48),
    }
    if name not in presets:
        raise InvalidOption(f"unknown FAR preset '{name}' ({', '.join(presets)})")
    return presets[name]


class Attention(nn.Module):
    """timm ViT attention: fused qkv (with bias), heads of width C/H, scale (C/H)^-½, output projection."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)) (exact GELU, no layer scale)."""

    def __init__(self, dim: int, heads: int, cfg: FARConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, heads, cfg.attn_dropout, cfg.proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class FARCondition:
    """Per-row class embeddings (R, Ce): [class rows; fake_latent rows] when guided.

    ``positions_Bn``: the current level's computed positions (set by ``stage_input``, read by ``step``; None
    = every token). FAR has no KV cache to carry them, so the per-call condition does.
    """

    emb_RC: torch.Tensor
    batch: int
    guided: bool
    positions_Bn: torch.Tensor | None = None


class FARTransformer(nn.Module):
    """Encoder–decoder over (buffer + seq_len) positions; rows [0:B] conditional, [B:2B] unconditional."""

    def __init__(self, cfg: FARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        Ce, Cd, n, buf = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len, cfg.buffer_size
        self.num_classes = cfg.num_classes
        self.depth = cfg.encoder_depth + cfg.decoder_depth
        self.class_emb = nn.Embedding(cfg.class_emb_rows, Ce)
        self.fake_latent = nn.Parameter(torch.zeros(1, Ce))
        self.z_proj = nn.Linear(cfg.token_channels, Ce, bias=True)
        self.z_proj_ln = nn.LayerNorm(Ce, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + n, Ce))
        self.encoder_blocks = nn.ModuleList(
            [Block(Ce, cfg.encoder_num_heads, cfg) for _ in range(cfg.encoder_depth)]
        )
        self.encoder_norm = nn.LayerNorm(Ce, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(Ce, Cd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + n, Cd))
        self.decoder_blocks = nn.ModuleList(
            [Block(Cd, cfg.decoder_num_heads, cfg) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(Cd, eps=cfg.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, Cd))
        self.initialize_weights()
        self.diffloss = DiffusionMLP(cfg.diffusion_mlp)

    def initialize_weights(self) -> None:
        """MAR's init: N(0, 0.02) embeddings and tables, xavier linears with zero bias, unit LayerNorms."""
        for p in (
            self.class_emb.weight,
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----- the two halves ----------------------------------------------------------------------------
    def class_embedding(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Class rows; negative labels mean unconditional (the learned ``fake_latent``)."""
        emb = self.class_emb(labels_B.clamp(min=0))
        uncond = (labels_B < 0).unsqueeze(-1)
        return torch.where(uncond, self.fake_latent.expand_as(emb), emb)

    def encode(
        self, tokens_BnC: torch.Tensor, class_BC: torch.Tensor, keep_Bn: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z_proj, buffer = class embedding, + positions, LN, drop masked tokens, encoder blocks, norm.

        ``keep_Bn`` (bool) keeps the same number of tokens in every row (MAR masking / token exclusion).
        """
        x = self.z_proj(tokens_BnC.to(self.z_proj.weight.dtype))
        B, _, C = x.shape
        buf = class_BC.unsqueeze(1).expand(B, self.cfg.buffer_size, C)
        x = torch.cat((buf, x), dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        if keep_Bn is not None:
            keep = torch.cat((keep_Bn.new_ones(B, self.cfg.buffer_size), keep_Bn), dim=1)
            x = x[keep].reshape(B, -1, C)
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, keep_Bn: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_embed, mask tokens in holes, + positions, blocks, norm, drop buffer, + diffusion pos."""
        x = self.decoder_embed(x)
        B, _, C = x.shape
        if keep_Bn is not None:
            keep = torch.cat((keep_Bn.new_ones(B, self.cfg.buffer_size), keep_Bn), dim=1)
            full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], C).clone()
            full[keep] = x.reshape(-1, C)
            x = full
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.cfg.buffer_size :]
        return x + self.diffusion_pos_embed_learned

    def conditions(
        self, tokens_BnC: torch.Tensor, class_BC: torch.Tensor, keep_Bn: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token diffusion conditions (B, seq_len, Cd) for one level's input tokens."""
        return self.decode(self.encode(tokens_BnC, class_BC, keep_Bn), keep_Bn)

    def conditions_at(
        self, tokens_BnC: torch.Tensor, class_BC: torch.Tensor, positions_Bn: torch.Tensor
    ) -> torch.Tensor:
        """Conditions (B, n, Cd) of the tokens at ``positions_Bn`` only (sorted, same count per row).

        The others are dropped from the encoder and are mask tokens in the decoder (MAR's token dropping,
        the same computation as ``conditions`` with a keep mask); the rows of the kept positions are returned.
        """
        B, n = positions_Bn.shape
        C, buf = self.cfg.encoder_embed_dim, self.cfg.buffer_size
        x = self.z_proj(tokens_BnC.to(self.z_proj.weight.dtype))
        table = self.encoder_pos_embed_learned[0]
        pos = torch.cat((table[:buf].expand(B, buf, C), table[buf:][positions_Bn]), dim=1)
        x = torch.cat((class_BC.unsqueeze(1).expand(B, buf, C), x), dim=1) + pos
        x = self.z_proj_ln(x)
        for blk in self.encoder_blocks:
            x = blk(x)
        x = self.decoder_embed(self.encoder_norm(x))
        Cd, l = x.shape[-1], self.cfg.seq_len
        full = self.mask_token.to(x.dtype).expand(B, buf + l, Cd).clone()
        full[:, :buf] = x[:, :buf]
        full[:, buf:].scatter_(1, positions_Bn.unsqueeze(-1).expand(B, n, Cd), x[:, buf:])
        x = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned
        return x.gather(1, positions_Bn.unsqueeze(-1).expand(B, n, Cd))

    # ----- engine protocol ---------------------------------------------------------------------------
    def condition(self, labels_B: torch.Tensor, guided: bool) -> FARCondition:
        B = labels_B.shape[0]
        emb = self.class_embedding(labels_B)
        if guided:
            emb = torch.cat((emb, self.fake_latent.expand(B, -1)))
        return FARCondition(emb, B, guided)

    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """No KV cache: every level is one bidirectional pass over the whole latent."""
        return None

    def stage_input(
        self,
        cond: FARCondition,
        tokens_BnCv: torch.Tensor | None,
        positions_Bn: torch.Tensor | None,
        stage: int,
    ) -> torch.Tensor:
        """Input tokens (R, n, C) of a level: zeros at the first level, repeated for the CFG rows.

        ``positions_Bn`` (sorted, the same count per sample): only those tokens are given (``tokens_BnCv``
        holds them in that order); ``step`` then drops the others from the encoder and returns their rows.
        """
        R = cond.emb_RC.shape[0]
        cond.positions_Bn = positions_Bn
        if positions_Bn is not None:
            if tokens_BnCv is None:
                raise InvalidOption("FAR's first level has no input tokens to select from")
            return tokens_BnCv.repeat(R // tokens_BnCv.shape[0], 1, 1)
        if tokens_BnCv is None:
            dev = cond.emb_RC.device
            return torch.zeros(R, self.cfg.seq_len, self.cfg.token_channels, device=dev)
        return tokens_BnCv.repeat(R // tokens_BnCv.shape[0], 1, 1)

    def step(
        self, x_RnC: torch.Tensor, cond: FARCondition, cache: Any = None, taps: tuple[int, ...] = ()
    ) -> StepOutput:
        if cond.positions_Bn is None:
            return StepOutput(self.conditions(x_RnC, cond.emb_RC))
        pos = cond.positions_Bn.repeat(x_RnC.shape[0] // cond.positions_Bn.shape[0], 1)
        return StepOutput(self.conditions_at(x_RnC, cond.emb_RC, pos))

    # ----- training ----------------------------------------------------------------------------------
    def forward(
        self,
        latent_BCHW: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        level_weights: list[float] | None = None,
        level: int | None = None,
        mask: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training loss on scaled latents; upstream's draw order: level, label drop, (mask), t, noise.

        One level per batch, uniform over 0..seq_h−1 (``level`` forces one); the target is the full latent at
        every position. ``level_weights[s]`` multiplies the loss of level s (the paper's frequency-aware
        weighting; upstream's flag for it crashes). ``mask`` overrides ``cfg.mask`` for this call (a trainer
        that masks only some batches).
        """
        B = latent_BCHW.shape[0]
        dev = latent_BCHW.device
        draw = torch.randint(0, self.cfg.seq_h, (1,), generator=generator)
        s = int(draw.item()) if level is None else int(level)
        inp = to_tokens(lowpass(latent_BCHW, s))
        target = to_tokens(latent_BCHW)
        cls = self.class_emb(labels_B)
        dropped = torch.zeros(B, dtype=torch.bool, device=dev)
        if self.training:
            dropped = (torch.rand(B, generator=generator) < self.cfg.label_drop_prob).to(dev)
            d = dropped.unsqueeze(-1).to(cls.dtype)
            cls = d * self.fake_latent + (1 - d) * cls
        keep = None
        if self.training and (self.cfg.mask if mask is None else mask):
            keep = self._random_keep(B, s, generator, dev)
        z = self.conditions(inp, cls, keep)
        mul, Cd = self.cfg.diffusion_batch_mul, self.cfg.decoder_embed_dim
        target = target.reshape(-1, self.cfg.token_channels).repeat(mul, 1)
        z = z.reshape(-1, Cd).repeat(mul, 1)
        index = torch.full((z.shape[0], 1), float(s), device=dev)
        loss = self.diffloss.loss(target, z, index, generator=generator)
        if level_weights is not None:
            loss = loss * float(level_weights[s])
        return {"loss": loss, "level": torch.tensor([s]), "label_dropped": dropped.long()}

    def _random_keep(
        self, B: int, s: int, generator: torch.Generator | None, dev: torch.device
    ) -> torch.Tensor:
        """MAR masking: rate ~ N(1, 0.25) truncated to [0.7·s/seq_h, 1], a random permutation per sample."""
        lo = 0.7 * s / self.cfg.seq_h
        n = self.cfg.seq_len
        while True:
            rate = 1.0 + 0.25 * float(torch.randn(1, generator=generator))
            if lo <= rate <= 1.0:
                break
        num_masked = min(int(math.ceil(n * rate)), n - 1)
        order = torch.argsort(torch.rand(B, n, generator=generator), dim=1).to(dev)
        keep = torch.ones(B, n, dtype=torch.bool, device=dev)
        keep.scatter_(1, order[:, :num_masked], False)
        return keep

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_official(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load an upstream FAR state dict (``model`` or ``model_ema`` of ``checkpoint-last.pth``)."""
        from ..io import load_state_dict_strict

        if "z_proj.weight" not in state or not any(k.startswith("diffloss.net.") for k in state):
            keys = ", ".join(sorted(state)[:5])
            raise CheckpointMismatch(
                f"'{source}' is not a FAR state dict (needs z_proj.*, encoder_blocks.*, diffloss.net.*; "
                f"found {keys} ...)"
            )
        load_state_dict_strict(self, state, source=source)


FAR_CHECKPOINT_GLOBALS = ("argparse.Namespace",)


def load_far_checkpoint(path: str | os.PathLike[str], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """State dict from an official ``checkpoint-last.pth`` (or a plain state dict), without a bare unpickle.

    The file pickles an ``argparse.Namespace`` next to the tensors, so it is read with ``weights_only=True``
    and exactly that one class allowed; any other global is refused before anything is executed.
    """
    import argparse

    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"checkpoint not found: '{p}'")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "global" in str(e).lower():
            glob = _forbidden_global(str(e))
            raise CheckpointMismatch(
                f"refusing '{p}': it needs the pickle global {glob}, which is not allowed "
                f"(allowed: {', '.join(FAR_CHECKPOINT_GLOBALS)})"
            ) from None
        raise WeightsNotFound(f"cannot read checkpoint '{p}': {msg}") from None
    if isinstance(obj, dict):
        for key in ("model_ema", "model") if prefer_ema else ("model", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(
            f"'{p}' holds no FAR state dict (expected 'model_ema'/'model' or a flat dict)"
        )
    return obj


def _forbidden_global(msg: str) -> str:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global ([\w.]+)", msg)
    return m.group(1) if m else "(unnamed)"


__all__ = ["FARConfig", "FARTransformer", "FARCondition", "far_preset", "load_far_checkpoint", "to_latent"]
