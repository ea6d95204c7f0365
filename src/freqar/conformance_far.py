"""Recompute every tensor of a FAR conformance fixture (``freqar-far-fixture/1``) with freqar's modules.

Driven by ``config.json`` only (widths, depths, encoder ≠ decoder width, buffer size, VAE depth and image
size, respacing, guidance, unconditional generations). Generations go through the shared engine with the
diffusion stage head; the RNG stream is the fixture's (one CPU generator seeded per call).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .engine.diffusion_head import DiffusionHead, DiffusionSamplerConfig, far_guidance
from .engine.generate import generate
from .errors import FreqarError
from .io import load_safetensors, load_torch_file, read_json
from .models.far import FARConfig, FARTransformer
from .tokenizers.frequency import FrequencyTokenizer, lowpass, to_tokens
from .tokenizers.kl import AutoencoderKL, KLConfig

FAR_FILES = ("config.json", "vae.pth", "far.pth", "expected.safetensors")


def kl_config_from_fixture(v: dict, image_size: int, scale: float) -> KLConfig:
    return KLConfig(
        embed_dim=v.get("embed_dim", 16),
        ch=v["ch"],
        ch_mult=tuple(v["ch_mult"]),
        num_res_blocks=v.get("num_res_blocks", 2),
        dropout=v.get("dropout", 0.0),
        resolution=v.get("resolution", image_size),
        encoder_attn_resolutions=tuple(v.get("encoder_attn_resolutions", (16,))),
        decoder_attn_resolutions=tuple(v.get("decoder_attn_resolutions", ())),
        groupnorm_groups=v.get("groupnorm_groups", 32),
        in_channels=v.get("in_channels", 3),
        out_ch=v.get("out_ch", 3),
        scale_factor=v.get("scale_factor", scale),
        logvar_clamp=tuple(v.get("logvar_clamp", (-30.0, 20.0))),
    )


def far_config_from_fixture(f: dict) -> FARConfig:
    diff = f.get("diffusion", {})
    return FARConfig(
        encoder_embed_dim=f["encoder_embed_dim"],
        encoder_depth=f["encoder_depth"],
        encoder_num_heads=f["encoder_num_heads"],
        decoder_embed_dim=f["decoder_embed_dim"],
        decoder_depth=f["decoder_depth"],
        decoder_num_heads=f["decoder_num_heads"],
        mlp_ratio=f.get("mlp_ratio", 4.0),
        buffer_size=f["buffer_size"],
        num_classes=f.get("class_num", 1000),
        class_emb_rows=f.get("class_emb_rows", 1000),
        label_drop_prob=f.get("label_drop_prob", 0.1),
        diffloss_d=f["diffloss_d"],
        diffloss_w=f["diffloss_w"],
        token_channels=f.get("token_embed_dim", 16),
        seq_h=f.get("seq_h", 16),
        norm_eps=f.get("norm_eps", 1e-6),
        attn_dropout=f.get("attn_dropout", 0.0),
        proj_dropout=f.get("proj_dropout", 0.0),
        diffusion_batch_mul=f.get("diffusion_batch_mul", 4),
        noise_schedule=diff.get("noise_schedule", "cosine"),
        diffusion_steps=diff.get("diffusion_steps", 1000),
        mask=bool(f.get("mask", False)),
    )


def compute_far_fixture(fixture_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor a FAR fixture describes (inputs echoed so each stored tensor gets a row)."""
    d = Path(fixture_dir)
    cfg = read_json(d / "config.json")
    try:
        scale = float(cfg.get("latent_scale", 0.2325))
        vae_cfg = kl_config_from_fixture(cfg["vae"], int(cfg["image_size"]), scale)
        far_cfg = far_config_from_fixture(cfg["far"])
        steps = str(
            cfg["far"].get("num_sampling_steps", cfg["far"].get("diffusion", {}).get("timestep_respacing"))
        )
    except KeyError as e:
        raise FreqarError(f"'{d / 'config.json'}': missing key {e}") from None
    vae, far = AutoencoderKL(vae_cfg).eval(), FARTransformer(far_cfg).eval()
    vae.load_official(load_torch_file(d / "vae.pth", key="model"), str(d / "vae.pth"))
    far.load_official(load_torch_file(d / "far.pth", key="model"), str(d / "far.pth"))
    expected = load_safetensors(d / "expected.safetensors")
    C = far_cfg.token_channels
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        latent = expected.get("vae.latent")
        if "input.images" in expected:
            img = expected["input.images"]
            out["input.images"] = img
            moments = vae.moments(img)
            out["vae.moments"] = moments
            mean, logvar = vae.posterior(moments)
            out["vae.latent"] = mean * scale
            g = torch.Generator().manual_seed(int(cfg.get("vae_sample_seed", 0)))
            noise = torch.randn(mean.shape, generator=g)
            out["vae.sample_latent"] = (mean + torch.exp(0.5 * logvar) * noise) * scale
            latent = out["vae.latent"] if latent is None else latent
        if latent is not None:
            out["vae.decoded"] = vae.decode(latent)
            for s in cfg.get("lowpass_sizes", []):
                out[f"lowpass.{s}"] = lowpass(latent, int(s))
        mi = cfg.get("model_inputs")
        if mi is not None and latent is not None:
            labels = torch.tensor(mi["labels"], dtype=torch.long)
            out["model.labels"] = labels
            tokens = to_tokens(lowpass(latent, int(mi["level"])))
            cls = far.class_embedding(labels)
            out["model.cond"] = far.conditions(tokens, cls)
            out["model.cond_uncond"] = far.conditions(tokens, far.fake_latent.expand_as(cls))
        net = far.diffloss.net
        if "diffnet.x" in expected:
            x, t, index = expected["diffnet.x"], expected["diffnet.t"], expected["diffnet.index"]
            for k in ("diffnet.x", "diffnet.t", "diffnet.index", "diffnet.x_second_half"):
                if k in expected:
                    out[k] = expected[k]
            # the stored conditions isolate the MLP rows from transformer rounding; ours when absent
            c = expected.get("model.cond", out.get("model.cond"))
            if c is None:
                raise FreqarError(f"'{d}': diffnet.* rows need model.cond (model_inputs and vae.latent)")
            c = c.reshape(-1, far_cfg.decoder_embed_dim)
            out["diffnet.out"] = net(x, t, c, index)
            if "diffnet.x_second_half" in expected:
                h = expected["diffnet.x_second_half"].shape[0]
                cu = expected.get("model.cond_uncond", out.get("model.cond_uncond"))
                cu = cu.reshape(-1, far_cfg.decoder_embed_dim)
                out["diffnet.out_cfg"] = net.forward_with_cfg(
                    torch.cat((x[:h], expected["diffnet.x_second_half"])),
                    torch.cat((t[:h], t[:h])),
                    torch.cat((c[:h], cu[:h])),
                    float(cfg["diffnet"]["cfg_scale"]),
                    torch.cat((index[:h], index[:h])),
                )
            if "loss.t" in expected and latent is not None:
                lt, ln = expected["loss.t"], expected["loss.noise"]
                out["loss.t"], out["loss.noise"] = lt, ln
                proc = far.diffloss.train_diffusion
                terms = proc.training_losses(
                    lambda xx, tt: net(xx, tt, c, index), to_tokens(latent).reshape(-1, C), lt, ln
                )
                out["loss.mse"], out["loss.vb"], out["loss.loss"] = terms["mse"], terms["vb"], terms["loss"]
        tr = cfg.get("train")
        if tr is not None and latent is not None:
            far.train()
            try:
                g = torch.Generator().manual_seed(int(tr["seed"]))
                res = far(latent, torch.tensor(tr["labels"], dtype=torch.long), generator=g)
            finally:
                far.eval()
            out["train.loss"], out["train.level"] = res["loss"].reshape(()), res["level"]
            out["train.label_dropped"] = res["label_dropped"]
        for gen_cfg in cfg.get("generations", []):
            out.update(_generation(far, vae, gen_cfg, steps))
    return out


