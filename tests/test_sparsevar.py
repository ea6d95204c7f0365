"""SparseVAR as an engine policy: the disabled path, Eq. 2/3 semantics, batching and the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_pipeline
from freqar.errors import InvalidOption
from freqar.interfaces import Selection, StepOutput, materialize
from freqar.pipeline import Pipeline
from freqar.policies import make_policy
from freqar.policies.sparsevar import (
    ANCHOR,
    COMPUTED,
    COPIED,
    ZEROED,
    SparseVARConfig,
    SparseVARPolicy,
    SparseVARState,
    anchor_mask,
    best_anchor,
    mask_picture,
)

PN = (1, 2, 4, 6, 8)
LABELS = [0, 1, 2]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(patch_nums=PN, depth=3)


def _run(pipe: Pipeline, policy=None, labels=LABELS, **kw):
    kw.setdefault("cfg", 1.5)
    return pipe.generate(labels, seed=3, policy=policy, **kw)


@pytest.mark.parametrize(
    "knobs",
    [{"tau": 0.0}, {"start_stage": len(PN)}, {"keep": 1.0}, {"tau": 0.0, "signal": "entropy"}],
)
def test_disabled_is_bit_identical_to_dense(pipe: Pipeline, knobs: dict) -> None:
    dense = _run(pipe)
    sparse = _run(pipe, make_policy("sparsevar", alpha=2, **knobs))
    assert torch.equal(dense.images, sparse.images)
    for a, b in zip(dense.tokens, sparse.tokens, strict=True):
        assert torch.equal(a, b)
    assert sparse.tokens_computed == dense.tokens_computed


def _low_sets(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m != COMPUTED for m in masks]  # anchors inside the low set, copied and zeroed tokens


def test_exclusion_is_monotone_across_stages(pipe: Pipeline) -> None:
    pol = make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2)
    out = _run(pipe, pol)
    lows = _low_sets(out.policy_state.masks)
    assert any(bool(low.any()) for low in lows), "nothing excluded: the test would be vacuous"
    for prev, cur in zip(lows, lows[1:], strict=False):
        up = F.interpolate(prev[:, None].float(), size=cur.shape[-2:], mode="nearest")[:, 0] > 0.5
        assert bool((cur | ~up).all()), "a position excluded earlier was computed again"


@pytest.mark.parametrize("tau", [0.9, 1.0])
def test_anchors_are_always_computed(pipe: Pipeline, tau: float) -> None:
    pol = make_policy("sparsevar", tau=tau, alpha=2, start_stage=2)
    out = _run(pipe, pol)
    for m in out.policy_state.masks:
        h, w = m.shape[-2:]
        anchors = anchor_mask(h, w, 2).view(h, w)
        codes = m[:, anchors]
        assert bool(((codes == COMPUTED) | (codes == ANCHOR)).all())
    assert any(int((m == ANCHOR).sum()) > 0 for m in out.policy_state.masks)


def _synthetic_state(beta: float) -> tuple[SparseVARPolicy, SparseVARState, Selection, torch.Tensor]:
    """4x4 stage, α = 2, only the 4 anchors computed; previous logits built so similarities are known."""
    pol = SparseVARPolicy(SparseVARConfig(tau=0.5, alpha=2, beta=beta, start_stage=1))
    st = pol.begin([(2, 2), (4, 4)], batch=1, depth=2, device=torch.device("cpu"))
    anchors = anchor_mask(4, 4, 2)
    V = 4
    prev = torch.zeros(1, V, 4, 4)
    prev[0, 0] = 1.0  # every position along e0 ...
    prev[0, :, 0, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ... but the anchor at (0,2) along e1
    prev[0, :, 1, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # (1,3) is identical to that anchor
    prev[0, :, 3, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # (3,3) is orthogonal to every anchor
    st.prev_BhwV = prev.permute(0, 2, 3, 1)
    st.computed_Bl = anchors[None].clone()
    st.low_Bl = torch.ones(1, 16, dtype=torch.bool)
    st.anchor_l = anchors
    index = anchors.nonzero().view(1, -1)
    logits = torch.arange(4 * V, dtype=torch.float32).view(1, 4, V) + 100  # distinct per anchor
    return pol, st, Selection(index=index), logits


def test_excluded_token_copies_its_anchor_or_contributes_zero() -> None:
    pol, st, sel, logits = _synthetic_state(beta=0.9)
    pred, keep = pol.fill(1, sel, logits, StepOutput(logits), st)
    full = materialize(pred)  # the policy returns a row map; the sampler never builds this copy
    anchor_row = {int(p): i for i, p in enumerate(sel.index[0])}  # position -> row of its logits
    # (1,3) = position 7 is identical to the anchor at (0,2) = position 2: it gets exactly those logits
    assert torch.equal(full[0, 7], logits[0, anchor_row[2]])
    # (1,1) = position 5 is most similar to its own cell's anchor (0,0) = position 0 (sim 1)
    assert torch.equal(full[0, 5], logits[0, anchor_row[0]])
    # (3,3) = position 15 has similarity 0 < β: zero residual, every other token keeps its residual
    assert keep is not None
    assert keep[0].tolist() == [p != 15 for p in range(16)]
    codes = st.masks[-1].view(-1)
    assert int(codes[15]) == ZEROED and int(codes[7]) == COPIED and int(codes[0]) == ANCHOR


def test_similarity_below_beta_is_zeroed_even_for_close_tokens() -> None:
    pol, st, sel, logits = _synthetic_state(beta=1.0 + 0.0)
    st.prev_BhwV = st.prev_BhwV + 0.01 * torch.randn(
        st.prev_BhwV.shape, generator=torch.Generator().manual_seed(0)
    )
    _, keep = pol.fill(1, sel, logits, StepOutput(logits), st)
    assert keep is not None and not bool(keep[0, ~st.anchor_l].any())
    assert bool(keep[0, st.anchor_l].all())


def test_best_anchor_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for h, w, a in [(6, 6, 4), (5, 7, 2), (8, 8, 3)]:
        prev = torch.randn(2, 5, h, w, generator=g)
        sim, pos = best_anchor(prev.permute(0, 2, 3, 1), a)
        x = F.normalize(prev, dim=1).flatten(2)  # (B, V, l)
        for b in range(2):
            for i in range(h):
                for j in range(w):
                    cands = [
                        (ci * a) * w + cj * a
                        for ci in range(i // a - 1, i // a + 2)
                        for cj in range(j // a - 1, j // a + 2)
                        if 0 <= ci * a < h and 0 <= cj * a < w
                    ]
                    sims = torch.stack([x[b, :, i * w + j] @ x[b, :, c] for c in cands])
                    assert torch.allclose(sim[b, i * w + j], sims.max(), atol=1e-5)
                    p = int(pos[b, i * w + j])
                    assert p in cands
                    assert torch.allclose(x[b, :, i * w + j] @ x[b, :, p], sims.max(), atol=1e-5)


def test_reused_policy_matches_a_fresh_one(pipe: Pipeline) -> None:
    """The anchor tables cached on the policy carry no state from one generation to the next."""
    pol = make_policy("sparsevar", tau=0.8, alpha=2, beta=0.5, start_stage=2)
    first, again = _run(pipe, pol), _run(pipe, pol)
    fresh = _run(pipe, make_policy("sparsevar", tau=0.8, alpha=2, beta=0.5, start_stage=2))
    assert torch.equal(first.images, again.images) and torch.equal(first.images, fresh.images)
    grids = {(p, p) for p in PN[1:]}  # select needs stage P-1's grid on, fill from P on
    assert {k[:2] for k in pol._geometry} <= grids and len(pol._geometry) >= 2


def test_batch_equals_samples_run_alone(pipe: Pipeline) -> None:
    """Padded per-sample selections: each sample of a batch matches its own single-sample run."""
    pol = make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2)
    batch = _run(pipe, pol, top_k=1)
    counts = [c for c in batch.tokens_computed if len(set(c)) > 1]
    assert counts, "samples kept equal counts: padding is not exercised"
    for i, lab in enumerate(LABELS):
        alone = _run(pipe, pol, labels=[lab], top_k=1)
        assert torch.equal(batch.policy_state.masks[-1][i], alone.policy_state.masks[-1][0])
        masks = batch.policy_state.masks
        first = len(PN) - len(masks)  # masks are recorded from stage P-1 on
        for k, (tb, ta) in enumerate(zip(batch.tokens, alone.tokens, strict=True)):
            kept = (
                torch.ones_like(tb[i], dtype=torch.bool)
                if k < first
                else masks[k - first][i].view(-1) != ZEROED
            )
            assert torch.equal(tb[i][kept], ta[0][kept]), f"stage {k} differs for sample {i}"
        assert torch.allclose(batch.images[i], alone.images[0], atol=1e-5)


def _capture_cache(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list:
    caches = []
    orig = pipe.transformer.new_cache

    def wrapped(*a, **kw):
        caches.append(orig(*a, **kw))
        return caches[-1]

    monkeypatch.setattr(pipe.transformer, "new_cache", wrapped)
    return caches


@pytest.mark.parametrize("knobs", [{"tau": 0.9}, {"keep": 0.3}])
def test_kv_cache_holds_only_computed_tokens(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, knobs) -> None:
    caches = _capture_cache(pipe, monkeypatch)
    out = _run(pipe, make_policy("sparsevar", alpha=2, start_stage=2, **knobs))
    per_sample = torch.tensor(out.tokens_computed).sum(dim=0)  # (B,)
    assert int(per_sample.sum()) < len(LABELS) * sum(p * p for p in PN)
    held = caches[0].valid_counts()
    assert held.tolist() == torch.cat((per_sample, per_sample)).tolist()  # cond and uncond rows


def test_keep_budget_keeps_exact_counts_without_padding(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    sels: list[Selection] = []
    pol = make_policy("sparsevar", keep=0.3, alpha=2, start_stage=2)
    orig = pol.select
    monkeypatch.setattr(pol, "select", lambda k, st: sels.append(orig(k, st)) or sels[-1])
    out = _run(pipe, pol)
    for k, p in enumerate(PN):
        want = p * p if k < 2 else max(round(0.3 * p * p), int(anchor_mask(p, p, 2).sum()))
        assert out.tokens_computed[k] == [want] * len(LABELS)
        assert sels[k].valid is None


@pytest.mark.parametrize(
    "knobs, words",
    [
        ({"tau": -0.1}, "tau must be in [0, 1]"),
        ({"tau": 1.5}, "tau must be in [0, 1]"),
        ({"alpha": 0}, "alpha"),
        ({"beta": 1.2}, "beta"),
        ({"beta": -1.01}, "beta"),
        ({"keep": 0.0}, "keep"),
        ({"start_stage": 0}, "start stage"),
        ({"signal": "psd"}, "signal must be one of dF, entropy"),
    ],
)
def test_invalid_knobs_give_clear_errors(knobs: dict, words: str) -> None:
    with pytest.raises(InvalidOption, match=None) as e:
        SparseVARConfig(**knobs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_probe_block_outside_depth(pipe: Pipeline) -> None:
    with pytest.raises(InvalidOption, match="block 3 is outside the transformer's depth 3"):
        _run(pipe, make_policy("sparsevar", block=3))
    with pytest.raises(InvalidOption, match="unknown policy"):
        make_policy("sparsest")
    with pytest.raises(InvalidOption, match="no option"):
        make_policy("sparsevar", gamma=1)


def test_mask_picture_and_stats(pipe: Pipeline) -> None:
    out = _run(pipe, make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2))
    stats = out.policy_stats
    assert [s["stage"] for s in stats] == [1, 2, 3, 4]
    for s in stats:
        h, w = s["grid"]
        for b in range(len(LABELS)):
            assert s["computed"][b] + s["copied"][b] + s["zeroed"][b] == h * w
    assert [s["computed"] for s in stats] == out.tokens_computed[1:]
    pic = mask_picture(out.policy_state.masks, sample=1, image=out.images[1], side=32)
    assert pic.shape[:2] == (3, 32) and pic.min() >= 0 and pic.max() <= 1
    assert pic.shape[2] == 5 * 32 + 4 * 2  # image + 4 stage panels, 2-pixel gaps


def test_row_map_sampling_draws_exactly_like_multinomial() -> None:
    """The shared-row sampler (SparseVAR's copied tokens) gives torch.multinomial's draws on the full grid."""
    from freqar.engine.sampling import SamplerConfig, sample_categorical
    from freqar.interfaces import StagePrediction

    rows = torch.randn(2, 5, 64) * 3
    src = torch.randint(0, 5, (2, 12))
    pred = StagePrediction(rows.clone(), src)
    for cfg in (SamplerConfig(), SamplerConfig(top_k=10, top_p=0.9), SamplerConfig(top_k=8, smooth=True)):
        a = sample_categorical(StagePrediction(rows.clone(), src), cfg, torch.Generator().manual_seed(3), 0.5)
        b = sample_categorical(pred.full().clone(), cfg, torch.Generator().manual_seed(3), 0.5)
        assert torch.equal(a[0], b[0])
        if cfg.smooth:
            torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)


def test_entropy_signal_excludes_the_confident_tokens() -> None:
    """signal=entropy: Eq. 2 thresholds the previous stage's predictive entropy; no block is tapped."""
    pol = SparseVARPolicy(SparseVARConfig(tau=0.5, alpha=2, start_stage=2, signal="entropy"))
    st = pol.begin([(1, 1), (2, 2), (4, 4)], batch=1, depth=2, device=torch.device("cpu"))
    assert pol.select(1, st).taps == ()  # stage P-1 = 1: dense, nothing tapped
    V = 8
    logits = torch.zeros(1, 4, V)  # uniform (entropy log 8) at (0,0); one-hot-ish elsewhere
    logits[0, 1:, 0] = 30.0
    pol.fill(1, Selection(), logits, StepOutput(logits), st)
    assert st.dF_Bl is not None
    assert st.dF_Bl[0, 0] == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-5)
    assert float(st.dF_Bl[0, 1:].max()) < 1e-6
    sel = pol.select(2, st)
    assert st.computed_Bl is not None
    computed = st.computed_Bl.view(4, 4)
    # the uncertain token's 2x2 area and the anchors are computed; the confident rest is excluded
    assert bool(computed[:2, :2].all()) and int(computed.sum()) == 4 + 3
    assert sel.index is not None and sel.taps == ()


def test_entropy_signal_generates_and_excludes(pipe: Pipeline) -> None:
    out = _run(pipe, make_policy("sparsevar", tau=0.9, alpha=2, start_stage=2, signal="entropy"))
    assert any(s["zeroed"][0] + s["copied"][0] > 0 for s in out.policy_stats)
    assert torch.isfinite(out.images).all()
