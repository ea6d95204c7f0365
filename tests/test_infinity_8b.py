"""Infinity-8B: 2x2 spatial patchify on a tiny config, sharded checkpoints, the 8B preset's sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from freqar.cli import main
from freqar.errors import CheckpointMismatch, InvalidOption, WeightsNotFound
from freqar.io import load_sharded_state_dict, save_safetensors
from freqar.models.infinity import Infinity, schedule_for
from freqar.models.infinity_pipeline import (
    InfinitySpec,
    build_infinity_pipeline,
    get_infinity_spec,
    load_infinity,
)
from freqar.policies import make_policy
from freqar.tokenizers.bsq import BSQVAE, depth_to_space, space_to_depth, token_codes


@pytest.fixture(scope="module")
def tiny8b():
    return build_infinity_pipeline(get_infinity_spec("infinity-tiny-8b"))


def _text(pipe, lens=(5, 3), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), max(lens), pipe.model.cfg.text_channels, generator=g)
    return feats, torch.tensor(lens)


def test_patchify_token_layout_is_pixel_shuffle_order_and_round_trips():
    B, h, w, d, p = 2, 3, 4, 5, 2
    bits = torch.randint(0, 2, (B, h * w, p * p * d))
    cells = depth_to_space(bits, (h, w), p)
    assert cells.shape == (B, d, p * h, p * w)
    # channel c·4 + i·2 + j of token (y, x) is VAE channel c at cell (2y + i, 2x + j) (upstream pixel_shuffle)
    for b, y, x, c, i, j in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 4, 1, 1), (0, 1, 2, 3, 0, 1), (1, 0, 1, 2, 1, 0)]:
        assert cells[b, c, p * y + i, p * x + j] == bits[b, y * w + x, c * p * p + i * p + j]
    assert torch.equal(space_to_depth(cells, p), bits)
    lat = torch.randn(B, d, p * h, p * w)
    assert torch.equal(depth_to_space(space_to_depth(lat, p), (h, w), p), lat)
    # codes are unit-norm per latent cell (its d bits), not over the 4d bits of a token
    codes = depth_to_space(token_codes(bits, 1 / d**0.5, p), (h, w), p)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(B, p * h, p * w))
    assert torch.allclose(codes.abs(), torch.full_like(codes, d**-0.5))
    assert torch.equal(codes > 0, cells > 0)


def test_patchify_encode_bits_rebuild_the_vae_latent(tiny8b):
    vae: BSQVAE = tiny8b.vae
    grids, _ = schedule_for(1.0, "0.06M")
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        tokens = vae.encode(img, grids, patchify=2)
        summed, vae_bits = vae.quantize(vae.encode_raw(img), [(2 * h, 2 * w) for h, w in grids])
    assert [t.shape[1:] for t in tokens] == [(h * w, 16) for h, w in grids]
    for t, b, (h, w) in zip(tokens, vae_bits, grids, strict=True):
        assert torch.equal(depth_to_space(t, (h, w), 2), depth_to_space(b, (2 * h, 2 * w), 1))
    torch.testing.assert_close(vae.summed_from_bits(tokens, grids, patchify=2), summed, atol=1e-5, rtol=0)


def _upstream_order_inputs(tokens: list[torch.Tensor], grids: list[tuple[int, int]], d: int) -> torch.Tensor:
    """Next-scale inputs written step by step in upstream's order (5-D tensors, bits -> (B,h,w,4d) ->
    channels first -> pixel_shuffle -> codes -> trilinear up/down -> pixel_unshuffle -> (B, h·w, 4d))."""
    F = torch.nn.functional
    vae_grids = [(1, 2 * h, 2 * w) for h, w in grids]
    summed, outs = 0, []
    for si, (h, w) in enumerate(grids[:-1]):
        b = tokens[si].reshape(-1, h, w, 4 * d).permute(0, 3, 1, 2)
        b = F.pixel_shuffle(b.float(), 2).permute(0, 2, 3, 1)  # (B, 2h, 2w, d)
        codes = (
            F.normalize((2 * b - 1) / d**0.5, dim=-1).permute(0, 3, 1, 2).unsqueeze(2)
        )  # (B, d, 1, 2h, 2w)
        summed = summed + F.interpolate(codes, size=vae_grids[-1], mode="trilinear")
        nxt = F.interpolate(summed, size=vae_grids[si + 1], mode="trilinear").squeeze(2)
        nxt = F.pixel_unshuffle(nxt, 2)
        outs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
    return torch.cat(outs, dim=1)


def test_patchify_generation_matches_teacher_forcing_and_has_the_right_size(tiny8b):
    pipe = tiny8b
    feats, lens = _text(pipe)
    res = pipe.generate(text=(feats, lens), cfg=1.0, tau=1.0, top_k=0, top_p=0.0, seed=1, record_logits=True)
    grids, ref = pipe.schedule()
    assert res.images.shape == (2, 3, 64, 64) and pipe.image_size() == (64, 64)
    assert res.canvas.shape == (2, 4, 32, 32)  # VAE latent: d=4 at twice the last token grid
    assert [t.shape[1:] for t in res.tokens] == [(h * w, 16) for h, w in grids]
    # the stage inputs the engine built (unshuffled running sums) = the independent teacher-forcing path
    x_tf = pipe.vae.teacher_forcing_input(res.tokens, grids, patchify=2)
    torch.testing.assert_close(x_tf, _upstream_order_inputs(res.tokens, grids, d=4), atol=1e-6, rtol=0)
    with torch.no_grad():
        tf_logits = pipe.model(feats, lens, x_tf, grids, ref)
    assert res.logits is not None
    torch.testing.assert_close(torch.cat(res.logits, dim=1), tf_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        img = pipe.vae.decode_latent(pipe.vae.summed_from_bits(res.tokens, grids, patchify=2)).add(1).mul(0.5)
    torch.testing.assert_close(res.images, img, atol=1e-5, rtol=0)
    tall = pipe.generate(text=(feats, lens), h_div_w=2.0, seed=1)
    assert tall.images.shape == (2, 3, 88, 44) and pipe.image_size(2.0) == (88, 44)


def test_patchify_sparsevar_disabled_is_bit_identical_and_budget_zeroes_whole_tokens(tiny8b):
    pipe = tiny8b
    feats, lens = _text(pipe)
    dense = pipe.generate(text=(feats, lens), seed=3, top_k=0, top_p=0.9)
    off = pipe.generate(
        text=(feats, lens), seed=3, top_k=0, top_p=0.9, policy=make_policy("sparsevar", tau=0.0)
    )
    for a, b in zip(dense.tokens, off.tokens, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dense.images, off.images) and torch.equal(dense.canvas, off.canvas)
    pol = make_policy("sparsevar", keep=0.5, alpha=2, beta=0.0, start_stage=4)
    sparse = pipe.generate(text=(feats, lens), seed=3, top_k=0, top_p=0.9, policy=pol)
    assert sparse.tokens_computed[-1] == [128, 128]  # half of the 16x16 token grid
    assert sparse.images.shape == dense.images.shape and torch.isfinite(sparse.images).all()


def test_patchify_codebook_mismatch_is_an_error():
    spec = get_infinity_spec("infinity-tiny-8b")
    bad = InfinitySpec(
        "bad", "", spec.vae, get_infinity_spec("infinity-tiny").transformer, spatial_patchify=True
    )
    with pytest.raises(InvalidOption, match=r"codebook_dim 8 must be the VAE's d=4 x 4"):
        build_infinity_pipeline(bad)


def test_8b_preset_sizes_on_the_meta_device():
    """Exact counts of freqar's modules (upstream's layout; 2B = the reference's 2.2046 B and 694 keys)."""
    counts = {}
    for name in ("infinity-2b", "infinity-8b"):
        spec = get_infinity_spec(name)
        with torch.device("meta"):
            model = Infinity(spec.transformer)
        counts[name] = (sum(p.numel() for p in model.parameters()), len(model.state_dict()))
    assert counts["infinity-2b"] == (2_204_564_032, 694)
    assert counts["infinity-8b"] == (8_375_791_824, 862)  # reference: "8.378 B" (rounded, see report)
    spec = get_infinity_spec("infinity-8b")
    with torch.device("meta"):
        model = Infinity(spec.transformer)
    assert tuple(model.word_embed.weight.shape) == (3584, 56) and tuple(model.head.weight.shape) == (
        112,
        3584,
    )
    assert model.text_proj_for_sos.ca.H == 16 and model.text_proj_for_sos.ca.c == 224
    assert spec.image_size == 1024 and spec.patchify == 2


