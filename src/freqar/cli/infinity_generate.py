"""``freqar generate --model infinity-*``: text-to-image with Infinity (prompts through a local T5 copy)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidOption
from ..imageio import save_images
from ..models.infinity_pipeline import get_infinity_spec, load_infinity
from .common import resolve_device


def random_text(pipe: Any, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text features for random-weight smoke runs without a text encoder: N(0,1), 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    n = min(8, pipe.model.cfg.text_maxlen)
    feats = torch.randn(batch, n, pipe.model.cfg.text_channels, generator=g)
    return feats, torch.full((batch,), n, dtype=torch.long)


def run_infinity(args: argparse.Namespace, policy: Any, out: Path) -> int:
    """Load the preset (released files or random tiny), encode the prompts, generate, write the PNG."""
    for flag in ("labels", "var"):
        if getattr(args, flag, None):
            raise InvalidOption(f"--{flag} does not apply to Infinity (use --prompt, --weights and --vae)")
    if args.smooth:
        raise InvalidOption("--smooth does not apply to Infinity (bitwise sampling has no Gumbel mode)")
    spec = get_infinity_spec(args.model)
    device = resolve_device(args.device)
    prompts = list(getattr(args, "prompt", None) or [])
    negative = getattr(args, "negative_prompt", None)
    encoder_dir = getattr(args, "text_encoder", None)
    if prompts and encoder_dir is None:
        raise InvalidOption("--prompt needs --text-encoder DIR (a local T5 copy, e.g. google/flan-t5-xl)")
    if encoder_dir is not None and not prompts:
        raise InvalidOption("--text-encoder given but no --prompt")
    if negative is not None and not prompts:
        raise InvalidOption("--negative-prompt needs --prompt and --text-encoder")
    if negative is not None and not negative.strip():
        raise InvalidOption("--negative-prompt is empty")
    if negative is not None and args.cfg == 1:
        raise InvalidOption("--negative-prompt needs guidance; with --cfg 1 it has no effect")
    pipe = load_infinity(args.model, transformer=args.weights, vae=args.vae, device=device)
    if encoder_dir is not None:
        from ..text import T5TextEncoder

        pipe.text_encoder = T5TextEncoder(encoder_dir, max_length=spec.transformer.text_maxlen, device=device)
    h_div_w = getattr(args, "h_div_w", None)
    resolution = getattr(args, "resolution", None)
    grids, _ = pipe.schedule(h_div_w, resolution)
    if policy is not None:  # knob errors that depend on the model before any work
        policy.begin(grids, 1, pipe.model.depth, pipe.device)
    text = None if prompts else random_text(pipe, args.batch or 1, args.seed)
    bar = tqdm(total=len(grids), desc="stages", unit="stage", disable=args.quiet, leave=False)

    def on_stage(info) -> None:
        bar.set_postfix_str(f"{info.grid[0]}x{info.grid[1]}")
        bar.update(1)

    res = pipe.generate(
        prompts or None,
        text=text,
        negative_prompt=negative,
        h_div_w=h_div_w,
        resolution=resolution,
        seed=args.seed,
        cfg=args.cfg,
        tau=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        policy=policy,
        callback=on_stage,
    )
    bar.close()
    save_images(res.images, out, args.nrow)
    n = res.images.shape[0]
    H, W = pipe.image_size(h_div_w, resolution)
    what = f"{len(prompts)} prompt(s)" if prompts else "random text features (no --prompt)"
    what += ", negative prompt" if negative is not None else ""
    print(
        f"wrote {out} ({n} image{'s' if n > 1 else ''}, {H}x{W}px, {len(grids)} scales, {what}; "
        f"transformer {res.transformer_seconds:.2f}s, decode {res.decode_seconds:.2f}s)"
    )
    if policy is not None:
        total = sum(h * w for h, w in res.grids) * n
        done = sum(sum(c) for c in res.tokens_computed)
        print(f"{policy.name}: computed {done}/{total} tokens ({100 * done / total:.1f}%)")
    return 0
