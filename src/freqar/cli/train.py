"""``freqar train tokenizer|var``: config file + ``key=value`` overrides -> a resumable run folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a tokenizer (VQ or KL), a VAR or a FAR transformer (resumable; torchrun for DDP)",
        description="Train a tokenizer (multi-scale VQ for VAR, KL autoencoder for FAR), a VAR or a FAR "
        "model. "
        "Re-running the same command resumes from OUT/checkpoint.pt.",
    )
    p.add_argument(
        "what",
        choices=("tokenizer", "var", "far", "hart-tokenizer", "hart"),
        help="which model to train (hart-tokenizer: HART's hybrid VQ + continuous tokenizer)",
    )
    p.add_argument(
        "--kind",
        choices=("vq", "kl"),
        help="(tokenizer) vq: multi-scale VQVAE for VAR (default); kl: KL autoencoder for FAR",
    )
    p.add_argument("--config", help="YAML file with sections model/data/optim/run (and loss or var)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, loss.png, config.yaml, exports")
    p.add_argument("--data", help="shortcut for data.path=DIR")
    p.add_argument(
        "--tokenizer",
        help="(var) shortcut for var.tokenizer=DIR; (far) for far.kl=DIR; (hart) for hart.tokenizer=DIR",
    )
    p.add_argument("--steps", type=int, help="shortcut for run.steps=N")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export the EMA weights of OUT's latest checkpoint (same config) without training",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides right after tokenizer|var|far, e.g. optim.lr=3e-4",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override anywhere on the line (repeatable), e.g. --set model.ch_mult=[1,2,4,4]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidOption
    from ..io import atomic_write
    from ..train.config import TokenizerTrainConfig, VARTrainConfig, load_config, to_dict
    from ..train.dist import init_distributed, shutdown
    from ..train.far import FARTrainConfig, train_far
    from ..train.hart import HARTTrainConfig, train_hart
    from ..train.hart_tokenizer import HARTTokenizerTrainConfig, train_hart_tokenizer
    from ..train.kl import KLTrainConfig, train_kl
    from ..train.run import train_tokenizer, train_var

    overrides = list(args.overrides) + list(args.sets)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.kind and args.what != "tokenizer":
        raise InvalidOption("--kind is only for `freqar train tokenizer` (vq or kl)")
    if args.tokenizer:
        key = {"var": "var.tokenizer", "far": "far.kl", "hart": "hart.tokenizer"}.get(args.what)
        if key is None:
            raise InvalidOption("--tokenizer is only for `freqar train var`, `far` and `hart`")
        overrides.append(f"{key}={args.tokenizer}")
    kind = "kl" if args.what == "tokenizer" and args.kind == "kl" else args.what
    default, fn = {
        "tokenizer": (TokenizerTrainConfig(), train_tokenizer),
        "kl": (KLTrainConfig(), train_kl),
        "var": (VARTrainConfig(), train_var),
        "far": (FARTrainConfig(), train_far),
        "hart-tokenizer": (HARTTokenizerTrainConfig(), train_hart_tokenizer),
        "hart": (HARTTrainConfig(), train_hart),
    }[kind]
    cfg = load_config(default, args.config, overrides)
    ctx = init_distributed(args.device)
    out = Path(args.out)
    try:
        if ctx.is_main:
            import yaml

            out.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
            atomic_write(out / "config.yaml", lambda p: p.write_text(text))
        res = fn(cfg, out, ctx, progress=False if args.no_progress else None, export_only=args.export_only)
        if isinstance(res, Path):
            print(f"exported {args.what} from {out / 'checkpoint.pt'} to {res}")
        elif ctx.is_main:
            print(
                f"trained {args.what}: {res.steps} steps, last loss {res.final_loss:.4f}, "
                f"{res.seconds:.0f} s this session; exported to {res.export}"
            )
    finally:
        shutdown(ctx)
    return 0
