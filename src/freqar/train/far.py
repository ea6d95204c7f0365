"""Training FAR on a frozen KL autoencoder (``freqar train far``): one level per batch, diffusion loss.

Every image (and its mirror, with hflip) is encoded once up front; the cache holds the posterior mean and
log-variance, and each step draws a fresh posterior sample from them (MAR's cached-moments recipe), scaled by
the autoencoder's latent scale. A step then follows the official training forward
(``FARTransformer.forward``): a level s drawn uniformly from 0..side−1 for the whole batch, the low-passed
latent as input, the *full* latent as the target at every position, class-label dropout to the learned null
(``fake_latent``) for classifier-free guidance, and the per-token diffusion loss (MSE + VLB) through the MLP
head with the level index as its extra input.

Frequency-aware loss weights: upstream's ``--loss_weight`` flag crashes (a Python list meets ``.unsqueeze``)
and never indexes its list by the level. We apply what the paper describes: the loss of a batch at level s is
multiplied by w_s = 1 + sin(π/2 · (s+1)/side), rising from ≈1.1 (coarsest) to 2 (finest), so the high
frequencies the model finds hardest get more weight (``far.loss_weights: sin``; ``none`` turns it off).

Masking (the paper's "mask mechanism"): with probability ``far.mask_prob`` a batch is trained with MAR's
random token dropping at upstream's level-dependent rate. Besides diversity, this teaches the decoder to work
with mask tokens in place of dropped inputs, which is exactly what the ``farskip`` exclusion policy feeds it
at inference.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption
from ..models.far import FARConfig, FARTransformer
from ..models.far_pipeline import FARDefaults, FARPipeline
from ..tokenizers.kl import AutoencoderKL
from .config import DataConfig, OptimConfig, RunConfig
from .data import (
    DatasetError,
    ImageSet,
    batch_indices,
    load_validation_set,
    step_generator,
    to_unit,
    train_eval_indices,
)
from .dist import DistContext
from .kl import kl_fingerprint, load_kl


@dataclass
class FARModelConfig:
    """The transformer and diffusion MLP (fields of ``FARConfig``; latent shape and classes come from the data
    and the autoencoder)."""

    encoder_embed_dim: int = 192
    encoder_depth: int = 3
    encoder_num_heads: int = 4
    decoder_embed_dim: int = 192
    decoder_depth: int = 3
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    buffer_size: int = 8
    diffloss_d: int = 3
    diffloss_w: int = 256
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    diffusion_batch_mul: int = 4


@dataclass
class FARTrainSettings:
    kl: str = ""  # a `freqar train tokenizer --kind kl` run dir (or its kl/ export)
    label_drop: float = 0.1  # probability of the null class, for classifier-free guidance
    loss_weights: str = "sin"  # sin: w_s = 1 + sin(π/2·(s+1)/side) (the paper's intent); none: all 1
    mask_prob: float = 0.0  # fraction of batches trained with MAR masking (upstream's --mask is 1)
    sample_posterior: bool = True  # a fresh posterior draw per step (else the posterior mean)
    amp: bool = False  # bf16 autocast (CPUs with AVX512-BF16/AMX, or CUDA); the loss itself stays float32
    cfg: float = 3.0  # sampling defaults written into the exported model
    guidance_schedule: str = "linear"
    steps: str = "25"
    temperature: float = 1.0
    init: str = ""  # an exported FAR model (run dir or model folder): a second phase from its weights


@dataclass
class FARTrainConfig:
    model: FARModelConfig = field(default_factory=FARModelConfig)
    far: FARTrainSettings = field(default_factory=FARTrainSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-4, weight_decay=0.02))
    run: RunConfig = field(default_factory=RunConfig)


def level_weights(kind: str, side: int) -> list[float] | None:
    """Per-level loss weights (None = unweighted)."""
    if kind == "none":
        return None
    if kind == "sin":
        return [1.0 + math.sin(math.pi / 2 * (s + 1) / side) for s in range(side)]
    raise InvalidOption(f"unknown far.loss_weights '{kind}' (sin, none)")


def far_config(cfg: FARTrainConfig, vae: AutoencoderKL, num_classes: int) -> FARConfig:
    m = cfg.model
    return FARConfig(
        encoder_embed_dim=m.encoder_embed_dim,
        encoder_depth=m.encoder_depth,
        encoder_num_heads=m.encoder_num_heads,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        mlp_ratio=m.mlp_ratio,
        buffer_size=m.buffer_size,
        num_classes=num_classes,
        class_emb_rows=num_classes,
        label_drop_prob=cfg.far.label_drop,
        diffloss_d=m.diffloss_d,
        diffloss_w=m.diffloss_w,
        token_channels=vae.cfg.embed_dim,
        seq_h=vae.cfg.latent_side,
        attn_dropout=m.attn_dropout,
        proj_dropout=m.proj_dropout,
        diffusion_batch_mul=m.diffusion_batch_mul,
    )


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: torch.Tensor, flip: bool, batch: int = 32) -> torch.Tensor:
    """Posterior (mean ‖ log-variance), unscaled, of every image: (V, N, 2C, h, w), V = 2 with mirrors."""
    dev = next(vae.parameters()).device
    outs = []
    for mirrored in [False, True] if flip else [False]:
        rows = []
        for i in range(0, images.shape[0], batch):
            x = to_unit(images[i : i + batch]).to(dev)
            if mirrored:
                x = x.flip(-1)
            mean, logvar = vae.posterior(vae.moments(x))
            rows.append(torch.cat((mean, logvar), dim=1).cpu())
        outs.append(torch.cat(rows))
    return torch.stack(outs)


class FARTask:
    """FAR's training step on cached posterior moments, with the frequency-aware weights and CFG dropout."""

    name = "far"

    def __init__(self, cfg: FARTrainConfig, data: ImageSet, ctx: DistContext, run_dir: Path) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        if not cfg.far.kl:
            raise DatasetError("no autoencoder given (far.kl=RUN_DIR of `freqar train tokenizer --kind kl`)")
        if not 0.0 <= cfg.far.mask_prob <= 1.0:
            raise InvalidOption(f"far.mask_prob must be in [0, 1], got {cfg.far.mask_prob}")
        self.vae = load_kl(cfg.far.kl).to(ctx.device)
        if data.size != self.vae.cfg.resolution:
            raise DatasetError(
                f"images are {data.size} px but the autoencoder '{cfg.far.kl}' expects "
                f"{self.vae.cfg.resolution} px"
            )
        self.far_cfg = far_config(cfg, self.vae, len(data.class_names))
        self.weights = level_weights(cfg.far.loss_weights, self.far_cfg.seq_h)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            model = FARTransformer(self.far_cfg)
        if cfg.far.mask_prob == 0:  # never used in training: keep it out of the optimizer (and of DDP)
            model.mask_token.requires_grad_(False)
        if cfg.far.init:
            self._start_from(model, cfg.far.init)
        self.module = model
        self.moments = self._moments(run_dir)
        self.val = load_validation_set(cfg.data, cfg.run.val_data, data) if cfg.run.eval_every > 0 else None
        self._val_moments: torch.Tensor | None = None

    def _start_from(self, model: FARTransformer, folder: str) -> None:
        """Load ``far.init``'s transformer after checking its architecture and latent space."""
        from ..models.far_pipeline import load_far_dir
        from .decoder_swap import start_from_export

        p = Path(folder)
        start = load_far_dir(p / "model" if (p / "model" / "config.json").is_file() else p)
        start_from_export(model, self.vae, start.vae, start.transformer, "far.init", folder)

    def _moments(self, run_dir: Path) -> torch.Tensor:
        """Encode the data set once; cached in the run folder keyed by the data and the autoencoder."""
        h = hashlib.sha256()
        h.update(self.data.images.numpy().tobytes())
        h.update(kl_fingerprint(self.vae).encode())
        h.update(str(self.cfg.data.hflip).encode())
        path = run_dir / f"moments-{h.hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        moments = encode_moments(self.vae, self.data.images, self.cfg.data.hflip)
        if self.ctx.is_main:
            from ..io import atomic_path

            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(moments, tmp)
        return moments

    def latents(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Scaled latents (B, C, h, w) of images ``idx``: original or mirror at random, a posterior draw."""
        B = idx.numel()
        V = self.moments.shape[0]
        variant = (torch.rand(B, generator=g) < 0.5).long() if V > 1 else torch.zeros(B, dtype=torch.long)
        mean, logvar = self.moments[variant, idx].chunk(2, dim=1)
        z = mean
        if self.cfg.far.sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        return z * self.vae.cfg.scale_factor

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        c, dev = self.cfg, self.ctx.device
        idx = batch_indices(len(self.data), c.run.batch_size, step, c.run.seed, self.ctx.rank, self.ctx.world)
        g = step_generator(c.run.seed, step, self.ctx.rank, 1)
        z = self.latents(idx, g).to(dev)
        masked = bool(torch.rand(1, generator=g).item() < c.far.mask_prob) if c.far.mask_prob > 0 else False
        dev_type = "cuda" if str(dev).startswith("cuda") else "cpu"
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=c.far.amp):
            out = model(
                z,
                self.data.labels[idx].to(dev),
                generator=step_generator(c.run.seed, step, self.ctx.rank, 2),
                level_weights=self.weights,
                mask=masked,
            )
        loss = out["loss"].float()
        if c.far.mask_prob > 0:  # mask_token gets a (zero) gradient in unmasked batches too, as DDP requires
            loss = loss + 0.0 * self.module.mask_token.sum()
        return loss, {"level": float(out["level"][0])}, idx.numel()

    def after_step(self, step: int, loop: Any) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """The training loss (weighted diffusion loss, no masking) on posterior-mean latents of the held-out
        images and of as many training images, with the same fixed levels, timesteps and noise for both
        sets and at every evaluation, so the numbers compare across steps and between the sets."""
        assert self.val is not None
        if self._val_moments is None:
            self._val_moments = encode_moments(self.vae, self.val.images, False)[0]
            self._train_idx = train_eval_indices(self.data, self.val, self.cfg.run.seed)
        ti = self._train_idx
        return {
            "val_loss": self._diffusion_loss(model, self._val_moments, self.val.labels),
            "train_eval_loss": self._diffusion_loss(model, self.moments[0][ti], self.data.labels[ti]),
        }

    def _diffusion_loss(
        self, model: nn.Module, moments: torch.Tensor, labels: torch.Tensor, batch: int = 32
    ) -> float:
        dev, c = self.ctx.device, self.cfg
        dev_type = "cuda" if str(dev).startswith("cuda") else "cpu"
        total, n = 0.0, moments.shape[0]
        for b, i in enumerate(range(0, n, batch)):
            z = moments[i : i + batch].chunk(2, dim=1)[0] * self.vae.cfg.scale_factor
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=c.far.amp):
                out = model(
                    z.to(dev),
                    labels[i : i + batch].to(dev),
                    generator=step_generator(c.run.seed, b, 0, 9),
                    level_weights=self.weights,
                    mask=False,
                )
            total += out["loss"].float().item() * z.shape[0]
        return total / n

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def pipeline(self, transformer: FARTransformer, name: str) -> FARPipeline:
        f = self.cfg.far
        defaults = FARDefaults(
            cfg=f.cfg, guidance_schedule=f.guidance_schedule, steps=str(f.steps), temperature=f.temperature
        )
        return FARPipeline(name, transformer, self.vae, defaults, list(self.data.class_names)).eval()

    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        """A loadable FAR model folder (``FARPipeline.save``): the EMA transformer + the autoencoder."""
        assert isinstance(ema, FARTransformer)
        return self.pipeline(ema, run_dir.name).save(run_dir / "model")


def train_far(
    cfg: FARTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> Any:
    """``freqar train far``: a TrainResult, or the export Path with ``export_only``."""
    from .run import run_task

    return run_task("far", cfg, lambda data, c: FARTask(cfg, data, c, out), out, ctx, progress, export_only)
