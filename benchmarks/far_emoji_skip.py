"""farskip on a trained FAR model: dense against token exclusion on frequency levels, quality and speed.

``freqar eval --accel`` covers the VAR-family methods; this command does the same protocol for FAR's
``farskip`` policy: every setting generates the same labels with the same seeds (batch b uses seed + b), the
batches are interleaved (batch b of every setting, in a rotating order, before batch b+1) so load on a shared
machine slows every setting alike, and a second dense run with other seeds shows how much FD moves from
sampling alone. Speed is end-to-end wall time per image (transformer + diffusion head + VAE decode); quality
is FD on EfficientNet-Lite0 features against the data set's train split, with the floor/ceiling of
``freqar eval`` and the FD increase over dense.

Usage:
    python benchmarks/far_emoji_skip.py --model far-emoji --data data/emoji128 --samples 200 \
        --taus 0.05,0.1,0.2,0.4 --keeps 0.5 --start-stages 2,4 --out runs/far-skip
Writes OUT/far_skip.json, OUT/far_skip.md and OUT/far_skip.png (speed-up against FD increase).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

NOISE_SEED_OFFSET = 1000


@dataclass
class Row:
    label: str
    policy: Any = None
    seed_offset: int = 0
    seconds: float = 0.0
    transformer_s: float = 0.0
    head_s: float = 0.0
    decode_s: float = 0.0
    tokens: int = 0
    images: list[torch.Tensor] = field(default_factory=list)


def build_rows(taus: list[float], keeps: list[float], starts: list[int | None]) -> list[Row]:
    """Dense, dense with other seeds, then every (start level P, τ) and (P, keep budget) pair."""
    from freqar.policies.levels import FARSkipConfig, FARSkipPolicy

    rows = [Row("dense"), Row("dense (other seeds)", seed_offset=NOISE_SEED_OFFSET)]
    for p in starts:
        at = "" if p is None else f" P={p}"
        for t in taus:
            rows.append(Row(f"farskip tau={t:g}{at}", FARSkipPolicy(FARSkipConfig(tau=t, start_stage=p))))
        for k in keeps:
            rows.append(Row(f"farskip keep={k:g}{at}", FARSkipPolicy(FARSkipConfig(keep=k, start_stage=p))))
    return rows


def run(args: argparse.Namespace) -> dict:
    from freqar.eval.fid import extract, fd, lite0_feature_net
    from freqar.eval.run import reference_features, sample_labels
    from freqar.models.far_pipeline import create_far_model

    torch.set_num_threads(args.threads)
    pipe = create_far_model(args.model)
    net = lite0_feature_net()
    ref = reference_features(Path(args.data), net)
    labels = sample_labels(ref["train_labels"], args.samples, pipe.num_classes, args.seed)
    taus = [float(t) for t in args.taus.split(",") if t]
    keeps = [float(k) for k in args.keeps.split(",") if k]
    starts = [int(p) for p in args.start_stages.split(",") if p] if args.start_stages else [None]
    rows = build_rows(taus, keeps, starts)
    kw = dict(steps=args.steps, cfg=args.cfg)
    pipe.generate(labels[:2], seed=0, **kw)  # warm-up, untimed
    batches = list(range(0, len(labels), args.batch))
    t0 = time.perf_counter()
    for bi, i in enumerate(batches):
        lab = labels[i : i + args.batch]
        for j in [(bi + k) % len(rows) for k in range(len(rows))]:
            r = rows[j]
            t = time.perf_counter()
            out = pipe.generate(lab, seed=args.seed + bi + r.seed_offset, policy=r.policy, **kw)
            r.seconds += time.perf_counter() - t
            head = float(sum(out.head_seconds))  # type: ignore[attr-defined]
            r.head_s += head
            r.transformer_s += out.transformer_seconds - head
            r.decode_s += out.decode_seconds
            r.tokens += sum(sum(c) for c in out.tokens_computed)
            r.images.append(out.images.float().cpu().clamp(0, 1))
        print(f"batch {bi + 1}/{len(batches)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    n_ref = min(args.samples, ref["heldout"].shape[0])
    floor = fd(ref["train"], ref["heldout"][:n_ref])
    ceiling = fd(ref["train"], ref["ceiling"][:n_ref])
    dense_tokens = rows[0].tokens
    res: list[dict] = []
    dense_imgs = torch.cat(rows[0].images)
    for r in rows:
        imgs = torch.cat(r.images)
        feats, _ = extract(net, imgs)
        sub = feats[np.random.default_rng(args.seed).choice(len(feats), n_ref, replace=False)]
        d = {
            "setting": r.label,
            "fd": fd(ref["train"], feats),
            "fd_at_floor_count": fd(ref["train"], sub),
            "seconds_per_image": r.seconds / len(labels),
            "transformer_s_per_image": r.transformer_s / len(labels),
            "head_s_per_image": r.head_s / len(labels),
            "decode_s_per_image": r.decode_s / len(labels),
            "token_fraction": r.tokens / dense_tokens,
            "identical_to_dense": int((imgs == dense_imgs).flatten(1).all(dim=1).sum()),
        }
        d["fd_normalized"] = (d["fd_at_floor_count"] - floor) / (ceiling - floor)
        res.append(d)
    for d in res:
        d["fd_increase"] = d["fd"] / res[0]["fd"] - 1
        d["speedup_vs_dense"] = res[0]["seconds_per_image"] / d["seconds_per_image"]
    ok = [d for d in res[2:] if d["fd_increase"] <= 0.05]
    best = max(ok, key=lambda d: d["speedup_vs_dense"]) if ok else None
    return {
        "model": pipe.name,
        "samples": args.samples,
        "batch": args.batch,
        "seed": args.seed,
        "threads": args.threads,
        "steps": args.steps or pipe.defaults.steps,
        "cfg": args.cfg if args.cfg is not None else pipe.defaults.cfg,
        "levels": list(pipe.tokenizer().levels),
        "start_stages": args.start_stages or "default (levels // 2)",
        "fd_floor": floor,
        "fd_ceiling": ceiling,
        "results": res,
        "best_within_5pct": best["setting"] if best else None,
        "target_met": bool(best and best["speedup_vs_dense"] >= 1.5),
    }


def write_report(rep: dict, out: Path) -> list[Path]:
    from freqar.io import atomic_path, atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "far_skip.json", rep)
    lines = [
        f"# farskip on `{rep['model']}` ({rep['samples']} samples, {rep['steps']} diffusion steps, "
        f"cfg {rep['cfg']}, levels {rep['levels']})",
        "",
        f"FD floor {rep['fd_floor']:.1f}, ceiling {rep['fd_ceiling']:.1f}. "
        f"Best setting within +5% FD: {rep['best_within_5pct']} "
        f"(target >= 1.5x: {'met' if rep['target_met'] else 'NOT met'}).",
        "",
        "| setting | FD | FD increase | normalised FD | e2e s/img | speed-up | transformer | head | decode "
        "| tokens | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in rep["results"]:
        cells = [
            d["setting"],
            f"{d['fd']:.1f}",
            f"{100 * d['fd_increase']:+.1f}%",
            f"{d['fd_normalized']:.3f}",
            f"{d['seconds_per_image']:.3f}",
            f"{d['speedup_vs_dense']:.2f}x",
            f"{d['transformer_s_per_image']:.3f}",
            f"{d['head_s_per_image']:.3f}",
            f"{d['decode_s_per_image']:.3f}",
            f"{100 * d['token_fraction']:.0f}%",
            str(d["identical_to_dense"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "far_skip.md", lambda p: p.write_text(text))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for d in rep["results"]:
        ax.scatter(d["speedup_vs_dense"], 100 * d["fd_increase"])
        ax.annotate(d["setting"].replace("farskip ", ""), (d["speedup_vs_dense"], 100 * d["fd_increase"]))
    ax.axhline(5, ls="--", c="gray", lw=1)
    ax.axvline(1.5, ls=":", c="gray", lw=1)
    ax.set_xlabel("end-to-end speed-up vs dense")
    ax.set_ylabel("FD increase over dense (%)")
    ax.set_title(f"farskip on {rep['model']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "far_skip.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return [out / "far_skip.json", out / "far_skip.md", out / "far_skip.png"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="far-emoji")
    ap.add_argument("--data", default="data/emoji128")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default=None, help="diffusion steps per level (default: the model's)")
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--taus", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--keeps", default="0.5")
    ap.add_argument("--start-stages", default="", help="first sparse levels P, e.g. 2,4 (default: levels//2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/far-skip")
    args = ap.parse_args()
    rep = run(args)
    for d in rep["results"]:
        print(
            f"{d['setting']:<22} FD {d['fd']:7.2f} ({100 * d['fd_increase']:+6.1f}%) "
            f"norm {d['fd_normalized']:.3f}  {d['seconds_per_image']:.3f}s/img  "
            f"{d['speedup_vs_dense']:.2f}x  tokens {100 * d['token_fraction']:.0f}%"
        )
    print("wrote " + ", ".join(str(p) for p in write_report(rep, Path(args.out))))


if __name__ == "__main__":
    main()
