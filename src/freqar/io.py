"""File helpers: safe checkpoint loading, atomic writes and freqar's own save format."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointMismatch, FreqarError, WeightsNotFound


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the old file in place.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FreqarError(f"cannot write '{target}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise FreqarError(f"cannot write '{target}': directory '{parent}' is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically (indent 1, trailing newline)."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"file not found: '{p}'")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FreqarError(f"'{p}' is not valid JSON: {e}") from None


def load_torch_file(path: str | os.PathLike[str], *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a ``.pth`` state dict with ``weights_only=True`` (checkpoints are untrusted input).

    ``key`` picks a nested dict such as ``{"vae": state_dict}``; a flat dict is returned as is.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"checkpoint not found: '{p}'")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, forbidden pickle global...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFound(f"cannot read checkpoint '{p}': {msg}") from None
    if key is not None and isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"'{p}' does not hold a flat state dict of tensors")
    return obj


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file on the CPU with a one-line error for missing/corrupt files."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"weights not found: '{p}'")
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:
        raise WeightsNotFound(f"cannot read safetensors file '{p}': {e}") from None


# Index names transformers writes for sharded checkpoints, in the order it prefers them.
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_shard_index(path: str | os.PathLike[str]) -> Path:
    """The ``*.index.json`` of a sharded checkpoint: ``path`` itself, or the one index in folder ``path``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise WeightsNotFound(f"sharded checkpoint not found: '{p}'")
    for name in SHARD_INDEX_NAMES:
        if (p / name).is_file():
            return p / name
    found = sorted(p.glob("*.index.json"))
    if not found:
        raise WeightsNotFound(f"no shard index (*.index.json) in '{p}'")
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise WeightsNotFound(f"several shard indexes in '{p}' ({names}); pass the one to use")
    return found[0]


def load_sharded_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Merge a sharded state dict (transformers' layout: an index JSON whose ``weight_map`` maps each key to
    a ``.safetensors`` or ``.bin``/``.pth`` shard beside it), every shard read safely (``weights_only``).

    ``path`` is the folder or the index file. A missing index or shard, a shard without the keys the index
    assigns to it, or a key in two shards is a one-line error naming the file.
    """
    index = find_shard_index(path)
    meta = read_json(index)
    wmap = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointMismatch(f"'{index}' has no 'weight_map' of key -> shard file")
    shards: dict[str, list[str]] = {}
    for key, fname in wmap.items():
        shards.setdefault(fname, []).append(key)
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(shards):
        f = index.parent / fname
        if not f.is_file():
            raise WeightsNotFound(f"shard '{fname}' listed in '{index}' not found")
        part = load_safetensors(f) if fname.endswith(".safetensors") else load_torch_file(f)
        missing = [k for k in shards[fname] if k not in part]
        if missing:
            raise CheckpointMismatch(
                f"shard '{f}' lacks keys that '{index.name}' assigns to it: {_abbrev(missing)}"
            )
        twice = [k for k in part if k in state]
        if twice:
            raise CheckpointMismatch(f"shard '{f}' repeats keys of another shard: {_abbrev(twice)}")
        state.update(part)
    return state


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors atomically in safetensors format (contiguous, CPU copies)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(data, str(p)))


def load_state_dict_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """Copy ``state`` into ``module``, failing with the missing/unexpected/mis-shaped keys named.

    ``ignore(key)`` marks checkpoint keys that are allowed to be absent from the module
    (e.g. the huge ``attn_bias_for_masking`` buffer that we rebuild instead of storing).
    """
    own = module.state_dict()
    ignore = ignore or (lambda k: False)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not ignore(k)]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbrev(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_abbrev(shapes)}")
    if problems:
        raise CheckpointMismatch(f"'{source}' does not fit the model: " + "; ".join(problems))
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _abbrev(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"[{shown}{more}]"


def save_model_dir(
    directory: str | os.PathLike[str], config: dict[str, Any], parts: dict[str, torch.nn.Module]
) -> Path:
    """freqar's model format: ``config.json`` + one ``model.safetensors`` with keys ``<part>.<param>``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}.{k}": v for prefix, m in parts.items() for k, v in m.state_dict().items()}
    save_safetensors(out / "model.safetensors", tensors)
    write_json(out / "config.json", config)
    return out
