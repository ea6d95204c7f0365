"""``freqar bench`` smoke test on the tiny scenario, its metrics, and the generate --accel options."""

from __future__ import annotations

import json

import pytest
import torch

from freqar.bench import (
    Setting,
    get_scenario,
    hart_flops,
    infinity_flops,
    plan_settings,
    psnr,
    run_bench,
    ssim,
    transformer_flops,
    write_report,
)
from freqar.cli import main
from freqar.errors import InvalidOption
from freqar.models.var import VARConfig

FIELDS = {
    "latency_median_s",
    "speedup_vs_dense",
    "ideal_speedup",
    "efficiency",
    "tokens_computed_fraction",
    "stage_latency_median_s",
    "stage_tokens",
    "peak_memory_mb",
    "psnr_db",
    "ssim",
    "token_agreement",
}


def test_bench_tiny_writes_json_md_png(tmp_path) -> None:
    report = run_bench(
        get_scenario("tiny"),
        methods=["dense", "sparsevar", "fastvar"],
        taus=[0.9],
        budgets=[0.3],
        runs=1,
        warmup=0,
    )
    paths = write_report(report, tmp_path / "b")
    assert {p.name for p in paths} == {"bench.json", "bench.md", "bench.png"}
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    labels = [r["setting"] for r in data["results"]]
    assert labels[0] == "dense" and "sparsevar keep=0.3" in labels and "fastvar keep=0.3" in labels
    for r in data["results"]:
        assert FIELDS <= set(r)
        assert len(r["stage_tokens"]) == len(data["scenario"]["patch_nums"])
    disabled = next(r for r in data["results"] if r["mode"] == "disabled")
    assert disabled["bit_identical_to_dense"] is True
    budget = next(r for r in data["results"] if r["setting"] == "sparsevar keep=0.3")
    assert budget["ideal_speedup"] > 1 and budget["tokens_computed_fraction"] < 1
    assert data["results"][0]["psnr_db"] is None  # dense vs itself: identical (infinite PSNR)
    assert "| sparsevar | sparsevar keep=0.3 |" in (tmp_path / "b" / "bench.md").read_text()


@pytest.mark.parametrize("name", ["infinity-tiny", "hart-tiny"])
def test_bench_infinity_and_hart_tiny(tmp_path, name) -> None:
    report = run_bench(
        get_scenario(name), methods=["dense", "sparsevar"], taus=[], budgets=[0.5], runs=1, warmup=0
    )
    write_report(report, tmp_path, plot=False)
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["setting"]: r for r in data["results"]}
    for r in rows.values():
        assert FIELDS | {"kv_cache_mb", "kv_cache_allocated_mb", "peak_memory_delta_mb", "flops"} <= set(r)
    assert rows["sparsevar tau=0 (disabled)"]["bit_identical_to_dense"] is True
    dense = rows["dense"]
    budgets = [r for r in rows.values() if r["mode"] == "budget"]
    assert len(budgets) == (3 if name == "hart-tiny" else 1)  # HART: skip / anchor / cond
    for r in budgets:
        assert r["ideal_speedup"] > 1 and 0 < r["kv_cache_mb"] < dense["kv_cache_mb"]
    if name == "hart-tiny":
        assert {r["options"]["excluded"] for r in budgets} == {"skip", "anchor", "cond"}
        assert all("diffusion_head_seconds" in r for r in rows.values())
        cond = next(r for r in budgets if r["options"]["excluded"] == "cond")
        skip = next(r for r in budgets if r["options"]["excluded"] == "skip")
        assert cond["ideal_speedup"] < skip["ideal_speedup"]  # cond runs the head on every token
    assert "| sparsevar |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("name", ["infinity-tiny", "hart-tiny"])
