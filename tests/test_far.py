"""FAR family: conformance on far_tiny, the shared diffusion module, levels, checkpoints and bad input."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from freqar.cli import main
from freqar.conformance import run
from freqar.diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, space_timesteps
from freqar.engine.diffusion_head import DiffusionSamplerConfig, far_guidance
from freqar.errors import CheckpointMismatch, FreqarError, InvalidOption
from freqar.heads.diffusion_mlp import DiffusionMLP, DiffusionMLPConfig
from freqar.models.far import FARTransformer, far_preset, load_far_checkpoint
from freqar.models.far_pipeline import FARDefaults, build_far_pipeline, create_far_model, load_far_dir
from freqar.tokenizers.frequency import default_levels, lowpass, validate_levels
from freqar.tokenizers.kl import KLConfig

FAR_TINY = Path(__file__).resolve().parent / "fixtures" / "far_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def far_rows():
    return run(FAR_TINY)


def test_far_tiny_every_row_passes(far_rows):
    assert len(far_rows) == 38
    bad = [(r.name, r.max_abs_err) for r in far_rows if not r.ok]
    assert not bad, bad
    assert all(r.max_abs_err == 0 for r in far_rows if r.tol == 0.0)


def test_checker_detects_a_wrong_weight(tmp_path):
    """Perturb one diffusion-MLP weight: MLP, loss and generation rows fail; VAE and transformer rows pass."""
    d = tmp_path / "fx"
    shutil.copytree(FAR_TINY, d)
    for f in d.iterdir():
        f.chmod(0o644)
    state = torch.load(d / "far.pth", weights_only=True)
    state["diffloss.net.res_blocks.0.mlp.2.bias"] += 1e-2
    torch.save(state, d / "far.pth")
    cfg = json.loads((d / "config.json").read_text())
    cfg["generations"] = cfg["generations"][1:]  # keep it quick: one generation
    (d / "config.json").write_text(json.dumps(cfg))
    rows = {r.name: r for r in run(d)}
    assert rows["vae.latent"].ok and rows["model.cond"].ok and rows["train.level"].ok
    assert not rows["diffnet.out"].ok and not rows["loss.loss"].ok and not rows["gen.nocfg.latent"].ok


def test_missing_far_file(tmp_path, capsys):
    d = tmp_path / "fx"
    shutil.copytree(FAR_TINY, d)
    (d / "far.pth").unlink()
    assert main(["conformance", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freqar: error:") and "far.pth" in err and "\n" not in err


# ----- levels ------------------------------------------------------------------------------------------
def test_lowpass_full_size_is_identity_and_zero_level_is_zero():
    z = torch.randn(2, 16, 8, 8)
    assert torch.equal(lowpass(z, 8), z)
    assert torch.equal(lowpass(z, 0), torch.zeros_like(z))
    low = lowpass(z, 2)  # a 2x2 core: smooth, but not constant
    assert low.shape == z.shape and low.std() < z.std()


def test_level_schedules():
    assert default_levels(16) == (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert default_levels(8) == tuple(range(8))
    with pytest.raises(InvalidOption, match="not strictly increasing"):
        validate_levels([0, 3, 3], 16)
    with pytest.raises(InvalidOption, match="beyond the latent side"):
        validate_levels([0, 4, 8], 8)


# ----- diffusion ---------------------------------------------------------------------------------------
def test_respacing_strings():
    assert space_timesteps(1000, "ddim4") == [0, 250, 500, 750]
    assert space_timesteps(1000, "3,2") == [0, 250, 499, 500, 999]
    assert len(space_timesteps(1000, "100")) == 100
    for bad in ("0", "ddim0", "abc", "2,0"):
        with pytest.raises(InvalidOption):
            space_timesteps(1000, bad)
    with pytest.raises(InvalidOption, match=">= 1"):
        DiffusionSamplerConfig(steps="0")
    betas = cosine_betas(1000)
    assert betas.dtype == torch.float64 and float(betas.max()) == pytest.approx(0.999)


def test_respaced_process_keeps_the_marginals():
    base = GaussianDiffusion(DiffusionConfig())
    sp = GaussianDiffusion.respaced(DiffusionConfig(), "ddim10")
    kept = sp.timestep_map
    assert torch.allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)


def _toy_mlp(seed: int = 0) -> DiffusionMLP:
    torch.manual_seed(seed)
    return DiffusionMLP(DiffusionMLPConfig(token_channels=2, cond_channels=4, width=32, depth=2))


def test_diffusion_loss_decreases_on_a_toy_distribution():
    """Two clusters selected by the condition: the MSE+VLB loss must drop well below its start."""
    mlp = _toy_mlp()
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    cond = torch.eye(4)[torch.tensor([0, 1] * 64)]
    target = torch.where(cond[:, :1] > 0, torch.tensor([0.5, -0.5]), torch.tensor([-0.5, 0.5]))
    target = target + 0.05 * torch.randn(target.shape, generator=g)
    losses = []
    for _ in range(150):
        loss = mlp.loss(target, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_ddim_without_noise_is_deterministic_and_ancestral_uses_the_generator():
    mlp = _toy_mlp(1)
    c = torch.randn(6, 4)
    runs = [mlp.sample(c, steps="ddim5", batch=6, ddim=True, generator=torch.Generator().manual_seed(0))]
    runs.append(mlp.sample(c, steps="ddim5", batch=6, ddim=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(runs[0], runs[1])
    # DDIM draws only x_T: a different seed changes the start, the same x_T gives the same output
    proc = GaussianDiffusion.respaced(mlp.cfg.diffusion, "ddim5")
    x_T = torch.randn(6, 2)

    def net(x, t):
        return mlp.net(x, t, c)

    a = proc.sample(net, x_T, ddim=True, generator=torch.Generator().manual_seed(1))
    b = proc.sample(net, x_T, ddim=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    a = proc.sample(net, x_T, generator=torch.Generator().manual_seed(1))
    b = proc.sample(net, x_T, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_temperature_zero_removes_the_injected_noise():
    mlp = _toy_mlp(2)
    proc = GaussianDiffusion.respaced(mlp.cfg.diffusion, "ddim5")
    c, x_T = torch.randn(4, 4), torch.randn(4, 2)
    a = proc.sample(
        lambda x, t: mlp.net(x, t, c), x_T, temperature=0.0, generator=torch.Generator().manual_seed(1)
    )
    b = proc.sample(
        lambda x, t: mlp.net(x, t, c), x_T, temperature=0.0, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b)


def test_batch_equals_rows_run_alone():
    """Per-token diffusion and the FAR transformer treat each sample independently."""
    torch.manual_seed(0)
    far = FARTransformer(far_preset("far-tiny")).eval()
    with torch.no_grad():
        for p in far.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        tok = torch.randn(3, 256, 16)
        cls = far.class_embedding(torch.tensor([1, 2, -1]))
        z = far.conditions(tok, cls)
        for i in range(3):
            torch.testing.assert_close(far.conditions(tok[i : i + 1], cls[i : i + 1]), z[i : i + 1])
        proc = GaussianDiffusion.respaced(far.diffloss.cfg.diffusion, "ddim4")
        c = z.reshape(-1, z.shape[-1])[:40]
        lv = torch.full((40, 1), 3.0)
        x_T = torch.randn(40, 16)
        full = proc.sample(lambda x, t: far.diffloss.net(x, t, c, lv), x_T, ddim=True)
        part = proc.sample(lambda x, t: far.diffloss.net(x, t, c[:7], lv[:7]), x_T[:7], ddim=True)
        torch.testing.assert_close(part, full[:7])


def test_far_guidance_and_temperature_schedules():
    g = far_guidance(3.0, 10)
    assert [1 + g.scale(k, 10) for k in (0, 5, 9)] == pytest.approx([1.0, 2.0, 2.8])
    assert not far_guidance(1.0, 10).enabled
    s = DiffusionSamplerConfig(steps="4")
    assert s.temperature_at(9, 10) == pytest.approx(1.0)
    assert DiffusionSamplerConfig(steps="4", temperature=0.5).temperature_at(9, 10) == pytest.approx(0.5)
    assert (
        DiffusionSamplerConfig(steps="4", temperature=0.7, temperature_ramp=False).temperature_at(0, 10)
        == 0.7
    )
    with pytest.raises(InvalidOption):
        far_guidance(0.5, 10)


# ----- pipeline ----------------------------------------------------------------------------------------
def _tiny_pipe():
    vae = KLConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, resolution=16)  # 8x8 latent
    far = far_preset("far-tiny")
    far = type(far)(**{**far.to_dict(), "seq_h": 8, "buffer_size": 4})
    return build_far_pipeline("t", vae, far, FARDefaults(cfg=2.0, steps="ddim3"))


def test_generation_through_the_engine_options_have_effects(tmp_path):
    pipe = _tiny_pipe()
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    seen = []
    res = pipe.generate([1, 2], seed=0, levels=(0, 2, 4), callback=lambda i: seen.append(i.stage))
    assert seen == [0, 1, 2] and res.images.shape == (2, 3, 16, 16)
    assert len(res.tokens) == 3 and res.tokens[0].shape == (2, 64, 16)
    assert torch.equal(res.images, pipe.generate([1, 2], seed=0, levels=(0, 2, 4)).images)
    base = res.canvas
    for kw in ({"cfg": 4.0}, {"temperature": 0.5}, {"steps": "ddim5"}, {"ddim": True}, {"levels": (0, 3, 4)}):
        other = pipe.generate([1, 2], seed=0, **{"levels": (0, 2, 4), **kw}).canvas
        assert not torch.equal(other, base), kw
    unc = pipe.generate(None, batch=2, unconditional=True, seed=0, levels=(0, 2, 4))
    assert unc.labels.tolist() == [-1, -1]
    pipe.save(tmp_path / "m")
    again = load_far_dir(tmp_path / "m")
    assert torch.equal(again.generate([1, 2], seed=0, levels=(0, 2, 4)).canvas, base)


def test_training_forward_and_masking():
    pipe = _tiny_pipe()
    far = pipe.transformer.train()
    lat = torch.randn(2, 16, 8, 8)
    out = far(lat, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and 0 <= int(out["level"]) < 8
    out["loss"].backward()
    masked = type(far.cfg)(**{**far.cfg.to_dict(), "mask": True})
    far2 = FARTransformer(masked).train()
    loss = far2(lat, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), level=6)["loss"]
    assert torch.isfinite(loss)


# ----- checkpoints and bad input ---------------------------------------------------------------------
def test_checkpoint_with_namespace_loads_and_prefers_ema(tmp_path):
    far = FARTransformer(far_preset("far-tiny"))
    sd = far.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": sd, "model_ema": ema, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, path)
    got = load_far_checkpoint(path)
    assert torch.equal(got["z_proj.weight"], ema["z_proj.weight"])
    assert torch.equal(load_far_checkpoint(path, prefer_ema=False)["z_proj.weight"], sd["z_proj.weight"])


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_a_foreign_global_is_refused(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Evil()}, path)
    with pytest.raises(CheckpointMismatch, match="refusing .* pickle global .*getcwd"):
        load_far_checkpoint(path)


def test_wrong_family_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "var.pth"
    torch.save({"word_embed.weight": torch.zeros(2, 2), "blocks.0.attn.mat_qkv.weight": torch.zeros(2)}, path)
    pipe = create_far_model("far-tiny")
    with pytest.raises(CheckpointMismatch, match="not a FAR state dict.*word_embed.weight"):
        pipe.transformer.load_official(load_far_checkpoint(path), str(path))
    with pytest.raises(CheckpointMismatch, match="not a KL autoencoder"):
        pipe.vae.load_official({"word_embed.weight": torch.zeros(1)}, "x")


def test_cli_far_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    cases = [
        (["--model", "far-b"], "needs --vae"),
        (["--model", "far-tiny", "--levels", "0,4,2"], "not strictly increasing"),
        (["--model", "far-tiny", "--levels", "0,4,16"], "beyond the latent side"),
        (["--model", "far-tiny", "--steps", "0"], ">= 1"),
        (["--model", "far-tiny", "--checkpoint", str(tmp_path / "nope.pth")], "not found"),
        (["--model", "far-tiny", "--top-k", "5"], "does not apply"),
        (["--model", "var-tiny", "--steps", "4"], "FAR models only"),
    ]
    for argv, msg in cases:
        assert main(["generate", *argv, "--out", out, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("freqar: error:") and msg in err and "\n" not in err, (argv, err)


def test_cli_generate_far_tiny(tmp_path, capsys):
    out = tmp_path / "g.png"
    argv = [
        "generate",
        "--model",
        "far-tiny",
        "--labels",
        "3",
        "--steps",
        "ddim2",
        "--levels",
        "0,4",
        "--quiet",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.is_file() and "2 levels x 2 diffusion steps" in capsys.readouterr().out


def test_freqar_error_is_the_base():
    assert issubclass(CheckpointMismatch, FreqarError)


def test_official_files_load_and_diffloss_size_comes_from_the_checkpoint(tmp_path):
    """kl16-style ``{"model": sd}`` and checkpoint-last.pth with another diffusion-MLP depth/width."""
    spec_far = far_preset("far-tiny")
    other = FARTransformer(type(spec_far)(**{**spec_far.to_dict(), "diffloss_d": 3, "diffloss_w": 40}))
    ck = tmp_path / "checkpoint-last.pth"
    torch.save(
        {"model": other.state_dict(), "model_ema": other.state_dict(), "args": argparse.Namespace()}, ck
    )
    vae_sd = create_far_model("far-tiny", init_seed=5).vae.state_dict()
    kl = tmp_path / "kl16.ckpt"
    torch.save({"model": vae_sd}, kl)
    pipe = create_far_model("far-tiny", vae=kl, checkpoint=ck)
    assert pipe.transformer.cfg.diffloss_d == 3 and pipe.transformer.cfg.diffloss_w == 40
    assert torch.equal(pipe.vae.state_dict()["quant_conv.weight"], vae_sd["quant_conv.weight"])


def test_checker_is_driven_by_config_only(tmp_path):
    """Another FAR fixture shape (Ce != Cd, other buffer, deeper VAE, comma respacing, unconditional run):
    a self-made fixture in the upstream layout must run through every code path and pass."""
    from safetensors.torch import save_file

    from freqar.conformance_far import compute_far_fixture

    cfg = json.loads((FAR_TINY / "config.json").read_text())
    cfg["image_size"] = 128
    cfg["vae"].update(ch_mult=[1, 1, 1, 1], resolution=128, downsample=8, num_res_blocks=1)
    cfg["far"].update(encoder_embed_dim=48, encoder_num_heads=3, buffer_size=16, diffloss_d=1)
    cfg["far"]["num_sampling_steps"] = "2,1"
    cfg["lowpass_sizes"] = [0, 3]
    cfg["generations"] = [{**cfg["generations"][1], "name": "unc", "prefix": "gen.unc.", "labels": None}]
    cfg["generations"][0]["latent_core"] = [0, 2, 5]
    far_cfg = far_preset("far-tiny")
    far = FARTransformer(
        type(far_cfg)(
            **{
                **far_cfg.to_dict(),
                "encoder_embed_dim": 48,
                "encoder_num_heads": 3,
                "buffer_size": 16,
                "diffloss_d": 1,
                "diffloss_w": 48,
            }
        )
    )
    vae = build_far_pipeline(
        "v", KLConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=128), far.cfg
    ).vae
    d = tmp_path / "fx"
    d.mkdir()
    torch.save(far.state_dict(), d / "far.pth")
    torch.save(vae.state_dict(), d / "vae.pth")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input.images": torch.rand(2, 3, 128, 128, generator=g) * 2 - 1,
        "diffnet.x": torch.randn(512, 16, generator=g),
        "diffnet.t": torch.randint(0, 1000, (512,), generator=g),
        "diffnet.index": torch.randint(0, 16, (512, 1), generator=g).float(),
        "diffnet.x_second_half": torch.randn(256, 16, generator=g),
        "loss.t": torch.randint(0, 999, (512,), generator=g),
        "loss.noise": torch.randn(512, 16, generator=g),
    }
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(inputs, str(d / "expected.safetensors"))
    # two passes: the checker reads model.cond from the expected file for the diffusion-net rows
    for _ in range(2):
        out = compute_far_fixture(d)
        save_file({k: v.contiguous() for k, v in out.items()}, str(d / "expected.safetensors"))
    assert "gen.unc.labels" not in out and out["gen.unc.latent"].shape == (2, 16, 16, 16)
    assert out["model.cond"].shape == (2, 256, 32)
    rows = run(d)
    assert len(rows) == len(out) and all(r.ok for r in rows)