def _shard(state: dict[str, torch.Tensor], folder: Path, n: int, fmt: str) -> dict[str, str]:
    """Save ``state`` as ``n`` shards + transformers-style index in ``folder``; returns the weight map."""
    folder.mkdir()
    keys = list(state)
    wmap = {}
    for i in range(n):
        part = {k: state[k] for k in keys[i::n]}
        name = f"model-{i + 1:05d}-of-{n:05d}.{fmt}"
        if fmt == "safetensors":
            save_safetensors(folder / name, part)
        else:
            torch.save({k: v.clone() for k, v in part.items()}, folder / name)
        wmap.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return wmap


@pytest.mark.parametrize("fmt, n", [("bin", 3), ("safetensors", 2)])
def test_sharded_transformer_loads_like_the_module(tmp_path, fmt, n):
    src = build_infinity_pipeline(get_infinity_spec("infinity-tiny-8b"), init_seed=7)
    state = src.model.state_dict()
    # the 8B release stores blocks as block_chunks.{c}.module.{j}; flip one scale_mul to the flash shape
    k = "block_chunks.1.module.0.sa.scale_mul_1H11"
    state[k] = state[k].reshape(1, 1, -1, 1)
    _shard(state, tmp_path / "w", n, fmt)
    torch.save({"vae": src.vae.state_dict()}, tmp_path / "vae.pth")
    pipe = load_infinity("infinity-tiny-8b", transformer=tmp_path / "w", vae=tmp_path / "vae.pth")
    for (name, a), b in zip(src.model.state_dict().items(), pipe.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    idx = next((tmp_path / "w").glob("*.index.json"))
    again = load_infinity("infinity-tiny-8b", transformer=idx)  # the index file itself works too
    assert torch.equal(again.model.head.weight, src.model.head.weight)


def test_sharded_checkpoint_errors_name_the_file(tmp_path):
    state = {"a": torch.zeros(2), "b": torch.ones(3), "c": torch.ones(1)}
    wmap = _shard(state, tmp_path / "w", 2, "bin")
    with pytest.raises(WeightsNotFound, match="no shard index"):
        load_sharded_state_dict(tmp_path)
    with pytest.raises(WeightsNotFound, match="sharded checkpoint not found"):
        load_sharded_state_dict(tmp_path / "nope")
    assert load_sharded_state_dict(tmp_path / "w").keys() == state.keys()
    (tmp_path / "w" / wmap["b"]).unlink()
    with pytest.raises(
        WeightsNotFound, match=f"shard '{wmap['b']}' listed in .*pytorch_model.bin.index.json"
    ):
        load_sharded_state_dict(tmp_path / "w")
    index = tmp_path / "w" / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": wmap["a"], "zz": wmap["a"]}}))
    with pytest.raises(CheckpointMismatch, match=r"lacks keys .*\[zz\]"):
        load_sharded_state_dict(tmp_path / "w")
    index.write_text("{}")
    with pytest.raises(CheckpointMismatch, match="no 'weight_map'"):
        load_sharded_state_dict(index)


def test_cli_infinity_8b(tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = main(["generate", "--model", "infinity-tiny-8b", "--h-div-w", "0.5", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    assert "44x88px" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for argv, msg in [
        (["--model", "infinity-8b"], "needs --weights PATH (official infinity_8b_weights/"),
        (
            ["--model", "infinity-tiny-8b", "--weights", str(tmp_path / "empty")],
            "no shard index (*.index.json)",
        ),
    ]:
        rc = main(["generate", *argv, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and "\n" not in err, err
