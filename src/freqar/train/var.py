"""Training the VAR transformer on a frozen tokenizer: teacher forcing over all scales, cross-entropy.

Every image (and its mirror, with hflip) is tokenized once up front; a step then only rebuilds the
teacher-forcing inputs from ground-truth codes, so the costly conv encoder runs once per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption
from ..models.var import VARConfig, VARTransformer
from ..pipeline import Pipeline, SamplingDefaults
from ..tokenizers.msvq import VQVAE
from .config import VARTrainConfig
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
from .tokenizer import load_tokenizer


def var_config(cfg: VARTrainConfig, tok: VQVAE, num_classes: int) -> VARConfig:
    m = cfg.model
    return VARConfig(
        depth=m.depth,
        embed_dim=m.embed_dim,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        shared_aln=m.shared_aln,
        num_classes=num_classes,
        patch_nums=tok.cfg.patch_nums,
        vocab_size=tok.cfg.vocab_size,
        z_channels=tok.cfg.z_channels,
        drop_path_rate=m.drop_path_rate,
    )


@torch.no_grad()
def init_var_weights(model: VARTransformer, gamma_init: float = 1e-3) -> None:
    """VAR's training init: small trunc-normal weights, zero biases, depth-scaled output projections,
    a tiny head and near-zero AdaLN gates so every block starts close to the identity."""
    C, depth = model.cfg.embed_dim, model.cfg.depth
    std = math.sqrt(1 / C / 3)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            nn.init.trunc_normal_(mod.weight, std=std)
    model.head.weight.mul_(0.02)
    model.head.bias.zero_()
    model.head_nm.ada_lin[-1].weight.mul_(0.5)
    for blk in model.blocks:
        blk.attn.proj.weight.div_(math.sqrt(2 * depth))
        blk.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if hasattr(blk, "ada_lin"):
            w = blk.ada_lin[-1].weight
            w[2 * C :].mul_(0.5)
            w[: 2 * C].mul_(gamma_init)
        else:
            blk.ada_gss[:, :, 2:].mul_(0.5)
            blk.ada_gss[:, :, :2].mul_(gamma_init)


@torch.no_grad()
def encode_views(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool, batch: int = 32
) -> torch.Tensor:
    """``fn`` of every image in [-1, 1], batched: (1, N, ...), or (2, N, ...) with the mirrored copies."""
    outs = []
    for mirrored in [False, True] if flip else [False]:
        rows = []
        for i in range(0, images.shape[0], batch):
            x = to_unit(images[i : i + batch])
            rows.append(fn(x.flip(-1) if mirrored else x).cpu())
        outs.append(torch.cat(rows))
    return torch.stack(outs)


def tokenize_images(tok: VQVAE, images: torch.Tensor, flip: bool, batch: int = 32) -> torch.Tensor:
    """Code ids (1, N, L) of every image, or (2, N, L) with the mirrored copies when ``flip``."""
    dtype = torch.int16 if tok.cfg.vocab_size < 32768 else torch.int32
    dev = tok.quantize.embedding.weight.device
    return encode_views(lambda x: torch.cat(tok.encode(x.to(dev)), dim=1).to(dtype), images, flip, batch)


class VARTask:
    """Teacher-forced next-scale prediction with class-label dropout (the null class) for CFG."""

    name = "var"

    def __init__(self, cfg: VARTrainConfig, data: ImageSet, ctx: DistContext, run_dir: Path) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        if not cfg.var.tokenizer:
            raise DatasetError("no tokenizer given (var.tokenizer=RUN_DIR of `freqar train tokenizer`)")
        self.tok = load_tokenizer(cfg.var.tokenizer).to(ctx.device)
        expect = self.tok.cfg.patch_nums[-1] * self.tok.cfg.downsample
        if data.size != expect:
            raise DatasetError(f"images are {data.size} px but the tokenizer expects {expect} px")
        self.var_cfg = var_config(cfg, self.tok, len(data.class_names))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            model = VARTransformer(self.var_cfg)
            init_var_weights(model)
        if cfg.var.init:
            self._start_from(model, cfg.var.init)
        self.module = model
        self.codes = self._codes(run_dir)
        sc = cfg.var.self_correct
        if not 0.0 <= sc < 1.0:
            raise InvalidOption(f"config 'var.self_correct' must be in [0, 1), got {sc!r}")
        near = cfg.var.self_correct_near
        if near < 0:
            raise InvalidOption(f"config 'var.self_correct_near' must be >= 0, got {near!r}")
        self.latents = self._latents(run_dir) if sc > 0 else None
        self.splits = [p * p for p in self.tok.cfg.patch_nums]
        self.val = load_validation_set(cfg.data, cfg.run.val_data, data) if cfg.run.eval_every > 0 else None
        self._val_codes: torch.Tensor | None = None

    def _start_from(self, model: VARTransformer, folder: str) -> None:
        """Load ``var.init``'s transformer after checking it has this run's architecture and codes."""
        from ..pipeline import load_pipeline_dir
        from .decoder_swap import start_from_export

        p = Path(folder)
        start = load_pipeline_dir(p / "model" if (p / "model" / "config.json").is_file() else p)
        start_from_export(model, self.tok, start.tokenizer, start.transformer, "var.init", folder)

    def _cache_path(self, run_dir: Path, kind: str) -> Path:
        """``run_dir/KIND-HASH.pt``, keyed by the images, the tokenizer's weights and hflip."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.data.images.numpy().tobytes())
        for v in self.tok.state_dict().values():
            h.update(v.detach().cpu().numpy().tobytes())
        h.update(str(self.cfg.data.hflip).encode())
        return run_dir / f"{kind}-{h.hexdigest()[:16]}.pt"

    def _save_cache(self, run_dir: Path, path: Path, value: torch.Tensor) -> None:
        if self.ctx.is_main:
            from ..io import atomic_path

            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(value, tmp)

    def _codes(self, run_dir: Path) -> torch.Tensor:
        """Tokenize the data set once; cached in the run folder keyed by the data and tokenizer."""
        path = self._cache_path(run_dir, "codes")
        if path.is_file():
            return torch.load(path, weights_only=True)
        codes = tokenize_images(self.tok, self.data.images, self.cfg.data.hflip).cpu()
        self._save_cache(run_dir, path, codes)
        return codes

    def _latents(self, run_dir: Path) -> torch.Tensor:
        """The encoder's continuous latents (V, N, C, h, w), for self-correction, which re-quantises
        them every step; cached in the run folder like the codes (bf16 would change the codes: float32)."""
        path = self._cache_path(run_dir, "latents")
        if path.is_file():
            return torch.load(path, weights_only=True)
        dev = self.ctx.device
        lat = encode_views(lambda x: self.tok.encode_latent(x.to(dev)), self.data.images, self.cfg.data.hflip)
        self._save_cache(run_dir, path, lat)
        return lat

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        c, dev = self.cfg, self.ctx.device
        idx = batch_indices(len(self.data), c.run.batch_size, step, c.run.seed, self.ctx.rank, self.ctx.world)
        g = step_generator(c.run.seed, step, self.ctx.rank, 1)
        B = idx.numel()
        if self.codes.shape[0] > 1:  # pick the original or the mirrored tokenization
            variant = (torch.rand(B, generator=g) < 0.5).long()
        else:
            variant = torch.zeros(B, dtype=torch.long)
        labels = self.data.labels[idx].clone()
        drop = torch.rand(B, generator=g) < c.var.label_drop
        labels[drop] = self.var_cfg.num_classes
        if self.latents is not None:
            rate = torch.rand(B, generator=g) * c.var.self_correct
            f = self.latents[variant, idx].to(dev)
            tgt_BL, x = self.tok.quantize.self_correction_batch(f, rate, c.var.self_correct_near, g)
        else:
            tgt_BL = self.codes[variant, idx].long().to(dev)
            with torch.no_grad():
                x = self.tok.quantize.teacher_forcing_input(list(tgt_BL.split(self.splits, dim=1)))
        dev_type = "cuda" if str(dev).startswith("cuda") else "cpu"
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=c.var.amp):
            logits = model(labels.to(dev), x).float()
        V = self.var_cfg.vocab_size
        loss = F.cross_entropy(logits.view(-1, V), tgt_BL.view(-1), label_smoothing=c.var.label_smoothing)
        with torch.no_grad():
            last = self.splits[-1]
            acc = (logits[:, -last:].argmax(-1) == tgt_BL[:, -last:]).float().mean().item()
        return loss, {"acc_last": acc}, B

    def after_step(self, step: int, loop: Any) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Teacher-forced cross-entropy (all scales, true labels, no mirror) on the held-out images and on
        as many training images (a fixed draw), and the last scale's accuracy on the held-out ones."""
        assert self.val is not None
        if self._val_codes is None:
            self._val_codes = tokenize_images(self.tok, self.val.images, False)[0]
            self._train_idx = train_eval_indices(self.data, self.val, self.cfg.run.seed)
        ti = self._train_idx
        val_ce, val_acc = self._teacher_forced(model, self._val_codes, self.val.labels)
        train_ce, _ = self._teacher_forced(model, self.codes[0][ti], self.data.labels[ti])
        return {"val_loss": val_ce, "train_eval_loss": train_ce, "val_acc_last": val_acc}

    def _teacher_forced(
        self, model: nn.Module, codes_NL: torch.Tensor, labels: torch.Tensor, batch: int = 32
    ) -> tuple[float, float]:
        dev, V, last = self.ctx.device, self.var_cfg.vocab_size, self.splits[-1]
        dev_type = "cuda" if str(dev).startswith("cuda") else "cpu"
        ce_sum, acc_sum, n = 0.0, 0.0, codes_NL.shape[0]
        for i in range(0, n, batch):
            tgt = codes_NL[i : i + batch].long().to(dev)
            x = self.tok.quantize.teacher_forcing_input(list(tgt.split(self.splits, dim=1)))
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=self.cfg.var.amp):
                logits = model(labels[i : i + batch].to(dev), x).float()
            ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
            ce_sum += ce.view(tgt.shape).mean(dim=1).sum().item()
            acc_sum += (logits[:, -last:].argmax(-1) == tgt[:, -last:]).float().mean(dim=1).sum().item()
        return ce_sum / n, acc_sum / n

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        """Save a loadable model folder (``Pipeline.save``) from the EMA transformer + the tokenizer."""
        v = self.cfg.var
        pipe = Pipeline(
            name=run_dir.name,
            transformer=ema,
            tokenizer=self.tok,
            defaults=SamplingDefaults(cfg=v.cfg, top_k=v.top_k, top_p=v.top_p),
            class_names=list(self.data.class_names),
        )
        return pipe.save(run_dir / "model")
