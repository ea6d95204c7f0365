"""``freqar study``: SparseVAR's ablations and its extensions on one trained model, with peers beside them.

One run of ``eval --accel``'s machinery (same labels, same seeds, interleaved batches, FD with floor and
ceiling, PSNR/SSIM to the same-seed dense image, engine timings) over a plan of settings grouped as the
paper's tables: the τ sweep (Tables 1-3), α (Table 4), β, the start stage P and the probe block s
(Figure 8), plus what this repository adds: content-adaptive against uniform anchors, the calibrated
against the fixed probe block, scale skipping alone and composed with SparseVAR and FastVAR, and FastVAR.
The study calibrates s itself (``calibrate.py``) and every other SparseVAR row uses that block, as a
user's runs do once ``freqar calibrate`` has stored it. ``--quick`` keeps a few settings per group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import CalibrationSettings, calibrate
from .errors import InvalidOption
from .eval.accel import (
    AccelSetting,
    header,
    mark_pareto,
    preview_png,
    run_accel,
    scatter_png,
    sparsevar_verdict,
    table,
    verdict_lines,
)
from .eval.fid import FeatureNet
from .eval.run import EvalSettings
from .io import atomic_write, write_json
from .pipeline import Pipeline
from .policies.sparsevar import SparseVARConfig

GROUPS = {
    "tau": "τ sweep (uniform anchors, calibrated s): the paper's Tables 1-3 analogue",
    "anchors": "content-adaptive against uniform anchors (same anchor count), τ sweep",
    "alpha": "anchor grid α at τ 0.6: the paper's Table 4 analogue",
    "beta": "similarity threshold β at τ 0.6",
    "P": "first sparse stage P at τ 0.6",
    "s": "probe block s at τ 0.6: fixed blocks against the calibrated one (the paper's Figure 8)",
    "skip": "scale skipping (the last k scales not run): alone, and composed with SparseVAR and FastVAR",
    "fastvar": "FastVAR (peer baseline; prune-only, and as released = + skip)",
    "signal": "exclusion signal at equal keep budgets (β 1): probe-block ΔF against previous-stage entropy",
}


@dataclass(frozen=True)
class StudyPlan:
    """The knob values each group sweeps."""

    taus: tuple[float, ...]
    adaptive_taus: tuple[float, ...]
    alphas: tuple[int, ...]
    betas: tuple[float, ...]
    start_offsets: tuple[int, ...]  # P = S - offset
    all_blocks: bool
    skips: tuple[int, ...]
    skip_taus: tuple[float, ...]
    fastvar_keeps: tuple[float, ...]
    signal_keeps: tuple[float, ...]  # keep budgets at which ΔF and entropy rank the same number of tokens
    samples: int
    batch: int
    calibration_samples: int


QUICK = StudyPlan(
    taus=(0.3, 0.6, 0.8),
    adaptive_taus=(0.3, 0.6, 0.8),
    alphas=(2, 8),
    betas=(0.5,),
    start_offsets=(3,),
    all_blocks=False,
    skips=(1,),
    skip_taus=(0.6,),
    fastvar_keeps=(),
    signal_keeps=(0.6,),
    samples=96,
    batch=24,
    calibration_samples=16,
)
FULL = StudyPlan(
    taus=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    adaptive_taus=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    alphas=(2, 4, 8, 16),
    betas=(0.0, 0.5, 0.8, 0.9, 0.95, 1.0),
    start_offsets=(6, 5, 4, 3, 2),
    all_blocks=True,
    skips=(1, 2),
    skip_taus=(0.3, 0.6),
    fastvar_keeps=(0.25, 0.5),
    signal_keeps=(0.5, 0.6, 0.75),
    samples=300,
    batch=25,
    calibration_samples=64,
)


def plan_settings(plan: StudyPlan, num_stages: int, depth: int, calibrated: int) -> list[AccelSetting]:
    """Every setting of the study, tagged with its groups (duplicates are merged when run)."""
    d = SparseVARConfig()
    S = num_stages
    out: list[AccelSetting] = []

    def sv(group: str, method: str = "sparsevar", **knobs: Any) -> None:
        out.append(AccelSetting(method, knobs, groups=[group]))

    for t in plan.taus:
        sv("tau", tau=t)
        sv("anchors", tau=t)
    for t in plan.adaptive_taus:
        sv("anchors", tau=t, anchors="adaptive")
    for a in sorted({*plan.alphas, d.alpha}):
        sv("alpha", tau=d.tau, alpha=a)
    for b in sorted({*plan.betas, d.beta}):
        sv("beta", tau=d.tau, beta=b)
    for off in sorted({*plan.start_offsets, 4}, reverse=True):
        if 1 <= S - off < S:
            sv("P", tau=d.tau, start_stage=S - off)
    fixed = d.resolve(S, depth)[1]
    blocks = range(depth) if plan.all_blocks else sorted({fixed, calibrated})
    for s in blocks:
        sv("s", tau=d.tau, block=s)
    for k in plan.skips:
        if k < S:
            out.append(AccelSetting("skip", {"skip": k}, groups=["skip"]))
            for t in plan.skip_taus:
                sv("skip", "sparsevar+skip", tau=t, skip=k)
            sv("skip", "sparsevar+skip", tau=d.tau, anchors="adaptive", skip=k)
            out.append(AccelSetting("fastvar+skip", {"skip": k}, groups=["skip", "fastvar"]))
    sv("skip", tau=d.tau)  # exclusion alone, beside the skip rows
    for keep in plan.signal_keeps:  # same budget and no logit copying: only the ranking differs
        for signal in ("dF", "entropy"):
            sv("signal", keep=keep, beta=1.0, signal=signal)
    out.append(AccelSetting("fastvar", {}, groups=["fastvar"]))
    for keep in plan.fastvar_keeps:
        out.append(AccelSetting("fastvar", {"keep": keep}, groups=["fastvar"]))
    return out


def run_study(
    pipe: Pipeline,
    data: Path,
    net: FeatureNet,
    plan: StudyPlan,
    seed: int = 0,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    bootstrap: int = 0,
) -> dict[str, Any]:
    """Calibrate s, run every setting on the same labels and seeds, and summarise against the targets
    (``bootstrap`` > 0: each FD increase also gets a paired-bootstrap 95% interval)."""
    if plan.samples < 2:
        raise InvalidOption(f"study samples must be >= 2, got {plan.samples}")
    t0 = time.perf_counter()
    cal = calibrate(pipe, CalibrationSettings(samples=plan.calibration_samples, seed=seed, batch=plan.batch))
    if log is not None:
        log(
            f"calibrated probe block s = {cal['block']} (fixed default {cal['default_block']}), "
            f"{time.perf_counter() - t0:.0f}s"
        )
    settings = plan_settings(plan, len(pipe.tokenizer.stage_grids()), pipe.transformer.depth, cal["block"])
    es = EvalSettings(samples=plan.samples, seed=seed, batch=plan.batch, kid_subsets=20)
    report = run_accel(
        pipe, data, settings, es, net, cache, calibrated=cal["block"], log=log, bootstrap=bootstrap
    )
    for r in report["results"]:
        if r["method"] == "dense":
            r["groups"] = ["dense"]
    mark_pareto(report["results"])
    report["calibration"] = {k: v for k, v in cal.items() if k != "labels"}
    report["plan"] = asdict(plan)
    report["groups"] = GROUPS
    report["summary"] = summarise(report)
    report["sparsevar_default"] = sparsevar_verdict(report)
    report["wall_seconds"] = time.perf_counter() - t0
    return report


# ----- analysis ------------------------------------------------------------------------------------------
def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x on points sorted by x (None outside their range)."""
    pts = sorted(points)
    if len(pts) < 2 or not pts[0][0] <= x <= pts[-1][0]:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.interp(x, xs, ys))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's questions, answered from the rows (numbers, not verdicts, where noise could decide)."""
    rows = report["results"]
    noise = next((r["fd_increase"] for r in rows if r["knobs"].get("seed_offset")), None)
    dense = rows[0]
    sv = [r for r in rows if r["method"] == "sparsevar" and "anchors" in r["groups"]]
    uni = [(r["speedup_vs_dense"], r["fd_increase"]) for r in sv if r["knobs"]["anchors"] == "uniform"]
    uni.append((1.0, 0.0))  # dense is the uniform curve's τ = 0 end
    same_tau = {r["knobs"]["tau"]: r for r in sv if r["knobs"]["anchors"] == "uniform"}
    cmp = []
    for r in sv:
        if r["knobs"]["anchors"] != "adaptive":
            continue
        u = _interp(uni, r["speedup_vs_dense"])
        red = None if u is None or u <= 0 else 1.0 - r["fd_increase"] / u
        twin = same_tau.get(r["knobs"]["tau"])
        cmp.append(
            {
                "tau": r["knobs"]["tau"],
                "speedup_vs_dense": r["speedup_vs_dense"],
                "fd_increase_adaptive": r["fd_increase"],
                "fd_increase_uniform_at_same_speedup": u,
                "reduction": red,
                # same τ: the same anchor count and (given the low set) the same computed tokens
                "uniform_same_tau": None
                if twin is None
                else {k: twin[k] for k in ("fd_increase", "speedup_vs_dense", "token_fraction", "psnr_db")},
                "adaptive_token_fraction": r["token_fraction"],
                "adaptive_psnr_db": r["psnr_db"],
            }
        )
    reds = [c["reduction"] for c in cmp if c["reduction"] is not None]
    ok = [r for r in rows if r["method"] != "dense" and r["fd_increase"] <= 0.05]
    best = max(ok, key=lambda r: r["speedup_vs_dense"]) if ok else None
    peers = [r for r in rows if r["method"].startswith(("fastvar", "skip"))]
    dominated_by = []
    if best is not None:
        dominated_by = [
            p["setting"]
            for p in peers
            if p["speedup_vs_dense"] >= best["speedup_vs_dense"] and p["fd_increase"] < best["fd_increase"]
        ]

    def pick(pred: Callable[[dict], bool]) -> dict | None:
        r = next((r for r in rows if pred(r)), None)
        if r is None:
            return None
        keys = ("setting", "speedup_vs_dense", "fd_increase", "psnr_db", "ssim", "token_fraction")
        return {k: r[k] for k in keys}

    d = SparseVARConfig()
    default_row = next((r for r in rows if r["is_default_sparsevar"]), None)
    base = {"tau": d.tau, "alpha": d.alpha, "beta": d.beta, "anchors": "uniform", "keep": None}
    if default_row is not None:
        base["start_stage"] = default_row["knobs"]["start_stage"]

    def is_base(r: dict, method: str) -> bool:
        return (
            r["method"] == method
            and all(r["knobs"].get(k) == v for k, v in base.items())
            and (r["knobs"].get("block_source") == "calibrated")
        )

    cal = report["calibration"]
    fixed_block = cal["default_block"]
    return {
        "fd_noise_other_seeds": noise,
        "dense": {
            "fd": dense["fd"],
            "fd_normalized": dense["fd_normalized"],
            "s_per_image": dense["seconds_per_image"],
        },
        "adaptive_vs_uniform": {
            "points": cmp,
            "mean_reduction": float(np.mean(reds)) if reds else None,
            "target_reduction": 0.20,
        },
        "best_within_5pct": None
        if best is None
        else {
            "setting": best["setting"],
            "method": best["method"],
            "knobs": best["knobs"],
            "speedup_vs_dense": best["speedup_vs_dense"],
            "fd_increase": best["fd_increase"],
            "on_pareto_front": best["pareto"],
            "peers_better_at_equal_or_higher_speed": dominated_by,
            "target_speedup": 2.0,
        },
        "skip_effect": {
            "skip_only": pick(lambda r: r["method"] == "skip" and r["knobs"].get("skip") == 1),
            "exclusion_only": pick(lambda r: is_base(r, "sparsevar")),
            "combined": pick(lambda r: is_base(r, "sparsevar+skip") and r["knobs"].get("skip") == 1),
            "fastvar_prune_only": pick(lambda r: r["method"] == "fastvar" and r["knobs"].get("keep") is None),
            "fastvar_as_released": pick(
                lambda r: r["method"] == "fastvar+skip" and r["knobs"].get("skip") == 1
            ),
        },
        "calibrated_vs_fixed_block": {
            "calibrated_block": cal["block"],
            "fixed_block": fixed_block,
            "calibrated": pick(lambda r: is_base(r, "sparsevar")),
            "fixed": pick(
                lambda r: (
                    r["method"] == "sparsevar"
                    and r["knobs"].get("block") == fixed_block
                    and all(r["knobs"].get(k) == v for k, v in base.items())
                )
            ),
        },
    }


