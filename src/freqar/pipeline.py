"""A loaded model family instance: transformer + tokenizer + defaults, with freqar's own save format."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from .engine.generate import GenerationOutput, generate
from .engine.guidance import Guidance
from .engine.sampling import SamplerConfig
from .errors import CheckpointMismatch, InvalidOption
from .interfaces import TokenPolicy
from .io import load_safetensors, load_state_dict_strict, read_json, save_model_dir
from .models.var import VARConfig, VARTransformer
from .tokenizers.msvq import VQVAE, MSVQConfig

FORMAT = "freqar-model/1"


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's recommended sampling settings (used when the caller does not override them).

    ``late_from`` > 0: from that stage on, guidance ``late_cfg`` and temperature ``late_temperature``
    (each None = unchanged) replace the regular ones; 0 = one setting for every stage.
    """

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    late_from: int = 0
    late_cfg: float | None = None
    late_temperature: float | None = None


_B = TypeVar("_B", bound="ModuleBundle")


class ModuleBundle:
    """``device``/``to``/``eval`` for a family's pipeline: a frozen set of modules that move together."""

    def parts(self) -> tuple[torch.nn.Module, ...]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parts()[0].parameters()).device

    def to(self: _B, device: str | torch.device) -> _B:
        for m in self.parts():
            m.to(device)
        return self

    def eval(self: _B) -> _B:
        for m in self.parts():
            m.eval()
        return self


@dataclass
class Pipeline(ModuleBundle):
    """Everything needed to generate: ``transformer``, ``tokenizer``, class names and defaults."""

    name: str
    transformer: VARTransformer
    tokenizer: VQVAE
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    class_names: list[str] | None = None
    family: str = "var"

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.patch_nums[-1] * self.tokenizer.cfg.downsample

    def parts(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer, self.tokenizer)

    def check_labels(self, labels: list[int]) -> None:
        check_class_labels(labels, self.num_classes, self.name)

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
        smooth: bool = False,
        policy: TokenPolicy | None = None,
        guidance_schedule: str = "linear",
        callback: Any = None,
        record_logits: bool = False,
        late_from: int | None = None,
        late_cfg: float | None = None,
        late_temperature: float | None = None,
    ) -> GenerationOutput:
        """Generate images for ``labels`` (or ``batch`` random labels); ``seed`` seeds a fresh generator.

        Every sampling option left None takes the model's default (:class:`SamplingDefaults`);
        ``late_from=0`` turns the model's late-stage settings off.
        """
        d = self.defaults
        late_from = d.late_from if late_from is None else late_from
        num_stages = len(self.tokenizer.cfg.patch_nums)
        if not 0 <= late_from < num_stages:
            raise InvalidOption(f"late_from must be in [0, {num_stages - 1}] (0 = off), got {late_from}")
        guidance = Guidance(
            cfg=d.cfg if cfg is None else cfg,
            schedule=guidance_schedule,
            late_from=late_from,
            late_cfg=d.late_cfg if late_cfg is None else late_cfg,
        )
        sampler = SamplerConfig(
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            temperature=d.temperature if temperature is None else temperature,
            smooth=smooth,
            late_from=late_from,
            late_temperature=d.late_temperature if late_temperature is None else late_temperature,
        )
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        lab_t = None
        if labels is not None:
            lab_t = label_tensor(labels, self.num_classes, self.name)
        elif batch < 1:
            raise InvalidOption(f"batch must be >= 1, got {batch}")
        return generate(
            self.transformer,
            self.tokenizer,
            labels=lab_t,
            batch=batch,
            num_classes=self.num_classes,
            guidance=guidance,
            sampler=sampler,
            policy=policy,
            generator=gen,
            callback=callback,
            record_logits=record_logits,
        )

    # ----- freqar's own format: DIR/config.json + DIR/model.safetensors --------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "family": self.family,
            "name": self.name,
            "tokenizer": self.tokenizer.cfg.to_dict(),
            "transformer": self.transformer.cfg.to_dict(),
            "defaults": {f.name: getattr(self.defaults, f.name) for f in fields(self.defaults)},
            "class_names": self.class_names,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (keys ``vae.*`` and ``var.*``) atomically."""
        return save_model_dir(directory, self.config_dict(), {"vae": self.tokenizer, "var": self.transformer})


def check_class_labels(labels: list[int], num_classes: int, model: str) -> None:
    """Every label in [0, num_classes): the one rule of all class-conditional pipelines."""
    for lab in labels:
        if not 0 <= lab < num_classes:
            raise InvalidOption(f"label {lab} is outside [0, {num_classes}) for model '{model}'")


def label_tensor(labels: list[int] | torch.Tensor, num_classes: int, model: str) -> torch.Tensor:
    """Checked labels as a long tensor (at least one)."""
    lab_list = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not lab_list:
        raise InvalidOption("batch must be >= 1")
    check_class_labels(lab_list, num_classes, model)
    return torch.tensor(lab_list, dtype=torch.long)


def build_pipeline(
    name: str,
    vae_cfg: MSVQConfig,
    var_cfg: VARConfig,
    defaults: SamplingDefaults | None = None,
    class_names: list[str] | None = None,
    init_seed: int | None = 0,
) -> Pipeline:
    """Build randomly initialised modules (``init_seed``: reproducible init, global RNG left untouched)."""
    if var_cfg.patch_nums != vae_cfg.patch_nums:
        raise InvalidOption(
            f"scale schedules differ: tokenizer {list(vae_cfg.patch_nums)} "
            f"vs transformer {list(var_cfg.patch_nums)}"
        )
    if var_cfg.vocab_size != vae_cfg.vocab_size or var_cfg.z_channels != vae_cfg.z_channels:
        raise InvalidOption("transformer vocab_size/z_channels must match the tokenizer's")
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        tok = VQVAE(vae_cfg)
        var = VARTransformer(var_cfg)
    return Pipeline(name, var, tok, defaults or SamplingDefaults(), class_names).eval()


def load_pipeline_dir(directory: str | os.PathLike[str]) -> Pipeline:
    """Load a model saved by :meth:`Pipeline.save`."""
    d = Path(directory)
    cfg = read_json(d / "config.json")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointMismatch(f"'{d / 'config.json'}' is not a freqar model config (format != {FORMAT})")
    try:
        vae_cfg = MSVQConfig(**cfg["tokenizer"])
        var_cfg = VARConfig(**cfg["transformer"])
        defaults = SamplingDefaults(**cfg.get("defaults", {}))
    except (KeyError, TypeError) as e:
        raise CheckpointMismatch(f"'{d / 'config.json'}': bad or missing key: {e}") from None
    pipe = build_pipeline(cfg.get("name", d.name), vae_cfg, var_cfg, defaults, cfg.get("class_names"), None)
    state = load_safetensors(d / "model.safetensors")
    src = str(d / "model.safetensors")
    load_state_dict_strict(pipe.tokenizer, _sub(state, "vae."), source=src)
    load_state_dict_strict(pipe.transformer, _sub(state, "var."), source=src)
    if set(state) - {k for k in state if k.startswith(("vae.", "var."))}:
        raise CheckpointMismatch(f"'{src}': unexpected keys outside vae.* / var.*")
    return pipe.eval()


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