def test_flop_model_matches_counted_matmuls(name) -> None:
    """The FLOP model without the attention products equals the counted linear FLOPs of a dense run (decode
    excluded): cross-attention, the bitwise head and the diffusion head's MLP are all in it."""
    from torch.utils.flop_counter import FlopCounterMode

    sc = get_scenario(name)
    runner = sc.runner("cpu", 1, 0)
    dense = Setting("dense", "dense", mode="dense")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out, _, _ = runner.generate(dense, 0, None)
    counts = fc.get_flop_counts()["Global"]
    counted = sum(v for k, v in counts.items() if str(k) in ("aten.addmm", "aten.mm"))
    tokens = [float(h * w) for h, w in out.grids]
    if name == "infinity-tiny":
        model = infinity_flops(sc.config(), tokens, 2, sc.text_len, attention=False)
    else:
        model = hart_flops(sc.config(), tokens, 2, tokens[-1], attention=False)
    assert abs(model / counted - 1) < 0.03


def test_bench_far_tiny_split_and_flops(tmp_path) -> None:
    """far-tiny: dense vs farskip, latency split, the disabled check, and the FAR FLOP model (linear part)
    against the counted matmuls of dense and keep-budget runs (kept tokens in encoder and diffusion head)."""
    from torch.utils.flop_counter import FlopCounterMode

    from freqar.bench_far import far_flops
    from freqar.policies import make_policy

    report = run_bench(
        get_scenario("far-tiny"), methods=["dense", "farskip"], taus=[0.2], budgets=[0.3], runs=1, warmup=0
    )
    write_report(report, tmp_path, plot=False)
    rows = {r["setting"]: r for r in report["results"]}
    assert rows["farskip tau=0 (disabled)"]["bit_identical_to_dense"] is True
    budget = rows["farskip keep=0.3"]
    assert budget["stage_tokens"] == [256.0] * 5 + [77.0] * 5 and budget["ideal_speedup"] > 1
    for r in rows.values():
        assert {"diffusion_head_seconds", "decode_seconds", "speedup_end_to_end", "blocks_seconds"} <= set(r)
        assert r["blocks_seconds"] + r["diffusion_head_seconds"] <= r["latency_median_s"]
    assert "| farskip | farskip keep=0.3 |" in (tmp_path / "bench.md").read_text()
    runner = get_scenario("far-tiny").runner("cpu", 1, 0)
    for pol in (None, make_policy("farskip", keep=0.3)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out, _, _ = runner.generate(Setting("x", "x"), 0, pol)
        counts = fc.get_flop_counts()["Global"]
        counted = sum(v for k, v in counts.items() if str(k) in ("aten.addmm", "aten.mm"))
        tokens = [float(sum(c)) for c in out.tokens_computed]
        model = sum(far_flops(runner.cfg, tokens, runner.head_rows, runner.steps, attention=False))
        assert abs(model / counted - 1) < 0.03


def test_flop_model_and_fidelity_metrics() -> None:
    cfg = VARConfig(depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 4), vocab_size=16, z_channels=4)
    dense = transformer_flops(cfg, [1, 4, 16], rows=2)
    half = transformer_flops(cfg, [1, 4, 8], rows=2)
    assert dense == 2 * transformer_flops(cfg, [1, 4, 16], rows=1)
    assert 1 < dense / half < 2
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(img, img) == float("inf") and abs(ssim(img, img) - 1) < 1e-6
    assert psnr(img, img.flip(-1)) < 20 and ssim(img, img.flip(-1)) < 0.5


def test_plan_rejects_bad_inputs() -> None:
    with pytest.raises(InvalidOption, match="unknown bench method"):
        plan_settings(["dense", "turbo"], [], [])
    with pytest.raises(InvalidOption, match="budgets"):
        plan_settings(["sparsevar"], [], [1.5])
    with pytest.raises(InvalidOption, match="--signal must be one of dF, entropy"):
        plan_settings(["sparsevar"], [0.5], [], "ent")
    with pytest.raises(InvalidOption, match="applies to the sparsevar method"):
        plan_settings(["dense", "fastvar"], [], [0.5], "entropy")
    with pytest.raises(InvalidOption, match="unknown scenario"):
        get_scenario("var-d99")
    with pytest.raises(InvalidOption, match="does not apply to the far scenario"):
        run_bench(get_scenario("far-tiny"), methods=["dense", "sparsevar"], taus=[], budgets=[], runs=1)
    with pytest.raises(InvalidOption, match="farskip does not apply to the var scenario"):
        run_bench(get_scenario("tiny"), methods=["farskip"], taus=[], budgets=[], runs=1)


