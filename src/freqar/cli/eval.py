"""``freqar eval``: FD/KID (EfficientNet-Lite0) with floor and ceiling, IS-like score, precision/recall;
with ``--accel``, dense against accelerated settings on the same labels and seeds (quality and speed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidOption
from .common import add_late_args, add_model_args, float_list, late_kwargs, load_model


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
    p.add_argument(
        "--out", required=True, help="writes OUT/eval.json and OUT/samples.png (with --accel: OUT/accel.*)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument(
        "--temperature",
        type=float,
        help="sampling temperature (default: the model's); VAR divides the logits by it, FAR scales the "
        "diffusion noise with it",
    )
    p.add_argument("--steps", help="FAR: diffusion steps, e.g. 25 or ddim25 (default: the model's)")
    add_late_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--cache", help="folder for cached reference features (default: the data folder)")
    a = p.add_argument_group("accelerated settings (the SparseVAR paper's Table 1 on this model)")
    a.add_argument(
        "--accel",
        metavar="METHODS",
        help="compare dense with these methods, comma-separated: sparsevar, fastvar, skip, sparsevar+skip, "
        "fastvar+skip (VAR models) or farskip (FAR models); knobs after a method as :key=value (e.g. "
        "sparsevar:anchors=adaptive, fastvar+skip:skip=2, sparsevar:block=2, farskip:start_stage=2, "
        "farskip:keep=0.5). Writes OUT/accel.json, accel.md, accel.png",
    )
    a.add_argument(
        "--taus",
        help="τ sweep for the SparseVAR methods and farskip without their own tau, e.g. 0.1,0.3,0.6,0.8",
    )
    a.add_argument(
        "--calibration",
        default="auto",
        help="probe block for SparseVAR settings without block=: auto (a stored `freqar calibrate` result "
        "for these weights, else the middle block), none (the middle block) or a calibration JSON file",
    )
    a.add_argument("--kid-subsets", type=int, default=None, help="KID subsets (default 100; 20 with --accel)")
    a.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        metavar="B",
        help="paired-bootstrap resamples for the 95%% interval of each setting's FD increase "
        "(default 100; 0 = off)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.accel import parse_accel
    from ..eval.fid import lite0_feature_net
    from ..eval.run import EvalSettings, evaluate

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.taus and not args.accel:
        raise InvalidOption("--taus needs --accel (e.g. --accel sparsevar --taus 0.3,0.6)")
    taus = float_list(args.taus or "", "--taus")
    for t in taus:
        if not 0 <= t <= 1:
            raise InvalidOption(f"--taus values must be in [0, 1], got {t}")
    settings = parse_accel(args.accel, taus) if args.accel else None
    pipe = load_model(args)
    kid_subsets = args.kid_subsets if args.kid_subsets is not None else (20 if settings else 100)
    if kid_subsets < 1:
        raise InvalidOption(f"--kid-subsets must be >= 1, got {kid_subsets}")
    s = EvalSettings(
        samples=args.samples,
        seed=args.seed,
        batch=args.batch,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        steps=args.steps,
        kid_subsets=kid_subsets,
        **late_kwargs(args),
    )
    if settings is not None:
        return run_accel_cli(args, pipe, settings, s)
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
    if res.get("class_accuracy") is not None:
        real = res.get("class_accuracy_real")
        print(
            f"class accuracy {res['class_accuracy']:.3f} (a linear probe on the features, trained on "
            "the train split; "
            + (f"real held-out images {real:.3f})" if real is not None else "no held-out labels)")
        )
    if res.get("fd_reconstruction") is not None:
        rn = res["fd_reconstruction_normalized"]
        print(
            f"tokenizer reconstructions of the held-out split: FD_lite0 {res['fd_reconstruction']:.1f}"
            + (f" (normalised {rn:.3f})" if rn is not None else "")
            + ": what a transformer on this tokenizer can at best approach"
        )
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def resolve_calibration(choice: str, pipe: Any, model: str) -> int | None:
    """``auto``: a stored calibration for these weights (else None), ``none``: None, else that file."""
    from ..calibrate import calibrated_block

    if choice == "none":
        return None
    return calibrated_block(pipe, model, None if choice == "auto" else choice)


def run_accel_cli(args: argparse.Namespace, pipe: Any, settings: list, s: Any) -> int:
    import sys

    from ..eval.accel import run_accel, write_accel_report
    from ..eval.fid import lite0_feature_net

    if pipe.family == "far" and args.calibration not in ("auto", "none"):
        raise InvalidOption(f"--calibration {args.calibration} applies to VAR models, not FAR '{pipe.name}'")
    block = None if pipe.family == "far" else resolve_calibration(args.calibration, pipe, args.model)
    out = Path(args.out)
    report = run_accel(
        pipe,
        Path(args.data),
        settings,
        s,
        lite0_feature_net(),
        Path(args.cache) if args.cache else None,
        calibrated=block,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        bootstrap=args.bootstrap,
    )
    paths = write_accel_report(report, out)
    for r in report["results"]:
        ci = r.get("fd_increase_ci95")
        ci_s = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
        print(
            f"{r['setting']:<40} FD {r['fd']:7.2f} ({100 * r['fd_increase']:+6.1f}%{ci_s})  "
            f"{r['speedup_vs_dense']:.2f}x e2e  tokens {100 * r['token_fraction']:5.1f}%  "
            f"PSNR {r['psnr_db']:.1f} SSIM {r['ssim']:.3f}"
        )
    v = report["sparsevar_default"]
    if v is not None:
        print(
            f"SparseVAR default: FD {100 * v['fd_increase']:+.1f}%, {v['speedup_vs_dense']:.2f}x "
            f"(targets FD <= +5%: {'met' if v['fd_within_tolerance'] else 'NOT met'}"
            + (f" [95% CI: {v['fd_verdict_ci95']}]" if v.get("fd_verdict_ci95") else "")
            + ", "
            f">= 1.3x: {'met' if v['speedup_met'] else 'NOT met'})"
        )
    f = report.get("farskip_target")
    if f is not None:
        best = (
            "none within the FD tolerance"
            if f["best_setting"] is None
            else f"{f['best_setting']}: {f['speedup_vs_dense']:.2f}x at {100 * f['fd_increase']:+.1f}% FD"
        )
        met = "met" if f["target_met"] else "NOT met"
        print(f"farskip best within +5% FD: {best} (target >= 1.5x: {met})")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
