"""Infinity presets and the text-to-image pipeline: prompts (or text features) -> images, shared engine.

A preset fixes the architecture; the scale schedule is chosen per call from an aspect template (15 h/w
ratios) and a resolution preset (0.06M/0.25M/0.60M/1M), so one set of weights serves every image shape.
Infinity-8B adds 2x2 spatial patchify: the transformer runs the template's schedule with 4·d bits per token
and its VAE (stride 8) decodes grids twice as large, so the image size is the same as 2B's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.generate import GenerationOutput, generate
from ..engine.heads import BitwiseHead
from ..errors import InvalidOption, UnknownModel, WeightsNotFound
from ..interfaces import TokenPolicy
from ..io import load_sharded_state_dict, load_torch_file
from ..pipeline import ModuleBundle
from ..tokenizers.bsq import BSQVAE, BSQConfig
from .infinity import RESOLUTIONS, Infinity, InfinityConfig, schedule_for


@dataclass(frozen=True)
class InfinityDefaults:
    """Upstream's 2B inference settings (infer.sh + notebook): cfg 3, tau 0.5, top-k 900, top-p 0.97."""

    cfg: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    h_div_w: float = 1.0
    resolution: str = "1M"


@dataclass(frozen=True)
class InfinitySpec:
    name: str
    description: str
    vae: BSQConfig
    transformer: InfinityConfig
    defaults: InfinityDefaults = field(default_factory=InfinityDefaults)
    hub_repo: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # role ("vae", "transformer") -> hub file name
    text_encoder: str | None = None  # hub id of the text encoder (the user passes a local copy)
    spatial_patchify: bool = False

    @property
    def patchify(self) -> int:
        """Side of the latent cell block one transformer token carries (2 with spatial patchify)."""
        return 2 if self.spatial_patchify else 1

    @property
    def image_size(self) -> int:
        """Side of the default (1:1) image."""
        grids, _ = schedule_for(self.defaults.h_div_w, self.defaults.resolution)
        return grids[-1][0] * self.vae.patch_size * self.patchify


def infinity_presets() -> dict[str, Callable[[], InfinitySpec]]:
    """Registered Infinity presets."""

    def b2() -> InfinitySpec:
        return InfinitySpec(
            "infinity-2b",
            "Infinity-2B text-to-image (bitwise, d=32), 15 h/w templates, 0.06M-1M (1024px at 1:1)",
            BSQConfig(),
            InfinityConfig(),
            hub_repo="FoundationVision/Infinity",
            files={"vae": "infinity_vae_d32reg.pth", "transformer": "infinity_2b_reg.pth"},
            text_encoder="google/flan-t5-xl",
        )

    def b8() -> InfinitySpec:
        return InfinitySpec(
            "infinity-8b",
            "Infinity-8B text-to-image (d=14 VAE, 2x2 spatial patchify: 56 bits/token), sharded weights, "
            "15 h/w templates, 0.06M-1M (1024px at 1:1)",
            BSQConfig(
                codebook_dim=14, encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4), patch_size=8
            ),
            InfinityConfig(depth=40, embed_dim=3584, num_heads=28, codebook_dim=56),
            defaults=InfinityDefaults(tau=1.0),  # the 8B notebook: cfg 3, tau 1
            hub_repo="FoundationVision/Infinity",
            files={"vae": "infinity_vae_d56_f8_14_patchify.pth", "transformer": "infinity_8b_weights/"},
            text_encoder="google/flan-t5-xl",
            spatial_patchify=True,
        )

    def tiny() -> InfinitySpec:
        return InfinitySpec(
            "infinity-tiny",
            "tiny random-weight Infinity (d=8, 4 blocks of 64, 128-d text) for tests: pictures are noise",
            BSQConfig(codebook_dim=8, base_ch=24, encoder_ch_mult=(1, 2, 1), decoder_ch_mult=(1, 2, 1),
                      num_res_blocks=1, patch_size=4),
            InfinityConfig(depth=4, embed_dim=64, num_heads=4, block_chunks=2, text_channels=128,
                           text_maxlen=16, codebook_dim=8),
            defaults=InfinityDefaults(resolution="0.06M"),
        )  # fmt: skip

    def tiny8b() -> InfinitySpec:
        return InfinitySpec(
            "infinity-tiny-8b",
            "tiny random-weight Infinity with the 8B layout (2x2 spatial patchify, d=4 VAE of stride 2, "
            "16 bits/token) for tests: pictures are noise",
            BSQConfig(codebook_dim=4, base_ch=24, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                      num_res_blocks=1, patch_size=2),
            InfinityConfig(depth=4, embed_dim=64, num_heads=4, block_chunks=2, text_channels=128,
                           text_maxlen=16, codebook_dim=16),
            defaults=InfinityDefaults(tau=1.0, resolution="0.06M"),
            spatial_patchify=True,
        )  # fmt: skip

    return {"infinity-2b": b2, "infinity-8b": b8, "infinity-tiny": tiny, "infinity-tiny-8b": tiny8b}


