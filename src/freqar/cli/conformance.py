"""``freqar conformance DIR``: compare against an upstream-recomputed fixture, one row per tensor."""

from __future__ import annotations

import argparse

import torch

from ..conformance import run as run_fixture


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="check freqar against an upstream conformance fixture")
    p.add_argument("fixture", help="fixture directory (config.json, vae.pth, var.pth, expected.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # One throw-away multi-threaded exp: works around a first-call CPU rounding flake seen in fresh processes.
    torch.exp(torch.linspace(-1, 1, 100_000))
    rows = run_fixture(args.fixture)
    w = max(len(r.name) for r in rows)
    print(f"{'tensor':<{w}}  {'max abs err':>11}  {'tol':>7}  result")
    for r in rows:
        res = "ok" if r.ok else "FAIL"
        print(f"{r.name:<{w}}  {r.max_abs_err:>11.3e}  {r.tol:>7.1e}  {res}{'  ' + r.note if r.note else ''}")
    bad = sum(not r.ok for r in rows)
    print(f"{len(rows) - bad}/{len(rows)} tensors ok")
    return 1 if bad else 0
