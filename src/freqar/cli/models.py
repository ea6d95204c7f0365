"""``freqar models``: list presets."""

from __future__ import annotations

import argparse
import fnmatch

from ..models.far_pipeline import far_presets
from ..models.infinity_pipeline import get_infinity_spec, infinity_presets
from ..registry import get_spec, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'var-d*'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    infinity = sorted(n for n in infinity_presets() if fnmatch.fnmatch(n, args.pattern))
    names = list_models(args.pattern) + infinity
    far = {n: s for n, s in far_presets().items() if fnmatch.fnmatch(n, args.pattern)}
    w = max((len(n) for n in [*names, *far]), default=4)
    for n, fs in far.items():
        src = f"  [{'; '.join(fs.files.values())}]" if fs.files else ""
        print(f"{n:<{w}}  {fs.vae.resolution:>4}px  {fs.description}{src}")
    for n in names:
        s = get_infinity_spec(n) if n in infinity else get_spec(n)
        src = f"  [{s.hub_repo}: {', '.join(s.files.values())}]" if s.hub_repo else ""
        print(f"{n:<{w}}  {s.image_size:>4}px  {s.description}{src}")
    return 0
