"""The CLI end to end on tiny models, official-format loading and every bad input as one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_pipeline
from freqar.cli import main
from freqar.registry import create_model


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("freqar: error:"), err
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def saved(tmp_path):
    pipe = tiny_pipeline()
    pipe.save(tmp_path / "model")
    return tmp_path / "model"


def official_files(tmp_path):
    """var-tiny weights written in the upstream flat layout, buffers included."""
    pipe = create_model("var-tiny")
    vae_sd = dict(pipe.tokenizer.state_dict())
    var_sd = dict(pipe.transformer.state_dict())
    L = pipe.transformer.cfg.L
    var_sd["lvl_1L"] = pipe.transformer.lvl_1L.clone()
    var_sd["attn_bias_for_masking"] = torch.where(
        pipe.transformer.block_causal_mask("cpu"), 0.0, -torch.inf
    ).view(1, 1, L, L)
    for i in range(pipe.transformer.depth):
        var_sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(pipe.transformer.cfg.embed_dim)
    torch.save(vae_sd, tmp_path / "vae.pth")
    torch.save(var_sd, tmp_path / "var.pth")
    return pipe, tmp_path / "vae.pth", tmp_path / "var.pth"


def test_generate_grid_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(
        [
            "generate",
            "--model",
            str(saved),
            "--labels",
            "0,1,2,3",
            "--seed",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2x2 grid of 8px images, 2px padding


def test_generate_single_and_random_labels(saved, tmp_path):
    assert (
        main(["generate", "--model", str(saved), "--batch", "1", "--out", str(tmp_path / "a.png"), "--quiet"])
        == 0
    )
    assert Image.open(tmp_path / "a.png").size == (8, 8)


def test_python_dash_m_and_models_listing():
    r = subprocess.run([sys.executable, "-m", "freqar", "models"], capture_output=True, text=True, check=True)
    for name in ("var-d16", "var-d36", "infinity-2b", "far-b", "hart-0.7b"):
        assert name in r.stdout


def test_official_pth_loading(tmp_path):
    pipe, vae, var = official_files(tmp_path)
    back = create_model("var-tiny", vae=vae, var=var, init_seed=123)
    a = pipe.generate([1], seed=0).images
    b = back.generate([1], seed=0).images
    assert torch.equal(a, b)
    # a VAE stored as {"vae": state_dict} and an ema buffer for another number of scales also load
    sd = torch.load(vae, weights_only=True)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(10, sd["quantize.ema_vocab_hit_SV"].shape[1])
    torch.save({"vae": sd}, tmp_path / "vae2.pth")
    create_model("var-tiny", vae=tmp_path / "vae2.pth", var=var)


def test_bad_checkpoints(tmp_path, capsys):
    _, vae, var = official_files(tmp_path)
    base = ["generate", "--model", "var-tiny", "--vae", str(vae), "--quiet", "--out", str(tmp_path / "o.png")]
    assert main([*base, "--var", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in _err(capsys)
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip file at all")
    assert main([*base, "--var", str(tmp_path / "corrupt.pth")]) == 2
    assert "corrupt.pth" in _err(capsys)
    sd = torch.load(var, weights_only=True)
    sd["blocks.0.attn.proj.weightX"] = sd.pop("blocks.0.attn.proj.weight")
    torch.save(sd, tmp_path / "keys.pth")
    assert main([*base, "--var", str(tmp_path / "keys.pth")]) == 2
    err = _err(capsys)
    assert "missing keys [blocks.0.attn.proj.weight]" in err and "blocks.0.attn.proj.weightX" in err
    sd = torch.load(var, weights_only=True)
    sd["head.weight"] = sd["head.weight"][:, :5]
    torch.save(sd, tmp_path / "shape.pth")
    assert main([*base, "--var", str(tmp_path / "shape.pth")]) == 2
    assert "head.weight" in _err(capsys)
    sd = torch.load(var, weights_only=True)
    sd["lvl_1L"] = sd["lvl_1L"][:, :-1]
    torch.save(sd, tmp_path / "lvl.pth")
    assert main([*base, "--var", str(tmp_path / "lvl.pth")]) == 2
    assert "lvl_1L" in _err(capsys)


def test_pickle_with_code_is_refused(tmp_path, capsys):
    import collections

    _, vae, _ = official_files(tmp_path)
    torch.save(collections.OrderedDict(a=torch.zeros(1), b=print), tmp_path / "evil.pth")
    assert (
        main(["generate", "--model", "var-tiny", "--var", str(tmp_path / "evil.pth"), "--vae", str(vae)]) == 2
    )
    assert "evil.pth" in _err(capsys)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--labels", "5"], "label 5"),
        (["--labels", "-1"], "label -1"),
        (["--labels", "a,b"], "--labels"),
        (["--batch", "0"], "--batch"),
        (["--cfg", "-1"], "--cfg"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--temperature", "0"], "--temperature"),
        (["--device", "tpu"], "tpu"),
        (["--model", "var-d61"], "var-d61"),
    ],
)
def test_bad_generate_options(saved, tmp_path, capsys, args, needle):
    base = ["generate", "--model", str(saved), "--quiet", "--out", str(tmp_path / "o.png")]
    assert main(base + args) == 2
    assert needle in _err(capsys)


def test_unwritable_output(saved, tmp_path, capsys):
    assert main(["generate", "--model", str(saved), "--out", str(tmp_path / "nope" / "x.png")]) == 2
    assert "nope" in _err(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("root ignores directory permissions")
        assert main(["generate", "--model", str(saved), "--out", str(ro / "x.png")]) == 2
        assert "ro" in _err(capsys)
    finally:
        ro.chmod(0o700)


def test_invalid_schedule_in_saved_config(saved, capsys):
    import json

    cfg = json.loads((saved / "config.json").read_text())
    cfg["transformer"]["patch_nums"] = [1, 3, 2, 4]
    (saved / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(saved), "--quiet"]) == 2
    assert "schedule" in _err(capsys)


def test_bad_config_json(saved, capsys):
    (saved / "config.json").write_text("{not json")
    assert main(["generate", "--model", str(saved), "--quiet"]) == 2
    assert "config.json" in _err(capsys)


def test_late_stage_flags(saved, tmp_path, capsys):
    base = ["generate", "--model", str(saved), "--labels", "0", "--out", str(tmp_path / "a.png"), "--quiet"]
    assert main([*base, "--late-from", "2", "--late-cfg", "0.5", "--late-temperature", "0.3"]) == 0
    capsys.readouterr()
    for flags, key in (
        (["--late-from", "4"], "late_from"),
        (["--late-from", "-1"], "--late-from"),
        (["--late-cfg", "-1"], "--late-cfg"),
        (["--late-temperature", "0"], "--late-temperature"),
    ):
        assert main([*base, *flags]) == 2
        assert key in _err(capsys)
    far = ["generate", "--model", "far-tiny", "--labels", "0", "--out", str(tmp_path / "f.png"), "--quiet"]
    assert main([*far, "--late-from", "2"]) == 2
    assert "VAR-family" in _err(capsys)