def is_infinity_model(name: str) -> bool:
    return name in infinity_presets()


def get_infinity_spec(name: str) -> InfinitySpec:
    reg = infinity_presets()
    if name not in reg:
        raise UnknownModel(f"unknown Infinity model '{name}' (choose from: {', '.join(sorted(reg))})")
    return reg[name]()


def _per_stage(value: float | Sequence[float], S: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * S
    vals = [float(v) for v in value]
    if len(vals) == 1:
        return vals * S
    if len(vals) < S:
        raise InvalidOption(f"{what} list has {len(vals)} values for {S} scales")
    return vals[:S]


@dataclass
class InfinityPipeline(ModuleBundle):
    """Infinity weights + BSQ VAE + (optional) text encoder; ``generate`` picks the schedule per call."""

    name: str
    model: Infinity
    vae: BSQVAE
    defaults: InfinityDefaults = field(default_factory=InfinityDefaults)
    text_encoder: Any = None
    family: str = "infinity"
    patchify: int = 1  # 2: Infinity-8B's 2x2 spatial patchify (tokens of 4·d bits, VAE grids doubled)

    def parts(self) -> tuple[torch.nn.Module, ...]:
        return (self.model, self.vae)

    def schedule(
        self, h_div_w: float | None = None, resolution: str | None = None
    ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """(scale schedule, RoPE reference grid) for a ratio (nearest template) and resolution preset."""
        d = self.defaults
        return schedule_for(d.h_div_w if h_div_w is None else h_div_w, resolution or d.resolution)

    def image_size(self, h_div_w: float | None = None, resolution: str | None = None) -> tuple[int, int]:
        """(height, width) in pixels."""
        grids, _ = self.schedule(h_div_w, resolution)
        p = self.vae.cfg.patch_size * self.patchify
        return grids[-1][0] * p, grids[-1][1] * p

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise InvalidOption("prompts need a text encoder (a local T5 folder); or pass text features")
        feats, lens = self.text_encoder.encode(prompts)
        if feats.shape[-1] != self.model.cfg.text_channels:
            raise InvalidOption(
                f"text encoder gives {feats.shape[-1]}-d features, model '{self.name}' expects "
                f"{self.model.cfg.text_channels}"
            )
        return feats, lens

    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
        h_div_w: float | None = None,
        resolution: str | None = None,
        seed: int | None = 0,
        cfg: float | Sequence[float] | None = None,
        tau: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_insertion_layer: Sequence[int] = (0,),
        policy: TokenPolicy | None = None,
        callback: Any = None,
        record_logits: bool = False,
    ) -> GenerationOutput:
        """Images for ``prompts`` (or precomputed ``text`` = (features (B,T,C), lens (B,))).

        ``cfg``/``tau``: one value or one per scale (upstream's lists); cfg 1 = no guidance.
        ``cfg_insertion_layer``: 0 = CFG on logits, -k = on the output of block depth-k.
        ``negative_prompt`` (one for the batch, or one per prompt; or ``negative`` = its features) is the
        unconditional half of CFG instead of the learned null text, as upstream's negative label.
        """
        if (prompts is None) == (text is None):
            raise InvalidOption("give either prompts or text features")
        if negative_prompt is not None and negative is not None:
            raise InvalidOption("give either a negative prompt or negative text features, not both")
        if prompts is not None:
            text = self.encode(list(prompts))
        assert text is not None
        grids, ref = self.schedule(h_div_w, resolution)
        S = len(grids)
        d = self.defaults
        cfg_l = _per_stage(d.cfg if cfg is None else cfg, S, "cfg")
        tau_l = _per_stage(d.tau if tau is None else tau, S, "tau")
        if (negative_prompt is not None or negative is not None) and all(c == 1 for c in cfg_l):
            raise InvalidOption("a negative prompt needs guidance (cfg != 1); with cfg 1 it has no effect")
        if negative_prompt is not None:
            negative = self._negative_text(negative_prompt, int(text[0].shape[0]))
        layers = [int(i) for i in cfg_insertion_layer]
        depth = self.model.cfg.depth
        if any(i > 0 or i < -depth for i in layers):
            raise InvalidOption(f"cfg insertion layers must be 0 (logits) or in [-{depth}, -1], got {layers}")
        run = self.model.bind(grids, ref)
        cond = self.model.condition_text(
            text[0],
            text[1],
            guided=any(c != 1 for c in cfg_l),
            cfg=tuple(cfg_l),
            cfg_layers=tuple(depth + i for i in layers if i < 0),
            negative=negative,
        )
        head = BitwiseHead(
            run,
            cfg_l,
            tau_l,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            cfg_on_logits=0 in layers,
        )
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        return generate(
            run,
            self.vae.stages(grids, self.patchify),
            condition=cond,
            head=head,
            policy=policy,
            generator=gen,
            callback=callback,
            record_logits=record_logits,
        )

    def _negative_text(
        self, negative_prompt: str | Sequence[str], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the negative prompt(s): one string serves the whole batch."""
        negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) == 1:
            negs = negs * batch
        if len(negs) != batch:
            raise InvalidOption(f"{len(negs)} negative prompts for a batch of {batch} (give 1 or {batch})")
        if any(not (isinstance(n, str) and n.strip()) for n in negs):
            raise InvalidOption("negative prompts must be non-empty strings")
        return self.encode(negs)


def build_infinity_pipeline(spec: InfinitySpec, *, init_seed: int | None = 0) -> InfinityPipeline:
    """Random-weight modules for a preset (``init_seed``: reproducible, global RNG untouched)."""
    bits = spec.vae.codebook_dim * spec.patchify**2
    if spec.transformer.codebook_dim != bits:
        raise InvalidOption(
            f"'{spec.name}': transformer codebook_dim {spec.transformer.codebook_dim} must be the VAE's "
            f"d={spec.vae.codebook_dim} x {spec.patchify**2} (patchify {spec.patchify}) = {bits}"
        )
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        vae = BSQVAE(spec.vae)
        model = Infinity(spec.transformer)
    return InfinityPipeline(spec.name, model, vae, spec.defaults, patchify=spec.patchify).eval()


def load_transformer_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Infinity transformer weights: one ``.pth`` (2B) or a sharded folder / ``*.index.json`` (8B)."""
    p = Path(path)
    if p.is_dir() or p.name.endswith(".index.json"):
        return load_sharded_state_dict(p)
    return load_torch_file(p)


def load_infinity(
    name: str,
    *,
    transformer: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    text_encoder: Any = None,
    device: str = "cpu",
) -> InfinityPipeline:
    """A preset with the released weights (2B: ``infinity_2b_reg.pth`` + ``infinity_vae_d32reg.pth``; 8B: the
    sharded ``infinity_8b_weights/`` folder + ``infinity_vae_d56_f8_14_patchify.pth``).

    Tiny presets (no hub files) run with random weights when no path is given; real presets need both.
    """
    spec = get_infinity_spec(name)
    if spec.hub_repo is not None:
        for role, path in (("transformer", transformer), ("vae", vae)):
            if path is None:
                flag = "--weights" if role == "transformer" else "--vae"
                raise WeightsNotFound(
                    f"model '{name}' needs {flag} PATH (official {spec.files[role]} from {spec.hub_repo})"
                )
    pipe = build_infinity_pipeline(spec, init_seed=0 if transformer is None else None)
    if vae is not None:
        pipe.vae.load_official(load_torch_file(vae, key="vae"), str(vae))
    if transformer is not None:
        pipe.model.load_official(load_transformer_state(transformer), str(transformer))
    pipe.text_encoder = text_encoder
    return pipe.eval().to(device)


__all__ = [
    "RESOLUTIONS",
    "InfinityDefaults",
    "InfinityPipeline",
    "InfinitySpec",
    "build_infinity_pipeline",
    "get_infinity_spec",
    "infinity_presets",
    "is_infinity_model",
    "load_infinity",
    "load_transformer_state",
]
