"""Argument helpers shared by subcommands (model selection, device, number lists)."""

from __future__ import annotations

import argparse

import torch

from ..errors import InvalidOption
from ..pipeline import Pipeline
from ..registry import create_model

DEFAULT_MODEL = "emoji"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"preset name (see `freqar models`) or a saved model directory (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--vae", help="official tokenizer checkpoint (.pth), e.g. vae_ch160v4096z32.pth")
    p.add_argument("--var", help="official transformer checkpoint (.pth), e.g. var_d16.pth")
    p.add_argument(
        "--download", action="store_true", help="fetch missing official files with huggingface_hub"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


LATE_FLAGS = ("late_from", "late_cfg", "late_temperature")


def add_late_args(p: argparse.ArgumentParser) -> None:
    """Late-stage sampling flags (VAR-family class models): detail stages sampled apart from structure."""
    g = p.add_argument_group("late-stage sampling (VAR-family class models; default: the model's)")
    g.add_argument(
        "--late-from",
        type=int,
        help="first stage that uses --late-cfg / --late-temperature (0 = off: one setting for all stages)",
    )
    g.add_argument("--late-cfg", type=float, help="guidance strength from --late-from on (>= 0)")
    g.add_argument("--late-temperature", type=float, help="sampling temperature from --late-from on (> 0)")


LATE_ONLY_VAR = "--late-from, --late-cfg and --late-temperature apply to VAR-family class models only"


def late_kwargs(args: argparse.Namespace) -> dict[str, float | int]:
    """The late-stage flags that were given, checked (--late-from's upper bound is the model's to check)."""
    kw = {f: getattr(args, f) for f in LATE_FLAGS if getattr(args, f, None) is not None}
    if kw.get("late_from", 0) < 0:
        raise InvalidOption(f"--late-from must be >= 0 (0 = off), got {kw['late_from']}")
    if kw.get("late_cfg", 0) < 0:
        raise InvalidOption(f"--late-cfg must be >= 0, got {kw['late_cfg']}")
    if not kw.get("late_temperature", 1) > 0:
        raise InvalidOption(f"--late-temperature must be > 0, got {kw['late_temperature']}")
    return kw


def resolve_device(name: str) -> str:
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidOption(f"device '{name}' requested but CUDA is not available")
        return name
    raise InvalidOption(f"unknown device '{name}' (cpu, cuda, cuda:N)")


def load_model(args: argparse.Namespace) -> Pipeline:
    return create_model(
        args.model, vae=args.vae, var=args.var, download=args.download, device=resolve_device(args.device)
    )


def int_list(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise InvalidOption(f"{what} must be comma-separated integers, got '{text}'") from None


def float_list(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise InvalidOption(f"{what} must be comma-separated numbers, got '{text}'") from None
