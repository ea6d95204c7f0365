"""``freqar generate --model far-*``: class-conditional FAR images (frequency levels + diffusion head)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..diffusion import space_timesteps
from ..errors import InvalidOption
from ..imageio import save_images
from .common import int_list, resolve_device


def add_far_args(p: argparse.ArgumentParser) -> None:
    """FAR-only options of ``freqar generate`` (a separate group so VAR users are not confused)."""
    f = p.add_argument_group("FAR models (far-b, far-l, far-h, far-tiny, saved FAR folders)")
    f.add_argument("--checkpoint", help="FAR: official checkpoint-last.pth (model_ema preferred)")
    f.add_argument("--steps", help="FAR: diffusion steps per level, e.g. 100, 25, ddim25 (default: model's)")
    f.add_argument("--levels", help="FAR: level schedule as core sizes, e.g. 0,2,3,4,5,6,7,8,9,10")
    f.add_argument("--ddim", action="store_true", help="FAR: deterministic DDIM updates instead of ancestral")
    f.add_argument("--unconditional", action="store_true", help="FAR: sample with the null class")


def run_far(args: argparse.Namespace, policy: Any, out: Path) -> int:
    """Load (preset + official files, or a saved folder), generate with progress over levels and steps."""
    from ..models.far_pipeline import create_far_model

    for flag in ("top_k", "top_p", "var", "weights", "text_encoder", "prompt", "h_div_w", "resolution"):
        if getattr(args, flag, None):
            raise InvalidOption(f"--{flag.replace('_', '-')} does not apply to FAR models")
    if getattr(args, "smooth", False):
        raise InvalidOption("--smooth does not apply to FAR models")
    if policy is not None and policy.name != "farskip":
        raise InvalidOption(f"--accel {policy.name} does not apply to FAR models (use --accel farskip)")
    if args.cfg is not None and args.cfg < 1:
        raise InvalidOption(f"FAR's --cfg is a guidance scale >= 1 (1 = none), got {args.cfg}")
    if args.labels and args.unconditional:
        raise InvalidOption("--labels and --unconditional exclude each other")
    if args.steps is not None:
        space_timesteps(1000, args.steps)
    device = resolve_device(args.device)
    pipe = create_far_model(args.model, vae=args.vae, checkpoint=args.checkpoint, device=device)
    levels = int_list(args.levels, "--levels") if args.levels else None
    tok = pipe.tokenizer(levels)
    steps = str(args.steps or pipe.defaults.steps)
    n_steps = len(space_timesteps(pipe.transformer.cfg.diffusion_steps, steps))
    labels = int_list(args.labels, "--labels") if args.labels else None
    if labels is not None and not labels:
        raise InvalidOption("--labels is empty")
    bar = tqdm(total=len(tok.levels) * n_steps, desc="levels", unit="step", disable=args.quiet, leave=False)

    def on_step(stage: int, i: int, total: int) -> None:
        bar.set_postfix_str(f"level {stage + 1}/{len(tok.levels)} (core {tok.levels[stage]})")
        bar.update(1)

    res = pipe.generate(
        labels,
        batch=args.batch or 4,
        seed=args.seed,
        cfg=args.cfg,
        steps=steps,
        temperature=args.temperature,
        ddim=args.ddim,
        levels=tok.levels,
        unconditional=args.unconditional,
        on_diffusion_step=on_step,
        policy=policy,
    )
    bar.close()
    save_images(res.images, out, args.nrow)
    names = pipe.class_names
    labs = res.labels.tolist()
    shown = ", ".join("null" if lab < 0 else (f"{lab} ({names[lab]})" if names else str(lab)) for lab in labs)
    head_s = sum(getattr(res, "head_seconds", []))
    print(
        f"wrote {out} ({len(labs)} image{'s' if len(labs) > 1 else ''}, {pipe.image_size}px, labels {shown}; "
        f"{len(tok.levels)} levels x {n_steps} diffusion steps; transformer "
        f"{res.transformer_seconds - head_s:.2f}s, diffusion head {head_s:.2f}s, "
        f"decode {res.decode_seconds:.2f}s)"
    )
    if policy is not None:
        done = sum(sum(c) for c in res.tokens_computed)
        total = sum(len(c) * h * w for c, (h, w) in zip(res.tokens_computed, res.grids, strict=True))
        print(f"{policy.name}: computed {done}/{total} tokens ({100 * done / total:.1f}%)")
    return 0
