"""``freqar eval --accel farskip``: the eval --accel protocol on a FAR model (far-tiny, random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_pipeline
from freqar.cli import main
from freqar.errors import InvalidOption
from freqar.eval import fid
from freqar.eval.accel import AccelSetting, check_methods, farskip_verdict, parse_accel
from train_helpers import write_manifest_dataset

LEVELS, SIDE = 10, 16  # far-tiny: 10 levels over a 16x16 latent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(fid, "lite0_feature_net", lambda: fid.random_feature_net(8))
    return write_manifest_dataset(tmp_path / "data", n=24, size=16)


def test_parse_accel_expands_farskip_over_taus_only_without_tau_or_keep() -> None:
    s = parse_accel("farskip,farskip:start_stage=2,farskip:keep=0.5,farskip:tau=0", [0.4, 0.1])
    assert [(x.method, x.knobs) for x in s] == [
        ("farskip", {"tau": 0.1}),
        ("farskip", {"tau": 0.4}),
        ("farskip", {"tau": 0.1, "start_stage": 2}),
        ("farskip", {"tau": 0.4, "start_stage": 2}),
        ("farskip", {"keep": 0.5}),
        ("farskip", {"tau": 0}),
    ]
    assert s[2].label == "farskip tau=0.1 start_stage=2"
    with pytest.raises(InvalidOption, match="unknown accelerated method 'farskip\\+skip'.*farskip for FAR"):
        parse_accel("farskip+skip")


def test_eval_accel_farskip_end_to_end(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    accel = "farskip,farskip:tau=0:start_stage=2,farskip:keep=0.5:start_stage=2,farskip:start_stage=5"
    argv = ["eval", "--model", "far-tiny", "--data", str(data), "--samples", "4", "--batch", "2"]
    argv += ["--out", str(out), "--accel", accel, "--taus", "0.3", "--kid-subsets", "2"]
    assert main(argv) == 0
    rep = json.loads((out / "accel.json").read_text())
    assert rep["family"] == "far"
    rows = {r["setting"]: r for r in rep["results"]}
    # farskip tau=0.3 resolves to P = 5 (the default start level): one run, not two
    assert list(rows) == [
        "dense",
        "dense (other seeds)",
        "farskip tau=0.3",
        "farskip tau=0 start_stage=2",
        "farskip keep=0.5 start_stage=2",
    ]
    assert rows["farskip tau=0.3"]["knobs"]["start_stage"] == 5
    off = rows["farskip tau=0 start_stage=2"]
    assert off["knobs"]["disabled"] and off["bit_identical_to_dense"] and off["identical_images"] == 4
    assert off["psnr_db"] == rows["dense"]["psnr_db"] and off["fd"] == rows["dense"]["fd"]
    assert not rows["dense (other seeds)"]["bit_identical_to_dense"]
    keep = rows["farskip keep=0.5 start_stage=2"]
    # levels 0, 1 dense, levels 2..9 half of the 16x16 tokens
    assert keep["token_fraction"] == pytest.approx((2 + 0.5 * (LEVELS - 2)) / LEVELS)
    assert not keep["bit_identical_to_dense"]
    for r in rows.values():  # FAR's split: encoder-decoder, diffusion head, decode; the total is their sum
        split = [r[f"{k}_seconds_per_image"] for k in ("transformer", "head", "decode")]
        assert all(x > 0 for x in split) and r["seconds_per_image"] == pytest.approx(sum(split))
        assert {"fd_increase", "speedup_vs_dense", "head_speedup_vs_dense", "pareto"} <= set(r)
    assert rep["sparsevar_default"] is None and rep["farskip_target"]["targets"]["speedup_min"] == 1.5
    md = (out / "accel.md").read_text()
    assert "transformer / head / decode" in md and "**farskip**" in md and "SparseVAR" not in md
    for name in ("accel.md", "accel.png", "accel_samples.png"):
        assert (out / name).is_file()
    assert "farskip best within +5% FD" in capsys.readouterr().out


def test_wrong_family_methods_are_one_line_errors(data: Path, tmp_path: Path, capsys) -> None:
    var_model = tiny_pipeline(patch_nums=(1, 2, 4)).save(tmp_path / "var")
    base = ["eval", "--data", str(data), "--samples", "4", "--out", str(tmp_path / "o")]
    cases = [
        (["--model", "far-tiny", "--accel", "sparsevar"], "method 'sparsevar' is for VAR models, 'far-tiny' "
         "is a FAR model (it takes farskip)"),
        (["--model", "far-tiny", "--accel", "farskip,fastvar+skip"], "'fastvar+skip' is for VAR models"),
        (["--model", str(var_model), "--accel", "farskip"], "method 'farskip' is for FAR models, 'tiny' is "
         "a VAR model"),
        (["--model", "far-tiny", "--accel", "farskip:alpha=2"], "policy 'farskip' has no option alpha"),
        (["--model", "far-tiny", "--accel", "farskip:start_stage=1"], "farskip start stage must be"),
        (["--model", "far-tiny", "--accel", "farskip:start_stage=two"], "--accel farskip start_stage=two:"),
        (["--model", "far-tiny", "--accel", "farskip", "--top-k", "5"], "--top-k does not apply to FAR"),
        (["--model", "far-tiny", "--accel", "farskip", "--calibration", "x.json"], "applies to VAR models"),
        (["--model", "far-tiny", "--top-p", "0.5"], "--top-p does not apply to FAR"),
        (["--model", "far-tiny", "--late-from", "2"], "--late-from does not apply to FAR"),
        (["--model", str(var_model), "--late-temperature", "0"], "--late-temperature must be > 0"),
        (["--model", str(var_model), "--steps", "5"], "--steps applies to FAR models"),
        (["--model", "far-tiny", "--steps", "0"], "steps"),
        (["--model", "far-tiny", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", str(var_model), "--temperature", "0"], "temperature must be > 0"),
    ]  # fmt: skip
    for extra, msg in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (extra, err)


def test_eval_steps_reach_the_far_sampler(data: Path, tmp_path: Path, monkeypatch) -> None:
    """``freqar eval --steps/--temperature`` reach FAR's sampler and eval.json, not dropped."""
    from freqar.models import far_pipeline

    seen: list = []
    real = far_pipeline.FARPipeline.generate

    def spy(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        seen.append((kw.get("steps"), kw.get("temperature")))
        return real(self, *a, **kw)

    monkeypatch.setattr(far_pipeline.FARPipeline, "generate", spy)
    out = tmp_path / "o"
    argv = ["eval", "--model", "far-tiny", "--data", str(data), "--samples", "2", "--batch", "2"]
    extra = ["--steps", "ddim3", "--temperature", "0.4", "--kid-subsets", "2", "--out", str(out)]
    assert main([*argv, *extra]) == 0
    assert seen == [("ddim3", 0.4)]
    rec = json.loads((out / "eval.json").read_text())["settings"]
    assert rec["steps"] == "ddim3" and rec["temperature"] == 0.4


def test_check_methods_and_verdict_without_a_model() -> None:
    far = SimpleNamespace(family="far", name="m")
    check_methods(far, [AccelSetting("dense"), AccelSetting("farskip")])
    with pytest.raises(InvalidOption, match="needs a class-conditional VAR or FAR model"):
        check_methods(SimpleNamespace(family="infinity", name="i"), [AccelSetting("dense")])
    row = {"method": "farskip", "setting": "farskip tau=0.2", "knobs": {}}
    rep = {
        "results": [
            {"method": "dense", "setting": "dense", "knobs": {}, "fd_increase": 0.0, "speedup_vs_dense": 1.0},
            {**row, "fd_increase": 0.04, "speedup_vs_dense": 1.6},
            {**row, "setting": "farskip tau=0.4", "fd_increase": 0.08, "speedup_vs_dense": 2.5},
        ]
    }
    v = farskip_verdict(rep)
    assert v is not None and v["best_setting"] == "farskip tau=0.2" and v["target_met"]
    rep["results"][1]["speedup_vs_dense"] = 1.4
    assert not farskip_verdict(rep)["target_met"]
