"""``freqar eval``: FD/KID (EfficientNet-Lite0) with floor and ceiling, IS-like score, precision/recall."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model's samples against a data set (FD/KID with floor and ceiling)",
        description="Generate --samples images and score them on EfficientNet-Lite0 features against "
        "the data set's train split. FD here is a stand-in for Inception FID and is not comparable "
        "with published FIDs.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="a `freqar data` folder (manifest.json + images.npz)")
    p.add_argument("--samples", type=int, default=500, help="number of generated images (default 500)")
    p.add_argument("--out", required=True, help="writes OUT/eval.json and OUT/samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--cache", help="folder for cached reference features (default: the data folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.fid import lite0_feature_net
    from ..eval.run import EvalSettings, evaluate

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pipe = load_model(args)
    s = EvalSettings(
        samples=args.samples,
        seed=args.seed,
        batch=args.batch,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    res = evaluate(
        pipe,
        Path(args.data),
        Path(args.out),
        s,
        lite0_feature_net(),
        Path(args.cache) if args.cache else None,
    )
    norm = res["fd_normalized"]
    print(
        f"FD_lite0 {res['fd_at_floor_count']:.1f} "
        f"(floor {res['fd_floor']:.1f}, ceiling {res['fd_ceiling']:.1f}"
        + (f", normalised {norm:.3f})" if norm is not None else ")")
    )
    print(
        f"KID {res['kid']:.4f} (floor {res['kid_floor']:.4f}, ceiling {res['kid_ceiling']:.4f}); "
        f"IS-like {res['inception_like_score']:.2f}; "
        f"precision {res['precision']:.3f}, recall {res['recall']:.3f}"
    )
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
