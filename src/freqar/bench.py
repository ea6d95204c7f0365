"""``freqar bench``: dense vs SparseVAR vs FastVAR on random-weight scenarios, interleaved, same seeds.

Random weights make SparseVAR's ΔF maps meaningless, so besides the τ sweep every sparse method also
runs at fixed keep budgets (fraction of tokens computed in the sparse stages): those runs measure how
much of the ideal (FLOP-count) speed-up the engine turns into wall-clock time. Latency is the
transformer part of generation (stages, policy, sampling, tokenizer updates), not the VAE decode.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InvalidOption
from .io import atomic_write, write_json
from .models.var import VARConfig
from .pipeline import Pipeline, SamplingDefaults, build_pipeline
from .policies import make_policy
from .tokenizers.msvq import MSVQConfig

INFINITY_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class Scenario:
    """A random-weight model shape plus the sampling settings the benchmark uses."""

    name: str
    description: str
    patch_nums: tuple[int, ...]
    depth: int
    embed_dim: int
    num_heads: int
    vocab_size: int = 4096
    z_channels: int = 32
    vae_ch: int = 160
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_groups: int = 32
    num_classes: int = 1000
    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95

    def build(self) -> Pipeline:
        vae = MSVQConfig(
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
            ch=self.vae_ch,
            ch_mult=self.vae_ch_mult,
            patch_nums=self.patch_nums,
            groupnorm_groups=self.vae_groups,
        )
        var = VARConfig(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_classes=self.num_classes,
            patch_nums=self.patch_nums,
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
        )
        defaults = SamplingDefaults(cfg=self.cfg, top_k=self.top_k, top_p=self.top_p)
        return build_pipeline(self.name, vae, var, defaults, init_seed=0)


def scenarios() -> dict[str, Scenario]:
    """Registered benchmark scenarios by name."""
    items = [
        Scenario(
            "var-d16",
            "VAR-d16 architecture (16 blocks, width 1024), 256px 10-scale schedule, official tokenizer shape",
            VAR_256,
            depth=16,
            embed_dim=1024,
            num_heads=16,
        ),
        Scenario(
            "infinity-1024",
            "width-512 8-block VAR transformer, 1024px Infinity schedule (13 scales to 64x64), 16x tokenizer",
            INFINITY_1024,
            depth=8,
            embed_dim=512,
            num_heads=8,
            vae_ch=16,
            vae_groups=8,
        ),
        Scenario(
            "tiny",
            "tiny smoke scenario (2 blocks, width 64, 6 scales up to 8x8) for tests",
            (1, 2, 3, 4, 6, 8),
            depth=2,
            embed_dim=64,
            num_heads=4,
            vocab_size=64,
            z_channels=8,
            vae_ch=16,
            vae_ch_mult=(1, 2),
            vae_groups=8,
            num_classes=10,
            cfg=1.5,
            top_k=0,
            top_p=0.0,
        ),
    ]
    return {s.name: s for s in items}


def get_scenario(name: str) -> Scenario:
    reg = scenarios()
    if name not in reg:
        raise InvalidOption(f"unknown scenario '{name}' (run `freqar bench --list`: {', '.join(reg)})")
    return reg[name]


# ----- cost model --------------------------------------------------------------------------------------
def transformer_flops(cfg: VARConfig, tokens_per_stage: list[float], rows: int) -> float:
    """FLOPs of the transformer for the given computed tokens per stage (one sample, ``rows`` CFG rows).

    Per block: 24·d²·n linear (qkv, proj, FFN x4) + 4·d·n·K attention (QKᵀ and AV over the K keys in the
    cache, which holds only computed tokens); plus the head 2·d·V·n.
    """
    d, V = cfg.embed_dim, cfg.vocab_size
    total, keys = 0.0, 0.0
    for n in tokens_per_stage:
        keys += n
        total += cfg.depth * (24 * d * d * n + 4 * d * n * keys) + 2 * d * V * n
    return total * rows


# ----- fidelity ----------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, σ 1.5) of (B, 3, H, W) images in [0, 1], per channel."""
    a, b = a.float(), b.float()
    C = a.shape[1]
    x = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(C, 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def token_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Fraction of all stage tokens equal between two generations."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.numel() for x in a)


# ----- timing ------------------------------------------------------------------------------------------
class TimedPolicy:
    """Wraps a policy and accumulates the wall time of its own work (selection overhead)."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = device
        self.seconds = 0.0
        if hasattr(inner, "observe_input"):
            self.observe_input = lambda *a: self._timed(inner.observe_input, *a)

    def _timed(self, fn: Any, *args: Any) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def begin(self, *args: Any) -> Any:
        return self._timed(self.inner.begin, *args)

    def select(self, *args: Any) -> Any:
        return self._timed(self.inner.select, *args)

    def fill(self, *args: Any) -> Any:
        return self._timed(self.inner.fill, *args)

    def stats(self, state: Any) -> list[dict]:
        return self.inner.stats(state)


@dataclass
class Setting:
    """One method at one setting of its knobs."""

    method: str
    label: str
    knobs: dict[str, Any] = field(default_factory=dict)
    mode: str = "default"  # "dense", "disabled", "threshold", "budget" or "default"


def plan_settings(methods: list[str], taus: list[float], budgets: list[float]) -> list[Setting]:
    """Dense first, then SparseVAR (disabled check, τ sweep, budgets) and FastVAR (paper ratios, budgets)."""
    known = {"dense", "sparsevar", "fastvar"}
    bad = [m for m in methods if m not in known]
    if bad:
        raise InvalidOption(f"unknown bench method {', '.join(bad)} (choose from dense, sparsevar, fastvar)")
    for t in taus:
        if not 0 <= t <= 1:
            raise InvalidOption(f"--taus values must be in [0, 1], got {t}")
    for b in budgets:
        if not 0 < b <= 1:
            raise InvalidOption(f"--budgets values must be in (0, 1], got {b}")
    out = [Setting("dense", "dense", mode="dense")]
    if "sparsevar" in methods:
        out.append(Setting("sparsevar", "sparsevar tau=0 (disabled)", {"tau": 0.0}, "disabled"))
        out += [Setting("sparsevar", f"sparsevar tau={t:g}", {"tau": t}, "threshold") for t in taus]
        out += [Setting("sparsevar", f"sparsevar keep={b:g}", {"keep": b}, "budget") for b in budgets]
    if "fastvar" in methods:
        out.append(Setting("fastvar", "fastvar (paper ratios)", {}, "default"))
        out += [Setting("fastvar", f"fastvar keep={b:g}", {"keep": b}, "budget") for b in budgets]
    return out


def _peak_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024, "process_peak_rss"


def run_bench(
    scenario: Scenario,
    *,
    methods: list[str],
    taus: list[float],
    budgets: list[float],
    runs: int = 3,
    seed: int = 0,
    batch: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 1,
    log: Any = None,
) -> dict:
    """Run every setting ``runs`` times, interleaved (run r of every setting before run r+1), same seed."""
    if runs < 1:
        raise InvalidOption(f"--runs must be >= 1, got {runs}")
    if batch < 1:
        raise InvalidOption(f"--batch must be >= 1, got {batch}")
    if threads is not None:
        if threads < 1:
            raise InvalidOption(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    settings = plan_settings(methods, taus, budgets)
    pipe = scenario.build().to(device)
    dev = pipe.device
    labels = torch.randint(
        0, pipe.num_classes, (batch,), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    cfg = pipe.transformer.cfg
    rows = 2 if scenario.cfg > 0 else 1
    S = len(scenario.patch_nums)

    def once(s: Setting) -> tuple[Any, float]:
        pol = None if s.method == "dense" else TimedPolicy(make_policy(s.method, **s.knobs), dev)
        out = pipe.generate(labels, seed=seed, policy=pol)
        return out, (pol.seconds if pol is not None else 0.0)

    for _ in range(warmup):
        once(settings[0])
    lat: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    stage_lat: dict[int, list[list[float]]] = {i: [] for i in range(len(settings))}
    over: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    last: dict[int, Any] = {}
    peaks: dict[int, float] = {}
    mem_kind = ""
    for r in range(runs):
        for i, s in enumerate(settings):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            out, ov = once(s)
            lat[i].append(out.transformer_seconds)
            stage_lat[i].append(out.stage_seconds)
            over[i].append(ov)
            peaks[i], mem_kind = _peak_mb(dev)
            if r == runs - 1:
                last[i] = out
            if log is not None:
                log(f"run {r + 1}/{runs} {s.label}: {out.transformer_seconds:.3f}s")

    dense_out = last[0]
    dense_med = statistics.median(lat[0])
    grids = [p * p for p in scenario.patch_nums]
    P = max(1, S - 4)
    dense_flops = transformer_flops(cfg, [float(g) for g in grids], rows)
    results = []
    for i, s in enumerate(settings):
        out = last[i]
        per_stage = [sum(c) / len(c) for c in out.tokens_computed]  # mean over samples
        med = statistics.median(lat[i])
        flops = transformer_flops(cfg, per_stage, rows)
        speed = dense_med / med
        ideal = dense_flops / flops
        row: dict[str, Any] = {
            "method": s.method,
            "setting": s.label,
            "mode": s.mode,
            "knobs": s.knobs,
            "latency_median_s": med,
            "latency_runs_s": lat[i],
            "speedup_vs_dense": speed,
            "ideal_speedup": ideal,
            "efficiency": speed / ideal,
            "tokens_computed_fraction": sum(per_stage) / sum(grids),
            "tokens_computed_fraction_sparse_stages": sum(per_stage[P:]) / sum(grids[P:]),
            "stage_latency_median_s": [statistics.median(x) for x in zip(*stage_lat[i], strict=True)],
            "stage_tokens": per_stage,
            "peak_memory_mb": peaks[i],
            "selection_overhead_s": statistics.median(over[i]),
            "selection_overhead_fraction_of_dense": statistics.median(over[i]) / dense_med,
            "psnr_db": _finite(psnr(out.images, dense_out.images)),
            "ssim": ssim(out.images, dense_out.images),
            "token_agreement": token_agreement(out.tokens, dense_out.tokens),
        }
        if s.mode == "disabled":
            row["bit_identical_to_dense"] = bool(torch.equal(out.images, dense_out.images)) and all(
                torch.equal(a, b) for a, b in zip(out.tokens, dense_out.tokens, strict=True)
            )
            row["latency_delta_vs_dense"] = med / dense_med - 1.0
        results.append(row)
    return {
        "scenario": asdict(scenario),
        "sparse_start_stage": P,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "batch": batch,
        "labels": labels,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "peak_memory_kind": mem_kind,
        "dense_flops": dense_flops,
        "results": results,
    }


def _finite(x: float) -> float | None:
    """JSON has no infinity: identical images (infinite PSNR) are stored as null."""
    return None if x == float("inf") else x


# ----- writers -----------------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 2) -> str:
    return "inf" if x is None else f"{x:.{nd}f}"


def markdown_table(report: dict) -> str:
    """The bench results as a Markdown table (one row per method setting)."""
    sc = report["scenario"]
    lines = [
        f"### `{sc['name']}`: {sc['description']}",
        "",
        f"{report['runs']} runs (median), batch {report['batch']}, device {report['device']}, "
        f"{report['threads']} thread(s), torch {report['torch']}; "
        f"sparse stages >= {report['sparse_start_stage']} (0-based). "
        "Latency = transformer part (stages + policy + sampling), decode excluded.",
        "",
        "| method | setting | latency (s) | speed-up | ideal | efficiency | tokens | sparse-stage tokens "
        "| overhead | PSNR (dB) | SSIM | token agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['latency_median_s']:.3f} | {r['speedup_vs_dense']:.2f}x "
            f"| {r['ideal_speedup']:.2f}x | {r['efficiency']:.2f} "
            f"| {100 * r['tokens_computed_fraction']:.1f}% "
            f"| {100 * r['tokens_computed_fraction_sparse_stages']:.1f}% "
            f"| {100 * r['selection_overhead_fraction_of_dense']:.1f}% | {_fmt(r['psnr_db'])} "
            f"| {r['ssim']:.3f} | {r['token_agreement']:.3f} |"
        )
    for r in report["results"]:
        if "bit_identical_to_dense" in r:
            lines += [
                "",
                f"Disabled SparseVAR (τ = 0): bit-identical to dense = {r['bit_identical_to_dense']}, "
                f"latency delta {100 * r['latency_delta_vs_dense']:+.1f}%.",
            ]
    return "\n".join(lines) + "\n"


def plot_png(report: dict, path: str | os.PathLike[str]) -> None:
    """Speed-fidelity scatter: speed-up vs token agreement (PSNR is infinite for identical images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dense": "black", "sparsevar": "tab:red", "fastvar": "tab:blue"}
    for r in report["results"]:
        c = colours.get(r["method"], "grey")
        marker = "s" if r["mode"] == "budget" else "o"
        y = 60.0 if r["psnr_db"] is None else min(r["psnr_db"], 60.0)
        axes[0].scatter(r["speedup_vs_dense"], y, color=c, marker=marker)
        axes[0].annotate(r["setting"].replace(r["method"] + " ", ""), (r["speedup_vs_dense"], y), fontsize=7)
        axes[1].scatter(r["ideal_speedup"], r["speedup_vs_dense"], color=c, marker=marker)
    top = max(r["ideal_speedup"] for r in report["results"]) * 1.05
    axes[1].plot([1, top], [1, top], "k:", lw=1, label="efficiency 1")
    axes[1].plot([1, top], [0.85, 0.85 * top], "g:", lw=1, label="efficiency 0.85")
    axes[0].set_xlabel("measured speed-up vs dense")
    axes[0].set_ylabel("PSNR vs same-seed dense (dB, capped at 60)")
    axes[1].set_xlabel("ideal speed-up (FLOPs)")
    axes[1].set_ylabel("measured speed-up")
    axes[1].legend(fontsize=8)
    for m, c in colours.items():
        axes[0].scatter([], [], color=c, label=m)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"freqar bench: {report['scenario']['name']} (squares = keep budgets)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """DIR/bench.json, DIR/bench.md and (if matplotlib is installed) DIR/bench.png, each atomically."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "bench.json", report)
    md = markdown_table(report)
    atomic_write(d / "bench.md", lambda p: p.write_text(md))
    paths = [d / "bench.json", d / "bench.md"]
    if plot:
        try:
            plot_png(report, d / "bench.png")
            paths.append(d / "bench.png")
        except ImportError:
            pass
    return paths
