"""Copy a trained VAR run into the package as the bundled ``emoji`` model and draw its README grid.

Usage: python scripts/ship_emoji_default.py RUN_DIR [--cfg 3.0 --top-k 0 --top-p 0.0 --temperature 1.0]
    [--late-from 6 --late-cfg 1.0 --late-temperature 0.3] [--grid docs/x.png] [--tokenizer FT_RUN]
RUN_DIR is a `freqar train var` folder (its ``model/`` export is used) or a model folder (e.g. the bundled
src/freqar/assets/emoji-default, to swap only its decoder). ``--tokenizer`` swaps in the decoder
of a decoder-only fine-tune (configs/emoji128_decoder_ft.yaml); its encoder and codebook must equal the VAR
run's, so the transformer's codes keep their meaning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from freqar.pipeline import SamplingDefaults, load_pipeline_dir
from freqar.train.decoder_swap import swap_decoder
from freqar.train.samples import class_grid
from freqar.train.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--dest", default="src/freqar/assets/emoji-default")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0, help="divides the logits before top-k/p")
    ap.add_argument("--late-from", type=int, default=0, help="first detail stage (0 = off)")
    ap.add_argument("--late-cfg", type=float, help="guidance from --late-from on")
    ap.add_argument("--late-temperature", type=float, help="temperature from --late-from on")
    ap.add_argument("--grid", default="docs/emoji_default_samples.png")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="a decoder-only fine-tune run whose decoder replaces the run's")
    args = ap.parse_args()
    src = Path(args.run_dir)
    pipe = load_pipeline_dir(src / "model" if (src / "model").is_dir() else src)
    pipe.name = "emoji"
    if args.tokenizer:
        swap_decoder(pipe.tokenizer, load_tokenizer(args.tokenizer), args.tokenizer)
    pipe.defaults = SamplingDefaults(
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        late_from=args.late_from,
        late_cfg=args.late_cfg,
        late_temperature=args.late_temperature,
    )
    dest = pipe.save(args.dest)
    size = sum(p.stat().st_size for p in dest.iterdir()) / 2**20
    print(f"saved {dest} ({size:.1f} MiB)")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        class_grid(pipe, per_class=args.per_class, seed=args.seed).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
