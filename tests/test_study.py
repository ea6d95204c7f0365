"""Probe-block calibration (deterministic, refused on tiny sets, stored and found) and ``freqar study``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_pipeline
from freqar.calibrate import (
    CALIBRATION_NAME,
    CalibrationError,
    CalibrationSettings,
    calibrate,
    calibrated_block,
    with_calibrated_block,
)
from freqar.cli import main
from freqar.eval import fid
from freqar.pipeline import Pipeline
from freqar.policies import make_policy
from train_helpers import write_manifest_dataset

PN = (1, 2, 4, 6, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(patch_nums=PN, depth=3)


def test_calibration_is_deterministic_for_a_seed(pipe: Pipeline) -> None:
    s = CalibrationSettings(samples=8, batch=4, seed=5)
    a, b = calibrate(pipe, s), calibrate(pipe, s)
    assert a == b
    assert 0 <= a["block"] < 3 and len(a["scores"]["spearman"]) == 3
    assert a["block"] == max(range(3), key=lambda i: a["scores"]["spearman"][i])
    assert set(a["per_stage_spearman"]) == {"1", "2", "3", "4"}  # P = max(1, 5 - 4)
    assert -1.0 <= a["scores"]["entropy_spearman"] <= 1.0 and a["scores"]["entropy_spearman"] != 0.0
    assert calibrate(pipe, CalibrationSettings(samples=8, batch=4, seed=6))["labels"] != a["labels"]


@pytest.mark.parametrize("n", [0, 3])
def test_calibration_refuses_tiny_sample_sets(pipe: Pipeline, n: int) -> None:
    with pytest.raises(CalibrationError, match="at least 8 samples"):
        calibrate(pipe, CalibrationSettings(samples=n))


def test_calibration_refuses_a_single_block() -> None:
    with pytest.raises(CalibrationError, match="no probe block to choose"):
        calibrate(tiny_pipeline(patch_nums=PN, depth=1), CalibrationSettings(samples=8))


def test_calibration_is_stored_and_used_by_default(pipe: Pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FREQAR_CONFIG_DIR", str(tmp_path / "config"))
    model = pipe.save(tmp_path / "model")
    assert main(["calibrate", "--model", str(model), "--samples", "8", "--batch", "8"]) == 0
    stored = json.loads((model / CALIBRATION_NAME).read_text())
    assert calibrated_block(pipe, str(model)) == stored["block"]
    pol = with_calibrated_block(make_policy("sparsevar"), pipe, str(model))
    assert pol.cfg.block == stored["block"]
    assert with_calibrated_block(make_policy("sparsevar", block=0), pipe, str(model)).cfg.block == 0
    # a preset name (bundled model): the user config dir, keyed by the weights
    assert calibrated_block(pipe, "tiny") is None
    assert (
        main(["calibrate", "--model", str(model), "--samples", "8", "--out", str(tmp_path / "c.json")]) == 0
    )
    other = tiny_pipeline(patch_nums=PN, depth=3, seed=1)
    assert calibrated_block(other, str(model)) is None, "another model's weights must not use it"
    with pytest.raises(CalibrationError, match="other weights"):
        calibrated_block(other, "x", tmp_path / "c.json")


def test_study_runs_end_to_end(pipe: Pipeline, tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(fid, "lite0_feature_net", lambda: fid.random_feature_net(8))
    data = write_manifest_dataset(tmp_path / "data", n=24, size=16)
    model = pipe.save(tmp_path / "model")
    out = tmp_path / "study"
    args = ["study", "--quick", "--model", str(model), "--data", str(data), "--out", str(out)]
    opts = ["--samples", "4", "--batch", "4", "--calibration-samples", "8", "--bootstrap", "3"]
    assert main([*args, *opts]) == 0
    rep = json.loads((out / "study.json").read_text())
    rows = rep["results"]
    for r in rows:
        for k in (
            "method",
            "knobs",
            "speedup_vs_dense",
            "fd_increase",
            "groups",
            "pareto",
            "fd_increase_ci95",
        ):
            assert k in r
    methods = {r["method"] for r in rows}
    assert {"dense", "sparsevar", "sparsevar+skip", "skip", "fastvar", "fastvar+skip"} <= methods
    assert any(r["knobs"].get("anchors") == "adaptive" for r in rows)
    groups = {g for r in rows for g in r["groups"]}
    assert {"tau", "anchors", "alpha", "beta", "P", "s", "skip", "fastvar", "signal"} <= groups
    by_signal = {r["knobs"].get("signal"): r for r in rows if "signal" in r["groups"]}
    assert set(by_signal) == {"dF", "entropy"}  # one budget in --quick, the same token count for both
    assert by_signal["dF"]["token_fraction"] == by_signal["entropy"]["token_fraction"]
    assert len({json.dumps([r["method"], r["knobs"]], sort_keys=True) for r in rows}) == len(rows)
    assert rep["calibration"]["block"] in range(3)
    assert {"adaptive_vs_uniform", "best_within_5pct", "skip_effect"} <= set(rep["summary"])
    for name in ("study.md", "study.png", "study_samples.png"):
        assert (out / name).is_file()


def test_bundled_emoji_ships_its_calibration(tmp_path: Path, monkeypatch) -> None:
    """The wheel's emoji model carries a calibration for exactly its weights (a fresh user, empty config
    dir, gets the calibrated probe block); reshipping weights without recalibrating fails here."""
    from freqar.registry import bundled_dir, create_model

    d = bundled_dir("emoji")
    if d is None:
        pytest.skip("bundled emoji weights not installed")
    monkeypatch.setenv("FREQAR_CONFIG_DIR", str(tmp_path / "empty"))
    stored = json.loads((d / CALIBRATION_NAME).read_text())
    assert calibrated_block(create_model("emoji"), "emoji") == stored["block"]
