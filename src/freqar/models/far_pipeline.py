"""A loaded FAR model: transformer + KL autoencoder + level schedule, generating through the shared engine."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..engine.diffusion_head import DiffusionHead, DiffusionSamplerConfig, far_guidance
from ..engine.generate import GenerationOutput, StageInfo, generate
from ..errors import CheckpointMismatch, InvalidOption
from ..interfaces import TokenPolicy
from ..io import load_safetensors, load_state_dict_strict, read_json, save_model_dir
from ..pipeline import ModuleBundle
from ..tokenizers.frequency import FrequencyTokenizer, validate_levels
from ..tokenizers.kl import AutoencoderKL, KLConfig
from .far import FARConfig, FARTransformer

FORMAT = "freqar-model/1"


@dataclass(frozen=True)
class FARDefaults:
    """Recommended sampling settings (upstream: cfg 3 linear, 100 diffusion steps, the temperature ramp)."""

    cfg: float = 3.0
    guidance_schedule: str = "linear"
    steps: str = "100"
    temperature: float = 1.0
    temperature_ramp: bool = True
    levels: tuple[int, ...] | None = None


@dataclass
class FARPipeline(ModuleBundle):
    """Everything needed to generate with FAR; ``levels`` None = the tokenizer's default schedule."""

    name: str
    transformer: FARTransformer
    vae: AutoencoderKL
    defaults: FARDefaults = field(default_factory=FARDefaults)
    class_names: list[str] | None = None
    family: str = "far"

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    @property
    def image_size(self) -> int:
        return self.vae.cfg.resolution

    def parts(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer, self.vae)

    def tokenizer(self, levels: tuple[int, ...] | list[int] | None = None) -> FrequencyTokenizer:
        return FrequencyTokenizer(self.vae, levels if levels is not None else self.defaults.levels)

    def generate(
        self,
        labels: list[int] | torch.Tensor | None = None,
        *,
        batch: int = 1,
        seed: int | None = 0,
        cfg: float | None = None,
        guidance_schedule: str | None = None,
        steps: str | int | None = None,
        temperature: float | None = None,
        temperature_ramp: bool | None = None,
        ddim: bool = False,
        eta: float = 0.0,
        levels: tuple[int, ...] | list[int] | None = None,
        policy: TokenPolicy | None = None,
        callback: Callable[[StageInfo], None] | None = None,
        on_diffusion_step: Callable[[int, int, int], None] | None = None,
        unconditional: bool = False,
        upstream_noise: bool = True,
        generator: torch.Generator | None = None,
        **_: Any,
    ) -> GenerationOutput:
        """Images for ``labels`` (or ``batch`` random labels; ``unconditional``: the null class)."""
        d = self.defaults
        tok = self.tokenizer(levels)
        if tok.side != self.transformer.cfg.seq_h or tok.channels != self.transformer.cfg.token_channels:
            raise InvalidOption(
                f"autoencoder latent {tok.side}x{tok.side}x{tok.channels} does not fit the transformer "
                f"({self.transformer.cfg.seq_h}x{self.transformer.cfg.seq_h}x{self.transformer.cfg.token_channels})"
            )
        guidance = far_guidance(
            d.cfg if cfg is None else cfg, len(tok.levels), guidance_schedule or d.guidance_schedule
        )
        sampler = DiffusionSamplerConfig(
            steps=str(d.steps if steps is None else steps),
            temperature=d.temperature if temperature is None else temperature,
            temperature_ramp=d.temperature_ramp if temperature_ramp is None else temperature_ramp,
            ddim=ddim,
            eta=eta,
            upstream_noise=upstream_noise,
        )
        head = DiffusionHead(self.transformer.diffloss, guidance, sampler, tok.levels, on_diffusion_step)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        lab_t = None
        if unconditional:
            if batch < 1:
                raise InvalidOption(f"batch must be >= 1, got {batch}")
            lab_t = torch.full((batch,), -1, dtype=torch.long)
        elif labels is not None:
            lab = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
            if not lab:
                raise InvalidOption("batch must be >= 1")
            for x in lab:
                if not 0 <= x < self.num_classes:
                    raise InvalidOption(
                        f"label {x} is outside [0, {self.num_classes}) for model '{self.name}'"
                    )
            lab_t = torch.tensor(lab, dtype=torch.long)
        out = generate(
            self.transformer,
            tok,
            labels=lab_t,
            batch=batch,
            num_classes=self.num_classes,
            guidance=guidance,
            policy=policy,
            generator=generator,
            callback=callback,
            head=head,
        )
        out.policy_stats = out.policy_stats or []
        out.head_seconds = list(head.seconds)  # type: ignore[attr-defined]
        return out

    # ----- freqar's own format: DIR/config.json + DIR/model.safetensors --------------------------------
    def config_dict(self) -> dict:
        dflt = {f.name: getattr(self.defaults, f.name) for f in fields(self.defaults)}
        return {
            "format": FORMAT,
            "family": self.family,
            "name": self.name,
            "tokenizer": self.vae.cfg.to_dict(),
            "transformer": self.transformer.cfg.to_dict(),
            "defaults": dflt,
            "class_names": self.class_names,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (keys ``vae.*`` and ``far.*``) atomically."""
        return save_model_dir(directory, self.config_dict(), {"vae": self.vae, "far": self.transformer})


def build_far_pipeline(
    name: str,
    vae_cfg: KLConfig,
    far_cfg: FARConfig,
    defaults: FARDefaults | None = None,
    class_names: list[str] | None = None,
    init_seed: int | None = 0,
) -> FARPipeline:
    """Randomly initialised modules (``init_seed``: reproducible init, global RNG untouched)."""
    if vae_cfg.latent_side != far_cfg.seq_h or vae_cfg.embed_dim != far_cfg.token_channels:
        raise InvalidOption(
            f"autoencoder latent "
            f"{vae_cfg.latent_side}x{vae_cfg.latent_side}x{vae_cfg.embed_dim} does not fit "
            f"the FAR transformer ({far_cfg.seq_h}x{far_cfg.seq_h}x{far_cfg.token_channels})"
        )
    defaults = defaults or FARDefaults()
    if defaults.levels is not None:
        validate_levels(defaults.levels, far_cfg.seq_h)
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        vae = AutoencoderKL(vae_cfg)
        far = FARTransformer(far_cfg)
    return FARPipeline(name, far, vae, defaults, class_names).eval()


def load_far_dir(directory: str | os.PathLike[str]) -> FARPipeline:
    """Load a FAR model saved by :meth:`FARPipeline.save`."""
    d = Path(directory)
    cfg = read_json(d / "config.json")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("family") != "far":
        raise CheckpointMismatch(f"'{d / 'config.json'}' is not a freqar FAR model config")
    try:
        vae_cfg = KLConfig(**cfg["tokenizer"])
        far_cfg = FARConfig(**cfg["transformer"])
        dd = dict(cfg.get("defaults", {}))
        if dd.get("levels") is not None:
            dd["levels"] = tuple(dd["levels"])
        defaults = FARDefaults(**dd)
    except (KeyError, TypeError) as e:
        raise CheckpointMismatch(f"'{d / 'config.json'}': bad or missing key: {e}") from None
    pipe = build_far_pipeline(
        cfg.get("name", d.name), vae_cfg, far_cfg, defaults, cfg.get("class_names"), None
    )
    state = load_safetensors(d / "model.safetensors")
    src = str(d / "model.safetensors")
    extra = [k for k in state if not k.startswith(("vae.", "far."))]
    if extra:
        raise CheckpointMismatch(f"'{src}': unexpected keys outside vae.* / far.*: {extra[:4]}")
    load_state_dict_strict(pipe.vae, {k[4:]: v for k, v in state.items() if k.startswith("vae.")}, source=src)
    load_state_dict_strict(
        pipe.transformer, {k[4:]: v for k, v in state.items() if k.startswith("far.")}, source=src
    )
    return pipe.eval()


@dataclass(frozen=True)
class FARSpec:
    """A FAR preset: autoencoder + transformer configs, sampling defaults and the official file names."""

    name: str
    description: str
    vae: KLConfig
    far: FARConfig
    defaults: FARDefaults = field(default_factory=FARDefaults)
    files: dict[str, str] = field(default_factory=dict)


def far_presets() -> dict[str, FARSpec]:
    """far-b/l/h (official ImageNet 256 px, weights from figereatfish/FAR), far-tiny (random, tests) and the
    bundled far-emoji (trained here; listed only when its package data is installed)."""
    from .far import far_preset

    official = {
        "vae": "kl16.ckpt (figereatfish/FAR, vae/)",
        "checkpoint": "checkpoint-last.pth (figereatfish/FAR)",
    }
    specs = [
        FARSpec(
            n,
            f"FAR-{n[-1].upper()} class-conditional ImageNet 256px",
            KLConfig(),
            far_preset(n),
            files=official,
        )
        for n in ("far-b", "far-l", "far-h")
    ]
    specs.append(
        FARSpec(
            "far-tiny",
            "tiny random-weight FAR (64 px, 16x16 latent) for tests and smoke runs: pictures are noise",
            KLConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, resolution=64),
            far_preset("far-tiny"),
            FARDefaults(cfg=2.0, steps="ddim4"),
        )
    )
    specs += [_bundled_far_spec(n) for n in _bundled_far_names()]
    return {s.name: s for s in specs}


def _bundled_far_names() -> list[str]:
    from ..registry import BUNDLED_FAR, bundled_dir

    return [n for n in BUNDLED_FAR if bundled_dir(n) is not None]


def _bundled_far_spec(name: str) -> FARSpec:
    """A FAR model whose weights ship in freqar/assets (no official files: ``files`` stays empty)."""
    from ..registry import bundled_dir

    d = bundled_dir(name)
    assert d is not None
    cfg = read_json(d / "config.json")
    classes = cfg.get("class_names") or []
    desc = cfg.get("description") or (
        f"FAR trained here, bundled ({len(classes)} classes: {', '.join(classes)})"
    )
    return FARSpec(name, desc, KLConfig(**cfg["tokenizer"]), FARConfig(**cfg["transformer"]))


def is_far_model(name_or_path: str) -> bool:
    """A FAR preset name, or a saved model directory whose config says family "far"."""
    if name_or_path in far_presets():
        return True
    cfg = Path(name_or_path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = read_json(cfg)
    except Exception:
        return False
    return isinstance(data, dict) and data.get("family") == "far"


def create_far_model(
    name_or_path: str,
    *,
    vae: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    prefer_ema: bool = True,
    init_seed: int | None = 0,
) -> FARPipeline:
    """A saved FAR directory, or a preset with official weights from local paths (random weights if none).

    Official presets need both files: MAR's ``kl16.ckpt`` (``--vae``) and FAR's ``checkpoint-last.pth``
    (``--checkpoint``, ``model_ema`` preferred); ``far-tiny`` runs with random weights.
    """
    from ..tokenizers.kl import load_kl_checkpoint
    from .far import load_far_checkpoint

    p = Path(name_or_path)
    if p.is_dir():
        if vae is not None or checkpoint is not None:
            raise InvalidOption("--vae/--checkpoint apply to presets, not to a saved model directory")
        return load_far_dir(p).to(device)
    presets = far_presets()
    if name_or_path not in presets:
        raise InvalidOption(f"unknown FAR model '{name_or_path}' ({', '.join(presets)})")
    if name_or_path in _bundled_far_names():
        from ..registry import bundled_dir

        if vae is not None or checkpoint is not None:
            raise InvalidOption(f"'{name_or_path}' ships its own weights; --vae/--checkpoint do not apply")
        pipe = load_far_dir(bundled_dir(name_or_path))  # type: ignore[arg-type]
        pipe.name = name_or_path
        return pipe.to(device)
    spec = presets[name_or_path]
    if spec.files and (vae is None or checkpoint is None):
        missing = "--vae PATH" if vae is None else "--checkpoint PATH"
        from ..errors import WeightsNotFound

        raise WeightsNotFound(
            f"model '{spec.name}' needs {missing} "
            f"(official files: {spec.files['vae']}; {spec.files['checkpoint']})"
        )
    far_cfg, state = spec.far, None
    if checkpoint is not None:
        state = load_far_checkpoint(checkpoint, prefer_ema)
        far_cfg = _diffloss_size_from_state(far_cfg, state)
    pipe = build_far_pipeline(spec.name, spec.vae, far_cfg, spec.defaults, init_seed=init_seed)
    if vae is not None:
        pipe.vae.load_official(load_kl_checkpoint(vae), str(vae))
    if state is not None:
        pipe.transformer.load_official(state, str(checkpoint))
    return pipe.eval().to(device)


def _diffloss_size_from_state(cfg: FARConfig, state: dict[str, torch.Tensor]) -> FARConfig:
    """The diffusion-MLP depth/width are training flags (``--diffloss_d/w``), not part of the model name,
    so they are read from the checkpoint (the README's parameter counts do not pin them down for L/H)."""
    import dataclasses
    import re

    w = state.get("diffloss.net.input_proj.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"diffloss\.net\.res_blocks\.(\d+)\.", k))}
    if w is None or not blocks:
        return cfg
    return dataclasses.replace(cfg, diffloss_d=max(blocks) + 1, diffloss_w=int(w.shape[0]))