def _generation(far: FARTransformer, vae: AutoencoderKL, g: dict, steps: str) -> dict[str, torch.Tensor]:
    prefix = g.get("prefix", f"gen.{g['name']}.")
    B = int(g["B"])
    levels = tuple(g.get("latent_core", (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)))
    tok = FrequencyTokenizer(vae, levels)
    K = len(levels)
    uncond = g.get("labels") is None
    labels = torch.full((B,), -1, dtype=torch.long) if uncond else torch.tensor(g["labels"], dtype=torch.long)
    guidance = far_guidance(float(g["cfg"]), K, "linear")
    sampler = DiffusionSamplerConfig(steps=steps, temperature=1.0, temperature_ramp=True, upstream_noise=True)
    head = DiffusionHead(far.diffloss, guidance, sampler, levels)
    gen = torch.Generator().manual_seed(int(g["seed"]))
    res = generate(far, tok, labels=labels, guidance=guidance, generator=gen, head=head)
    out = {
        prefix + "cfg_per_level": torch.tensor(
            [1 + guidance.scale(k, K) for k in range(K)], dtype=torch.float32
        ),
        prefix + "temperature_per_level": torch.tensor(
            [sampler.temperature_at(k, K) for k in range(K)], dtype=torch.float32
        ),
        prefix + "latent": res.canvas,
        prefix + "img": vae.decode(res.canvas),
    }
    if not uncond:
        out[prefix + "labels"] = labels
    if g.get("per_level"):
        out[prefix + "level_samples"] = torch.stack(res.tokens)
    return out
