"""``freqar generate``: class-conditional images to a PNG (a grid when several)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..errors import InvalidOption
from ..imageio import check_writable, make_grid, save_png
from .common import add_model_args, int_list, load_model


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
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


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
    out = check_writable(args.out)
    pipe = load_model(args)
    labels = int_list(args.labels, "--labels") if args.labels else None
    if labels is not None:
        if not labels:
            raise InvalidOption("--labels is empty")
        pipe.check_labels(labels)
    n_stages = len(pipe.tokenizer.stage_grids())
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
        callback=on_stage,
    )
    bar.close()
    img = res.images[0] if res.images.shape[0] == 1 else make_grid(res.images, args.nrow)
    save_png(img, out)
    names = pipe.class_names
    labs = res.labels.tolist()
    shown = ", ".join(f"{lab} ({names[lab]})" if names else str(lab) for lab in labs)
    print(
        f"wrote {out} ({len(labs)} image{'s' if len(labs) > 1 else ''}, {pipe.image_size}px, labels {shown}; "
        f"transformer {res.transformer_seconds:.2f}s, decode {res.decode_seconds:.2f}s)"
    )
    return 0