def test_plan_carries_the_signal_to_every_sparsevar_setting() -> None:
    plan = plan_settings(["dense", "sparsevar", "fastvar"], [0.6], [0.5], "entropy")
    sv = [s for s in plan if s.method == "sparsevar"]
    assert len(sv) == 3 and all(s.knobs["signal"] == "entropy" and "signal=entropy" in s.label for s in sv)
    assert all("signal" not in s.knobs for s in plan if s.method != "sparsevar")
    assert all("signal" not in s.knobs for s in plan_settings(["sparsevar"], [0.6], [0.5]))  # dF: as before


def test_cli_bench_list_and_errors(capsys) -> None:
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "var-d16" in listed and "infinity-1024" in listed and "tiny" in listed
    assert main(["bench", "--scenario", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freqar: error: unknown scenario") and err.count("\n") == 1


def test_depth_override_runs_that_many_blocks(tmp_path, capsys) -> None:
    """--depth: a depth-cut scenario runs the blocks asked for; at the full depth no estimate is made;
    scenarios without a cut, or a depth outside [1, full], are one-line errors."""
    from freqar.bench import with_depth

    cut = with_depth(get_scenario("hart-tiny"), 1)
    assert cut.depth == 1 and cut.full_depth == 2
    report = run_bench(cut, methods=["dense"], taus=[], budgets=[], runs=1, warmup=0)
    assert report["depth"] == 1 and report["full_depth"] == 2
    assert "latency_full_depth_est_s" in report["results"][0]
    full = run_bench(get_scenario("hart-tiny"), methods=["dense"], taus=[], budgets=[], runs=1, warmup=0)
    assert "latency_full_depth_est_s" not in full["results"][0]
    assert "32 of 32 blocks run (--depth)" in with_depth(get_scenario("infinity-2b"), 32).description
    base = ["bench", "--runs", "1", "--warmup", "0", "--methods", "dense", "--taus", "", "--budgets", ""]
    for args, msg in (
        (["--scenario", "tiny", "--depth", "1"], "--depth applies to the depth-cut scenarios"),
        (["--scenario", "hart-tiny", "--depth", "3"], "--depth must be in [1, 2] for 'hart-tiny', got 3"),
    ):
        assert main([*base, *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


def test_cli_generate_accel_and_save_masks(tmp_path, capsys) -> None:
    out, masks = tmp_path / "s.png", tmp_path / "m.png"
    argv = ["generate", "--labels", "1,2", "--quiet", "--out", str(out)]
    assert (
        main(
            argv + ["--accel", "sparsevar", "--tau", "0.9", "--start-stage", "3", "--save-masks", str(masks)]
        )
        == 0
    )
    assert out.is_file() and masks.is_file()
    assert "sparsevar: computed" in capsys.readouterr().out
    assert main(argv + ["--accel", "fastvar", "--keep", "0.5"]) == 0
    for bad, words in [
        (["--tau", "0.5"], "--tau applies to --accel sparsevar"),
        (["--accel", "sparsevar", "--tau", "1.5"], "tau must be in [0, 1]"),
        (["--accel", "sparsevar", "--probe-block", "9"], "block 9 is outside"),
        (["--accel", "fastvar", "--save-masks", str(masks)], "--save-masks needs --accel sparsevar"),
    ]:
        capsys.readouterr()
        assert main(argv + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("freqar: error:") and words in err
