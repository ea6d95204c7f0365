"""Evaluation metrics: FD/KID identities, IS-like bounds, precision/recall, and the eval.json writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import tiny_pipeline
from freqar.eval.fid import (
    fd,
    frechet_distance,
    frechet_distance_to,
    inception_like_score,
    kid,
    precision_recall,
    psd_sqrt,
    random_feature_net,
    stats,
)
from freqar.eval.run import EvalSettings, evaluate
from train_helpers import write_manifest_dataset


def test_fd_of_a_set_with_itself_is_zero_and_shift_is_positive() -> None:
    x = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(fd(x, x)) < 1e-6
    assert fd(x, x + 0.5) > 16 * 0.25 * 0.9
    assert fd(x, x * 2) > 1.0


def test_fd_to_a_reference_without_the_covariance_matches() -> None:
    """The n×n route (fewer samples than features) gives the d×d route's number, and so does n >= d."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3
    mu, s = stats(ref)
    half = psd_sqrt(s)
    for n in (5, 40, 200):
        x = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
        want = frechet_distance(mu, s, *stats(x), s1_half=half)
        assert abs(frechet_distance_to(mu, s, half, x) - want) < 1e-7 * max(1.0, abs(want))
    assert abs(frechet_distance_to(mu, s, half, ref)) < 1e-6


def test_kid_is_near_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    assert abs(kid(a, b, subsets=20, subset_size=100)) < 0.05
    assert kid(a, b + 1.0, subsets=20, subset_size=100) > 0.1


def test_inception_like_score_bounds() -> None:
    assert abs(inception_like_score(np.zeros((10, 5))) - 1.0) < 1e-6
    confident = np.eye(5)[np.arange(10) % 5] * 50
    assert abs(inception_like_score(confident) - 5.0) < 1e-3


def test_precision_recall() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 4))
    p, r = precision_recall(real, real[:100])
    assert p == 1.0 and r > 0.3
    p, _ = precision_recall(real, real + 100)
    assert p == 0.0


def test_evaluate_writes_eval_json(tmp_path: Path) -> None:
    data = write_manifest_dataset(tmp_path / "data", n=24, size=8)
    pipe = tiny_pipeline()
    s = EvalSettings(samples=6, batch=3, kid_subsets=5, kid_subset_size=3)
    res = evaluate(pipe, data, tmp_path / "out", s, random_feature_net(8))
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    for key in ("fd", "fd_floor", "fd_ceiling", "inception_like_score", "precision", "recall", "settings"):
        assert key in saved
    assert all(np.isfinite(res[k]) for k in ("fd", "fd_floor", "fd_ceiling", "kid", "precision", "recall"))
    assert list(data.glob("features-*.npz"))  # reference stats cached
    assert np.isfinite(res["fd_reconstruction"]) and "fd_reconstruction_normalized" in saved
    assert 0.0 <= saved["class_accuracy"] <= 1.0 and 0.0 <= saved["class_accuracy_real"] <= 1.0
    assert len(saved["class_accuracy_per_class"]) == 3  # the tiny data set's three shapes
    assert (tmp_path / "out" / "samples_by_class.png").is_file()
    assert saved["settings"]["model_defaults"]["cfg"] == pipe.defaults.cfg  # what None resolved to


def test_eval_temperature_changes_var_samples(tmp_path: Path) -> None:
    """``EvalSettings.temperature`` reaches the VAR sampler: a low temperature gives other images."""
    from freqar.eval.run import generate_samples

    pipe = tiny_pipeline()
    s = EvalSettings(samples=2, batch=2)
    base, _ = generate_samples(pipe, [0, 1], s)
    same, _ = generate_samples(pipe, [0, 1], EvalSettings(samples=2, batch=2, temperature=1.0))
    cold, _ = generate_samples(pipe, [0, 1], EvalSettings(samples=2, batch=2, temperature=0.05))
    assert torch.equal(base, same) and not torch.equal(base, cold)
    late = EvalSettings(samples=2, batch=2, late_from=2, late_temperature=0.05)
    assert not torch.equal(base, generate_samples(pipe, [0, 1], late)[0])  # late settings reach it too


def test_linear_probe_class_accuracy() -> None:
    """Separable classes: the probe finds them (deterministically); shuffled labels score near chance;
    an unlabelled data set gets no class accuracy."""
    from freqar.eval.fid import LinearProbe
    from freqar.eval.run import EvalSettings, ReferenceScorer

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 16))
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(120, 16))
    probe = LinearProbe(x, y)
    acc, per = probe.accuracy(x, y)
    assert acc == 1.0 and per == [1.0, 1.0, 1.0]
    assert np.array_equal(probe.predict(x), LinearProbe(x, y).predict(x))
    y_test = np.repeat(np.arange(3), 30)
    x_test = centres[y_test] + rng.normal(size=(90, 16))
    assert probe.accuracy(x_test, y_test)[0] > 0.95
    assert probe.accuracy(x_test, rng.permutation(y_test))[0] < 0.6
    assert probe.accuracy(x_test[:30], y_test[:30])[1][1:] == [None, None]  # classes with no images
    ref = {"train": x, "train_labels": y, "heldout": x_test, "heldout_labels": y_test, "ceiling": x_test + 5}
    sc = ReferenceScorer(ref, EvalSettings(kid_subsets=2, kid_subset_size=20))
    r = sc.score(x_test, None, y_test)
    assert r["class_accuracy"] > 0.95 and r["class_accuracy_real"] == r["class_accuracy"]
    one = dict(ref, train_labels=np.zeros(120, dtype=np.int64))
    assert "class_accuracy" not in ReferenceScorer(
        one, EvalSettings(kid_subsets=2, kid_subset_size=20)
    ).score(x_test, None, y_test)
