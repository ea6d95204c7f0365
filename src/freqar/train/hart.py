"""Training a class-conditional HART (``freqar train hart``) on a frozen hybrid tokenizer.

Upstream released no trainer; what its ``forward`` and paper fix, and what we chose:

- Teacher forcing over all scales exactly as VAR (the inputs of scales 1..S-1 are area-downsampled running
  sums of the ground-truth codes; the last-scale rule only affects the sum after the last scale), with
  HART's block-causal attention over [prefix; scales 1..S-1]; cross-entropy on every scale's codes.
- Residual diffusion at the last scale against the model's *own* code: per last-scale position a code is
  drawn from the (detached) logits with upstream's training sampler (top-k 600, top-p 0.96); the target is
  the continuous residual before the last discrete code minus that code's vector, divided by ``vae_scale``;
  the condition is ``decoder_norm(h + word_embed(emb(code)))``. Each condition is used
  ``diffusion_batch_mul`` times with independent timesteps and noise (upstream: 4). The head thus learns to
  correct whatever discrete choice sampling makes.
- Not done: upstream's MAR-style random dropping of last-scale inputs (its MaskGIT path; generation here is
  one pass over the last scale, ``num_maskgit_iters=1`` as upstream's default).
- Conditioning: class labels through ``ClassContext`` (a learned prefix per class, see
  ``models/hart_class.py``) with label dropout to HART's unconditional prefix, for classifier-free guidance.

Every image (and its mirror with hflip) is tokenized once; the codes and the last-scale residual targets are
cached in the run folder keyed by the data and the tokenizer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.sampling import mask_top_k_top_p_
from ..errors import InvalidOption
from ..models.hart import HARTConfig, HARTTransformer
from ..models.hart_class import ClassContext, HARTClassPipeline
from ..models.hart_pipeline import HARTDefaults, HARTPipeline
from ..tokenizers.hybrid import HybridTokenizer
from .config import DataConfig, OptimConfig, RunConfig
from .data import DatasetError, ImageSet, batch_indices, step_generator, to_unit
from .dist import DistContext
from .hart_tokenizer import load_hybrid_tokenizer


@dataclass
class HARTModelConfig:
    """The transformer and residual head (fields of ``HARTConfig``; vocabulary, latent width and schedule
    come from the tokenizer)."""

    depth: int = 5
    embed_dim: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = False
    context_token: int = 1  # prefix tokens per class label
    context_dim: int = 128
    diff_width: int = 128
    diff_depth: int = 2
    num_sampling_steps: str = "8"
    vae_scale: float = 0.6  # residual / vae_scale should stay inside [-1, 1] (the sampler clips there)


@dataclass
class HARTTrainSettings:
    tokenizer: str = ""  # a `freqar train hart-tokenizer` (or `tokenizer`) run dir or its tokenizer/ export
    label_drop: float = 0.1  # probability of HART's unconditional prefix, for classifier-free guidance
    label_smoothing: float = 0.0
    diffusion_weight: float = 1.0
    diffusion_batch_mul: int = 4
    sample_top_k: int = 600  # upstream's sampler for the code the residual is taken against
    sample_top_p: float = 0.96
    amp: bool = False  # bf16 autocast for the transformer (CPUs with AVX512-BF16/AMX, or CUDA)
    cfg: float = 3.0  # sampling defaults written into the exported model
    top_k: int = 0  # a constant top-k (0 = off); upstream's 600/300 schedule suits a 4096-code book only
    top_p: float = 0.0
    smooth: bool = False


@dataclass
class HARTTrainConfig:
    model: HARTModelConfig = field(default_factory=HARTModelConfig)
    hart: HARTTrainSettings = field(default_factory=HARTTrainSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05))
    run: RunConfig = field(default_factory=RunConfig)


def hart_config(cfg: HARTTrainConfig, tok: HybridTokenizer) -> HARTConfig:
    m = cfg.model
    return HARTConfig(
        context_token=m.context_token,
        context_dim=m.context_dim,
        depth=m.depth,
        embed_dim=m.embed_dim,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        attn_l2_norm=m.attn_l2_norm,
        diff_width=m.diff_width,
        diff_depth=m.diff_depth,
        num_sampling_steps=m.num_sampling_steps,
        patch_nums=tok.cfg.patch_nums,
        vocab_size=tok.cfg.vocab_size,
        z_channels=tok.cfg.z_channels,
        vae_scale=m.vae_scale,
    )


@torch.no_grad()
def init_hart_weights(model: HARTTransformer, gamma_init: float = 1e-3) -> None:
    """VAR's training init carried to HART's blocks: small trunc-normal linears with zero biases, output
    projections scaled by 1/sqrt(2·depth), a tiny codebook head and near-zero AdaLN gates (each block starts
    close to the identity). The diffusion MLP keeps MAR's own init (zero output layers)."""
    C, depth = model.cfg.embed_dim, model.cfg.depth
    std = math.sqrt(1 / C / 3)
    for name, mod in model.named_modules():
        if name.startswith("diffloss"):
            continue
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            nn.init.trunc_normal_(mod.weight, std=std)
    model.head.weight.mul_(0.02)
    model.head_nm.ada_lin[-1].weight.mul_(0.5)
    for blk in model.blocks:
        blk.attn.proj.weight.div_(math.sqrt(2 * depth))
        blk.ffn.down_proj.weight.div_(math.sqrt(2 * depth))
        w = blk.ada_lin[-1].weight
        w[2 * C :].mul_(0.5)
        w[: 2 * C].mul_(gamma_init)


