"""``freqar bench --scenario far-emoji``: the bundled trained FAR model (not random weights) in the bench."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from freqar.bench import get_scenario, run_bench, scenarios
from freqar.errors import InvalidOption
from freqar.models.far_pipeline import create_far_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_far_emoji_scenario_is_registered_with_the_models_settings() -> None:
    sc = scenarios()["far-emoji"]
    pipe = create_far_model("far-emoji")
    assert sc.family == "far" and sc.model == "far-emoji"
    assert sc.patch_nums == pipe.tokenizer().levels == (0, 1, 2, 3, 4, 5, 6, 7)
    assert (sc.steps, sc.cfg, sc.resolution) == (pipe.defaults.steps, pipe.defaults.cfg, pipe.image_size)


def test_far_emoji_bench_runs_on_the_trained_weights() -> None:
    sc = dataclasses.replace(get_scenario("far-emoji"), steps="2")  # 2 diffusion steps: a smoke run
    runner = sc.runner("cpu", 1, 0)
    trained = create_far_model("far-emoji").transformer.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in runner.pipe.transformer.state_dict().items())
    assert runner.steps == 2 and runner.head_rows == [1] + [2] * 7  # level 0: guidance scale 1
    rep = run_bench(sc, methods=["dense", "farskip"], taus=[], budgets=[0.5], runs=1, warmup=0)
    rows = {r["setting"]: r for r in rep["results"]}
    assert list(rows) == ["dense", "farskip tau=0 (disabled)", "farskip keep=0.5"]
    assert rows["farskip tau=0 (disabled)"]["bit_identical_to_dense"] is True
    keep = rows["farskip keep=0.5"]
    assert keep["tokens_computed_fraction_sparse_stages"] == pytest.approx(0.5)  # from P = 4
    for r in rows.values():
        assert r["diffusion_head_seconds"] > 0 and r["decode_seconds"] > 0
        assert r["flops_diffusion_head"] > 0 and r["efficiency"] > 0 and "speedup_end_to_end" in r
    assert keep["flops_diffusion_head"] < rows["dense"]["flops_diffusion_head"]
    assert rep["scenario"]["model"] == "far-emoji"
    with pytest.raises(InvalidOption, match="sparsevar does not apply to the far scenario 'far-emoji'"):
        run_bench(sc, methods=["dense", "sparsevar"], taus=[], budgets=[], runs=1)
