"""Token policies by name: ``dense`` (alias ``none``), ``sparsevar``, the ``fastvar`` peer baseline
and ``farskip`` (exclusion on FAR's frequency levels).

``make_policy(name, **knobs)`` is the one front door; knobs are the fields of the policy's frozen config
dataclass, and unknown names or knobs raise ``InvalidOption`` with the valid choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..engine.generate import DensePolicy
from ..errors import InvalidOption
from .fastvar import FastVARConfig, FastVARPolicy
from .levels import FARSkipConfig, FARSkipPolicy
from .sparsevar import SparseVARConfig, SparseVARPolicy

_ALIASES = {"none": "dense"}


def _registry() -> dict[str, tuple[type | None, Callable[[Any], Any]]]:
    return {
        "dense": (None, lambda cfg: DensePolicy()),
        "sparsevar": (SparseVARConfig, SparseVARPolicy),
        "fastvar": (FastVARConfig, FastVARPolicy),
        "farskip": (FARSkipConfig, FARSkipPolicy),
    }


def list_policies() -> list[str]:
    """Registered policy names (aliases not included)."""
    return sorted(_registry())


def policy_knobs(name: str) -> list[str]:
    """Knob names a policy accepts."""
    cfg_cls, _ = _lookup(name)
    return [] if cfg_cls is None else [f.name for f in dataclasses.fields(cfg_cls)]


def _lookup(name: str) -> tuple[type | None, Callable[[Any], Any]]:
    reg = _registry()
    key = _ALIASES.get(name, name)
    if key not in reg:
        raise InvalidOption(f"unknown policy '{name}' (choose from: none, {', '.join(sorted(reg))})")
    return reg[key]


def make_policy(name: str, **knobs: Any) -> Any:
    """Build a policy; knobs set to None keep their defaults."""
    cfg_cls, factory = _lookup(name)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if cfg_cls is None:
        if knobs:
            raise InvalidOption(f"policy '{name}' takes no options, got {', '.join(sorted(knobs))}")
        return factory(None)
    allowed = {f.name for f in dataclasses.fields(cfg_cls)}
    bad = sorted(set(knobs) - allowed)
    if bad:
        raise InvalidOption(
            f"policy '{name}' has no option {', '.join(bad)} (options: {', '.join(sorted(allowed))})"
        )
    return factory(cfg_cls(**knobs))


__all__ = [
    "DensePolicy",
    "FARSkipConfig",
    "FARSkipPolicy",
    "FastVARConfig",
    "FastVARPolicy",
    "SparseVARConfig",
    "SparseVARPolicy",
    "list_policies",
    "make_policy",
    "policy_knobs",
]
