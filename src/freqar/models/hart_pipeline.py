"""A loaded HART model: transformer + hybrid tokenizer (+ text encoder), generating through the engine.

Presets: ``hart-0.7b`` (the released 1024 px model; built from the ``config.json`` shipped with the weights,
the preset's own widths only when none is given) and ``hart-tiny`` (random weights, for tests and smoke runs).
Released layout: ``<dir>/llm/{config.json, ema_model.bin | model.safetensors | pytorch_model.bin}`` and
``<dir>/tokenizer/{model.safetensors | pytorch_model.bin}``; ``--weights`` names ``<dir>`` or ``<dir>/llm``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..engine.generate import GenerationOutput, StageInfo, generate
from ..engine.guidance import Guidance
from ..errors import CheckpointMismatch, InvalidOption, UnknownModel, WeightsNotFound
from ..interfaces import TokenPolicy
from ..io import load_torch_file, read_json
from ..pipeline import ModuleBundle
from ..tokenizers.hybrid import HART_1024, HybridTokenizer, find_tokenizer_weights
from ..tokenizers.msvq import MSVQConfig
from .hart import (
    HARTConfig,
    HARTHead,
    HARTTransformer,
    ResidualConfig,
    TextFeatures,
    hart_config_from_upstream,
    hart_guidance_scales,
)


@dataclass(frozen=True)
class HARTDefaults:
    """Upstream's sampling defaults (sample.py): cfg 4.5, top-p off, more_smooth on, seed 1; ``top_k`` None
    is upstream's fixed 600-then-300 schedule (a trained model may set a constant, 0 = off)."""

    cfg: float = 4.5
    top_p: float = 0.0
    smooth: bool = True
    seed: int = 1
    top_k: int | None = None


@dataclass(frozen=True)
class HARTSpec:
    name: str
    description: str
    tokenizer: MSVQConfig
    transformer: HARTConfig
    defaults: HARTDefaults = field(default_factory=HARTDefaults)


def hart_presets() -> dict[str, Callable[[], HARTSpec]]:
    """Registered HART presets."""

    def big() -> HARTSpec:
        return HARTSpec(
            "hart-0.7b",
            "HART-0.7B text-to-image 1024px (14 scales); width/depth/heads from the weights' config.json "
            "(preset assumes depth 16, width 1536, 24 heads when none is given)",
            MSVQConfig(patch_nums=HART_1024),
            HARTConfig(),
        )

    def tiny() -> HARTSpec:
        pn = (1, 2, 3, 4, 6, 8)
        return HARTSpec(
            "hart-tiny",
            "tiny random-weight HART (32px, 6 scales, 16 text tokens) for tests and smoke runs",
            MSVQConfig(vocab_size=640, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=pn),
            HARTConfig(
                context_token=16,
                context_dim=32,
                depth=2,
                embed_dim=64,
                num_heads=2,
                diff_width=32,
                diff_depth=1,
                num_sampling_steps="4",
                patch_nums=pn,
                vocab_size=640,
                z_channels=8,
            ),
        )

    return {"hart-0.7b": big, "hart-tiny": tiny}


def is_hart_model(name_or_path: str) -> bool:
    return name_or_path in hart_presets()


@dataclass
class HARTPipeline(ModuleBundle):
    """Everything needed to generate with HART from prompts or precomputed text features."""

    name: str
    transformer: HARTTransformer
    tokenizer: HybridTokenizer
    defaults: HARTDefaults = field(default_factory=HARTDefaults)
    text_encoder: Any = None
    family: str = "hart"

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.patch_nums[-1] * self.tokenizer.cfg.downsample

    def parts(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer, self.tokenizer)

    def encode(self, prompts: list[str]) -> TextFeatures:
        if self.text_encoder is None:
            raise InvalidOption(
                f"model '{self.name}' has no text encoder: pass --text-encoder DIR or features"
            )
        feats = self.text_encoder.encode(prompts)
        T = self.transformer.cfg.context_token
        if feats.features.shape[1] != T:
            raise InvalidOption(f"text encoder gives {feats.features.shape[1]} tokens, the model needs {T}")
        return feats

    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        text: TextFeatures | None = None,
        seed: int | None = None,
        cfg: float | None = None,
        top_p: float | None = None,
        smooth: bool | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        residual: bool = True,
        excluded: str = "skip",
        policy: TokenPolicy | None = None,
        callback: Callable[[StageInfo], None] | None = None,
        record_logits: bool = False,
        head_factory: Callable[..., HARTHead] | None = None,
    ) -> GenerationOutput:
        """Images for ``prompts`` (needs a text encoder) or precomputed ``text`` features.

        ``excluded`` (skip, anchor, cond): the last-scale residual of tokens a policy skipped (see
        ``models.hart.EXCLUDED_OPTIONS``). ``seed`` seeds two generators, as upstream has two streams:
        the categorical draws (seed) and the residual diffusion noise (seed + 1). ``top_k`` None keeps the
        model's default (upstream: the 600/300 schedule); a number is used at every stage (0 = off).
        """
        d = self.defaults
        if text is None:
            if prompts is None:
                raise InvalidOption("give prompts or text features")
            text = self.encode(list(prompts))
        cfg = d.cfg if cfg is None else cfg
        if cfg < 0:
            raise InvalidOption(f"cfg must be >= 0, got {cfg}")
        top_p = d.top_p if top_p is None else top_p
        if not 0.0 <= top_p <= 1.0:
            raise InvalidOption(f"top_p must be in [0, 1], got {top_p}")
        seed = d.seed if seed is None else seed
        top_k = d.top_k if top_k is None else top_k
        if top_k is not None and top_k < 0:
            raise InvalidOption(f"top_k must be >= 0, got {top_k}")
        if not temperature > 0:
            raise InvalidOption(f"temperature must be > 0, got {temperature}")
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        dgen = torch.Generator(device=dev).manual_seed(seed + 1)
        S = len(self.tokenizer.cfg.patch_nums)
        guidance = Guidance(schedule="list", per_stage=hart_guidance_scales(cfg, S))
        kw: dict[str, Any] = dict(
            top_p=top_p,
            smooth=d.smooth if smooth is None else smooth,
            temperature=temperature,
            residual=ResidualConfig(enabled=residual, excluded=excluded),
            diffusion_generator=dgen,
        )
        if top_k is not None:
            kw["top_k"] = partial(_constant_top_k, top_k)
        head = (head_factory or HARTHead)(self.transformer, self.tokenizer.quantize.embedding, guidance, **kw)
        cond = self.transformer.condition(text.to(dev), guidance.enabled)
        return generate(
            self.transformer,
            self.tokenizer,
            guidance=guidance,
            head=head,
            policy=policy,
            generator=gen,
            callback=callback,
            record_logits=record_logits,
            condition=cond,
        )


