"""``freqar models``: list presets."""

from __future__ import annotations

import argparse

from ..registry import get_spec, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'var-d*'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    w = max((len(n) for n in names), default=4)
    for n in names:
        s = get_spec(n)
        src = f"  [{s.hub_repo}: {', '.join(s.files.values())}]" if s.hub_repo else ""
        print(f"{n:<{w}}  {s.image_size:>4}px  {s.description}{src}")
    return 0
