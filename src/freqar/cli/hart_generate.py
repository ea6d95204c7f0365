"""``freqar generate --model hart-*``: text-to-image with HART (prompts through a local Qwen2 copy)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidOption, WeightsNotFound
from ..imageio import save_images
from ..models.hart import TextFeatures
from ..models.hart_pipeline import build_hart_pipeline, hart_presets, load_hart_released
from .common import resolve_device


def random_text(pipe: Any, batch: int, seed: int) -> TextFeatures:
    """Stand-in features for random-weight smoke runs (no text encoder): N(0,1), full mask."""
    cfg = pipe.transformer.cfg
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, cfg.context_token, cfg.context_dim, generator=g)
    return TextFeatures(feats, torch.ones(batch, cfg.context_token, dtype=torch.long))


def run_hart(args: argparse.Namespace, policy: Any, out: Path) -> int:
    """Load (released folder or random preset), encode the prompts, generate, write the PNG."""
    for flag in ("labels", "vae", "var"):
        if getattr(args, flag, None):
            raise InvalidOption(f"--{flag} does not apply to HART (use --prompt and --weights)")
    if args.top_k is not None:
        raise InvalidOption("--top-k does not apply to HART (its top-k schedule is fixed: 600, then 300)")
    device = resolve_device(args.device)
    weights = getattr(args, "weights", None)
    encoder_dir = getattr(args, "text_encoder", None)
    prompts = list(getattr(args, "prompt", None) or [])
    spec = hart_presets()[args.model]()
    if weights is None and args.model != "hart-tiny":
        raise WeightsNotFound(f"model '{args.model}' needs --weights DIR (released hart-0.7b-1024px)")
    encoder = None
    if encoder_dir is not None:
        from ..models.hart_text import QwenTextEncoder

        encoder = QwenTextEncoder(encoder_dir, max_tokens=spec.transformer.context_token, device=device)
    if weights is not None:
        pipe = load_hart_released(weights, name=args.model, text_encoder=encoder, device=device)
    else:
        pipe = build_hart_pipeline(spec).to(device)
        pipe.text_encoder = encoder
    if prompts and encoder is None:
        raise InvalidOption("--prompt needs --text-encoder DIR (a local Qwen2 copy)")
    if not prompts and encoder is not None:
        raise InvalidOption("--text-encoder given but no --prompt")
    text = None if prompts else random_text(pipe, args.batch or 1, args.seed)
    S = len(pipe.tokenizer.stage_grids())
    bar = tqdm(total=S, desc="stages", unit="stage", disable=args.quiet, leave=False)

    def on_stage(info) -> None:
        bar.set_postfix_str(f"{info.grid[0]}x{info.grid[1]}")
        bar.update(1)

    res = pipe.generate(
        prompts or None,
        text=text,
        seed=args.seed,
        cfg=args.cfg,
        top_p=args.top_p,
        smooth=True if args.smooth else None,
        policy=policy,
        callback=on_stage,
    )
    bar.close()
    save_images(res.images, out, args.nrow)
    n = res.images.shape[0]
    what = f"{len(prompts)} prompt(s)" if prompts else "random text features (no --prompt)"
    print(
        f"wrote {out} ({n} image{'s' if n > 1 else ''}, {pipe.image_size}px, {what}; "
        f"transformer+head {res.transformer_seconds:.2f}s, decode {res.decode_seconds:.2f}s)"
    )
    return 0
