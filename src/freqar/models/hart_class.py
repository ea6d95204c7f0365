"""A class-conditional HART (the ``freqar train hart`` export): class labels enter as learned "text" features.

HART is text-conditioned: a prefix of ``context_token`` feature vectors of width ``context_dim`` is projected,
pooled for AdaLN, and its last position predicts the first scale. A trained emoji model has 9 labels and no
text encoder, so ``ClassContext`` supplies that prefix from a learned table (one ``context_token x
context_dim`` block per class). The transformer, tokenizer, schedules and residual head are HART's, unchanged;
the null condition is HART's own unconditional branch (zero features, zero position ids, mask on position 0),
which training uses for label dropout so that classifier-free guidance at sampling time matches.

``HARTClassPipeline`` offers the ``Pipeline`` surface (``generate(labels, ...)``, ``num_classes``,
``class_names``, ``check_labels``, ``tokenizer``/``transformer``) so ``freqar generate --model DIR`` and
``freqar eval --model DIR`` treat it like a VAR model directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.generate import GenerationOutput, StageInfo
from ..errors import CheckpointMismatch, InvalidOption
from ..interfaces import TokenPolicy
from ..io import load_safetensors, load_state_dict_strict, read_json, save_model_dir
from ..pipeline import FORMAT, ModuleBundle, check_class_labels, label_tensor
from ..tokenizers.hybrid import HybridTokenizer
from ..tokenizers.msvq import MSVQConfig
from .hart import HARTConfig, HARTTransformer, TextFeatures
from .hart_pipeline import HARTDefaults, HARTPipeline

FAMILY = "hart"


class ClassContext(nn.Module):
    """Per-class learned prefix features (num_classes, tokens, dim), as HART's text encoder output."""

    def __init__(self, num_classes: int, tokens: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise InvalidOption(f"a class-conditional HART needs >= 1 class, got {num_classes}")
        self.num_classes, self.tokens, self.dim = num_classes, tokens, dim
        self.table = nn.Embedding(num_classes, tokens * dim)
        nn.init.normal_(self.table.weight)  # unit scale, like a text encoder's hidden states

    def forward(self, labels_B: torch.Tensor, drop_B: torch.Tensor | None = None) -> TextFeatures:
        """Features of ``labels``; rows with ``drop`` True become HART's unconditional prefix."""
        B, T = labels_B.shape[0], self.tokens
        feats = self.table(labels_B).view(B, T, self.dim)
        mask = torch.ones(B, T, dtype=torch.long, device=feats.device)
        pos = torch.arange(T, device=feats.device).expand(B, T).clone()
        if drop_B is not None:
            keep = (~drop_B).to(feats.device)
            feats = feats * keep.view(B, 1, 1).to(feats.dtype)
            mask = mask * keep.view(B, 1).long()
            mask[:, 0] = 1
            pos = pos * keep.view(B, 1).long()
        return TextFeatures(feats, mask, pos)


@dataclass
class HARTClassPipeline(ModuleBundle):
    """A HART pipeline driven by class labels through a ``ClassContext``."""

    name: str
    hart: HARTPipeline
    classes: ClassContext
    class_names: list[str] | None = None
    family: str = FAMILY
    description: str = ""

    @property
    def transformer(self) -> HARTTransformer:
        return self.hart.transformer

    @property
    def tokenizer(self) -> HybridTokenizer:
        return self.hart.tokenizer

    @property
    def defaults(self) -> HARTDefaults:
        return self.hart.defaults

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def image_size(self) -> int:
        return self.hart.image_size

    def parts(self) -> tuple[nn.Module, ...]:
        return (self.hart.transformer, self.hart.tokenizer, self.classes)

    def check_labels(self, labels: list[int]) -> None:
        check_class_labels(labels, self.num_classes, self.name)

    @torch.no_grad()
    def generate(
        self,
        labels: list[int] | torch.Tensor | None = None,
        *,
        batch: int = 1,
        seed: int | None = 0,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        smooth: bool | None = None,
        policy: TokenPolicy | None = None,
        callback: Callable[[StageInfo], None] | None = None,
        record_logits: bool = False,
        excluded: str = "skip",
        residual: bool = True,
        head_factory: Callable[..., Any] | None = None,
    ) -> GenerationOutput:
        """Images for ``labels`` (or ``batch`` labels drawn from ``seed``), HART sampling underneath."""
        seed = self.defaults.seed if seed is None else seed
        if labels is None:
            if batch < 1:
                raise InvalidOption(f"batch must be >= 1, got {batch}")
            g = torch.Generator().manual_seed(seed)
            lab = torch.randint(0, self.num_classes, (batch,), generator=g)
        else:
            lab = label_tensor(labels, self.num_classes, self.name)
        text = self.classes(lab.to(self.device))
        out = self.hart.generate(
            text=text,
            seed=seed,
            cfg=cfg,
            top_p=top_p,
            smooth=smooth,
            top_k=top_k,
            temperature=1.0 if temperature is None else temperature,
            residual=residual,
            excluded=excluded,
            policy=policy,
            callback=callback,
            record_logits=record_logits,
            head_factory=head_factory,
        )
        out.labels = lab
        return out

    # ----- freqar's model format, family "hart" ------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "family": FAMILY,
            "name": self.name,
            "description": self.description,
            "tokenizer": self.tokenizer.cfg.to_dict(),
            "transformer": self.transformer.cfg.to_dict(),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "defaults": asdict(self.defaults),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``config.json`` + ``model.safetensors`` (keys ``vae.*``, ``hart.*``, ``classes.*``), atomically."""
        parts = {"vae": self.tokenizer, "hart": self.transformer, "classes": self.classes}
        return save_model_dir(directory, self.config_dict(), parts)


def is_hart_class_dir(directory: str | os.PathLike[str]) -> bool:
    """A saved model folder whose config says family "hart"."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        return False
    cfg = read_json(p)
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT and cfg.get("family") == FAMILY


def build_hart_class_pipeline(
    name: str,
    tokenizer: MSVQConfig,
    transformer: HARTConfig,
    num_classes: int,
    *,
    class_names: list[str] | None = None,
    defaults: HARTDefaults | None = None,
    description: str = "",
) -> HARTClassPipeline:
    """Random-weight modules of the given configs (schedules, vocabulary and latent width must agree)."""
    if tuple(tokenizer.patch_nums) != tuple(transformer.patch_nums):
        raise InvalidOption(
            f"scale schedules differ: tokenizer {list(tokenizer.patch_nums)} "
            f"vs transformer {list(transformer.patch_nums)}"
        )
    if tokenizer.vocab_size != transformer.vocab_size or tokenizer.z_channels != transformer.z_channels:
        raise InvalidOption("transformer vocab_size/z_channels must match the tokenizer's")
    hart = HARTPipeline(
        name, HARTTransformer(transformer), HybridTokenizer(tokenizer), defaults or HARTDefaults()
    )
    ctx = ClassContext(num_classes, transformer.context_token, transformer.context_dim)
    return HARTClassPipeline(name, hart, ctx, class_names, description=description).eval()


def load_hart_class_dir(directory: str | os.PathLike[str]) -> HARTClassPipeline:
    """Load a model saved by :meth:`HARTClassPipeline.save`."""
    d = Path(directory)
    src = str(d / "config.json")
    cfg = read_json(d / "config.json")
    if not isinstance(cfg, dict) or cfg.get("family") != FAMILY:
        raise CheckpointMismatch(f"'{src}' is not a class-conditional HART model (family != {FAMILY})")
    try:
        tok = MSVQConfig(**cfg["tokenizer"])
        tf = HARTConfig(**cfg["transformer"])
        defaults = HARTDefaults(**cfg.get("defaults", {}))
        n = int(cfg["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatch(f"'{src}': bad or missing key: {e}") from None
    with torch.random.fork_rng(devices=[]):
        pipe = build_hart_class_pipeline(
            cfg.get("name", d.name),
            tok,
            tf,
            n,
            class_names=cfg.get("class_names"),
            defaults=defaults,
            description=cfg.get("description", ""),
        )
    state = load_safetensors(d / "model.safetensors")
    wsrc = str(d / "model.safetensors")
    prefixes = {"vae.": pipe.tokenizer, "hart.": pipe.transformer, "classes.": pipe.classes}
    for prefix, module in prefixes.items():
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        load_state_dict_strict(module, sub, source=wsrc)
    extra = [k for k in state if not k.startswith(tuple(prefixes))]
    if extra:
        raise CheckpointMismatch(f"'{wsrc}': unexpected keys outside vae.* / hart.* / classes.*: {extra[:3]}")
    return pipe.eval()


__all__ = [
    "ClassContext",
    "HARTClassPipeline",
    "build_hart_class_pipeline",
    "is_hart_class_dir",
    "load_hart_class_dir",
]
