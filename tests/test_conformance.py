"""Conformance against tensors recomputed by upstream VAR (copy of shared/conformance/var_tiny)."""

from __future__ import annotations

import shutil

import torch

from freqar.cli import main
from freqar.conformance import run


def test_var_tiny_every_row_passes(var_tiny_fixture):
    rows = run(var_tiny_fixture)
    assert len(rows) == 26
    bad = [(r.name, r.max_abs_err) for r in rows if not r.ok]
    assert not bad, bad
    ints = [r for r in rows if r.tol == 0.0]
    assert ints and all(r.max_abs_err == 0 for r in ints)


def test_cli_conformance_prints_rows_and_exits_zero(var_tiny_fixture, capsys):
    assert main(["conformance", str(var_tiny_fixture)]) == 0
    out = capsys.readouterr().out
    assert "26/26 tensors ok" in out and "gen.smooth.img" in out


def test_checker_detects_a_wrong_weight(var_tiny_fixture, tmp_path, capsys):
    """A checker that cannot fail proves nothing: perturb one transformer weight and expect FAIL rows."""
    d = tmp_path / "fx"
    shutil.copytree(var_tiny_fixture, d)
    for f in d.iterdir():
        f.chmod(0o644)
    state = torch.load(d / "var.pth", weights_only=True)
    state["blocks.1.ffn.fc2.bias"] = state["blocks.1.ffn.fc2.bias"] + 1e-2
    torch.save(state, d / "var.pth")
    rows = {r.name: r for r in run(d)}
    assert rows["enc.idx"].ok and rows["vae.recon"].ok  # the tokenizer is untouched
    assert not rows["tf.logits"].ok and not rows["gen.sample.logits_cfg"].ok
    assert main(["conformance", str(d)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_missing_fixture_file(tmp_path, capsys):
    assert main(["conformance", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freqar: error:") and "config.json" in err and "\n" not in err
