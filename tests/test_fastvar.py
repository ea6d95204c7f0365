"""FastVAR peer policy: pruning counts, cached restoration, KV contents and the no-op setting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_pipeline
from freqar.errors import InvalidOption
from freqar.pipeline import Pipeline
from freqar.policies import make_policy
from freqar.policies.fastvar import FastVARConfig

PN = (1, 2, 4, 6, 8)
LABELS = [0, 1, 2]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(patch_nums=PN, depth=3)


def _run(pipe: Pipeline, policy=None, **kw):
    return pipe.generate(LABELS, seed=5, cfg=1.5, policy=policy, **kw)


def test_keep_one_is_bit_identical_to_dense(pipe: Pipeline) -> None:
    dense = _run(pipe)
    fast = _run(pipe, make_policy("fastvar", keep=1.0))
    assert torch.equal(dense.images, fast.images)


def test_default_ratios_prune_l_minus_floor_lr(pipe: Pipeline) -> None:
    out = _run(pipe, make_policy("fastvar"))
    P = len(PN) - 4
    drops = (0.4, 0.5, 0.5, 0.75)
    for k, p in enumerate(PN):
        l = p * p
        want = l if k < P else l - int(l * drops[k - P])
        assert out.tokens_computed[k] == [want] * len(LABELS)


def test_pruned_tokens_restore_the_cache_stage_logits(pipe: Pipeline) -> None:
    out = _run(pipe, make_policy("fastvar", keep=0.5, start_stage=3), record_logits=True)
    cache = out.logits[2]  # stage 2 (4x4) is the dense cache stage
    B, _, V = cache.shape
    for k in (3, 4):
        p = PN[k]
        restored = F.interpolate(cache.transpose(1, 2).reshape(B, V, 4, 4), size=(p, p), mode="area")
        restored = restored.flatten(2).transpose(1, 2)
        same = (out.logits[k] == restored).all(dim=-1)  # (B, l): restored rows match exactly
        n_kept = out.tokens_computed[k][0]
        assert (same.sum(dim=1) >= p * p - n_kept).all()


def test_kv_cache_holds_only_kept_tokens(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    caches = []
    orig = pipe.transformer.new_cache
    monkeypatch.setattr(
        pipe.transformer, "new_cache", lambda *a, **kw: caches.append(orig(*a, **kw)) or caches[-1]
    )
    out = _run(pipe, make_policy("fastvar", keep=0.3))
    per_sample = torch.tensor(out.tokens_computed).sum(dim=0)
    assert caches[0].length == int(per_sample[0]) < sum(p * p for p in PN)


@pytest.mark.parametrize(
    "knobs, words",
    [({"drop": (1.0,)}, "drop ratios"), ({"keep": 1.5}, "keep"), ({"start_stage": 0}, "start stage")],
)
def test_invalid_knobs(knobs: dict, words: str) -> None:
    with pytest.raises(InvalidOption) as e:
        FastVARConfig(**knobs)
    assert words in str(e.value)


def test_cache_stage_must_precede_pruning() -> None:
    with pytest.raises(InvalidOption, match="cache stage 3 must come before"):
        FastVARConfig(start_stage=2, cache_stage=3).resolve(5)
