"""HART's hybrid tokenizer: VAR's multi-scale VQ plus the continuous residual after the last discrete scale.

It is VAR's ``VQVAE`` (same encoder, decoder, codebook and Phi convs, keys under ``vae.`` in the released
``tokenizer/`` folder) with one rule changed at the last scale: its codes are added to f_hat *without* Phi
(upstream's "consistency" choice), and whatever residual remains is kept as continuous tokens, so the decoder
sees the exact latent. Generation adds the last scale's code vectors plus the residual head's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointMismatch
from ..interfaces import StageSample
from .msvq import VQVAE, MSVQConfig

HART_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass
class HybridEncoding:
    """Everything the hybrid encoder produces for a batch of images.

    ``idx`` per-scale indices (B, pn^2); ``rest_wo_last`` (B, h*w, C) the residual before the last scale's
    code is removed (the continuous target upstream trains on); ``rest`` (B, C, h, w) the residual after it;
    ``fhat`` the hybrid latent (discrete sum + rest).
    """

    idx: list[torch.Tensor]
    rest_wo_last: torch.Tensor
    rest: torch.Tensor
    fhat: torch.Tensor


class HybridTokenizer(VQVAE):
    """VAR's VQVAE with HART's last-scale rule; also the engine tokenizer for HART."""

    def __init__(self, cfg: MSVQConfig) -> None:
        super().__init__(cfg)

    @property
    def last(self) -> int:
        return len(self.cfg.patch_nums) - 1

    # ----- image <-> tokens -------------------------------------------------------------------------
    def encode_hybrid(self, img: torch.Tensor) -> HybridEncoding:
        """Image in [-1,1] -> indices, residual and hybrid latent (upstream ``f_to_idxBl_and_frest``)."""
        return self.quantize_hybrid(self.encode_latent(img))

    def quantize_hybrid(self, f_BChw: torch.Tensor, skip_continuous: bool = False) -> HybridEncoding:
        """Latent -> hybrid encoding; ``skip_continuous`` leaves the residual out of ``fhat`` (training)."""
        q = self.quantize
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list: list[torch.Tensor] = []
        rest_wo_last = f_rest
        for si, pn in enumerate(self.cfg.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != self.last else f_rest
            idx_Bl = q.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = q.codes_to_map(idx_Bl, pn)
            if si != self.last:
                h = q.residual(h, si)
            else:
                rest_wo_last = f_rest.clone()
            f_hat.add_(h)
            f_rest.sub_(h)
            idx_list.append(idx_Bl)
        if not skip_continuous:
            f_hat = f_hat + f_rest
        return HybridEncoding(idx_list, rest_wo_last.permute(0, 2, 3, 1).reshape(B, H * W, C), f_rest, f_hat)

    def idx_to_fhat_discrete(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Discrete-only latent, VAR-style (Phi at every scale, the last too): upstream ``idxBl_to_fhat``."""
        return self.quantize.idx_to_fhat(idx_list)

    # ----- engine interface -------------------------------------------------------------------------
    def token_vectors(self, sample: StageSample) -> torch.Tensor:
        """Code vectors (hard or soft) plus, where present, the continuous residual of each token."""
        h = super().token_vectors(sample)
        if sample.values is not None:
            h = h + sample.values
        return h

    def update(
        self, canvas: torch.Tensor, h_BlC: torch.Tensor, stage: int, keep_Bl: torch.Tensor | None = None
    ) -> torch.Tensor:
        """VAR's update for every scale but the last; the last adds its tokens as they are (no Phi)."""
        if stage != self.last:
            return super().update(canvas, h_BlC, stage, keep_Bl)
        if keep_Bl is not None:
            h_BlC = h_BlC * keep_Bl.unsqueeze(-1).to(h_BlC.dtype)
        pn = self.cfg.patch_nums[stage]
        return canvas.add_(h_BlC.transpose(1, 2).reshape(h_BlC.shape[0], -1, pn, pn))

    # ----- checkpoints -------------------------------------------------------------------------------
    def load_released(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a released ``HARTAutoEncoderWithDisc`` state dict: ``vae.*`` strictly, ``disc.*`` ignored.

        A second decoder (``vae.decoder2.*``, ``vae.post_quant_conv2.*``) serves only discrete-only training
        and is ignored: inference always decodes with ``decoder``.
        """
        vae = {
            k[4:]: v
            for k, v in state.items()
            if k.startswith("vae.") and not k.startswith(("vae.decoder2.", "vae.post_quant_conv2."))
        }
        if not vae:
            other = sorted({k.split(".")[0] for k in state})[:4]
            raise CheckpointMismatch(
                f"'{source}' has no 'vae.*' keys (top-level keys {other}); not a HART tokenizer checkpoint"
            )
        self.load_official(vae, source)


def find_tokenizer_weights(folder: str | os.PathLike[str]) -> Path:
    """The weights file of a released ``tokenizer/`` folder (safetensors or a PyTorch .bin/.pth)."""
    from ..errors import WeightsNotFound

    d = Path(folder)
    if not d.is_dir():
        raise WeightsNotFound(f"HART tokenizer folder not found: '{d}'")
    for name in ("model.safetensors", "pytorch_model.bin", "tokenizer.pth", "model.pth"):
        if (d / name).is_file():
            return d / name
    raise WeightsNotFound(
        f"'{d}' holds no tokenizer weights (looked for model.safetensors, pytorch_model.bin, tokenizer.pth)"
    )