def _constant_top_k(k: int, stage: int) -> int:
    return k


def build_hart_pipeline(spec: HARTSpec, *, init_seed: int | None = 0) -> HARTPipeline:
    """A preset with random weights (reproducible with ``init_seed``)."""
    if init_seed is not None:
        torch.manual_seed(init_seed)
    tok = HybridTokenizer(spec.tokenizer)
    tf = HARTTransformer(spec.transformer)
    return HARTPipeline(spec.name, tf, tok, spec.defaults).eval()


def _llm_weights(llm: Path) -> Path:
    for name in ("ema_model.bin", "model.safetensors", "pytorch_model.bin"):
        if (llm / name).is_file():
            return llm / name
    raise WeightsNotFound(
        f"'{llm}' holds no transformer weights (ema_model.bin, model.safetensors or pytorch_model.bin)"
    )


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from ..io import load_safetensors

        return load_safetensors(path)
    return load_torch_file(path)


def _hart_folders(weights: Path) -> tuple[Path, Path]:
    """(llm/, tokenizer/) of a released checkpoint, given its root or its llm/ folder."""
    if not weights.is_dir():
        raise WeightsNotFound(f"HART weights directory not found: '{weights}'")
    llm = weights / "llm" if (weights / "llm").is_dir() else weights
    if not (llm / "config.json").is_file():
        raise WeightsNotFound(f"'{llm}' has no config.json (expected the released llm/ folder)")
    tok = llm.parent / "tokenizer"
    if not tok.is_dir():
        raise WeightsNotFound(f"HART tokenizer folder missing: '{tok}' (the sibling of llm/)")
    return llm, tok


def load_hart_released(
    weights: str | os.PathLike[str],
    *,
    name: str = "hart-0.7b",
    text_encoder: Any = None,
    device: str = "cpu",
) -> HARTPipeline:
    """Build from a released ``hart-0.7b-1024px`` folder: ``llm/config.json``, EMA weights if present."""
    spec = hart_presets()[name]() if name in hart_presets() else None
    if spec is None:
        raise UnknownModel(f"unknown HART model '{name}' (hart-0.7b, hart-tiny)")
    llm, tok_dir = _hart_folders(Path(weights))
    c = read_json(llm / "config.json")
    mt = c.get("model_type")
    if mt is not None and mt != "hart_transformer_t2i":
        raise CheckpointMismatch(
            f"'{llm / 'config.json'}' is a '{mt}' model, not HART (hart_transformer_t2i)"
        )
    tcfg = spec.tokenizer
    tc_path = tok_dir / "config.json"
    if tc_path.is_file():
        tc = read_json(tc_path)
        tcfg = MSVQConfig(
            vocab_size=int(tc.get("vocab_size", tcfg.vocab_size)),
            z_channels=int(tc.get("z_channels", tcfg.z_channels)),
            ch=int(tc.get("ch", tcfg.ch)),
            ch_mult=tuple(tc.get("ch_mult", tcfg.ch_mult)),
            beta=float(tc.get("beta", tcfg.beta)),
            quant_resi=float(tc.get("quant_resi", tcfg.quant_resi)),
            share_quant_resi=int(tc.get("share_quant_resi", tcfg.share_quant_resi)),
            patch_nums=tuple(c.get("patch_nums", tcfg.patch_nums)),
        )
    else:
        tcfg = MSVQConfig(**{**tcfg.to_dict(), "patch_nums": tuple(c.get("patch_nums", tcfg.patch_nums))})
    hcfg = hart_config_from_upstream(
        {**spec.transformer.to_dict(), **c},
        vocab_size=tcfg.vocab_size,
        z_channels=tcfg.z_channels,
        source=str(llm / "config.json"),
    )
    tok = HybridTokenizer(tcfg)
    tf = HARTTransformer(hcfg)
    wpath = _llm_weights(llm)
    state = _load_any(wpath)
    state.pop("attn_bias_for_masking", None)  # 9750^2 floats upstream stores; never needed at inference
    tf.load_official(state, str(wpath))
    del state
    tpath = find_tokenizer_weights(tok_dir)
    tok.load_released(_load_any(tpath), str(tpath))
    return HARTPipeline(name, tf, tok, spec.defaults, text_encoder).eval().to(device)
