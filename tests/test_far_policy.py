"""``farskip``: token exclusion on FAR's frequency levels (far-tiny, random weights, DDIM 4 steps)."""

from __future__ import annotations

import pytest
import torch

from freqar.cli import main
from freqar.errors import InvalidOption
from freqar.heads.diffusion_mlp import DiffusionMLP
from freqar.models.far_pipeline import create_far_model
from freqar.policies import FARSkipConfig, make_policy
from freqar.tokenizers.frequency import FrequencyTokenizer

LABELS = [1, 7]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return create_far_model("far-tiny")


@pytest.fixture(scope="module")
def dense(pipe):
    return pipe.generate(LABELS, seed=3)


@pytest.mark.parametrize("knobs", [{"tau": 0.0}, {"start_stage": 10}, {"keep": 1.0}])
def test_disabled_is_bit_identical_to_dense(pipe, dense, knobs) -> None:
    out = pipe.generate(LABELS, seed=3, policy=make_policy("farskip", **knobs))
    assert torch.equal(out.images, dense.images)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, dense.tokens, strict=True))
    assert out.policy_stats == []


def test_keep_budget_computes_exactly_the_requested_tokens(pipe, dense, monkeypatch) -> None:
    rows: list[int] = []
    real = DiffusionMLP.sample

    def counting(self, cond, **kw):
        rows.append(kw["batch"])
        return real(self, cond, **kw)

    monkeypatch.setattr(DiffusionMLP, "sample", counting)
    out = pipe.generate(LABELS, seed=3, policy=make_policy("farskip", keep=0.3, start_stage=6))
    l, B, n = 256, len(LABELS), round(0.3 * 256)
    assert out.tokens_computed == [[l] * B] * 6 + [[n] * B] * 4
    assert rows == [B * l] * 6 + [B * n] * 4  # the diffusion head samples the computed rows only
    assert [s["computed"] for s in out.policy_stats] == [[n] * B] * 4
    assert not torch.equal(out.images, dense.images)


def test_excluded_tokens_keep_their_previous_value(pipe, monkeypatch) -> None:
    canvases: list[torch.Tensor] = []
    real = FrequencyTokenizer.update

    def recording(self, canvas, h, stage, keep=None):
        new = real(self, canvas, h, stage, keep)
        canvases.append(new.clone())
        return new

    monkeypatch.setattr(FrequencyTokenizer, "update", recording)
    out = pipe.generate(LABELS, seed=3, policy=make_policy("farskip", tau=0.3, start_stage=5))
    masks = out.policy_state.masks
    assert len(masks) == 5
    for j, computed in enumerate(masks):
        k = 5 + j
        excluded = ~computed.unsqueeze(1).expand_as(canvases[k])
        assert excluded.any()
        assert torch.equal(canvases[k][excluded], canvases[k - 1][excluded])
        assert not torch.equal(canvases[k][~excluded], canvases[k - 1][~excluded])
    # monotone: a token excluded at one level is excluded at every later one
    for a, b in zip(masks, masks[1:], strict=False):
        assert not bool((b & ~a).any())


def test_threshold_batch_computes_equal_counts(pipe) -> None:
    out = pipe.generate(LABELS, seed=3, policy=make_policy("farskip", tau=0.2))
    for counts in out.tokens_computed:
        assert len(set(counts)) == 1
    assert sum(out.tokens_computed[-1]) < 256 * len(LABELS)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"tau": 1.5}, "tau must be in"),
        ({"tau": -0.1}, "tau must be in"),
        ({"keep": 0.0}, "keep budget must be in"),
        ({"keep": 1.2}, "keep budget must be in"),
        ({"start_stage": 1}, "start stage must be an integer >= 2"),
        ({"alpha": 4}, "has no option alpha"),
    ],
)
def test_bad_knobs_are_one_line_errors(knobs, match) -> None:
    with pytest.raises(InvalidOption, match=match) as e:
        make_policy("farskip", **knobs)
    assert "\n" not in str(e.value)


def test_default_start_stage() -> None:
    assert FARSkipConfig().resolve(10) == 5 and FARSkipConfig().resolve(3) == 2
    assert FARSkipConfig(start_stage=4).resolve(10) == 4


def test_cli_generate_far_with_accel_farskip(tmp_path, capsys) -> None:
    out = tmp_path / "far.png"
    rc = main(
        ["generate", "--model", "far-tiny", "--labels", "1", "--accel", "farskip", "--keep", "0.5",
         "--quiet", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0 and out.is_file()
    assert "farskip: computed" in capsys.readouterr().out
    assert main(["generate", "--model", "far-tiny", "--accel", "farskip", "--alpha", "2", "--out", str(out)])
    assert "--alpha applies to --accel sparsevar, not --accel farskip" in capsys.readouterr().err