@torch.no_grad()
def tokenize_hybrid(
    tok: HybridTokenizer, images: torch.Tensor, flip: bool, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (V, N, L) and last-scale residual targets before the last code (V, N, l, C) in float16, with
    V = 2 (original, mirrored) when ``flip`` else 1."""
    codes, rests = [], []
    dtype = torch.int16 if tok.cfg.vocab_size < 32768 else torch.int32
    for mirrored in [False, True] if flip else [False]:
        c_rows, r_rows = [], []
        for i in range(0, images.shape[0], batch):
            x = to_unit(images[i : i + batch])
            if mirrored:
                x = x.flip(-1)
            enc = tok.encode_hybrid(x)
            c_rows.append(torch.cat(enc.idx, dim=1).to(dtype))
            r_rows.append(enc.rest_wo_last.to(torch.float16))
        codes.append(torch.cat(c_rows))
        rests.append(torch.cat(r_rows))
    return torch.stack(codes), torch.stack(rests)


class HARTTrainModule(nn.Module):
    """Transformer + class prefix; the whole loss is computed in ``forward`` so DDP sees every parameter."""

    def __init__(self, transformer: HARTTransformer, classes: ClassContext) -> None:
        super().__init__()
        self.transformer = transformer
        self.classes = classes

    def forward(
        self,
        labels_B: torch.Tensor,
        drop_B: torch.Tensor,
        x_BLCv: torch.Tensor,
        target_BL: torch.Tensor,
        rest_BlC: torch.Tensor,
        codebook: nn.Embedding,
        settings: HARTTrainSettings,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cross-entropy over all scales, residual diffusion loss, last-scale accuracy)."""
        tf = self.transformer
        dev_type = "cuda" if x_BLCv.is_cuda else "cpu"
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=settings.amp):
            logits, h_last = tf(self.classes(labels_B, drop_B), x_BLCv)
        logits, h_last = logits.float(), h_last.float()
        V = tf.cfg.vocab_size
        ce = F.cross_entropy(
            logits.reshape(-1, V), target_BL.reshape(-1), label_smoothing=settings.label_smoothing
        )
        l = h_last.shape[1]
        with torch.no_grad():
            last = logits[:, -l:].detach().float().clone()
            acc = (last.argmax(-1) == target_BL[:, -l:]).float().mean()
            mask_top_k_top_p_(last, settings.sample_top_k, settings.sample_top_p)
            probs = last.softmax(-1).reshape(-1, V)
            own = torch.multinomial(probs, 1, generator=generator).view(-1, l)  # the model's own code
            target = (rest_BlC.float() - codebook(own)) / tf.cfg.vae_scale
        z = tf.diffusion_condition(h_last, own, codebook)
        m = settings.diffusion_batch_mul
        C = target.shape[-1]
        diff = tf.diffloss.loss(
            target.reshape(-1, C).repeat(m, 1), z.reshape(-1, z.shape[-1]).repeat(m, 1), generator=generator
        )
        return ce, diff, acc


