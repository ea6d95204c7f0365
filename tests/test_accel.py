"""Accelerated settings: adaptive anchors, scale skipping and ``freqar eval --accel`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_pipeline
from freqar.cli import main
from freqar.errors import InvalidOption
from freqar.eval import fid
from freqar.eval.accel import parse_accel
from freqar.pipeline import Pipeline
from freqar.policies import make_policy
from freqar.policies.skip import build_accel, split_method
from freqar.policies.sparsevar import SparseVARConfig, adaptive_anchors, anchor_count, anchor_mask
from train_helpers import write_manifest_dataset

PN = (1, 2, 4, 6, 8)
LABELS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(patch_nums=PN, depth=3)


def _run(pipe: Pipeline, policy=None):
    return pipe.generate(LABELS, seed=3, policy=policy, cfg=1.5)


@pytest.mark.parametrize("low_fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_adaptive_anchors_keep_the_uniform_count_and_cost(low_fraction: float) -> None:
    g = torch.Generator().manual_seed(0)
    B, h, w, V, alpha = 3, 7, 9, 16, 2
    prev = torch.randn(B, h, w, V, generator=g)
    low = torch.rand(B, h * w, generator=g) < low_fraction
    grid = anchor_mask(h, w, alpha)
    n = anchor_count(h, w, alpha)
    assert int(grid.sum()) == n
    anchor, sim, pos = adaptive_anchors(prev, low, grid, reach=2 * alpha - 1)
    assert anchor.sum(dim=1).tolist() == [n] * B, "exactly the uniform grid's anchor count"
    # the same number inside the low set as the grid: the computed tokens are the grid's count
    assert (anchor & low).sum(dim=1).tolist() == (grid[None] & low).sum(dim=1).tolist()
    for b in range(B):
        reached = sim[b] > -torch.inf
        assert bool(anchor[b, pos[b][reached]].all()), "a token's best anchor must be an anchor"
        assert torch.allclose(sim[b][anchor[b]], torch.ones(n)), "an anchor covers itself"
    again = adaptive_anchors(prev, low, grid, reach=2 * alpha - 1)
    assert all(torch.equal(x, y) for x, y in zip(again, (anchor, sim, pos), strict=True))


def test_adaptive_anchors_in_the_policy(pipe: Pipeline) -> None:
    pol = make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2, anchors="adaptive")
    out = _run(pipe, pol)
    st = out.policy_state
    h, w = PN[-1], PN[-1]
    assert st.anchor_l.shape == (len(LABELS), h * w)
    assert st.anchor_l.sum(dim=1).tolist() == [anchor_count(h, w, 2)] * len(LABELS)
    assert bool((st.computed_Bl | ~st.anchor_l).all()), "anchors are computed"
    uniform = _run(pipe, make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2))
    assert not torch.equal(out.images, uniform.images)


def test_invalid_knob_combinations_are_one_line() -> None:
    with pytest.raises(InvalidOption, match="threshold mode"):
        SparseVARConfig(anchors="adaptive", keep=0.5)
    with pytest.raises(InvalidOption, match="anchors must be one of"):
        SparseVARConfig(anchors="random")
    with pytest.raises(InvalidOption, match="unknown accelerated method"):
        split_method("sparsevar+fastvar")
    with pytest.raises(InvalidOption, match="needs a '\\+skip' method"):
        build_accel("sparsevar", {"skip": 1})
    with pytest.raises(InvalidOption, match="takes no token-policy knobs"):
        build_accel("skip", {"tau": 0.5})
    with pytest.raises(InvalidOption, match="key=value"):
        parse_accel("sparsevar:tau")


@pytest.mark.parametrize(
    ("method", "knobs"),
    [
        ("skip", {"skip": 0}),
        ("sparsevar+skip", {"skip": 0, "tau": 0.0, "alpha": 2}),
        ("fastvar+skip", {"skip": 0, "keep": 1.0}),
    ],
)
def test_skip_and_exclusion_disabled_is_bit_identical(pipe: Pipeline, method: str, knobs: dict) -> None:
    dense = _run(pipe)
    out = _run(pipe, build_accel(method, knobs))
    assert torch.equal(dense.images, out.images)
    assert all(torch.equal(a, b) for a, b in zip(dense.tokens, out.tokens, strict=True))


def test_skip_runs_the_same_early_stages(pipe: Pipeline) -> None:
    dense = _run(pipe)
    out = _run(pipe, build_accel("skip", {"skip": 2}))
    assert len(out.tokens) == len(PN) - 2
    for a, b in zip(out.tokens, dense.tokens, strict=False):
        assert torch.equal(a, b), "guidance and sampling must see the full schedule"
    assert not torch.equal(out.images, dense.images)


def test_skip_errors_name_the_problem(pipe: Pipeline) -> None:
    with pytest.raises(InvalidOption, match="leaves no stage"):
        _run(pipe, build_accel("skip", {"skip": len(PN)}))
    with pytest.raises(InvalidOption, match="is skipped"):
        _run(pipe, build_accel("sparsevar+skip", {"skip": 2, "start_stage": 3}))


def test_parse_accel_expands_the_tau_sweep_with_the_default() -> None:
    s = parse_accel("sparsevar:anchors=adaptive,fastvar+skip:skip=2:drop=0.4/0.5,sparsevar:keep=0.7", [0.3])
    assert [(x.method, x.knobs) for x in s] == [
        ("sparsevar", {"tau": 0.3, "anchors": "adaptive"}),
        ("sparsevar", {"tau": 0.6, "anchors": "adaptive"}),
        ("fastvar+skip", {"skip": 2, "drop": (0.4, 0.5)}),
        ("sparsevar", {"keep": 0.7}),  # a budget ignores τ: not expanded
    ]


def test_eval_accel_end_to_end(pipe: Pipeline, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(fid, "lite0_feature_net", lambda: fid.random_feature_net(8))
    data = write_manifest_dataset(tmp_path / "data", n=24, size=16)
    model = pipe.save(tmp_path / "model")
    out = tmp_path / "out"
    base = ["eval", "--model", str(model), "--data", str(data), "--samples", "4", "--batch", "2"]
    rc = main([*base, "--out", str(out), "--accel", "sparsevar,skip", "--taus", "0.3", "--kid-subsets", "2"])
    assert rc == 0
    rep = json.loads((out / "accel.json").read_text())
    rows = rep["results"]
    assert [r["setting"] for r in rows] == [
        "dense",
        "dense (other seeds)",
        "sparsevar tau=0.3",
        "sparsevar tau=0.6",
        "skip",
    ]
    keys = ("fd", "fd_floor", "fd_ceiling", "fd_normalized", "fd_increase", "kid", "seconds_per_image")
    keys += ("speedup_vs_dense", "token_fraction", "psnr_db", "ssim", "method", "knobs")
    assert all(k in r for r in rows for k in keys)
    assert rows[0]["bit_identical_to_dense"] and rows[0]["fd_increase"] == 0.0
    assert not rows[1]["bit_identical_to_dense"], "the noise row uses other seeds"
    assert rows[4]["token_fraction"] < 1.0 and rows[4]["knobs"] == {"skip": 1}
    assert rows[3]["is_default_sparsevar"] and rows[3]["knobs"]["block_source"] == "default"
    assert rep["sparsevar_default"]["setting"] == "sparsevar tau=0.6"
    assert rep["bootstrap"] == 100 and rows[0]["fd_increase_ci95"] == [0.0, 0.0]
    for r in rows[1:]:
        lo, hi = r["fd_increase_ci95"]
        assert lo <= hi
    assert rep["sparsevar_default"]["fd_verdict_ci95"] in ("met", "not met", "inconclusive")
    assert "95% CI (paired bootstrap)" in (out / "accel.md").read_text()
    for name in ("accel.md", "accel.png", "accel_samples.png"):
        assert (out / name).is_file()
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--accel", "skip", "--bootstrap", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bootstrap must be >= 0" in err[0]
    assert main([*base, "--out", str(out), "--accel", "sparsevar+bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown accelerated method" in err[0]


def test_paired_bootstrap_interval() -> None:
    """Identical rows give [0, 0]; a shifted row's interval excludes 0; the draw is seeded."""
    from freqar.eval.accel import fd_verdict, paired_fd_increase_ci

    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 6))
    mu, sig = fid.stats(train)

    def to_train(f: np.ndarray) -> float:
        return fid.frechet_distance(mu, sig, *fid.stats(f))

    dense = rng.normal(size=(120, 6)) + 0.3
    same = dense.copy()
    worse = dense + 0.5  # every sample moved further from the train set
    near = dense + rng.normal(scale=0.05, size=dense.shape)
    cis = paired_fd_increase_ci([dense, same, worse, near], to_train, reps=60, seed=1)
    assert cis[0] == [0.0, 0.0] and cis[1] == [0.0, 0.0]
    assert cis[2][0] > 0.5, "the shift raises FD in every resample"
    assert cis[3][0] < cis[3][1] and cis[3][1] < cis[2][0]
    for f, (lo, hi) in zip([worse, near], cis[2:], strict=True):  # centred on the measured increase
        assert lo <= to_train(f) / to_train(dense) - 1.0 <= hi
    assert cis == paired_fd_increase_ci([dense, same, worse, near], to_train, reps=60, seed=1)
    with pytest.raises(ValueError):
        paired_fd_increase_ci([dense, dense[:10]], to_train, reps=5)
    assert fd_verdict([0.01, 0.04], 0.05) == "met"
    assert fd_verdict([0.06, 0.2], 0.05) == "not met"
    assert fd_verdict([0.02, 0.08], 0.05) == "inconclusive"
    assert fd_verdict(None, 0.05) is None
