"""Training configs: plain dataclasses, loadable from YAML, with ``section.key=value`` overrides.

A run directory stores the resolved config; resuming with a different one is refused, because the
schedule, data order and optimizer state would silently stop matching.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidOption


@dataclass
class DataConfig:
    """Where images come from: a ``freqar data`` folder (manifest.json + images.npz) or any image folder."""

    path: str = ""
    split: str = "train"  # train | heldout | all (emoji manifests); ignored for plain folders
    size: int = 128  # images are resized to size x size (plain folders) or must already match (manifests)
    labels: str = ""  # optional labels file for plain folders (CSV: file,label[,caption])
    hflip: bool = True


@dataclass
class OptimConfig:
    """AdamW + linear warm-up + cosine decay to ``lr * min_lr_ratio``; EMA of the weights."""

    lr: float = 2e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 2.0
    ema_decay: float = 0.999


@dataclass
class RunConfig:
    """Length of the run and its bookkeeping (fields in ``VOLATILE`` may change on resume)."""

    steps: int = 1000
    batch_size: int = 16  # per process
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    threads: int = 0  # torch.set_num_threads; 0 = leave the default
    # held-out evaluation of the EMA weights every N steps (0 = off): the loss on held-out images beside the
    # same loss on as many training images, so over-fitting shows while the run goes on (history, loss.png)
    eval_every: int = 0
    # held-out images for eval_every: '' = the held-out split of the training `freqar data` folder; else a
    # `freqar data` folder (its held-out split) or an image folder (with an optional labels.csv inside)
    val_data: str = ""


@dataclass
class TokenizerModelConfig:
    """The multi-scale VQVAE to train (fields of ``MSVQConfig``)."""

    vocab_size: int = 512
    z_channels: int = 16
    ch: int = 16
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 1
    using_sa: bool = False
    using_mid_sa: bool = True
    groupnorm_groups: int = 8
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    decoder_num_res_blocks: int = -1  # decoder depth per level when it differs (-1 = num_res_blocks)


@dataclass
class AdversarialLoss:
    """The patch critic's settings, shared by both autoencoder losses (train/adversarial.py)."""

    gan_weight: float = 0.0  # patch-critic hinge term, adaptively balanced (train/adversarial.py); 0 = off
    gan_start: int = 0  # step from which the decoder sees the adversarial term (the critic trains from 0)
    disc_lr: float = 1e-4
    disc_channels: int = 32
    disc_layers: int = 3
    # a training run's checkpoint.pt whose critic (and its optimizer) this run starts from, so a further round
    # keeps the critic that has followed the decoder ('' = a fresh critic)
    disc_init: str = ""
    # decoder-only + gan_weight > 0: a bank of the model's own generated latents (scripts/sample_latents.py:
    # 'fhat' for a VQ tokenizer, 'z' for a KL autoencoder) decoded each step beside the reconstructions and
    # judged by the critic ('' = off)
    gen_latents: str = ""


@dataclass
class TokenizerLoss(AdversarialLoss):
    """Reconstruction (MSE + L1) + VQ (commitment and codebook) terms; dead-code restarts."""

    l1_weight: float = 0.2
    vq_weight: float = 1.0
    usage_decay: float = 0.99
    restart_every: int = 50
    restart_threshold: float = 0.01  # EMA hits per step below which a code counts as dead
    perceptual_weight: float = 0.0  # EfficientNet-Lite0 feature distance (train/perceptual.py); 0 = off


@dataclass
class TokenizerInit:
    """Start from a trained tokenizer; ``decoder_only`` freezes encoder, quantiser and codebook so the
    codes (and any transformer trained on them) stay valid while the decoder is sharpened."""

    path: str = ""
    decoder_only: bool = False


@dataclass
class TokenizerTrainConfig:
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: TokenizerLoss = field(default_factory=TokenizerLoss)
    init: TokenizerInit = field(default_factory=TokenizerInit)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class VARModelConfig:
    """The transformer to train (fields of ``VARConfig``; vocab/z/schedule come from the tokenizer)."""

    depth: int = 6
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    drop_path_rate: float = 0.0


@dataclass
class VARTrainSettings:
    tokenizer: str = ""  # a `freqar train tokenizer` run dir (or its tokenizer/ export)
    label_drop: float = 0.1  # probability of the null class, for classifier-free guidance
    label_smoothing: float = 0.0
    # self-correction (Infinity's bitwise self-correction, for a codebook): each sample's history codes
    # slip with a rate drawn from U[0, self_correct] to one of the self_correct_near next-nearest codes
    # (0: any code), and later scales learn to correct it; 0 disables (plain teacher forcing)
    self_correct: float = 0.0
    self_correct_near: int = 8
    amp: bool = False  # bf16 autocast for the transformer (CPUs with AVX512-BF16/AMX, or CUDA)
    cfg: float = 3.0  # sampling defaults written into the exported model
    top_k: int = 0
    top_p: float = 0.0
    # a model folder (a run's model/ export) to start the transformer from: a second phase with a fresh
    # schedule; model.* and the tokenizer's codes must be the folder's
    init: str = ""


@dataclass
class VARTrainConfig:
    model: VARModelConfig = field(default_factory=VARModelConfig)
    var: VARTrainSettings = field(default_factory=VARTrainSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.05))
    run: RunConfig = field(default_factory=RunConfig)


# Fields that may differ when resuming (bookkeeping only, no effect on the numbers).
VOLATILE = {
    ("run", "ckpt_every"),
    ("run", "log_every"),
    ("run", "threads"),
    ("run", "eval_every"),  # evaluation reads the EMA weights and no random state: training is unchanged
    ("run", "val_data"),
}


def _coerce(value: Any, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise InvalidOption(f"config '{name}' must be true/false, got {value!r}")
    if isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidOption(f"config '{name}' must be an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InvalidOption(f"config '{name}' must be a number, got {value!r}")
    if isinstance(current, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise InvalidOption(f"config '{name}' must be a list, got {value!r}")
    if isinstance(current, str):
        return str(value)
    return value


def update_from_dict(obj: Any, data: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``data`` applied; unknown keys are an error."""
    if not isinstance(data, dict):
        raise InvalidOption(f"config section '{prefix or '<root>'}' must be a mapping")
    names = {f.name for f in fields(obj)}
    changes = {}
    for k, v in data.items():
        full = f"{prefix}{k}"
        if k not in names:
            raise InvalidOption(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            changes[k] = update_from_dict(cur, v, full + ".")
        else:
            changes[k] = _coerce(v, cur, full)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, lists, booleans)."""
    import yaml

    if "=" not in text:
        raise InvalidOption(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(default: Any, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides."""
    cfg = default
    if path:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise InvalidOption(f"config file not found: '{p}'")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InvalidOption(f"'{p}' is not valid YAML: {e}") from None
        cfg = update_from_dict(cfg, data)
    for o in overrides or []:
        cfg = update_from_dict(cfg, parse_override(o))
    return cfg


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def config_diff(a: dict, b: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """Differences between two config dicts, ignoring ``VOLATILE`` keys."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = (*prefix, k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key)
        elif key not in VOLATILE and va != vb:
            out.append(f"{'.'.join(key)}: {va!r} -> {vb!r}")
    return out
