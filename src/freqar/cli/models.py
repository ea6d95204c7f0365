"""``freqar models``: list the presets of every family."""

from __future__ import annotations

import argparse

from ..registry import catalogue


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets of every family")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'var-d*'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = catalogue(args.pattern)
    w = max((len(r.name) for r in rows), default=4)
    for r in rows:
        src = f"  [{r.source}]" if r.source else ""
        print(f"{r.name:<{w}}  {r.family:<8}  {r.image_size:>4}px  {r.description}{src}")
    return 0
