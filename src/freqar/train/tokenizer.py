"""Training the multi-scale VQ tokenizer: reconstruction + VQ losses, codebook usage and dead-code restarts.

The VQ forward mirrors ``MultiScaleQuantizer.encode`` but keeps gradients: per scale the running ``f_hat``
is pulled towards the (frozen) latent (codebook term) and the latent towards ``f_hat`` (commitment term,
weight beta), and the decoder sees ``f_hat`` through a straight-through estimator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch
from ..io import load_safetensors, load_state_dict_strict, read_json, save_safetensors, write_json
from ..pipeline import FORMAT as MODEL_FORMAT
from ..pipeline import load_pipeline_dir
from ..tokenizers.msvq import VQVAE, MSVQConfig
from .adversarial import load_latent_bank, make_adversary
from .config import TokenizerTrainConfig, to_dict
from .data import (
    ImageSet,
    batch_indices,
    load_validation_set,
    reconstruction_scores,
    step_generator,
    to_unit,
)
from .dist import DistContext, all_reduce_sum, broadcast

TOKENIZER_FORMAT = "freqar-tokenizer/1"


def msvq_config(cfg: TokenizerTrainConfig) -> MSVQConfig:
    m = cfg.model
    return MSVQConfig(
        vocab_size=m.vocab_size,
        z_channels=m.z_channels,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        beta=m.beta,
        quant_resi=m.quant_resi,
        share_quant_resi=m.share_quant_resi,
        patch_nums=tuple(m.patch_nums),
        using_sa=m.using_sa,
        using_mid_sa=m.using_mid_sa,
        groupnorm_groups=m.groupnorm_groups,
        decoder_num_res_blocks=(
            m.decoder_num_res_blocks
            if m.decoder_num_res_blocks >= 0 and m.decoder_num_res_blocks != m.num_res_blocks
            else None
        ),
    )


class VQTrainModule(nn.Module):
    """Wraps a VQVAE with the training forward (DDP wraps this module)."""

    def __init__(self, vae: VQVAE, decoder_only: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.decoder_only = decoder_only
        if decoder_only:  # codes are fixed: only the decoder side learns
            vae.requires_grad_(False)
            vae.post_quant_conv.requires_grad_(True)
            vae.decoder.requires_grad_(True)

    def forward(
        self, x: torch.Tensor, gen_fhat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Image in [-1,1] -> (reconstruction, VQ loss, code ids per scale, sampled latents (n, C)).

        ``gen_fhat`` (decoder-only runs): generated latents decoded in the same pass; their images follow
        the B reconstructions in the first output (inside forward, so DDP sees every decoder use).
        """
        vae, q = self.vae, self.vae.quantize
        if self.decoder_only:
            with torch.no_grad():
                f = vae.encode_latent(x)
                idx_list, fhats = q.encode(f)
            rec = self.decode_with_generated(fhats[-1], gen_fhat)
            return rec, f.new_zeros(()), idx_list, f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        if gen_fhat is not None:
            raise ValueError("generated latents need a decoder-only run")
        f = vae.encode_latent(x)
        B, C, H, W = f.shape
        f_ng = f.detach()
        f_rest = f_ng.clone()
        f_hat = torch.zeros_like(f_ng)
        vq_loss = f.new_zeros(())
        codes, zs = [], []
        S = len(q.patch_nums)
        for si, pn in enumerate(q.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != S - 1 else f_rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = q.nearest_code(z_NC).view(B, pn * pn)
            h = self.scale_vectors(idx_Bl, pn, si)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + vae.cfg.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
            codes.append(idx_Bl)
            zs.append(z_NC)
        vq_loss = vq_loss / S
        rec = vae.decoder(vae.post_quant_conv(self.decoder_input(f, f_hat)))
        return rec, vq_loss, codes, torch.cat(zs)

    def decode_with_generated(self, fhat: torch.Tensor, gen_fhat: torch.Tensor | None) -> torch.Tensor:
        """Decoder on ``fhat`` with the generated latents (if any) appended as extra rows, in one pass."""
        if gen_fhat is not None:
            fhat = torch.cat([fhat, gen_fhat.to(fhat)])
        return self.vae.decoder(self.vae.post_quant_conv(fhat))

    def scale_vectors(self, idx_Bl: torch.Tensor, pn: int, si: int) -> torch.Tensor:
        """Scale ``si``'s codes on the latent grid, Phi(up(emb(idx))) (a subclass may change the rule)."""
        q = self.vae.quantize
        return q.residual(q.codes_to_map(idx_Bl, pn), si)

    def decoder_input(self, f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """Straight-through: the decoder sees ``f_hat``, the gradient reaches the encoder's ``f``."""
        return (f_hat.detach() - f.detach()) + f


class TokenizerTask:
    """Loss, usage tracking and dead-code restarts for ``freqar train tokenizer``."""

    name = "tokenizer"

    def __init__(self, cfg: TokenizerTrainConfig, data: ImageSet, ctx: DistContext) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        self.vae_cfg = msvq_config(cfg)
        expect = self.vae_cfg.patch_nums[-1] * self.vae_cfg.downsample
        if data.size != expect:
            raise CheckpointMismatch(
                f"images are {data.size} px but this tokenizer needs {expect} px (last scale "
                f"{self.vae_cfg.patch_nums[-1]} x downsampling {self.vae_cfg.downsample}); "
                f"set data.size={expect} or change model.ch_mult / model.patch_nums"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            vae = VQVAE(self.vae_cfg)
        if cfg.init.decoder_only and not cfg.init.path:
            raise CheckpointMismatch("init.decoder_only needs init.path (the tokenizer whose codes to keep)")
        if cfg.init.path:
            start = load_tokenizer(cfg.init.path)
            # a decoder-only run may make the decoder deeper: its new blocks start as the identity
            free = {"decoder_num_res_blocks"} if cfg.init.decoder_only else set()
            mine = {k: v for k, v in self.vae_cfg.to_dict().items() if k not in free}
            if {k: v for k, v in start.cfg.to_dict().items() if k not in free} != mine:
                raise CheckpointMismatch(
                    f"init.path '{cfg.init.path}' is a different tokenizer than model.* describes; "
                    "copy its model section into the config"
                )
            from .decoder_swap import grow_decoder

            grow_decoder(vae, start)  # everything when the shapes match; a deeper decoder grows
        self.module = VQTrainModule(vae, decoder_only=cfg.init.decoder_only)
        self.perceptual = None
        if cfg.loss.perceptual_weight > 0:
            from .perceptual import load_lite0_perceptual

            self.perceptual = load_lite0_perceptual().to(ctx.device)
        self.adversary = make_adversary(cfg.loss, cfg.run.seed, ctx, data.size)
        self.gen_fhat = self.load_gen_latents() if cfg.loss.gen_latents else None
        V = self.vae_cfg.vocab_size
        self.val = load_validation_set(cfg.data, cfg.run.val_data, data) if cfg.run.eval_every > 0 else None
        self.usage = torch.full((V,), cfg.loss.restart_threshold * 4)  # EMA hits per step, all processes
        self.last_counts = torch.zeros(V)
        self.pool: torch.Tensor | None = None
        self.restarted = 0

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        c, dev = self.cfg, self.ctx.device
        idx = batch_indices(len(self.data), c.run.batch_size, step, c.run.seed, self.ctx.rank, self.ctx.world)
        x = to_unit(self.data.images[idx])
        if c.data.hflip:
            g = step_generator(c.run.seed, step, self.ctx.rank)
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
        x = x.to(dev)
        gen = None
        if self.gen_fhat is not None:
            g = step_generator(c.run.seed, step, self.ctx.rank, 5)
            gen = self.gen_fhat[torch.randint(0, self.gen_fhat.shape[0], (x.shape[0],), generator=g)].to(dev)
        rec, vq, codes, zs = model(x, gen)
        rec, rec_gen = rec[: x.shape[0]], rec[x.shape[0] :]
        mse = F.mse_loss(rec, x)
        recon = mse + c.loss.l1_weight * F.l1_loss(rec, x)
        logs: dict[str, float] = {}
        if self.perceptual is not None:
            per = self.perceptual(rec, x)
            recon = recon + c.loss.perceptual_weight * per
            logs["perc"] = per.item()
        if self.adversary is not None:
            last = self.module.vae.decoder.conv_out.weight
            # generated latents (loss.gen_latents) have no target image: they meet only the critic, which
            # judges them beside the reconstructions
            fake = rec if gen is None else torch.cat([rec, rec_gen])
            recon = recon + self.adversary.step(x, fake, recon, last, step, logs)
        loss = recon + c.loss.vq_weight * vq
        with torch.no_grad():
            counts = torch.bincount(
                torch.cat([k.flatten() for k in codes]).cpu(), minlength=self.usage.numel()
            )
            counts = all_reduce_sum(counts.float().to(dev), self.ctx).cpu()
            d = c.loss.usage_decay
            self.usage.mul_(d).add_(counts, alpha=1 - d)
            self.last_counts = counts
            keep = min(zs.shape[0], 4096)
            sel = torch.randperm(zs.shape[0], generator=step_generator(c.run.seed, step, self.ctx.rank, 3))[
                :keep
            ]
            self.pool = zs.detach()[sel.to(zs.device)]
        psnr = -10 * torch.log10(mse.detach() / 4 + 1e-12)  # images span [-1, 1]: peak-to-peak 2
        logs.update(psnr=psnr.item(), vq=vq.item(), used=self.active_fraction())
        return loss, logs, x.shape[0]

    def load_gen_latents(self) -> torch.Tensor:
        """The ``loss.gen_latents`` bank: (N, C, h, w) f_hat of the model's own samples."""
        p = self.vae_cfg.patch_nums[-1]
        shape = (self.vae_cfg.z_channels, p, p)
        c = self.cfg
        return load_latent_bank(
            c.loss, c.init.decoder_only, self.adversary is not None, "fhat", shape, "tokenizer"
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Reconstruction loss (MSE + L1 weight·L1, no perceptual term) and PSNR of the held-out images, and
        the same loss on as many training images."""
        assert self.val is not None
        c = self.cfg
        return reconstruction_scores(
            lambda x: model(x)[0], self.val, self.data, c.run.seed, c.loss.l1_weight, self.ctx.device
        )

    def active_fraction(self) -> float:
        return (self.usage >= self.cfg.loss.restart_threshold).float().mean().item()

    def perplexity(self) -> float:
        p = self.last_counts / self.last_counts.sum().clamp_min(1)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()

    @torch.no_grad()
    def after_step(self, step: int, loop: Any) -> dict[str, float]:
        """Every ``restart_every`` steps, move dead codes onto latents seen in this batch (rank 0 picks)."""
        lc = self.cfg.loss
        if self.cfg.init.decoder_only:  # restarting codes would change the codes the decoder is tuned for
            return {}
        if lc.restart_every <= 0 or (step + 1) % lc.restart_every or self.pool is None:
            return {}
        dead = (self.usage < lc.restart_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return {}
        emb = loop.model.vae.quantize.embedding.weight
        if self.ctx.is_main:
            g = step_generator(self.cfg.run.seed, step, 0, 7)
            pick = torch.randint(0, self.pool.shape[0], (dead.numel(),), generator=g)
            new = self.pool[pick.to(self.pool.device)]
            new = new + 0.01 * new.std() * torch.randn(new.shape, generator=g).to(new.device)
            emb.data[dead.to(emb.device)] = new
        broadcast(emb.data, self.ctx)
        loop.ema.vae.quantize.embedding.weight.data.copy_(emb.data)
        st = loop.optimizer.state.get(emb, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][dead.to(st[key].device)] = 0
        self.usage[dead] = lc.restart_threshold * 4
        self.restarted += int(dead.numel())
        return {"restarted": float(dead.numel())}

    def state_dict(self) -> dict[str, Any]:
        adv = self.adversary.state_dict() if self.adversary is not None else {}
        return {"usage": self.usage, "last_counts": self.last_counts, "restarted": self.restarted, **adv}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state)
        if "usage" in state:
            self.usage = state["usage"].cpu().clone()
            self.last_counts = state["last_counts"].cpu().clone()
            self.restarted = int(state.get("restarted", 0))

    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        """Write ``run_dir/tokenizer/{config.json, model.safetensors}`` from the EMA weights."""
        out = run_dir / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(
            ema.vae,
            out,
            extra={
                "codebook_used": self.active_fraction(),
                "codebook_perplexity": self.perplexity(),
                "dead_code_restarts": self.restarted,
                "train_config": to_dict(self.cfg),
            },
        )
        return out


def save_tokenizer(vae: VQVAE, out: Path, extra: dict | None = None) -> None:
    save_safetensors(out / "model.safetensors", vae.state_dict())
    write_json(
        out / "config.json", {"format": TOKENIZER_FORMAT, "tokenizer": vae.cfg.to_dict(), **(extra or {})}
    )


def load_tokenizer(path: str | Path) -> VQVAE:
    """A trained tokenizer: its export folder, the run folder that holds ``tokenizer/``, or a freqar VAR model
    folder (e.g. the bundled ``emoji``), whose tokenizer is taken."""
    p = Path(path)
    if (p / "tokenizer" / "config.json").is_file():
        p = p / "tokenizer"
    cfg = read_json(p / "config.json")
    if isinstance(cfg, dict) and cfg.get("format") == MODEL_FORMAT and cfg.get("family", "var") == "var":
        return load_pipeline_dir(p).tokenizer.requires_grad_(False)
    if not isinstance(cfg, dict) or cfg.get("format") != TOKENIZER_FORMAT:
        raise CheckpointMismatch(f"'{p / 'config.json'}' is not a freqar tokenizer export")
    vae = VQVAE(MSVQConfig(**cfg["tokenizer"]))
    load_state_dict_strict(vae, load_safetensors(p / "model.safetensors"), source=str(p))
    return vae.eval().requires_grad_(False)
