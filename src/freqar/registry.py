"""Named model presets and the single front door ``create_model``.

A preset is a ``ModelSpec``: the tokenizer and transformer configs, sampling defaults, and where the
official weights live (hub repo + file names). Loading never touches the network unless the caller
asks for a hub download and ``huggingface_hub`` is installed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnknownModel, WeightsNotFound
from .io import load_torch_file
from .models.var import VARConfig
from .pipeline import Pipeline, SamplingDefaults, build_pipeline, load_pipeline_dir
from .tokenizers.msvq import MSVQConfig

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model and find its official weights."""

    name: str
    family: str
    description: str
    tokenizer: MSVQConfig
    transformer: VARConfig
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    hub_repo: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # role ("vae", "var") -> file name in hub_repo

    @property
    def image_size(self) -> int:
        return self.tokenizer.patch_nums[-1] * self.tokenizer.downsample


def _official_var(depth: int, patch_nums: tuple[int, ...] = VAR_256, shared: bool = False) -> ModelSpec:
    reso = patch_nums[-1] * 16
    aln = "shared" if shared else "per-block"
    return ModelSpec(
        name=f"var-d{depth}",
        family="var",
        description=f"VAR-d{depth} class-conditional ImageNet {reso}px ({aln} AdaLN)",
        tokenizer=MSVQConfig(patch_nums=patch_nums),
        transformer=VARConfig(
            depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=shared, patch_nums=patch_nums
        ),
        defaults=SamplingDefaults(cfg=4.0, top_k=900, top_p=0.95),
        hub_repo="FoundationVision/var",
        files={"vae": "vae_ch160v4096z32.pth", "var": f"var_d{depth}.pth"},
    )


def _tiny() -> ModelSpec:
    pn = (1, 2, 3, 4, 6, 8)
    return ModelSpec(
        name="var-tiny",
        family="var",
        description="tiny random-weight VAR (64 px, 6 scales) for tests and smoke runs: pictures are noise",
        tokenizer=MSVQConfig(
            vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), patch_nums=pn, share_quant_resi=4
        ),
        transformer=VARConfig(
            depth=2, embed_dim=64, num_heads=4, num_classes=10, patch_nums=pn, vocab_size=256, z_channels=16
        ),
        defaults=SamplingDefaults(cfg=1.5, top_k=0, top_p=0.0),
    )


# Models whose trained weights ship inside the package: preset name -> folder under freqar/assets.
BUNDLED = {"emoji": "emoji-default"}
BUNDLED_FAR = {"far-emoji": "far-emoji"}  # FAR family (models/far_pipeline.py builds their presets)
# What a bare `--accel` runs per model: the fastest measured setting (`freqar study`, `freqar eval --accel`)
# whose paired-bootstrap 95% interval stays within +5% FD of dense on that model, at the largest sample
# count measured (README); other models get the paper's SparseVAR, FAR models farskip's defaults.
# emoji: SparseVAR with a 97% keep budget per sparse stage and no logit copying (beta 1: excluded tokens
# add a zero residual), 1.02x at +1.9% [1.0, 2.8] FD on 500 samples with the decoder tuned on generated
# latents (keep 0.95: +3.5% [2.3, 4.9] but 1.00x, within the timing noise; keep 0.92: 1.05x at +4.5%
# [3.2, 6.2], its interval over the line).
# far-emoji: farskip at tau 0.2, 1.54x at +3.0% on 100 samples of the fifth-round weights (tau 0.4: 1.73x
# at +4.7%, too close to the line).
STUDIED_ACCEL: dict[str, tuple[str, dict[str, int | float | str]]] = {
    # stop 24: the previous stage's entropy ranks the tokens better than ΔF on this model (README)
    "emoji": ("sparsevar", {"keep": 0.75, "beta": 1.0, "start_stage": 8, "signal": "entropy"}),
    "far-emoji": ("farskip", {"tau": 0.2}),
}


def recommended_accel(model: str) -> tuple[str, dict[str, int | float | str]]:
    """The accelerated method and knobs ``--accel auto`` picks for ``model`` (FAR models: farskip)."""
    from .models.far_pipeline import is_far_model

    fallback = ("farskip", {}) if is_far_model(model) else ("sparsevar", {})
    method, knobs = STUDIED_ACCEL.get(model, fallback)
    return method, dict(knobs)


def bundled_dir(name: str) -> Path | None:
    """The package-data folder of a bundled model, or None when its weights are not installed."""
    folder = BUNDLED.get(name) or BUNDLED_FAR.get(name)
    if folder is None:
        return None
    from importlib.resources import files

    d = Path(str(files("freqar").joinpath("assets", folder)))
    return d if (d / "config.json").is_file() and (d / "model.safetensors").is_file() else None


def _bundled_spec(name: str, directory: Path) -> ModelSpec:
    from .io import read_json

    cfg = read_json(directory / "config.json")
    classes = cfg.get("class_names") or []
    return ModelSpec(
        name=name,
        family=cfg.get("family", "var"),
        description=cfg.get("description")
        or f"class-conditional model with bundled weights ({len(classes)} classes: {', '.join(classes)})",
        tokenizer=MSVQConfig(**cfg["tokenizer"]),
        transformer=VARConfig(**cfg["transformer"]),
        defaults=SamplingDefaults(**cfg.get("defaults", {})),
    )


def _registry() -> dict[str, Callable[[], ModelSpec]]:
    reg: dict[str, Callable[[], ModelSpec]] = {
        f"var-d{d}": (lambda d=d: _official_var(d)) for d in (16, 20, 24, 30)
    }
    reg["var-d36"] = lambda: _official_var(36, VAR_512, shared=True)
    reg["var-tiny"] = _tiny
    for name in BUNDLED:
        d = bundled_dir(name)
        if d is not None:
            reg[name] = lambda name=name, d=d: _bundled_spec(name, d)
    return reg


