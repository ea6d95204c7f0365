"""HART fixtures (``freqar-hart-fixture/1``): recompute every stored tensor with freqar's modules and engine.

Driven by ``config.json`` alone (any schedule, widths, pooling mode, context norm, diffusion size, list of
generations). The RNG streams follow the fixture's documented order: the categorical draws (and Gumbel noise)
come from a generator seeded with ``g_seed``, the diffusion noise from one seeded with
``diff_seed`` (upstream's global RNG), and teacher forcing's single draw from one seeded with ``rng_seed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .engine.generate import generate
from .engine.guidance import Guidance
from .engine.sampling import mask_top_k_top_p_
from .errors import FreqarError
from .io import load_safetensors, load_torch_file, read_json
from .models.hart import (
    HARTConfig,
    HARTHead,
    HARTTransformer,
    TextFeatures,
    hart_config_from_upstream,
    hart_guidance_scales,
    sample_residual,
)
from .tokenizers.hybrid import HybridTokenizer
from .tokenizers.msvq import MSVQConfig

FILES = ("config.json", "tokenizer.pth", "hart.pth", "expected.safetensors")


def tokenizer_config(v: dict) -> MSVQConfig:
    """MSVQConfig from an upstream ``HARTAutoEncoderConfig``-style dict."""
    return MSVQConfig(
        vocab_size=int(v["vocab_size"]),
        z_channels=int(v["z_channels"]),
        ch=int(v["ch"]),
        ch_mult=tuple(v["ch_mult"]),
        num_res_blocks=int(v.get("num_res_blocks", 2)),
        dropout=float(v.get("dropout", 0.0)),
        beta=float(v.get("beta", 0.25)),
        using_znorm=bool(v.get("using_znorm", False)),
        quant_conv_ks=int(v.get("quant_conv_ks", 3)),
        quant_resi=float(v.get("quant_resi", 0.5)),
        share_quant_resi=int(v.get("share_quant_resi", 4)),
        patch_nums=tuple(v["v_patch_nums"]),
        in_channels=int(v.get("in_channels", 3)),
        using_sa=bool(v.get("using_sa", True)),
        using_mid_sa=bool(v.get("using_mid_sa", True)),
        groupnorm_groups=int(v.get("groupnorm_groups", 32)),
    )


class _RecordingTokenizer:
    """Delegates to the tokenizer and keeps f_hat as it was before the last scale's update."""

    def __init__(self, tok: HybridTokenizer) -> None:
        self.tok = tok
        self.fhat_pre_last: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def update(self, canvas, h_BlC, stage, keep_Bl=None):
        if stage == len(self.tok.cfg.patch_nums) - 1:
            self.fhat_pre_last = canvas.clone()
        return self.tok.update(canvas, h_BlC, stage, keep_Bl)


def build_from_fixture(d: Path, cfg: dict) -> tuple[HybridTokenizer, HARTTransformer, HARTConfig]:
    try:
        tcfg = tokenizer_config(cfg["tokenizer"])
        hcfg = hart_config_from_upstream(
            cfg["hart"], vocab_size=tcfg.vocab_size, z_channels=tcfg.z_channels, source=str(d / "config.json")
        )
    except KeyError as e:
        raise FreqarError(f"'{d / 'config.json'}': missing key {e}") from None
    tok, hart = HybridTokenizer(tcfg).eval(), HARTTransformer(hcfg).eval()
    tok.load_released(load_torch_file(d / "tokenizer.pth"), str(d / "tokenizer.pth"))
    hart.load_official(load_torch_file(d / "hart.pth"), str(d / "hart.pth"))
    return tok, hart, hcfg


