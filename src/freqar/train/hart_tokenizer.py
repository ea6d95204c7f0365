"""Training HART's hybrid tokenizer (``freqar train hart-tokenizer``): VAR's VQ task with HART's two changes.

1. The last scale's codes enter f_hat without Phi (the rule ``HybridTokenizer`` generates with).
2. Per image, the decoder sees either the hybrid latent (discrete sum + continuous residual = the
   encoder's exact latent) or, with probability ``hybrid.skip_continuous_prob``, the discrete sum alone
   (straight-through). The decoder thus works on both, which generation needs: the residual head may be
   off, or a token policy may skip a token's residual (upstream's ``skip_continuous_prob``; 50 % there).

Everything else (VQ losses, dead-code restarts, the perceptual term, ``init.path`` / ``init.decoder_only``,
export) is ``TokenizerTask``'s. The export is a ``freqar-tokenizer/1`` folder with a ``hybrid`` entry;
``load_hybrid_tokenizer`` reads it (or any VAR tokenizer export) as a ``HybridTokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption
from ..io import read_json, write_json
from ..tokenizers.hybrid import HybridTokenizer
from .config import TokenizerTrainConfig, to_dict
from .data import ImageSet, step_generator
from .dist import DistContext
from .tokenizer import TokenizerTask, VQTrainModule, load_tokenizer


@dataclass
class HybridSettings:
    skip_continuous_prob: float = 0.5  # chance that an image's decoder input is the discrete latent only


@dataclass
class HARTTokenizerTrainConfig(TokenizerTrainConfig):
    """``TokenizerTrainConfig`` plus the ``hybrid`` section."""

    hybrid: HybridSettings = field(default_factory=HybridSettings)


class HybridTrainModule(VQTrainModule):
    """The VQ training forward with HART's last-scale rule and the per-image continuous/discrete choice.

    ``generator`` (set by the task before each step) draws the choice, so a step is a pure function of
    (seed, step, rank) and resumes exactly.
    """

    def __init__(self, vae: HybridTokenizer, skip_prob: float, decoder_only: bool = False) -> None:
        super().__init__(vae, decoder_only=decoder_only)
        self.skip_prob = skip_prob
        self.generator: torch.Generator | None = None
        self.kept = 1.0  # fraction of the last batch decoded with its continuous residual

    def scale_vectors(self, idx_Bl: torch.Tensor, pn: int, si: int) -> torch.Tensor:
        q = self.vae.quantize
        h = q.codes_to_map(idx_Bl, pn)
        return h if si == len(q.patch_nums) - 1 else q.residual(h, si)

    def continuous_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 1, 1, 1) bool: which images keep their continuous residual this step."""
        u = torch.rand(batch, generator=self.generator)
        keep = u >= self.skip_prob
        self.kept = keep.float().mean().item()
        return keep.to(device).view(batch, 1, 1, 1)

    def decoder_input(self, f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """Hybrid (f itself: discrete + residual is exact) or the discrete sum, straight-through."""
        keep = self.continuous_mask(f.shape[0], f.device)
        return torch.where(keep, f, super().decoder_input(f, f_hat))

    def forward(
        self, x: torch.Tensor, gen_fhat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        if not self.decoder_only:
            return super().forward(x, gen_fhat)
        vae = self.vae
        with torch.no_grad():  # codes fixed: only the decoder side learns
            f = vae.encode_latent(x)
            enc = vae.quantize_hybrid(f, skip_continuous=True)
        keep = self.continuous_mask(f.shape[0], f.device)
        rec = self.decode_with_generated(torch.where(keep, f, enc.fhat), gen_fhat)
        return rec, f.new_zeros(()), enc.idx, f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


class HybridTokenizerTask(TokenizerTask):
    """``TokenizerTask`` on a ``HybridTokenizer`` (same init, restarts and losses), see the module doc."""

    name = "hart-tokenizer"

    def __init__(self, cfg: HARTTokenizerTrainConfig, data: ImageSet, ctx: DistContext) -> None:
        p = cfg.hybrid.skip_continuous_prob
        if not 0.0 <= p <= 1.0:
            raise InvalidOption(f"config 'hybrid.skip_continuous_prob' must be in [0, 1], got {p}")
        super().__init__(cfg, data, ctx)
        base = self.module
        vae = HybridTokenizer(self.vae_cfg)
        vae.load_state_dict(base.vae.state_dict())  # the same (seeded or init.path) weights
        self.module = HybridTrainModule(vae, p, decoder_only=base.decoder_only)

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        self.module.generator = step_generator(self.cfg.run.seed, step, self.ctx.rank, 11)
        loss, logs, n = super().compute_loss(model, step)
        logs["hybrid"] = self.module.kept
        return loss, logs, n

    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        out = super().export(ema, run_dir)
        info = read_json(out / "config.json")
        info["hybrid"] = to_dict(self.cfg.hybrid)  # type: ignore[attr-defined]
        write_json(out / "config.json", info)
        return out


def load_hybrid_tokenizer(path: str | Path) -> HybridTokenizer:
    """A ``freqar train hart-tokenizer`` (or plain ``tokenizer``) export as HART's hybrid tokenizer."""
    vae = load_tokenizer(path)
    tok = HybridTokenizer(vae.cfg)
    tok.load_state_dict(vae.state_dict())
    return tok.eval().requires_grad_(False)


def train_hart_tokenizer(
    cfg: HARTTokenizerTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> Any:
    """``freqar train hart-tokenizer``: a TrainResult, or the export Path with ``export_only``."""
    from .run import run_task

    return run_task(
        "hart-tokenizer",
        cfg,
        lambda data, c: HybridTokenizerTask(cfg, data, c),
        out,
        ctx,
        progress,
        export_only,
    )