# ----- writers -------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    cal = report["calibration"]
    lines = header(report, "freqar study")
    lines += [
        f"Probe block calibrated on {cal['settings']['samples']} samples: s = {cal['block']} (the fixed "
        f"default is {cal['default_block']}); Spearman score per block "
        + ", ".join(f"{i}: {v:+.3f}" for i, v in enumerate(cal["scores"]["spearman"]))
        + f". Dense with other seeds moves FD by {_pct(s['fd_noise_other_seeds'])}: "
        "FD differences below that are sampling noise at this sample count.",
        "",
        "## Summary",
        "",
    ]
    av = s["adaptive_vs_uniform"]
    lines.append(
        "- Adaptive vs uniform anchors at equal speed-up: "
        + (
            "no adaptive point lies within the uniform curve's speed range."
            if av["mean_reduction"] is None
            else f"mean reduction of the FD increase {100 * av['mean_reduction']:.0f}% (target >= 20%); "
            + "; ".join(
                f"τ {c['tau']:g}: {c['speedup_vs_dense']:.2f}x, "
                f"adaptive {_pct(c['fd_increase_adaptive'])} "
                f"vs uniform {_pct(c['fd_increase_uniform_at_same_speedup'])}"
                for c in av["points"]
            )
        )
    )
    for c in av["points"]:
        u = c["uniform_same_tau"]
        if u is not None:
            lines.append(
                f"  - same τ {c['tau']:g} (same anchor count and cost): adaptive FD "
                f"{_pct(c['fd_increase_adaptive'])}, tokens {100 * c['adaptive_token_fraction']:.1f}%, "
                f"PSNR {c['adaptive_psnr_db']:.2f} dB; uniform {_pct(u['fd_increase'])}, "
                f"tokens {100 * u['token_fraction']:.1f}%, PSNR {u['psnr_db']:.2f} dB"
            )
    b = s["best_within_5pct"]
    if b is None:
        lines.append("- No accelerated setting stays within +5% FD of dense.")
    else:
        lines.append(
            f"- Fastest setting within +5% FD: {b['setting']} at {b['speedup_vs_dense']:.2f}x "
            f"({_pct(b['fd_increase'])}; "
            f"target >= 2x: {'met' if b['speedup_vs_dense'] >= 2 else 'NOT met'}); "
            f"on the Pareto front: {'yes' if b['on_pareto_front'] else 'no'}"
            + (
                f"; peers as fast with lower FD: {', '.join(b['peers_better_at_equal_or_higher_speed'])}"
                if b["peers_better_at_equal_or_higher_speed"]
                else "; no peer point is as fast with lower FD"
            )
            + "."
        )
    for name, r in s["skip_effect"].items():
        if r is not None:
            lines.append(
                f"- {name.replace('_', ' ')}: {r['setting']}: {r['speedup_vs_dense']:.2f}x, FD "
                f"{_pct(r['fd_increase'])}, PSNR {r['psnr_db']:.1f} dB, "
                f"tokens {100 * r['token_fraction']:.0f}%"
            )
    cf = s["calibrated_vs_fixed_block"]
    for name in ("calibrated", "fixed"):
        r = cf[name]
        if r is not None:
            lines.append(
                f"- probe block {name} (s = {cf[name + '_block']}): {r['speedup_vs_dense']:.2f}x, FD "
                f"{_pct(r['fd_increase'])}, PSNR {r['psnr_db']:.1f} dB"
            )
    lines += ["", *verdict_lines(report.get("sparsevar_default")), ""]
    for g, title in GROUPS.items():
        rows = [r for r in report["results"] if g in r["groups"] or r["method"] == "dense"]
        if len(rows) <= 2:
            continue
        lines += [f"## {title}", "", *table(rows), ""]
    lines += ["## Every setting", "", *table(report["results"]), ""]
    return "\n".join(lines)


def write_study(report: dict[str, Any], out: Path, plot: bool = True) -> list[Path]:
    """DIR/study.json, DIR/study.md, DIR/study.png (Pareto plot) and DIR/study_samples.png."""
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "previews"}
    write_json(out / "study.json", body)
    md = markdown(report)
    atomic_write(out / "study.md", lambda p: p.write_text(md))
    paths = [out / "study.json", out / "study.md"]
    preview_png(report, out / "study_samples.png")
    paths.append(out / "study_samples.png")
    if plot:
        try:
            scatter_png(report, out / "study.png", f"freqar study: {report['model']} (speed vs quality)")
            paths.append(out / "study.png")
        except ImportError:
            pass
    return paths
