"""Time dense generation of the VAR-d16 architecture (random weights) on CPU.

Median of N runs after one warm-up, split into transformer stages and VAE decode. Writes JSON and
Markdown next to each other. Random weights: the numbers measure compute, not picture quality.

    python benchmarks/bench_dense.py --model var-d16 --runs 5 --out bench-out/dense
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from freqar.io import atomic_write, write_json
from freqar.registry import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="var-d16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="bench-out/dense")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = create_model(args.model)
    build_s = time.perf_counter() - t0
    labels = list(range(args.batch))
    runs = []
    for i in range(args.runs + 1):
        t0 = time.perf_counter()
        res = pipe.generate(labels, seed=i, cfg=args.cfg, top_k=900, top_p=0.95)
        total = time.perf_counter() - t0
        if i == 0:
            continue  # warm-up
        runs.append({"total": total, "stages": res.stage_seconds, "decode": res.decode_seconds})
        tr = sum(res.stage_seconds)
        print(f"run {i}: total {total:.3f}s transformer {tr:.3f}s decode {res.decode_seconds:.3f}s")
    med = statistics.median
    S = len(runs[0]["stages"])
    report = {
        "model": args.model,
        "batch": args.batch,
        "cfg": args.cfg,
        "runs": args.runs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "build_seconds": build_s,
        "total_median_s": med(r["total"] for r in runs),
        "transformer_median_s": med(sum(r["stages"]) for r in runs),
        "decode_median_s": med(r["decode"] for r in runs),
        "stage_median_s": [med(r["stages"][k] for r in runs) for k in range(S)],
        "grids": [list(g) for g in pipe.tokenizer.stage_grids()],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dense.json", report)
    lines = [
        f"# Dense generation, {args.model} (random weights), batch {args.batch}, cfg {args.cfg}, "
        f"{report['threads']} threads",
        "",
        f"- total (median of {args.runs}): **{report['total_median_s']:.3f} s**",
        f"- transformer stages: {report['transformer_median_s']:.3f} s",
        f"- VAE decode: {report['decode_median_s']:.3f} s",
        "",
        "| stage | grid | median s |",
        "|---|---|---|",
    ]
    for k, (g, s) in enumerate(zip(report["grids"], report["stage_median_s"], strict=True)):
        lines.append(f"| {k} | {g[0]}x{g[1]} | {s:.4f} |")
    atomic_write(out / "dense.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
