"""HART: conformance on hart_tiny, RoPE subsets, cache vs block-causal forward, batching, loading, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from freqar.cli import main
from freqar.conformance import run
from freqar.errors import CheckpointMismatch, FreqarError, InvalidOption, WeightsNotFound
from freqar.models.hart import HARTHead, TextFeatures, image_coords, rope_2d
from freqar.models.hart_pipeline import (
    HARTPipeline,
    build_hart_pipeline,
    hart_presets,
    load_hart_released,
)

HART_TINY = Path(__file__).resolve().parent / "fixtures" / "hart_tiny"


def tiny_hart(seed: int = 0) -> HARTPipeline:
    pipe = build_hart_pipeline(hart_presets()["hart-tiny"](), init_seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            # small diffusion-head weights: a random variance output overflows exp() (upstream's too)
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.startswith("diffloss") else 0.3))
    return pipe


def text_batch(pipe: HARTPipeline, lens: list[int], seed: int = 3) -> TextFeatures:
    cfg = pipe.transformer.cfg
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), cfg.context_token, cfg.context_dim, generator=g)
    mask = torch.zeros(len(lens), cfg.context_token, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    return TextFeatures(feats, mask)


def test_hart_tiny_conformance_every_row_passes():
    rows = run(HART_TINY)
    assert len(rows) == 37
    bad = [(r.name, r.max_abs_err) for r in rows if not r.ok]
    assert not bad, bad


def test_rope_2d_subset_equals_full_grid():
    pipe = tiny_hart()
    tf = pipe.transformer
    cond = tf.condition(text_batch(pipe, [16, 9]), guided=True)
    stage = 4
    full_cos, full_sin = tf.stage_rope(cond, stage, None)
    pos = torch.tensor([[0, 5, 17, 35], [3, 4, 20, 30]])
    cos, sin = tf.stage_rope(cond, stage, pos)
    R = cos.shape[0]
    idx = pos.repeat(R // 2, 1)
    assert torch.equal(cos, full_cos.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1])))
    assert torch.equal(sin, full_sin.gather(1, idx[..., None].expand(-1, -1, sin.shape[-1])))
    # the layout pairs row angles with column angles: [row x2 | col x2]
    c = image_coords(2, 4, "cpu")[None]
    cs, _ = rope_2d(c, 8, 10000.0)
    assert torch.allclose(cs[0, 1, :4], torch.cos(torch.tensor([0.0, 0.0, 0.0, 0.0])))
    assert torch.allclose(cs[0, 1, 4:6], torch.cos(torch.tensor([2.0, 2.0 * 0.01])))


def test_cached_steps_equal_block_causal_forward():
    pipe = tiny_hart()
    tf, tok = pipe.transformer, pipe.tokenizer
    text = text_batch(pipe, [16, 7])
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, tok.cfg.vocab_size, (2, p * p), generator=g) for p in tok.cfg.patch_nums]
    x_tf = tok.quantize.teacher_forcing_input(idx)
    with torch.no_grad():
        ref, _ = tf(text, x_tf)
        cond = tf.condition(text, guided=False)
        cache = tf.new_cache(2, torch.float32, "cpu")
        outs, start = [], 0
        for k, p in enumerate(tok.cfg.patch_nums):
            toks = None if k == 0 else x_tf[:, start : start + p * p]
            start += 0 if k == 0 else p * p
            x = tf.stage_input(cond, toks, None, k)
            cache.begin_stage(x.shape[1], None)
            out = tf.step(x, cond, cache)
            cache.end_stage()
            outs.append(tf.logits(out.hidden, cond))
    got = torch.cat(outs, dim=1)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-5), float((got - ref).abs().max())


def _greedy_head(*args, **kw):
    return HARTHead(*args, **{**kw, "top_k": lambda stage: 1})


def test_batch_of_different_prompt_lengths_equals_each_alone():
    pipe = tiny_hart()
    text = text_batch(pipe, [16, 5])
    kw = dict(seed=0, cfg=2.0, smooth=False, residual=False, head_factory=_greedy_head, record_logits=True)
    both = pipe.generate(text=text, **kw)
    for b in range(2):
        alone = pipe.generate(text=TextFeatures(text.features[b : b + 1], text.mask[b : b + 1]), **kw)
        assert torch.equal(both.tokens[-1][b], alone.tokens[-1][0])
        assert torch.allclose(both.images[b], alone.images[0], atol=1e-5)
        for lb, la in zip(both.logits, alone.logits, strict=True):
            assert torch.allclose(lb[b], la[0], atol=1e-4)


def test_generation_runs_with_residual_and_smoothing():
    pipe = tiny_hart()
    res = pipe.generate(text=text_batch(pipe, [10]), seed=3, cfg=4.5, smooth=True)
    assert res.images.shape == (1, 3, 32, 32)
    assert res.images.min() >= 0 and res.images.max() <= 1
    again = pipe.generate(text=text_batch(pipe, [10]), seed=3, cfg=4.5, smooth=True)
    assert torch.equal(res.images, again.images)  # seeded: both RNG streams reproduce


def _released_folder(tmp_path: Path, pipe: HARTPipeline) -> Path:
    import json

    root = tmp_path / "hart-0.7b-1024px"
    (root / "llm").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    cfg = pipe.transformer.cfg
    conf = {
        "model_type": "hart_transformer_t2i",
        "attn_type": "llama",
        "mlp_type": "llama",
        **{k: v for k, v in cfg.to_dict().items() if k not in ("vocab_size", "z_channels")},
    }
    conf["patch_nums"] = list(cfg.patch_nums)
    (root / "llm" / "config.json").write_text(json.dumps(conf))
    state = dict(pipe.transformer.state_dict())
    n = cfg.seq_len
    state["attn_bias_for_masking"] = torch.zeros(1, 1, n, n)
    state["lvl_1L"] = pipe.transformer.lvl_1L.clone()
    torch.save(state, root / "llm" / "ema_model.bin")
    tok = {f"vae.{k}": v for k, v in pipe.tokenizer.state_dict().items()}
    tok["disc.main.0.weight"] = torch.zeros(3)
    torch.save(tok, root / "tokenizer" / "pytorch_model.bin")
    t = pipe.tokenizer.cfg
    tc = dict(vocab_size=t.vocab_size, z_channels=t.z_channels, ch=t.ch, ch_mult=list(t.ch_mult))
    (root / "tokenizer" / "config.json").write_text(json.dumps(tc))
    return root


def test_load_released_folder_layout(tmp_path):
    pipe = tiny_hart()
    root = _released_folder(tmp_path, pipe)
    for where in (root, root / "llm"):
        got = load_hart_released(where, name="hart-tiny")
        for k, v in pipe.transformer.state_dict().items():
            assert torch.equal(got.transformer.state_dict()[k], v), k
        assert torch.equal(got.tokenizer.quantize.embedding.weight, pipe.tokenizer.quantize.embedding.weight)


def test_bad_inputs_are_one_line_errors(tmp_path):
    pipe = tiny_hart()
    tf = pipe.transformer
    wrong_width = TextFeatures(torch.zeros(1, 16, 31), torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(InvalidOption, match="width 31"):
        tf.condition(wrong_width, True)
    too_long = TextFeatures(torch.zeros(1, 17, 32), torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(InvalidOption, match="context_token=16"):
        tf.condition(too_long, True)
    with pytest.raises(WeightsNotFound, match="config.json"):
        load_hart_released(tmp_path, name="hart-tiny")
    root = _released_folder(tmp_path, pipe)
    (root / "tokenizer" / "pytorch_model.bin").unlink()
    with pytest.raises(WeightsNotFound, match="no tokenizer weights"):
        load_hart_released(root, name="hart-tiny")
    var_state = {"class_emb.weight": torch.zeros(2, 2), "pos_1LC": torch.zeros(1)}
    with pytest.raises(CheckpointMismatch, match="VAR checkpoint"):
        tf.load_official(var_state, "var_d16.pth")
    with pytest.raises(CheckpointMismatch, match="no 'vae"):
        pipe.tokenizer.load_released({"encoder.conv_in.weight": torch.zeros(1)}, "vae.pth")
    for e in (InvalidOption, WeightsNotFound, CheckpointMismatch):
        assert issubclass(e, FreqarError)


def test_cli_conformance_on_hart_fixture(capsys):
    assert main(["conformance", str(HART_TINY)]) == 0
    assert "37/37 tensors ok" in capsys.readouterr().out


def _tiny_qwen(tmp_path: Path) -> Path:
    """A 1-layer width-32 Qwen2 with a character-level Qwen2 tokenizer, saved locally (no download)."""
    transformers = pytest.importorskip("transformers")
    chars = [chr(c) for c in range(33, 127)] + ["\u0120"]  # byte-level BPE spells a space as U+0120
    vocab = {"<pad>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    fast = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<pad>")
    cfg = transformers.Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2Model(cfg)
    d = tmp_path / "qwen"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    return d


def test_qwen_text_encoder_from_local_dir(tmp_path):
    from freqar.models.hart_text import QwenTextEncoder

    d = _tiny_qwen(tmp_path)
    enc = QwenTextEncoder(d, max_tokens=16)
    both = enc.encode(["a cat", "dog"])  # one token per character (spaces included)
    assert both.features.shape == (2, 16, 32) and both.features.dtype == torch.float32
    assert both.mask.sum(1).tolist() == [5, 3]
    assert both.position_ids[1].tolist() == [0, 1, 2] + [2] * 13
    alone = enc.encode(["dog"])
    assert torch.allclose(alone.features[0, :3], both.features[1, :3], atol=1e-5)
    with pytest.warns(UserWarning, match="truncated"):
        enc.encode(["a" * 20])
    pipe = tiny_hart()
    pipe.text_encoder = enc
    res = pipe.generate(["a cat on the mat"], seed=0, cfg=3.0)
    assert res.images.shape == (1, 3, 32, 32)


def test_cli_generate_hart_tiny_with_prompt(tmp_path, capsys):
    d = _tiny_qwen(tmp_path)
    out = tmp_path / "h.png"
    args = ["generate", "--model", "hart-tiny", "--text-encoder", str(d), "--prompt", "a cat", "--quiet"]
    assert main([*args, "--prompt", "red dog", "--out", str(out)]) == 0
    assert out.is_file() and "2 prompt(s)" in capsys.readouterr().out
    assert main(["generate", "--model", "hart-tiny", "--prompt", "a cat", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freqar: error:") and "--text-encoder" in err and "\n" not in err
    assert main(["generate", "--model", "hart-0.7b", "--weights", str(tmp_path), "--out", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_sparsevar_on_hart_disabled_is_dense_and_options_run():
    from freqar.models.hart import EXCLUDED_OPTIONS
    from freqar.policies import make_policy

    pipe = tiny_hart()
    text = text_batch(pipe, [16, 6])
    dense = pipe.generate(text=text, seed=5, cfg=3.0)
    off = pipe.generate(text=text, seed=5, cfg=3.0, policy=make_policy("sparsevar", tau=0.0))
    assert torch.equal(dense.images, off.images)
    outs = {}
    for opt in EXCLUDED_OPTIONS:
        half = make_policy("sparsevar", keep=0.5)
        res = pipe.generate(text=text, seed=5, cfg=3.0, policy=half, excluded=opt)
        assert sum(res.tokens_computed[-1]) < 2 * 64  # the last scale really was sparse
        assert torch.isfinite(res.images).all()
        outs[opt] = res.canvas
    assert not torch.equal(outs["skip"], outs["cond"]) and not torch.equal(outs["skip"], outs["anchor"])


def test_excluded_tokens_follow_the_policys_anchor_map(monkeypatch):
    """anchor/cond use SparseVAR's Eq. 3 anchor (a top-left cell anchor), not the nearest computed token."""
    from freqar.policies import make_policy
    from freqar.policies.sparsevar import COPIED, anchor_mask

    pipe = tiny_hart()
    text = text_batch(pipe, [16, 6])
    side = pipe.transformer.patch_nums[-1]
    anchors = anchor_mask(side, side, 4).nonzero().flatten().tolist()
    seen: list[torch.Tensor] = []
    orig = pipe.transformer.diffusion_condition

    def spy(hidden, idx, codebook):  # type: ignore[no-untyped-def]
        seen.append(hidden)
        return orig(hidden, idx, codebook)

    monkeypatch.setattr(pipe.transformer, "diffusion_condition", spy)
    recs = {}
    heads: list[HARTHead] = []

    def factory(*a, **k):  # type: ignore[no-untyped-def]
        heads.append(HARTHead(*a, record=True, **k))
        return heads[-1]

    for opt in ("anchor", "cond", "skip"):
        pol = make_policy("sparsevar", keep=0.5, beta=-1.0)  # beta = -1: every excluded token is copied
        res = pipe.generate(text=text, seed=5, cfg=3.0, policy=pol, excluded=opt, head_factory=factory)
        copied = res.policy_state.masks[-1].flatten(1) == COPIED  # (B, l)
        assert copied.any(dim=1).all()
        recs[opt] = (heads[-1].records["diff_residual"], res.tokens[-1], copied, seen[-1])
    resid, idx, copied, _ = recs["anchor"]
    for b, p in copied.nonzero().tolist():
        same = [a for a in anchors if torch.equal(resid[b, p], resid[b, a])]
        assert same, f"copied token {p} took no anchor's residual"
        assert idx[b, p] == idx[b, same[0]]
    _, _, copied, hidden = recs["cond"]  # hidden (R, l, C): every grid position's conditioning state
    for b, p in copied.nonzero().tolist():
        assert any(torch.equal(hidden[b, p], hidden[b, a]) for a in anchors), p
    resid, _, copied, _ = recs["skip"]
    assert (resid[copied] == 0).all() and (resid[~copied].abs().sum(-1) > 0).all()
