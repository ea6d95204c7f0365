"""Training MAR's KL autoencoder (``freqar train tokenizer --kind kl``): pixel loss + a small KL term.

The decoder always sees a posterior *sample* (reparameterised, noise from the per-step generator so resume
is exact), which keeps it robust to the latent noise FAR's diffusion head leaves behind. The KL weight is
small: it only bounds the latent's scale and keeps the posterior from collapsing to a point. The posterior
starts with a small variance (``model.logvar_init``): with the default unit variance the untrained means are
drowned in noise and the decoder sits at the average image for hundreds of steps. At export the
latent scale is measured on the training images (1/std of the posterior means, as LDM/MAR pick 0.2325 for
kl16), so FAR trains on roughly unit-variance latents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatch
from ..io import (
    atomic_path,
    load_safetensors,
    load_state_dict_strict,
    read_json,
    save_safetensors,
    write_json,
)
from ..tokenizers.kl import AutoencoderKL, KLConfig
from .adversarial import load_latent_bank, make_adversary
from .config import AdversarialLoss, DataConfig, OptimConfig, RunConfig, to_dict
from .data import (
    ImageSet,
    batch_indices,
    load_validation_set,
    reconstruction_scores,
    step_generator,
    to_unit,
)
from .dist import DistContext

KL_FORMAT = "freqar-kl/1"
# KLConfig fields that only shape the decoder (free to change in a decoder-only run)
DECODER_SHAPE = ("decoder_ch", "decoder_num_res_blocks", "decoder_attn_resolutions")


@dataclass
class KLModelConfig:
    """The autoencoder to train (fields of ``KLConfig``; the resolution comes from ``data.size``)."""

    embed_dim: int = 16
    ch: int = 16
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 1
    encoder_attn_resolutions: list[int] = field(default_factory=list)
    decoder_attn_resolutions: list[int] = field(default_factory=list)
    groupnorm_groups: int = 8
    logvar_init: float = -6.0  # initial posterior log-variance (bias of quant_conv's logvar half)
    decoder_ch: int = 0  # decoder width when it differs from the encoder's (0 = ch)
    decoder_num_res_blocks: int = -1  # decoder depth per level when it differs (-1 = num_res_blocks)


@dataclass
class KLLoss(AdversarialLoss):
    """mse + l1_weight·L1 + kl_weight·KL (all means per element) + optional perceptual term."""

    l1_weight: float = 0.5
    kl_weight: float = 1e-4
    perceptual_weight: float = 0.0  # EfficientNet-Lite0 distance (train/perceptual.py); 0 = off
    scale_images: int = 512  # training images used to measure the latent scale at export


@dataclass
class KLInit:
    """Start from a trained KL export (a second phase with a fresh schedule); ``model.*`` must match it.

    ``decoder_only`` freezes the encoder (and so the latent space and its scale): the decoder alone learns,
    so a FAR model trained on this autoencoder's latents stays valid with the tuned decoder.
    """

    path: str = ""
    decoder_only: bool = False


@dataclass
class KLTrainConfig:
    model: KLModelConfig = field(default_factory=KLModelConfig)
    loss: KLLoss = field(default_factory=KLLoss)
    init: KLInit = field(default_factory=KLInit)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-4, weight_decay=0.0))
    run: RunConfig = field(default_factory=RunConfig)


def kl_config(cfg: KLTrainConfig, scale_factor: float = 1.0) -> KLConfig:
    m = cfg.model
    return KLConfig(
        embed_dim=m.embed_dim,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        resolution=cfg.data.size,
        encoder_attn_resolutions=tuple(m.encoder_attn_resolutions),
        decoder_attn_resolutions=tuple(m.decoder_attn_resolutions),
        groupnorm_groups=m.groupnorm_groups,
        scale_factor=scale_factor,
        decoder_ch=m.decoder_ch if m.decoder_ch > 0 and m.decoder_ch != m.ch else None,
        decoder_num_res_blocks=(
            m.decoder_num_res_blocks
            if m.decoder_num_res_blocks >= 0 and m.decoder_num_res_blocks != m.num_res_blocks
            else None
        ),
    )


class KLTrainModule(nn.Module):
    """Wraps the autoencoder with the training forward (DDP wraps this module)."""

    def __init__(self, vae: AutoencoderKL, decoder_only: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.decoder_only = decoder_only
        if decoder_only:  # the latent space is fixed: only the decoder side learns
            vae.requires_grad_(False)
            vae.post_quant_conv.requires_grad_(True)
            vae.decoder.requires_grad_(True)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor, gen_z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image in [-1,1], standard-normal noise shaped like the latent -> (reconstruction, mean, logvar).

        ``gen_z`` (decoder-only runs): generated latents (unscaled, as the decoder takes them) decoded in the
        same pass; their images follow the B reconstructions in the first output.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            mean, logvar = self.vae.posterior(self.vae.moments(x))
        z = mean + torch.exp(0.5 * logvar) * noise
        if gen_z is not None:
            if not self.decoder_only:
                raise ValueError("generated latents need a decoder-only run")
            z = torch.cat([z, gen_z.to(z)])
        return self.vae.decoder(self.vae.post_quant_conv(z)), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def psnr(rec: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(rec.clamp(-1, 1), x).item()
    return -10.0 * torch.log10(torch.tensor(mse / 4 + 1e-12)).item()


class KLTask:
    """Loss of one step and the export of ``freqar train tokenizer --kind kl``."""

    name = "kl"

    def __init__(self, cfg: KLTrainConfig, data: ImageSet, ctx: DistContext) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        self.vae_cfg = kl_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            vae = AutoencoderKL(self.vae_cfg)
        with torch.no_grad():  # near-deterministic start: unit noise would drown the untrained means
            vae.quant_conv.bias[self.vae_cfg.embed_dim :].fill_(cfg.model.logvar_init)
        if cfg.init.decoder_only and not cfg.init.path:
            raise CheckpointMismatch(
                "init.decoder_only needs init.path (the autoencoder whose latents to keep)"
            )
        self.fixed_scale: float | None = None
        if cfg.init.path:
            start = load_kl(cfg.init.path)
            # a decoder-only run may give the decoder another shape: it then starts fresh on frozen latents
            free = {"scale_factor"} | (set(DECODER_SHAPE) if cfg.init.decoder_only else set())
            mine = {k: v for k, v in self.vae_cfg.to_dict().items() if k not in free}
            if {k: v for k, v in start.cfg.to_dict().items() if k not in free} != mine:
                raise CheckpointMismatch(
                    f"init.path '{cfg.init.path}' is a different autoencoder than model.* describes; "
                    "copy its model section into the config"
                )
            from .decoder_swap import grow_decoder

            grow_decoder(vae, start)  # everything when the shapes match; a grown or new decoder otherwise
            if cfg.init.decoder_only:  # same encoder, same latent scale: keep it exactly
                self.fixed_scale = start.cfg.scale_factor
        self.module = KLTrainModule(vae, decoder_only=cfg.init.decoder_only)
        self.val = load_validation_set(cfg.data, cfg.run.val_data, data) if cfg.run.eval_every > 0 else None
        self.perceptual = None
        if cfg.loss.perceptual_weight > 0:
            from .perceptual import load_lite0_perceptual

            self.perceptual = load_lite0_perceptual().to(ctx.device)
        self.adversary = make_adversary(cfg.loss, cfg.run.seed, ctx, data.size)
        self.gen_z = None
        if cfg.loss.gen_latents:
            shape = (self.vae_cfg.embed_dim, self.vae_cfg.latent_side, self.vae_cfg.latent_side)
            critic = self.adversary is not None
            self.gen_z = load_latent_bank(cfg.loss, cfg.init.decoder_only, critic, "z", shape, "autoencoder")

    def batch(self, step: int) -> torch.Tensor:
        """This process's images of ``step`` in [-1, 1], mirrored at random when ``data.hflip``."""
        c = self.cfg
        idx = batch_indices(len(self.data), c.run.batch_size, step, c.run.seed, self.ctx.rank, self.ctx.world)
        x = to_unit(self.data.images[idx])
        if c.data.hflip:
            flip = torch.rand(x.shape[0], generator=step_generator(c.run.seed, step, self.ctx.rank)) < 0.5
            x[flip] = x[flip].flip(-1)
        return x

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        c, dev = self.cfg, self.ctx.device
        x = self.batch(step).to(dev)
        side = self.vae_cfg.latent_side
        g = step_generator(c.run.seed, step, self.ctx.rank, 1)
        noise = torch.randn(x.shape[0], self.vae_cfg.embed_dim, side, side, generator=g).to(dev)
        gen = None
        if self.gen_z is not None:  # as many of the model's own latents as the batch has images
            g = step_generator(c.run.seed, step, self.ctx.rank, 5)
            gen = self.gen_z[torch.randint(0, self.gen_z.shape[0], (x.shape[0],), generator=g)].to(dev)
        rec, mean, logvar = model(x, noise, gen)
        rec, rec_gen = rec[: x.shape[0]], rec[x.shape[0] :]
        mse = F.mse_loss(rec, x)
        kl = kl_divergence(mean, logvar)
        loss = mse + c.loss.l1_weight * F.l1_loss(rec, x) + c.loss.kl_weight * kl
        logs: dict[str, float] = {}
        if self.perceptual is not None:
            per = self.perceptual(rec, x)
            loss = loss + c.loss.perceptual_weight * per
            logs["perc"] = per.item()
        if self.adversary is not None:
            last = self.module.vae.decoder.conv_out.weight
            # generated latents have no target image: they meet only the critic, beside the reconstructions
            fake = rec if gen is None else torch.cat([rec, rec_gen])
            loss = loss + self.adversary.step(x, fake, loss, last, step, logs)
        logs.update(
            psnr=-10 * torch.log10(mse.detach() / 4 + 1e-12).item(),
            kl=kl.item(),
            std=torch.exp(0.5 * logvar.detach()).mean().item(),
        )
        return loss, logs, x.shape[0]

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Reconstruction loss (MSE + L1 weight·L1) and PSNR of the posterior mode on the held-out images,
        and the same loss on as many training images."""
        assert self.val is not None
        c, side, C = self.cfg, self.vae_cfg.latent_side, self.vae_cfg.embed_dim

        def mode(x: torch.Tensor) -> torch.Tensor:  # zero noise: the posterior mean
            return model(x, x.new_zeros(x.shape[0], C, side, side))[0]

        return reconstruction_scores(mode, self.val, self.data, c.run.seed, c.loss.l1_weight, self.ctx.device)

    def after_step(self, step: int, loop: Any) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.adversary.state_dict() if self.adversary is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state)

    @torch.no_grad()
    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        """Write ``run_dir/kl/{config.json, model.safetensors, recon.png}`` from the EMA weights.

        The latent scale is 1/std of the posterior means of the first ``loss.scale_images`` training images;
        config.json also records the reconstruction PSNR (posterior mode) on those images.
        """
        vae: AutoencoderKL = ema.vae
        was_training = vae.training
        vae.eval()
        dev = next(vae.parameters()).device
        n = min(len(self.data), max(self.cfg.loss.scale_images, 1))
        means, recs, errs = [], [], []
        for i in range(0, n, 32):
            x = to_unit(self.data.images[i : min(i + 32, n)]).to(dev)
            mean, _ = vae.posterior(vae.moments(x))
            rec = vae.decoder(vae.post_quant_conv(mean)).clamp(-1, 1)
            means.append(mean.cpu())
            errs.append(F.mse_loss(rec, x, reduction="none").mean(dim=(1, 2, 3)).cpu())
            if i == 0:
                recs.append((x[:8].cpu(), rec[:8].cpu()))
        vae.train(was_training)
        std = torch.cat(means).float().std().item()
        mse = torch.cat(errs).mean().item()
        scale = 1.0 / max(std, 1e-6) if self.fixed_scale is None else self.fixed_scale
        out = run_dir / "kl"
        out.mkdir(parents=True, exist_ok=True)
        cfg = kl_config(self.cfg, scale_factor=round(scale, 6))
        save_safetensors(out / "model.safetensors", vae.state_dict())
        write_json(
            out / "config.json",
            {
                "format": KL_FORMAT,
                "tokenizer": cfg.to_dict(),
                "latent_std": std,
                "psnr_train_mode": -10.0 * torch.log10(torch.tensor(mse / 4 + 1e-12)).item(),
                "scale_images": n,
                "train_config": to_dict(self.cfg),
            },
        )
        _save_recon(recs[0][0], recs[0][1], out / "recon.png")
        return out


def _save_recon(x: torch.Tensor, rec: torch.Tensor, path: Path) -> None:
    """Two rows: originals over reconstructions."""
    from PIL import Image

    rows = [torch.cat(list(t), dim=2) for t in (x, rec)]
    arr = torch.cat(rows, dim=1).add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def load_kl(path: str | Path) -> AutoencoderKL:
    """A trained KL autoencoder: its export folder, the run folder that holds ``kl/``, or a freqar FAR model
    folder (e.g. the bundled far-emoji), whose autoencoder is taken."""
    p = Path(path)
    if (p / "kl" / "config.json").is_file():
        p = p / "kl"
    head = read_json(p / "config.json") if (p / "config.json").is_file() else None
    if isinstance(head, dict) and head.get("family") == "far":
        from ..models.far_pipeline import load_far_dir

        return load_far_dir(p).vae.eval().requires_grad_(False)
    if not (p / "config.json").is_file():
        raise CheckpointMismatch(f"no KL autoencoder export in '{path}' (expected kl/config.json)")
    cfg = read_json(p / "config.json")
    if not isinstance(cfg, dict) or cfg.get("format") != KL_FORMAT:
        raise CheckpointMismatch(f"'{p / 'config.json'}' is not a freqar KL autoencoder export")
    vae = AutoencoderKL(KLConfig(**cfg["tokenizer"]))
    load_state_dict_strict(vae, load_safetensors(p / "model.safetensors"), source=str(p))
    return vae.eval().requires_grad_(False)


def kl_fingerprint(vae: AutoencoderKL) -> str:
    """A short hash of the weights and config (keys cached latents to the exact autoencoder)."""
    h = hashlib.sha256(repr(sorted(vae.cfg.to_dict().items())).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_kl(
    cfg: KLTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> Any:
    """``freqar train tokenizer --kind kl``: a TrainResult, or the export Path with ``export_only``."""
    from .run import run_task

    return run_task("kl", cfg, lambda data, c: KLTask(cfg, data, c), out, ctx, progress, export_only)
