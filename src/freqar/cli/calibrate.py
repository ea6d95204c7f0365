"""``freqar calibrate``: pick SparseVAR's probe block s for a model and store it for later runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose SparseVAR's probe block s for a model (stored and used by default afterwards)",
        description="Generate --samples images densely, score every transformer block by how well its ΔF "
        "map predicts which tokens still change the final image, and store the best block with the "
        "model's weight fingerprint: beside config.json for a model folder, else (bundled or preset "
        "models) in $FREQAR_CONFIG_DIR or ~/.config/freqar/calibration/. SparseVAR runs without "
        "--probe-block use it from then on.",
    )
    add_model_args(p)
    p.add_argument("--samples", type=int, default=32, help="images to calibrate on (default 32, minimum 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--start-stage", type=int, help="SparseVAR's first sparse stage P (default: stages - 4)")
    p.add_argument("--out", help="write the result to this JSON file instead of the default place")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..calibrate import (
        CalibrationSettings,
        calibrate,
        default_calibration_path,
        save_calibration,
    )

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pipe = load_model(args)
    s = CalibrationSettings(
        samples=args.samples, seed=args.seed, batch=args.batch, start_stage=args.start_stage
    )
    res = calibrate(pipe, s)
    path = Path(args.out) if args.out else default_calibration_path(pipe, args.model, res["weights"])
    save_calibration(res, path)
    scores = ", ".join(f"{i}: {v:+.3f}" for i, v in enumerate(res["scores"]["spearman"]))
    print(f"probe block s = {res['block']} (default {res['default_block']}); Spearman per block {scores}")
    ent = res["scores"]["entropy_spearman"]
    print(f"Spearman of the previous stage's entropy (sparsevar signal=entropy): {ent:+.3f}")
    note = (
        "" if args.out is None else " (pass it with --calibration FILE; only the default place is automatic)"
    )
    print(f"wrote {path}{note}")
    return 0