class HARTTask:
    """Teacher-forced next-scale cross-entropy plus the last-scale residual diffusion loss."""

    name = "hart"

    def __init__(self, cfg: HARTTrainConfig, data: ImageSet, ctx: DistContext, run_dir: Path) -> None:
        self.cfg, self.data, self.ctx = cfg, data, ctx
        s = cfg.hart
        if not s.tokenizer:
            raise DatasetError("no tokenizer given (hart.tokenizer=RUN_DIR of `freqar train hart-tokenizer`)")
        if s.diffusion_batch_mul < 1:
            raise InvalidOption(
                f"config 'hart.diffusion_batch_mul' must be >= 1, got {s.diffusion_batch_mul}"
            )
        if not cfg.model.vae_scale > 0:
            raise InvalidOption(f"config 'model.vae_scale' must be > 0, got {cfg.model.vae_scale}")
        self.tok = load_hybrid_tokenizer(s.tokenizer).to(ctx.device)
        expect = self.tok.cfg.patch_nums[-1] * self.tok.cfg.downsample
        if data.size != expect:
            raise DatasetError(f"images are {data.size} px but the tokenizer expects {expect} px")
        self.hart_cfg = hart_config(cfg, self.tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            tf = HARTTransformer(self.hart_cfg)
            init_hart_weights(tf)
            classes = ClassContext(
                len(data.class_names), self.hart_cfg.context_token, self.hart_cfg.context_dim
            )
        self.module = HARTTrainModule(tf, classes)
        self.codes, self.rests = self._tokenized(run_dir)
        self.splits = [p * p for p in self.tok.cfg.patch_nums]

    def _tokenized(self, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and residual targets of the data set, cached in the run folder (keyed by data, tokenizer)."""
        h = hashlib.sha256()
        h.update(self.data.images.numpy().tobytes())
        for v in self.tok.state_dict().values():
            h.update(v.detach().cpu().numpy().tobytes())
        h.update(str(self.cfg.data.hflip).encode())
        path = run_dir / f"hybrid-codes-{h.hexdigest()[:16]}.pt"
        if path.is_file():
            d = torch.load(path, weights_only=True)
            return d["codes"], d["rests"]
        codes, rests = tokenize_hybrid(self.tok, self.data.images, self.cfg.data.hflip)
        codes, rests = codes.cpu(), rests.cpu()
        if self.ctx.is_main:
            from ..io import atomic_path

            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"codes": codes, "rests": rests}, tmp)
        return codes, rests

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        c, dev = self.cfg, self.ctx.device
        idx = batch_indices(len(self.data), c.run.batch_size, step, c.run.seed, self.ctx.rank, self.ctx.world)
        g = step_generator(c.run.seed, step, self.ctx.rank, 1)
        B = idx.numel()
        if self.codes.shape[0] > 1:  # the original or the mirrored tokenization
            variant = (torch.rand(B, generator=g) < 0.5).long()
        else:
            variant = torch.zeros(B, dtype=torch.long)
        tgt_BL = self.codes[variant, idx].long().to(dev)
        rest = self.rests[variant, idx].to(dev)
        labels = self.data.labels[idx].clone().to(dev)
        drop = (torch.rand(B, generator=g) < c.hart.label_drop).to(dev)
        with torch.no_grad():
            x = self.tok.quantize.teacher_forcing_input(list(tgt_BL.split(self.splits, dim=1)))
        dgen = step_generator(c.run.seed, step, self.ctx.rank, 2)
        if str(dev).startswith("cuda"):
            dgen = torch.Generator(device=dev).manual_seed(int(torch.randint(2**62, (1,), generator=dgen)))
        ce, diff, acc = model(labels, drop, x, tgt_BL, rest, self.tok.quantize.embedding, c.hart, dgen)
        loss = ce + c.hart.diffusion_weight * diff
        return loss, {"ce": ce.item(), "diff": diff.item(), "acc_last": acc.item()}, B

    def after_step(self, step: int, loop: Any) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def pipeline(self, module: HARTTrainModule, name: str) -> HARTClassPipeline:
        s = self.cfg.hart
        defaults = HARTDefaults(cfg=s.cfg, top_p=s.top_p, smooth=s.smooth, seed=0, top_k=s.top_k)
        hart = HARTPipeline(name, module.transformer, self.tok, defaults)
        return HARTClassPipeline(
            name,
            hart,
            module.classes,
            list(self.data.class_names),
            description=f"class-conditional HART trained with `freqar train hart` "
            f"({len(self.data.class_names)} classes, {hart.image_size} px)",
        )

    def export(self, ema: nn.Module, run_dir: Path) -> Path:
        """Save a loadable model folder (family "hart") from the EMA weights + the tokenizer."""
        assert isinstance(ema, HARTTrainModule)
        return self.pipeline(ema, run_dir.name).save(run_dir / "model")


def train_hart(
    cfg: HARTTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> Any:
    """``freqar train hart``: a TrainResult, or the export Path with ``export_only``."""
    from .run import run_task

    return run_task("hart", cfg, lambda data, c: HARTTask(cfg, data, c, out), out, ctx, progress, export_only)