def list_models(pattern: str = "*") -> list[str]:
    """Registered preset names matching a shell-style wildcard."""
    return sorted(n for n in _registry() if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    reg = _registry()
    if name not in reg:
        raise UnknownModel(f"unknown model '{name}'; run `freqar models` to list presets")
    return reg[name]()


def _hub_file(repo: str, filename: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsNotFound(
            f"no local path given for '{filename}' and huggingface_hub is not installed; "
            f"download {repo}/{filename} and pass its path"
        ) from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache_dir))
    except Exception as e:
        raise WeightsNotFound(
            f"cannot fetch {repo}/{filename} from the hub ({type(e).__name__}); pass a local path"
        ) from None


def create_model(
    name_or_path: str,
    *,
    vae: str | os.PathLike[str] | None = None,
    var: str | os.PathLike[str] | None = None,
    pretrained: bool | None = None,
    download: bool = False,
    cache_dir: str | None = None,
    device: str = "cpu",
    init_seed: int | None = 0,
) -> Pipeline:
    """Build a preset (random weights unless weights are given or found) or load a saved model directory.

    - a directory holding ``config.json`` -> freqar's own format;
    - a preset name with ``vae``/``var`` local paths -> official ``.pth`` state dicts;
    - a preset name with ``download=True`` -> its hub files through ``huggingface_hub``;
    - otherwise the preset is built with random weights (``pretrained=True`` makes that an error).
    """
    from .models.far_pipeline import create_far_model, is_far_model

    if is_far_model(name_or_path):  # FAR presets and folders: the same generate/eval surface
        far = create_far_model(name_or_path, vae=vae, checkpoint=var, device=device, init_seed=init_seed)
        return far  # type: ignore[return-value]
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise WeightsNotFound(f"'{p}' is a directory without config.json")
        from .models.hart_class import is_hart_class_dir, load_hart_class_dir

        if is_hart_class_dir(p):  # a `freqar train hart` export: same generate/eval surface
            return load_hart_class_dir(p).to(device)  # type: ignore[return-value]
        return load_pipeline_dir(p).to(device)
    bundled = bundled_dir(name_or_path)
    if bundled is not None and vae is None and var is None:
        pipe = load_pipeline_dir(bundled)
        pipe.name = name_or_path
        return pipe.to(device)
    spec = get_spec(name_or_path)
    pipe = build_pipeline(spec.name, spec.tokenizer, spec.transformer, spec.defaults, init_seed=init_seed)
    want = pretrained if pretrained is not None else (vae is not None or var is not None or download)
    if not want:
        return pipe.to(device)
    paths = {"vae": vae, "var": var}
    for role in ("vae", "var"):
        if paths[role] is None:
            if not (download and spec.hub_repo and role in spec.files):
                raise WeightsNotFound(
                    f"model '{spec.name}' needs --{role} PATH"
                    + (
                        f" (official file {spec.files[role]} from {spec.hub_repo})"
                        if role in spec.files
                        else ""
                    )
                )
            paths[role] = _hub_file(spec.hub_repo, spec.files[role], cache_dir)
    load_official_weights(pipe, paths["vae"], paths["var"])
    return pipe.to(device)


def load_official_weights(
    pipe: Pipeline, vae_path: str | os.PathLike[str] | None, var_path: str | os.PathLike[str] | None
) -> None:
    """Load upstream ``vae_*.pth`` / ``var_d*.pth`` state dicts into a built pipeline."""
    if vae_path is not None:
        pipe.tokenizer.load_official(load_torch_file(vae_path, key="vae"), str(vae_path))
    if var_path is not None:
        pipe.transformer.load_official(load_torch_file(var_path), str(var_path))
    pipe.eval()


@dataclass(frozen=True)
class CatalogueEntry:
    """One row of ``freqar models``: any family's preset, with where its official files come from."""

    name: str
    family: str
    image_size: int
    description: str
    source: str = ""


def catalogue(pattern: str = "*") -> list[CatalogueEntry]:
    """Every preset of every family, matching a shell-style wildcard (families import lazily)."""
    from .models.far_pipeline import far_presets
    from .models.hart_pipeline import hart_presets
    from .models.infinity_pipeline import get_infinity_spec, infinity_presets

    rows: list[CatalogueEntry] = []
    for n in list_models(pattern):
        s = get_spec(n)
        src = f"{s.hub_repo}: {', '.join(s.files.values())}" if s.hub_repo else ""
        rows.append(CatalogueEntry(n, s.family, s.image_size, s.description, src))
    for n in sorted(infinity_presets()):
        if fnmatch.fnmatch(n, pattern):
            s = get_infinity_spec(n)
            src = f"{s.hub_repo}: {', '.join(s.files.values())}" if s.hub_repo else ""
            rows.append(CatalogueEntry(n, "infinity", s.image_size, s.description, src))
    for n, fs in far_presets().items():
        if fnmatch.fnmatch(n, pattern):
            src = "; ".join(fs.files.values())
            rows.append(CatalogueEntry(n, "far", fs.vae.resolution, fs.description, src))
    for n, make in hart_presets().items():
        if fnmatch.fnmatch(n, pattern):
            hs = make()
            size = hs.tokenizer.patch_nums[-1] * hs.tokenizer.downsample
            src = "mit-han-lab/hart-0.7b-1024px (llm/, tokenizer/)" if n == "hart-0.7b" else ""
            rows.append(CatalogueEntry(n, "hart", size, hs.description, src))
    return rows
