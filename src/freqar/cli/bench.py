"""``freqar bench``: dense vs SparseVAR vs FastVAR, writing DIR/bench.json, bench.md and bench.png."""

from __future__ import annotations

import argparse
import sys

from ..bench import get_scenario, run_bench, scenarios, with_depth, write_report
from ..errors import InvalidOption
from .common import float_list, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark token policies against dense generation")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--scenario", default="infinity-1024", help="scenario name (default infinity-1024)")
    p.add_argument("--methods", default="dense,sparsevar,fastvar", help="comma-separated methods")
    p.add_argument("--taus", default="0.4,0.5,0.6,0.7", help="SparseVAR thresholds to sweep ('' = none)")
    p.add_argument("--budgets", default="0.5,0.3,0.15", help="keep budgets for sparse stages ('' = none)")
    p.add_argument(
        "--signal",
        default="dF",
        help="SparseVAR's exclusion signal in every sparsevar setting: dF (paper's probe block) or entropy",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed dense runs first (default 1)")
    p.add_argument("--batch", type=int, default=1, help="images per generation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every method (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")
    p.add_argument("--quiet", action="store_true", help="no per-run log")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="blocks to run in a depth-cut scenario (infinity-2b, hart-1024); its full depth fits a GPU",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for sc in scenarios().values():
            print(f"{sc.name:<15} {sc.description}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InvalidOption("--methods is empty")
    if args.warmup < 0:
        raise InvalidOption(f"--warmup must be >= 0, got {args.warmup}")
    report = run_bench(
        with_depth(get_scenario(args.scenario), args.depth),
        methods=methods,
        taus=float_list(args.taus, "--taus"),
        budgets=float_list(args.budgets, "--budgets"),
        runs=args.runs,
        seed=args.seed,
        batch=args.batch,
        device=resolve_device(args.device),
        threads=args.threads,
        warmup=args.warmup,
        log=None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)),
        signal=args.signal,
    )
    paths = write_report(report, args.out, plot=not args.no_plot)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
