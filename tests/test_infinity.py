"""Infinity family: conformance on infinity_tiny, batching of prompts, templates, text encoder, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from freqar.cli import main
from freqar.conformance import compare
from freqar.conformance_infinity import bsq_config, infinity_config
from freqar.engine.generate import generate
from freqar.engine.heads import BitwiseHead
from freqar.errors import CheckpointMismatch, InvalidOption, WeightsNotFound
from freqar.io import load_safetensors, load_torch_file, read_json
from freqar.models.infinity import Infinity, nearest_template, schedule_for, templates
from freqar.models.infinity_pipeline import InfinityPipeline, build_infinity_pipeline, get_infinity_spec
from freqar.policies import make_policy
from freqar.tokenizers.bsq import BSQVAE

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "infinity_tiny"
VAR_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "var_tiny"


@pytest.fixture(scope="module")
def fixture_models() -> tuple[Infinity, BSQVAE, dict, dict]:
    cfg = read_json(FIXTURE / "config.json")
    vae = BSQVAE(bsq_config(cfg["vae"])).eval()
    model = Infinity(infinity_config(cfg["infinity"], cfg["vae"]["codebook_dim"])).eval()
    vae.load_official(load_torch_file(FIXTURE / "vae.pth", key="vae"), "vae.pth")
    model.load_official(load_torch_file(FIXTURE / "infinity.pth"), "infinity.pth")
    return model, vae, cfg, load_safetensors(FIXTURE / "expected.safetensors")


def _grids(cfg: dict) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    sched = [(s[1], s[2]) for s in cfg["scale_schedule"]]
    return sched, tuple(cfg["rope_reference_scales"][-1][1:])


def _gen(model, vae, cfg, feats, lens, *, c=3.0, top_k=1, top_p=0.0, policy=None, seed=0):
    sched, ref = _grids(cfg)
    S = len(sched)
    run = model.bind(sched, ref)
    cond = model.condition_text(feats, lens, guided=c != 1, cfg=(c,) * S)
    head = BitwiseHead(run, [c] * S, [0.5] * S, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(seed)
    return generate(
        run, vae.stages(sched), condition=cond, head=head, policy=policy, generator=gen, record_logits=True
    )


def test_conformance_infinity_tiny_every_row_passes():
    rows = compare(FIXTURE)
    bad = [(r.name, r.max_abs_err, r.note) for r in rows if not r.ok]
    assert not bad, bad
    assert len(rows) == len(read_json(FIXTURE / "config.json")["tensors"])


def test_batch_with_different_prompt_lengths_equals_each_alone(fixture_models):
    model, vae, cfg, exp = fixture_models
    feats, lens = exp["text.features"], exp["text.lens"]
    assert lens.tolist() == [5, 9]
    both = _gen(model, vae, cfg, feats, lens)
    for b in range(2):
        n = int(lens[b])
        alone = _gen(model, vae, cfg, feats[b : b + 1, :n], lens[b : b + 1])
        for k in range(len(both.tokens)):
            assert torch.equal(both.tokens[k][b], alone.tokens[k][0]), (b, k)
            torch.testing.assert_close(both.logits[k][b], alone.logits[k][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(both.images[b], alone.images[0], atol=1e-5, rtol=0)


def test_vae_plain_key_layout_loads_identically(fixture_models):
    _, vae, cfg, exp = fixture_models
    state = load_torch_file(FIXTURE / "vae.pth", key="vae")
    plain = {}
    for k, v in state.items():
        for suf in (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"):
            if k.endswith(suf):
                k = k[: -len(suf)] + "." + suf.rsplit(".", 1)[1]
                break
        plain[k] = v
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    other = BSQVAE(bsq_config(cfg["vae"])).eval()
    other.load_official(plain, "plain")
    img = exp["input.images"]
    with torch.no_grad():
        torch.testing.assert_close(other.encode_raw(img), vae.encode_raw(img), atol=0, rtol=0)


def test_scale_mul_flash_shape_and_block_layouts_load(fixture_models):
    model, _, cfg, _ = fixture_models
    state = load_torch_file(FIXTURE / "infinity.pth")
    H = cfg["infinity"]["num_heads"]
    per = cfg["infinity"]["depth"] // cfg["infinity"]["block_chunks"]
    flat = {}
    for k, v in state.items():
        if k.startswith("block_chunks."):
            _, c, _, j, rest = k.split(".", 4)
            k = f"blocks.{int(c) * per + int(j)}.{rest}"
            if rest == "sa.scale_mul_1H11":
                v = v.reshape(1, 1, H, 1)
        flat[k] = v
    other = Infinity(model.cfg)
    other.load_official(flat, "flat")
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_sparsevar_disabled_is_bit_identical_and_keep_budget_runs(fixture_models):
    model, vae, cfg, exp = fixture_models
    feats, lens = exp["text.features"], exp["text.lens"]
    dense = _gen(model, vae, cfg, feats, lens, top_k=0, top_p=0.9, seed=3)
    off = _gen(
        model, vae, cfg, feats, lens, top_k=0, top_p=0.9, seed=3, policy=make_policy("sparsevar", tau=0.0)
    )
    for a, b in zip(dense.tokens, off.tokens, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dense.images, off.images)
    pol = make_policy("sparsevar", keep=0.5, alpha=2, beta=0.0, start_stage=4)
    sparse = _gen(model, vae, cfg, feats, lens, top_k=0, top_p=0.9, seed=3, policy=pol)
    last = sparse.tokens_computed[-1]
    assert all(c == round(0.5 * 64) for c in last), last
    assert sparse.images.shape == dense.images.shape and torch.isfinite(sparse.images).all()
    stats = sparse.policy_stats[-1]
    assert sum(stats["copied"]) + sum(stats["zeroed"]) == 2 * 64 - sum(last)


def test_templates_and_non_square_image_size():
    t = templates()
    assert len(t) == 15 and all(len(g) == 13 for g in t.values())
    assert t[0.5][-1] == (45, 90) and t[2.0][-1] == (90, 45)
    assert nearest_template(0.52) == 0.5
    grids, ref = schedule_for(1.0, "1M")
    assert sum(h * w for h, w in grids) == 10521 and ref == (64, 64)
    assert [sum(h * w for h, w in schedule_for(1.0, r)[0]) for r in ("0.06M", "0.25M", "0.60M")] == [
        521,
        2521,
        6425,
    ]
    pipe = build_infinity_pipeline(get_infinity_spec("infinity-tiny"))
    feats = torch.randn(1, 3, pipe.model.cfg.text_channels)
    res = pipe.generate(text=(feats, torch.tensor([3])), h_div_w=0.5, resolution="0.06M", cfg=1.0)
    assert tuple(res.images.shape) == (1, 3, 44, 88) == (1, 3, *pipe.image_size(0.5, "0.06M"))
    assert res.grids[-1] == (11, 22)


def test_bad_inputs_give_clear_errors(fixture_models, tmp_path):
    model, _, _, _ = fixture_models
    with pytest.raises(InvalidOption, match="unknown h/w template"):
        schedule_for(0.9, "1M", exact=True)
    with pytest.raises(InvalidOption, match="unknown resolution"):
        schedule_for(1.0, "4M")
    too_long = torch.randn(1, 20, model.cfg.text_channels)
    with pytest.raises(InvalidOption, match="longer than text_maxlen 16"):
        model.condition_text(too_long, torch.tensor([20]), guided=True)
    with pytest.raises(InvalidOption, match="features must be"):
        model.condition_text(torch.randn(1, 4, 7), torch.tensor([4]), guided=False)
    from freqar.text import T5TextEncoder

    with pytest.raises(WeightsNotFound, match="text encoder directory not found"):
        T5TextEncoder(tmp_path / "nope")
    with pytest.raises(CheckpointMismatch, match="VAR checkpoint"):
        Infinity(model.cfg).load_official(load_torch_file(VAR_FIXTURE / "var.pth"), "var.pth")
    with pytest.raises(CheckpointMismatch):
        BSQVAE(BSQVAE(bsq_config(read_json(FIXTURE / "config.json")["vae"])).cfg).load_official(
            load_torch_file(VAR_FIXTURE / "vae.pth"), "vae.pth"
        )


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--model", "infinity-2b"], "needs --weights PATH"),
        (["--model", "infinity-tiny", "--prompt", "a cat"], "--prompt needs --text-encoder"),
        (["--model", "infinity-tiny", "--resolution", "3M"], "unknown resolution"),
        (["--model", "infinity-tiny", "--labels", "1"], "--labels does not apply"),
        (["--model", "var-tiny", "--h-div-w", "0.5"], "apply to Infinity models only"),
        (["--model", "infinity-tiny", "--negative-prompt", "blur"], "--negative-prompt needs --prompt"),
        (["--model", "var-tiny", "--negative-prompt", "blur"], "applies to Infinity models only"),
    ],
)
def test_cli_errors_are_one_line(argv, msg, capsys, tmp_path):
    rc = main(["generate", *argv, "--out", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("freqar: error:") and msg in err and "\n" not in err


def test_import_does_not_pull_transformers():
    import subprocess

    code = "import freqar, freqar.models.infinity_pipeline, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _tiny_t5_dir(root: Path, d_model: int) -> Path:
    """A 1-layer random T5 encoder and a word-level tokenizer, saved the way a real checkpoint is."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "on", "the", "red", "mat", "photo", "of"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    d = root / "t5"
    fast.save_pretrained(d)
    cfg = transformers.T5Config(
        vocab_size=len(words), d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """One tiny T5 folder for the module (building and loading it is the slow part of these tests)."""
    return _tiny_t5_dir(
        tmp_path_factory.mktemp("t5"), get_infinity_spec("infinity-tiny").transformer.text_channels
    )


@pytest.fixture(scope="module")
def t5_encoder(t5_dir):
    from freqar.text import T5TextEncoder

    return T5TextEncoder(t5_dir, max_length=16)


def test_tiny_t5_prompts_end_to_end(tmp_path, t5_dir, t5_encoder):
    spec = get_infinity_spec("infinity-tiny")
    enc = t5_encoder
    feats, lens = enc.encode(["a cat", "a photo of the red dog on the mat"])
    assert lens.tolist() == [3, 10] and feats.shape == (2, 10, spec.transformer.text_channels)
    assert torch.all(feats[0, 3:] == 0)
    pipe: InfinityPipeline = build_infinity_pipeline(spec)
    pipe.text_encoder = enc
    res = pipe.generate(["a cat", "a photo of the red dog on the mat"], resolution="0.06M", seed=1, top_k=1)
    alone = pipe.generate(["a cat"], resolution="0.06M", seed=1, top_k=1)
    assert res.images.shape == (2, 3, 64, 64)
    for a, b in zip(res.tokens, alone.tokens, strict=True):
        assert torch.equal(a[:1], b)
    out = tmp_path / "cli.png"
    rc = main(
        [
            "generate", "--model", "infinity-tiny", "--prompt", "a red cat", "--text-encoder",
            str(t5_dir), "--resolution", "0.06M", "--h-div-w", "2", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0 and out.is_file()


def test_negative_prompt_replaces_the_null_text(tmp_path, t5_dir, t5_encoder):
    pipe: InfinityPipeline = build_infinity_pipeline(get_infinity_spec("infinity-tiny"))
    pipe.text_encoder = t5_encoder
    prompts = ["a cat", "a photo of the red dog on the mat"]
    kw = dict(resolution="0.06M", seed=2, top_k=0, top_p=0.0)
    base = pipe.generate(prompts, **kw)
    # default = null text cfg_uncond[:len] per prompt: passing exactly that as "negative" changes nothing
    feats, lens = pipe.encode(prompts)
    null = torch.zeros_like(feats)
    for b, n in enumerate(lens.tolist()):
        null[b, :n] = pipe.model.cfg_uncond[:n].detach()
    same = pipe.generate(prompts, negative=(null, lens), **kw)
    assert all(torch.equal(a, b) for a, b in zip(base.tokens, same.tokens, strict=True))
    assert torch.equal(base.images, same.images)
    neg = pipe.generate(prompts, negative_prompt="the red mat", **kw)
    assert not torch.equal(neg.images, base.images)
    assert sum(int((a != b).sum()) for a, b in zip(base.tokens, neg.tokens, strict=True)) > 0
    # one negative prompt serves the batch = the same prompt given per row
    per_row = pipe.generate(prompts, negative_prompt=["the red mat"] * 2, **kw)
    assert torch.equal(per_row.images, neg.images)
    with pytest.raises(InvalidOption, match="3 negative prompts for a batch of 2"):
        pipe.generate(prompts, negative_prompt=["a", "b", "c"], **kw)
    with pytest.raises(InvalidOption, match="needs guidance"):
        pipe.generate(prompts, negative_prompt="the red mat", cfg=1.0, **kw)
    out = tmp_path / "neg.png"
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a red cat", "--negative-prompt", "a dog"]
    rc = main([*argv, "--text-encoder", str(t5_dir), "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
