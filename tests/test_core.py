"""Core: tokenizer, transformer, engine invariants, save/load, official layouts."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_pipeline
from freqar.engine.generate import generate
from freqar.engine.guidance import Guidance
from freqar.engine.sampling import SamplerConfig, mask_top_k_top_p_
from freqar.errors import InvalidOption
from freqar.models.var import VARConfig, VARTransformer
from freqar.pipeline import SamplingDefaults, load_pipeline_dir
from freqar.registry import get_spec, list_models
from freqar.tokenizers.msvq import VQVAE, MSVQConfig, phi_index_table


def test_phi_tables_match_upstream_float64_rule():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(4, 4) == [0, 1, 2, 3]
    assert phi_index_table(5, 4) == [0, 1, 2, 2, 3]  # the float tie that upstream resolves to 2
    assert phi_index_table(6, 4) == [0, 0, 1, 2, 3, 3]
    assert phi_index_table(7, 4) == [0, 0, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("share", [0, 1, 2, 4])
def test_phi_sharing_key_layouts(share):
    cfg = MSVQConfig(
        vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 4), share_quant_resi=share
    )
    keys = [k for k in VQVAE(cfg).state_dict() if k.startswith("quantize.quant_resi.")]
    if share == 1:
        assert keys == ["quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"]
    elif share == 0:
        assert {k.split(".")[2] for k in keys} == {"0", "1", "2"}
    else:
        assert {k.split(".")[3] for k in keys} == {str(i) for i in range(share)}


def test_official_layouts_and_parameter_counts():
    """Key counts and parameter counts of the official checkpoints (built on the meta device, no memory)."""
    expected = {
        "var-d16": 310_283_520,
        "var-d20": 600_917_136,
        "var-d24": 1_033_399_360,
        "var-d30": 2_010_020_356,
        "var-d36": 2_353_893_904,
    }
    with torch.device("meta"):
        vae = VQVAE(get_spec("var-d16").tokenizer)
        assert len(vae.state_dict()) == 324
        assert sum(p.numel() for p in vae.parameters()) == 108_948_355
        for name, count in expected.items():
            var = VARTransformer(get_spec(name).transformer)
            assert sum(p.numel() for p in var.parameters()) == count, name
        d16 = VARTransformer(get_spec("var-d16").transformer)
        # 220 official entries minus the buffers we derive instead of storing (lvl_1L, mask, 16 zero_k_bias)
        assert len(d16.state_dict()) == 220 - 2 - 16
    d36 = get_spec("var-d36").transformer
    assert d36.shared_aln and d36.L == 2240 and get_spec("var-d36").image_size == 512


def test_encode_decode_roundtrip_shapes(tiny):
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    idx = tiny.tokenizer.encode(img)
    assert [t.shape[1] for t in idx] == [1, 4, 9, 16]
    rec = tiny.tokenizer.decode_indices(idx)
    assert rec.shape == img.shape and rec.min() >= -1 and rec.max() <= 1
    x_tf = tiny.tokenizer.quantize.teacher_forcing_input(idx)
    assert x_tf.shape == (2, 4 + 9 + 16, 8)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_cached_steps_equal_block_causal_forward(shared, cfg):
    """Per-stage logits of cached generation == the teacher-forced forward on the sampled tokens."""
    pipe = tiny_pipeline(shared_aln=shared)
    labels = torch.tensor([1, 3])
    res = pipe.generate(labels, seed=5, cfg=cfg, top_k=4, record_logits=True)
    x_tf = pipe.tokenizer.quantize.teacher_forcing_input(res.tokens)
    full = pipe.transformer(labels, x_tf)
    assert res.logits is not None
    if cfg == 0:
        torch.testing.assert_close(torch.cat(res.logits, 1), full, atol=1e-5, rtol=1e-5)
    else:  # guided = (1+t)*cond - t*uncond, per stage
        null = torch.full_like(labels, pipe.num_classes)
        unc = pipe.transformer(null, x_tf)
        S = len(res.tokens)
        off = 0
        for k, lg in enumerate(res.logits):
            n = lg.shape[1]
            t = cfg * k / (S - 1)
            ref = (1 + t) * full[:, off : off + n] - t * unc[:, off : off + n]
            torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)
            off += n


def test_fhat_from_generation_equals_rebuild(tiny):
    res = tiny.generate([0, 4], seed=1)
    torch.testing.assert_close(res.canvas, tiny.tokenizer.quantize.idx_to_fhat(res.tokens), atol=1e-6, rtol=0)


def test_seeds(tiny):
    a = tiny.generate([1, 2], seed=3, top_k=8)
    b = tiny.generate([1, 2], seed=3, top_k=8)
    c = tiny.generate([1, 2], seed=4, top_k=8)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens, strict=True))


def test_batch_equals_samples_alone_greedy(tiny):
    both = tiny.generate([2, 4], seed=0, top_k=1, cfg=1.5)
    for i, lab in enumerate([2, 4]):
        one = tiny.generate([lab], seed=0, top_k=1, cfg=1.5)
        for s in range(len(one.tokens)):
            assert torch.equal(both.tokens[s][i : i + 1], one.tokens[s])
        torch.testing.assert_close(both.images[i : i + 1], one.images, atol=1e-5, rtol=0)


def test_random_labels_drawn_from_generator(tiny):
    a = tiny.generate(None, batch=3, seed=9)
    b = tiny.generate(None, batch=3, seed=9)
    assert a.labels.shape == (3,) and torch.equal(a.labels, b.labels)
    assert int(a.labels.max()) < tiny.num_classes


def test_outputs_and_stats(tiny):
    seen = []
    res = tiny.generate([0], seed=0, callback=seen.append)
    assert res.images.shape == (1, 3, 8, 8) and 0 <= res.images.min() and res.images.max() <= 1
    assert [s.stage for s in seen] == [0, 1, 2, 3]
    assert res.tokens_computed == [[1], [4], [9], [16]]
    assert len(res.stage_seconds) == 4 and res.decode_seconds >= 0


def test_save_load_roundtrip(tmp_path, tiny):
    tiny.class_names = ["a", "b", "c", "d", "e"]
    tiny.save(tmp_path / "m")
    back = load_pipeline_dir(tmp_path / "m")
    for mod_a, mod_b in ((tiny.transformer, back.transformer), (tiny.tokenizer, back.tokenizer)):
        sa, sb = mod_a.state_dict(), mod_b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.class_names == tiny.class_names
    assert torch.equal(tiny.generate([1], seed=2).images, back.generate([1], seed=2).images)


def test_top_k_top_p_masking():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 3.0]]])
    out = mask_top_k_top_p_(logits.clone(), 2, 0.0)
    assert torch.isinf(out[0, 0, :3]).all() and torch.isfinite(out[0, 0, 3:]).all()  # ties kept
    out = mask_top_k_top_p_(torch.tensor([[[0.0, 0.0, 10.0]]]), 0, 0.5)
    assert torch.isfinite(out[0, 0, 2]) and torch.isinf(out[0, 0, :2]).all()


def test_list_models_and_bad_configs():
    assert {"var-d16", "var-d20", "var-d24", "var-d30", "var-d36", "var-tiny"} <= set(list_models())
    assert list_models("var-d3*") == ["var-d30", "var-d36"]
    for bad in [(4,), (1, 3, 2), (0, 2), ()]:
        with pytest.raises(InvalidOption, match="schedule"):
            VARConfig(patch_nums=bad)
    with pytest.raises(InvalidOption):
        SamplerConfig(top_p=1.5)
    with pytest.raises(InvalidOption):
        Guidance(cfg=-1)


def test_engine_rejects_empty_batch(tiny):
    with pytest.raises(InvalidOption, match="batch"):
        generate(tiny.transformer, tiny.tokenizer, batch=0, num_classes=5)
    with pytest.raises(InvalidOption, match="batch"):
        tiny.generate(None, batch=0)


def test_late_stage_sampling(tmp_path, tiny):
    base = tiny.generate([1, 3], seed=5, cfg=1.5)
    off = tiny.generate([1, 3], seed=5, cfg=1.5, late_from=0, late_cfg=9.0, late_temperature=0.01)
    assert torch.equal(base.images, off.images)  # late_from 0: bit-identical to one setting for all
    late = tiny.generate([1, 3], seed=5, cfg=1.5, late_from=2, late_cfg=0.0, late_temperature=0.01)
    assert all(torch.equal(a, b) for a, b in zip(base.tokens[:2], late.tokens[:2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(base.tokens[2:], late.tokens[2:], strict=True))
    # near-zero temperature from stage 2 on: the late stages are the argmax of the guided logits
    rec = tiny.generate([1, 3], seed=5, cfg=1.5, late_from=2, late_temperature=1e-4, record_logits=True)
    for s in (2, 3):
        assert torch.equal(rec.tokens[s], rec.logits[s].argmax(-1))
    # the model's defaults carry the late settings, and they survive save/load
    tiny.defaults = SamplingDefaults(cfg=1.5, late_from=2, late_cfg=0.0, late_temperature=0.01)
    tiny.save(tmp_path / "m")
    back = load_pipeline_dir(tmp_path / "m")
    assert back.defaults.late_from == 2 and torch.equal(back.generate([1, 3], seed=5).images, late.images)
    assert torch.equal(back.generate([1, 3], seed=5, late_from=0).images, base.images)
    with pytest.raises(InvalidOption, match="late_from"):
        tiny.generate([1], late_from=4)  # the tiny schedule has 4 stages: 0..3


def test_late_guidance_and_sampler_settings():
    g = Guidance(cfg=3.0, late_from=6, late_cfg=1.0)
    assert [g.scale(k, 10) for k in (0, 3, 5, 6, 9)] == [0.0, 1.0, 3.0 * 5 / 9, 1.0, 1.0]
    assert Guidance(cfg=0.0, late_from=2, late_cfg=1.0).enabled
    assert not Guidance(cfg=0.0, late_from=0, late_cfg=1.0).enabled
    s = SamplerConfig(temperature=1.0, late_from=3, late_temperature=0.5)
    assert s.at_stage(2).temperature == 1.0 and s.at_stage(3).temperature == 0.5
    for bad in ({"late_from": -1}, {"late_temperature": 0.0}):
        with pytest.raises(InvalidOption, match=next(iter(bad))):
            SamplerConfig(**bad)
    with pytest.raises(InvalidOption, match="late_cfg"):
        Guidance(late_from=1, late_cfg=-1.0)


def test_span_clock_on_the_cpu_times_each_span() -> None:
    import time

    from freqar.engine.timing import SpanClock

    clock = SpanClock("cpu")
    for d in (0.0, 0.02):
        mark = clock.start()
        time.sleep(d)
        clock.stop(mark)
    first, second = clock.seconds()
    assert 0 <= first < 0.015 and 0.015 <= second < 0.5
    assert clock.total() == first + second and clock.seconds() == [first, second]
