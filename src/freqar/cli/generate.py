"""``freqar generate``: class-conditional images to a PNG (a grid when several)."""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from ..calibrate import with_calibrated_block
from ..errors import InvalidOption
from ..imageio import check_writable, make_grid, save_images, save_png
from ..models.hart_pipeline import is_hart_model
from ..models.infinity_pipeline import is_infinity_model
from ..policies import make_policy
from ..policies.skip import SkipPolicy, build_accel, split_method
from ..policies.sparsevar import mask_picture
from ..registry import recommended_accel
from .common import (
    LATE_ONLY_VAR,
    add_late_args,
    add_model_args,
    float_list,
    int_list,
    late_kwargs,
    load_model,
)
from .far_generate import add_far_args

# --accel knob options -> (policy config field, policies that accept it)
_KNOBS = {
    "tau": ("tau", ("sparsevar", "farskip")),
    "alpha": ("alpha", ("sparsevar",)),
    "beta": ("beta", ("sparsevar",)),
    "probe_block": ("block", ("sparsevar",)),
    "start_stage": ("start_stage", ("sparsevar", "fastvar", "farskip")),
    "keep": ("keep", ("sparsevar", "fastvar", "farskip")),
    "drop": ("drop", ("fastvar",)),
    "cache_stage": ("cache_stage", ("fastvar",)),
    "anchors": ("anchors", ("sparsevar",)),
    "signal": ("signal", ("sparsevar",)),
    "skip": ("skip", ("skip", "sparsevar+skip", "fastvar+skip")),
}
ACCEL_CHOICES = ("none", "auto", "sparsevar", "fastvar", "farskip", "skip", "sparsevar+skip", "fastvar+skip")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images with a model")
    add_model_args(p)
    p.add_argument("--labels", help="comma-separated class labels (default: random labels)")
    p.add_argument("--batch", type=int, default=None, help="number of images when --labels is not given (4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance strength (>= 0)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling in [0,1] (0 = off)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0)")
    p.add_argument("--smooth", action="store_true", help="VAR's Gumbel-softmax smoothing (visualisation)")
    add_late_args(p)
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = p.add_argument_group("text-to-image models (HART)")
    t.add_argument("--prompt", action="append", help="text prompt; repeat for a batch")
    t.add_argument("--weights", help="released checkpoint folder (HART: with llm/ and tokenizer/)")
    t.add_argument("--text-encoder", help="local text-encoder folder (HART: a Qwen2 copy)")
    t.add_argument("--h-div-w", type=float, help="Infinity: height/width, nearest template (1.0)")
    t.add_argument("--resolution", help="Infinity: 0.06M, 0.25M, 0.60M or 1M (default 1M)")
    t.add_argument(
        "--negative-prompt", help="Infinity: text whose features replace the null text in CFG's uncond half"
    )
    add_far_args(p)
    a = p.add_argument_group("acceleration (token policies)")
    a.add_argument(
        "--accel",
        nargs="?",
        const="auto",
        default="none",
        choices=ACCEL_CHOICES,
        help="none (dense, default); auto (what a bare --accel gives: the setting `freqar study` found best "
        "for the model, else sparsevar); sparsevar (paper defaults); fastvar (peer baseline); farskip (FAR "
        "models: exclusion on frequency levels); skip, sparsevar+skip, fastvar+skip (the last --skip "
        "scales not run, VAR models)",
    )
    a.add_argument("--tau", type=float, help="SparseVAR/farskip threshold τ in [0,1] (0.6/0.1; 0 = off)")
    a.add_argument("--alpha", type=int, help="SparseVAR anchor grid α >= 1 (4)")
    a.add_argument("--beta", type=float, help="SparseVAR anchor similarity threshold β in [-1,1] (0.9)")
    a.add_argument("--probe-block", type=int, help="SparseVAR block s for the ΔF map (middle block)")
    a.add_argument(
        "--start-stage", type=int, help="first sparse stage P, 0-based (stages - 4; farskip: levels // 2)"
    )
    a.add_argument(
        "--keep", type=float, help="keep-budget mode: fraction of tokens computed per sparse stage"
    )
    a.add_argument("--drop", help="FastVAR drop ratios per pruned stage, comma-separated (0.4,0.5,0.5,0.75)")
    a.add_argument("--cache-stage", type=int, help="FastVAR dense cache stage (start stage - 1)")
    a.add_argument(
        "--anchors", choices=("uniform", "adaptive"), help="SparseVAR anchor placement (uniform α×α grid)"
    )
    a.add_argument(
        "--signal",
        choices=("dF", "entropy"),
        help="SparseVAR exclusion signal: the probe block's ΔF (paper) or the previous stage's entropy",
    )
    a.add_argument("--skip", type=int, help="scales not run at the end, for the +skip methods (1)")
    a.add_argument("--save-masks", metavar="PATH", help="SparseVAR: write the per-stage token masks (PNG)")
    p.set_defaults(func=run)


