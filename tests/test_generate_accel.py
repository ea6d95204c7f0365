"""`freqar generate --accel`: the study's default (auto), scale-skipping methods, adaptive anchors, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freqar.cli import main
from freqar.cli.generate import build_policy
from freqar.policies import SparseVARPolicy
from freqar.policies.skip import SkipPolicy
from freqar.registry import STUDIED_ACCEL, recommended_accel


def _args(model: str, accel: str, **kw: object) -> argparse.Namespace:
    opts = dict.fromkeys(
        (
            "tau",
            "alpha",
            "beta",
            "probe_block",
            "start_stage",
            "keep",
            "drop",
            "cache_stage",
            "anchors",
            "signal",
            "skip",
        )
    )
    opts.update(kw)
    return argparse.Namespace(model=model, accel=accel, save_masks=None, **opts)


def test_auto_is_the_studied_setting_or_sparsevar(monkeypatch: pytest.MonkeyPatch) -> None:
    assert recommended_accel("var-tiny") == ("sparsevar", {})
    assert isinstance(build_policy(_args("var-tiny", "auto")), SparseVARPolicy)
    assert build_policy(_args("far-tiny", "auto")).name == "farskip"
    far = build_policy(_args("far-emoji", "auto"))
    assert far.name == "farskip" and far.cfg.tau == STUDIED_ACCEL["far-emoji"][1]["tau"]
    assert build_policy(_args("far-emoji", "auto", tau=0.4)).cfg.tau == 0.4  # the user's knob wins
    monkeypatch.setitem(STUDIED_ACCEL, "var-tiny", ("fastvar+skip", {"skip": 2}))
    pol = build_policy(_args("var-tiny", "auto"))
    assert isinstance(pol, SkipPolicy) and pol.name == "fastvar+skip" and pol.cfg.skip == 2
    assert build_policy(_args("var-tiny", "auto", skip=1)).cfg.skip == 1  # the user's knob wins


def test_auto_on_emoji_is_the_studied_sparsevar_and_a_threshold_replaces_its_budget() -> None:
    method, knobs = STUDIED_ACCEL["emoji"]
    pol = build_policy(_args("emoji", "auto"))
    assert pol.name == method and pol.cfg.keep == knobs["keep"] and pol.cfg.beta == knobs["beta"]
    assert pol.cfg.start_stage == knobs["start_stage"] and pol.cfg.signal == knobs["signal"] == "entropy"
    assert build_policy(_args("emoji", "auto", signal="dF")).cfg.signal == "dF"  # the user's knob wins
    pol = build_policy(_args("emoji", "auto", tau=0.3))
    assert pol.cfg.keep is None and pol.cfg.tau == 0.3 and pol.cfg.beta == knobs["beta"]
    assert build_policy(_args("emoji", "auto", tau=0.3, keep=0.5)).cfg.keep == 0.5


def test_auto_names_the_studied_method_in_knob_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STUDIED_ACCEL, "var-tiny", ("fastvar+skip", {"skip": 2}))
    argv = ["generate", "--model", "var-tiny", "--labels", "0", "--quiet", "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--accel", "--tau", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "auto (= fastvar+skip" in err[0]


def test_skip_and_anchor_knobs_reach_the_policy() -> None:
    pol = build_policy(_args("var-tiny", "sparsevar+skip", skip=2, anchors="adaptive", tau=0.5))
    assert isinstance(pol, SkipPolicy) and pol.cfg.skip == 2
    assert pol.inner.cfg.anchors == "adaptive" and pol.inner.cfg.tau == 0.5
    assert build_policy(_args("var-tiny", "sparsevar", signal="entropy")).cfg.signal == "entropy"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_skip_zero_without_exclusion_is_dense(tmp_path: Path) -> None:
    base = ["generate", "--model", "var-tiny", "--labels", "0,1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "d.png")]) == 0
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "s.png"),
                "--accel",
                "sparsevar+skip",
                "--skip",
                "0",
                "--tau",
                "0",
            ]
        )
        == 0
    )
    assert np.array_equal(_pixels(tmp_path / "d.png"), _pixels(tmp_path / "s.png"))
    assert main([*base, "--out", str(tmp_path / "k.png"), "--accel", "skip"]) == 0
    assert not np.array_equal(_pixels(tmp_path / "d.png"), _pixels(tmp_path / "k.png"))


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--accel", "sparsevar", "--skip", "1"], "--skip applies to --accel skip"),
        (["--accel", "fastvar", "--anchors", "adaptive"], "--anchors applies to --accel sparsevar"),
        (["--accel", "skip", "--model", "far-tiny"], "scale skipping applies to VAR-family"),
        (["--accel", "skip", "--skip", "99"], "leaves no stage to run"),
    ],
)
def test_bad_accel_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], msg: str
) -> None:
    model = [] if "--model" in argv else ["--model", "var-tiny"]
    assert (
        main(["generate", *model, "--labels", "0", "--quiet", "--out", str(tmp_path / "x.png"), *argv]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
