"""Copy a trained FAR run into the package as the bundled ``far-emoji`` model and draw its README grid.

Usage: python scripts/ship_far_emoji.py RUN_DIR [--cfg 3.0 --steps 25 --temperature 1.0] [--grid docs/x.png]
RUN_DIR is a `freqar train far` folder (its ``model/`` export: EMA transformer + the KL autoencoder), or a
FAR model folder (e.g. the bundled src/freqar/assets/far-emoji, to swap in a new decoder).
``--kl`` swaps in the decoder of a decoder-only KL fine-tune (``init.decoder_only``): same latents and scale.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from freqar.models.far_pipeline import load_far_dir
from freqar.train.decoder_swap import swap_decoder
from freqar.train.kl import load_kl
from freqar.train.samples import class_grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--dest", default="src/freqar/assets/far-emoji")
    ap.add_argument("--cfg", type=float, default=None, help="sampling default (default: the run's)")
    ap.add_argument("--steps", default=None, help="diffusion steps per level (default: the run's)")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--grid", default="docs/far_emoji_samples.png")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl", help="a decoder-only KL fine-tune run whose decoder replaces the run's")
    args = ap.parse_args()
    run = Path(args.run_dir)
    pipe = load_far_dir(run / "model" if (run / "model" / "config.json").is_file() else run)
    if args.kl:
        swap_decoder(pipe.vae, load_kl(args.kl), args.kl)
    pipe.name = "far-emoji"
    changes = {"cfg": args.cfg, "steps": args.steps, "temperature": args.temperature}
    pipe.defaults = dataclasses.replace(pipe.defaults, **{k: v for k, v in changes.items() if v is not None})
    dest = pipe.save(args.dest)
    size = sum(p.stat().st_size for p in dest.iterdir()) / 2**20
    print(f"saved {dest} ({size:.1f} MiB; defaults {pipe.defaults})")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        class_grid(pipe, per_class=args.per_class, seed=args.seed).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