def build_policy(args: argparse.Namespace):
    """The token policy the options ask for (None = dense); knobs of another policy are an error."""
    method, knobs = args.accel, {}
    if method == "auto":  # the study's best setting for this model; the user's knobs still win
        method, knobs = recommended_accel(args.model)
    shown = method if args.accel != "auto" else f"auto (= {method} for model '{args.model}')"
    base, skip = split_method(method) if "skip" in method.split("+") else (method, False)
    for opt, (field, owners) in _KNOBS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if base not in owners and method not in owners:
            flag = "--" + opt.replace("_", "-")
            raise InvalidOption(f"{flag} applies to --accel {' or '.join(owners)}, not --accel {shown}")
        knobs[field] = tuple(float_list(value, "--drop")) if opt == "drop" else value
    if (
        args.accel == "auto"
        and getattr(args, "tau", None) is not None
        and getattr(args, "keep", None) is None
    ):
        knobs.pop(
            "keep", None
        )  # the user's threshold replaces the studied keep budget (they exclude each other)
    if args.save_masks and method != "sparsevar":
        raise InvalidOption(f"--save-masks needs --accel sparsevar, not --accel {shown}")
    if method == "none":
        return None
    return build_accel(method, knobs) if skip else make_policy(method, **knobs)


def run(args: argparse.Namespace) -> int:
    if args.cfg is not None and args.cfg < 0:
        raise InvalidOption(f"--cfg must be >= 0, got {args.cfg}")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        raise InvalidOption(f"--top-p must be in [0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise InvalidOption(f"--top-k must be >= 0, got {args.top_k}")
    if args.temperature is not None and not args.temperature > 0:
        raise InvalidOption(f"--temperature must be > 0, got {args.temperature}")
    if args.batch is not None and args.batch < 1:
        raise InvalidOption(f"--batch must be >= 1, got {args.batch}")
    late = late_kwargs(args)
    out = check_writable(args.out)
    masks_out = check_writable(args.save_masks) if args.save_masks else None
    policy = build_policy(args)
    if args.negative_prompt is not None and not is_infinity_model(args.model):
        raise InvalidOption("--negative-prompt applies to Infinity models only")
    from ..models.far_pipeline import is_far_model

    other_family = is_far_model(args.model) or is_hart_model(args.model) or is_infinity_model(args.model)
    if isinstance(policy, SkipPolicy) and other_family:
        raise InvalidOption(f"--accel {args.accel}: scale skipping applies to VAR-family class models only")
    if late and other_family:
        raise InvalidOption(LATE_ONLY_VAR)
    if is_far_model(args.model):
        from .far_generate import run_far

        return run_far(args, policy, out)
    if policy is not None and policy.name == "farskip":
        raise InvalidOption("--accel farskip applies to FAR models only")
    for flag in ("checkpoint", "steps", "levels"):
        if getattr(args, flag, None) is not None:
            raise InvalidOption(f"--{flag} applies to FAR models only")
    if args.ddim or args.unconditional:
        raise InvalidOption("--ddim and --unconditional apply to FAR models only")
    if is_hart_model(args.model):
        from .hart_generate import run_hart

        return run_hart(args, policy, out)
    if is_infinity_model(args.model):
        from .infinity_generate import run_infinity

        return run_infinity(args, policy, out)
    if args.h_div_w is not None or args.resolution is not None:
        raise InvalidOption("--h-div-w and --resolution apply to Infinity models only")
    pipe = load_model(args)
    if late and getattr(pipe, "family", "var") != "var":  # e.g. a HART trained here, saved as a folder
        raise InvalidOption(f"{LATE_ONLY_VAR}, not '{args.model}' ({pipe.family})")
    labels = int_list(args.labels, "--labels") if args.labels else None
    if labels is not None:
        if not labels:
            raise InvalidOption("--labels is empty")
        pipe.check_labels(labels)
    n_stages = len(pipe.tokenizer.stage_grids())
    if policy is not None:  # knob errors that depend on the model (probe block vs depth) before any work
        policy = with_calibrated_block(policy, pipe, args.model)  # `freqar calibrate`'s s, if stored
        policy.begin(pipe.tokenizer.stage_grids(), 1, pipe.transformer.depth, pipe.device)
    bar = tqdm(total=n_stages, desc="stages", unit="stage", disable=args.quiet, leave=False)

    def on_stage(info) -> None:
        bar.set_postfix_str(f"{info.grid[0]}x{info.grid[1]}")
        bar.update(1)

    res = pipe.generate(
        labels,
        batch=args.batch or 4,
        seed=args.seed,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        smooth=args.smooth,
        policy=policy,
        callback=on_stage,
        **late,
    )
    bar.close()
    save_images(res.images, out, args.nrow)
    names = pipe.class_names
    labs = res.labels.tolist()
    shown = ", ".join(f"{lab} ({names[lab]})" if names else str(lab) for lab in labs)
    print(
        f"wrote {out} ({len(labs)} image{'s' if len(labs) > 1 else ''}, {pipe.image_size}px, labels {shown}; "
        f"transformer {res.transformer_seconds:.2f}s, decode {res.decode_seconds:.2f}s)"
    )
    if policy is not None:
        total = sum(h * w for h, w in res.grids) * len(labs)
        done = sum(sum(c) for c in res.tokens_computed)
        print(f"{policy.name}: computed {done}/{total} tokens ({100 * done / total:.1f}%)")
    if masks_out is not None:
        save_png(_masks_grid(res), masks_out)
        print(f"wrote {masks_out} (token masks per sparse stage: red = anchor, blue = copied, grey = zeroed)")
    return 0


def _masks_grid(res) -> torch.Tensor:
    """One row per sample: the image, then its mask at every sparse stage."""
    masks = res.policy_state.masks
    side = max(64, min(256, 8 * res.grids[-1][0]))
    rows = [mask_picture(masks, b, res.images[b], side) for b in range(res.images.shape[0])]
    return rows[0] if len(rows) == 1 else make_grid(torch.stack(rows), nrow=1)
