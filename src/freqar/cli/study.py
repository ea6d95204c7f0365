"""``freqar study``: SparseVAR's ablations, adaptive anchors, calibrated s, scale skipping and FastVAR."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import InvalidOption
from .common import add_model_args, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="ablations of SparseVAR and its extensions against dense and FastVAR (JSON, Markdown, plot)",
        description="τ, α, β, P and s sweeps, uniform vs adaptive anchors, fixed vs calibrated s, with and "
        "without scale skipping, FastVAR beside them; same labels and seeds for every setting. Writes "
        "OUT/study.json, study.md, study.png (speed-quality Pareto plot) and study_samples.png.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="a `freqar data` folder (manifest.json + images.npz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer samples and settings (~15 min on 2 cores)")
    p.add_argument("--samples", type=int, help="images per setting (quick 96, full 300)")
    p.add_argument("--batch", type=int, help="images per batch (quick 24, full 25)")
    p.add_argument("--calibration-samples", type=int, help="images for the probe-block calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--cache", help="folder for cached reference features (default: the data folder)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="B",
        help="paired-bootstrap resamples for a 95%% interval of every FD increase (default 0 = off; "
        "100 adds about 0.3 s per setting and resample)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.fid import lite0_feature_net
    from ..study import FULL, QUICK, run_study, write_study

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    over = {
        "samples": args.samples,
        "batch": args.batch,
        "calibration_samples": args.calibration_samples,
    }
    for k, v in over.items():
        if v is not None and v < 1:
            raise InvalidOption(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    plan = dataclasses.replace(plan, **{k: v for k, v in over.items() if v is not None})
    pipe = load_model(args)
    report = run_study(
        pipe,
        Path(args.data),
        lite0_feature_net(),
        plan,
        seed=args.seed,
        cache=Path(args.cache) if args.cache else None,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        bootstrap=args.bootstrap,
    )
    paths = write_study(report, Path(args.out))
    s = report["summary"]
    b = s["best_within_5pct"]
    if b is not None:
        print(
            f"fastest within +5% FD: {b['setting']} {b['speedup_vs_dense']:.2f}x "
            f"({100 * b['fd_increase']:+.1f}%)"
        )
    av = s["adaptive_vs_uniform"]["mean_reduction"]
    if av is not None:
        print(f"adaptive vs uniform anchors at equal speed-up: FD increase reduced by {100 * av:.0f}% (mean)")
    print(
        f"{len(report['results'])} settings, {report['wall_seconds']:.0f}s; wrote "
        + ", ".join(map(str, paths))
    )
    return 0