def compute_hart_fixture(fixture_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor a HART fixture describes, computed by freqar."""
    d = Path(fixture_dir)
    cfg = read_json(d / "config.json")
    tok, hart, hcfg = build_from_fixture(d, cfg)
    expected = load_safetensors(d / "expected.safetensors")
    pn = tok.cfg.patch_nums
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if "input.images" in expected:
            img = expected["input.images"]
            out["input.images"] = img
            f = tok.encode_latent(img)
            enc = tok.quantize_hybrid(f)
            out["enc.f"] = f
            out["enc.idx"] = torch.cat(enc.idx, dim=1)
            out["enc.f_rest_wo_last_discrete"] = enc.rest_wo_last
            out["enc.f_rest"] = enc.rest
            out["enc.fhat"] = enc.fhat
            out["vae.recon"] = tok.decode_fhat(enc.fhat.clone())
        text = None
        if "text.features" in expected:
            mask = expected["text.mask"]
            text = TextFeatures(expected["text.features"], mask, expected.get("text.position_ids"))
            for k in ("features", "mask", "position_ids"):
                if f"text.{k}" in expected:
                    out[f"text.{k}"] = expected[f"text.{k}"]
            out["text.position_ids"] = mask.long().cumsum(1) - 1
        if "enc.idx" in expected:
            idx_list = list(expected["enc.idx"].split([p * p for p in pn], dim=1))
            out["vae.fhat_from_idx"] = tok.idx_to_fhat_discrete(idx_list)
            out["vae.recon_from_idx"] = tok.decode_fhat(out["vae.fhat_from_idx"].clone())
            x_tf = tok.quantize.teacher_forcing_input(idx_list)
            out["tf.x_BLCv_wo_first_l"] = x_tf
            if text is not None and "tf.logits" in expected:
                _teacher_forcing(cfg, tok, hart, text, expected, idx_list, out)
        if "diff.x" in expected:
            _diffusion_rows(cfg, hart, expected, out)
        for g in cfg.get("generations", []):
            if text is None:
                raise FreqarError(f"'{d}': generations need text.features")
            _generation(g, hcfg, tok, hart, text, out)
    return out


def _teacher_forcing(cfg, tok, hart, text, expected, idx_list, out) -> None:
    tf = cfg.get("teacher_forcing", {})
    x_tf = expected.get("tf.x_BLCv_wo_first_l", out["tf.x_BLCv_wo_first_l"])
    logits, h_last = hart(text, x_tf)
    out["tf.logits"] = logits
    l_last = h_last.shape[1]
    B, _, V = logits.shape
    masked = mask_top_k_top_p_(
        logits[:, -l_last:].clone(), int(tf.get("top_k", 600)), float(tf.get("top_p", 0.96))
    )
    g = torch.Generator().manual_seed(int(tf.get("rng_seed", 0)))
    probs = masked.softmax(-1).view(B * l_last, V)
    idx = torch.multinomial(probs, 1, replacement=True, generator=g).view(B, l_last)
    out["tf.idx_last_sampled"] = idx
    out["tf.diff_cond"] = hart.diffusion_condition(h_last, idx, tok.quantize.embedding)
    rest = expected.get("enc.f_rest_wo_last_discrete", out.get("enc.f_rest_wo_last_discrete"))
    if rest is not None:
        out["tf.diff_target"] = rest - tok.quantize.embedding(idx)


def _diffusion_rows(cfg, hart, expected, out) -> None:
    x, t, c = expected["diff.x"], expected["diff.t"], expected["diff.c"]
    out["diff.x"], out["diff.t"], out["diff.c"] = x, t, c  # inputs, echoed so every stored tensor has a row
    dh = cfg.get("diffusion_head", {})
    s = float(dh.get("sample_cfg", 1.0))
    net = hart.diffloss.net
    C = x.shape[1]
    out["diff.out"] = net(x, t, c)
    half = x[: x.shape[0] // 2]
    raw = net(torch.cat((half, half)), t, c)
    e = raw[: len(half), :C] * (1 + s) - s * raw[len(half) :, :C]
    out["diff.out_cfg"] = torch.cat((torch.cat((e, e)), raw[:, C:]), dim=1)
    from .diffusion import GaussianDiffusion

    proc = GaussianDiffusion.respaced(hart.cfg.diffusion.diffusion, hart.cfg.num_sampling_steps)
    gen = torch.Generator().manual_seed(int(dh.get("sample_seed", 0)))
    res = sample_residual(
        hart.diffloss, proc, c, s, guided=True, temperature=float(dh.get("temperature", 1.0)), generator=gen
    )
    out["diff.sample"] = res * hart.cfg.vae_scale


def _generation(g: dict, hcfg: HARTConfig, tok, hart, text: TextFeatures, out) -> None:
    prefix = g.get("prefix", f"gen.{g['name']}.")
    S = len(hcfg.patch_nums)
    B = int(g.get("B", text.batch))
    guidance = Guidance(schedule="list", per_stage=hart_guidance_scales(float(g["cfg"]), S))
    head = HARTHead(
        hart,
        tok.quantize.embedding,
        guidance,
        top_p=float(g.get("top_p", 0.0)),
        smooth=bool(g.get("more_smooth", False)),
        diffusion_generator=torch.Generator().manual_seed(int(g.get("diff_seed", 0))),
        record=True,
    )
    rec = _RecordingTokenizer(tok)
    t_in = TextFeatures(
        text.features[:B], text.mask[:B], None if text.position_ids is None else text.position_ids[:B]
    )
    res = generate(
        hart,
        rec,  # type: ignore[arg-type]
        condition=hart.condition(t_in, guidance.enabled),
        guidance=guidance,
        head=head,
        generator=torch.Generator().manual_seed(int(g["g_seed"])),
        record_logits=True,
    )
    assert res.logits is not None and head.records is not None
    out[prefix + "idx"] = torch.cat(res.tokens, dim=1)
    if g.get("store_logits", True):
        out[prefix + "logits_cfg"] = torch.cat(res.logits, dim=1)
    if rec.fhat_pre_last is not None:
        out[prefix + "fhat_pre_last"] = rec.fhat_pre_last
    if "diff_cond" in head.records:
        out[prefix + "diff_cond"] = head.records["diff_cond"]
        out[prefix + "diff_residual"] = head.records["diff_residual"]
    out[prefix + "fhat"] = res.canvas
    out[prefix + "img"] = res.images
