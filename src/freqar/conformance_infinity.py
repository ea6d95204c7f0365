"""Recompute an Infinity conformance fixture (``freqar-infinity-fixture/1``) with freqar's modules and engine.

Driven by ``config.json`` only: VAE widths and key layout, transformer sizes, block chunks, the scale
schedule and its RoPE reference grid, and every generation (cfg/tau lists, top-k/top-p, CFG placement).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .engine.generate import generate
from .engine.heads import BitwiseHead
from .errors import FreqarError
from .io import load_safetensors, load_torch_file, read_json
from .models.infinity import Infinity, InfinityConfig
from .tokenizers.bsq import BSQVAE, BSQConfig

FORMAT_PREFIX = "freqar-infinity-fixture/"
FILES = ("config.json", "expected.safetensors")


def bsq_config(v: dict) -> BSQConfig:
    """BSQ VAE config from a fixture's ``vae`` section."""
    return BSQConfig(
        codebook_dim=int(v["codebook_dim"]),
        base_ch=int(v["base_ch"]),
        encoder_ch_mult=tuple(v["encoder_ch_mult"]),
        decoder_ch_mult=tuple(v["decoder_ch_mult"]),
        num_res_blocks=int(v.get("num_res_blocks", 2)),
        patch_size=int(v["patch_size"]),
        in_channels=int(v.get("in_channels", 3)),
    )


def infinity_config(c: dict, d: int) -> InfinityConfig:
    """Transformer config from a fixture's ``infinity`` section (``d`` = bits per token)."""
    if int(c.get("apply_spatial_patchify", 0)):
        raise FreqarError("Infinity fixtures with apply_spatial_patchify=1 (8B) are not supported yet")
    if int(c.get("rope2d_normalized_by_hw", 2)) != 2 or not c.get("cos_attn", True):
        raise FreqarError("only rope2d_normalized_by_hw=2 with cosine attention is supported")
    return InfinityConfig(
        depth=int(c["depth"]),
        embed_dim=int(c["embed_dim"]),
        num_heads=int(c["num_heads"]),
        mlp_ratio=float(c.get("mlp_ratio", 4.0)),
        block_chunks=int(c.get("block_chunks", 1)),
        text_channels=int(c["text_channels"]),
        text_maxlen=int(c["text_maxlen"]),
        codebook_dim=d,
        norm_eps=float(c.get("norm_eps", 1e-6)),
        rope_base=float(c.get("rope_base", 10000.0)),
        rope_max_grid=int(c.get("rope_max_grid", 128)),
        lvl_embed_rows=int(c.get("lvl_embed_rows", 15)),
    )


def _grids(scales: list) -> list[tuple[int, int]]:
    return [(int(s[-2]), int(s[-1])) for s in scales]


def compute_infinity_fixture(fixture_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor an Infinity fixture describes, recomputed."""
    d = Path(fixture_dir)
    cfg = read_json(d / "config.json")
    if not str(cfg.get("format", "")).startswith(FORMAT_PREFIX):
        raise FreqarError(f"'{d / 'config.json'}': unsupported fixture format {cfg.get('format')!r}")
    try:
        vcfg = bsq_config(cfg["vae"])
        icfg = infinity_config(cfg["infinity"], vcfg.codebook_dim)
        schedule = _grids(cfg["scale_schedule"])
        rope_ref = _grids(cfg["rope_reference_scales"])[-1]
        vae_file = d / cfg["vae"].get("file", "vae.pth")
        inf_file = d / cfg["infinity"].get("file", "infinity.pth")
    except KeyError as e:
        raise FreqarError(f"'{d / 'config.json'}': missing key {e}") from None
    vae, model = BSQVAE(vcfg).eval(), Infinity(icfg).eval()
    vae.load_official(load_torch_file(vae_file, key=cfg["vae"].get("wrapper_key", "vae")), str(vae_file))
    model.load_official(load_torch_file(inf_file), str(inf_file))
    expected = load_safetensors(d / "expected.safetensors")
    sizes = [h * w for h, w in schedule]
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        feats, lens = expected.get("text.features"), expected.get("text.lens")
        if feats is not None:
            out["text.features"], out["text.lens"] = feats, lens  # inputs, echoed
        if "input.images" in expected:
            img = expected["input.images"]
            out["input.images"] = img
            raw = vae.encode_raw(img)
            summed, bits = vae.quantize(raw, schedule)
            out["enc.raw_features"] = raw
            out["enc.bits"] = torch.cat(bits, dim=1)
            out["enc.summed_codes"] = summed
            out["vae.recon"] = vae.decode_latent(summed.clone())
        if "enc.bits" in expected:
            bits = list(expected["enc.bits"].split(sizes, dim=1))
            z = vae.summed_from_bits(bits, schedule)
            out["vae.summed_from_bits"] = z
            out["vae.recon_from_bits"] = vae.decode_latent(z.clone())
            x_tf = vae.teacher_forcing_input(bits, schedule)
            out["tf.x_BLC_wo_prefix"] = x_tf
            if feats is not None and lens is not None:
                x_in = expected.get("tf.x_BLC_wo_prefix", x_tf)
                out["tf.logits"] = model(feats, lens, x_in, schedule, rope_ref)
        stages = vae.stages(schedule)
        run = model.bind(schedule, rope_ref)
        for g in cfg.get("generations", []):
            if feats is None or lens is None:
                raise FreqarError("fixture has generations but no text.features / text.lens")
            if g.get("negative_prompt") is not None or int(g.get("gt_leak", 0)):
                raise FreqarError(f"generation '{g['name']}': negative prompts / gt_leak are not supported")
            prefix = g.get("prefix", f"gen.{g['name']}.")
            S = len(schedule)
            cfg_list = [float(c) for c in g["cfg_list"]][:S]
            tau_list = [float(t) for t in g["tau_list"]][:S]
            layers = [int(i) for i in g.get("cfg_insertion_layer", [0])]
            guided = any(c != 1 for c in cfg_list)
            cond = model.condition_text(
                feats[: int(g["B"])],
                lens[: int(g["B"])],
                guided=guided,
                cfg=tuple(cfg_list),
                cfg_layers=tuple(icfg.depth + i for i in layers if i < 0),
            )
            head = BitwiseHead(
                run,
                cfg_list,
                tau_list,
                top_k=int(g.get("top_k", 0)),
                top_p=float(g.get("top_p", 0.0)),
                cfg_on_logits=0 in layers,
            )
            gen = torch.Generator().manual_seed(int(g["g_seed"]))
            res = generate(run, stages, condition=cond, head=head, generator=gen, record_logits=True)
            assert res.logits is not None
            out[prefix + "logits"] = torch.cat(res.logits, dim=1)
            out[prefix + "bits"] = torch.cat(res.tokens, dim=1)
            out[prefix + "summed_codes"] = res.canvas
            out[prefix + "img"] = res.images.mul(2).sub(1)  # the engine returns (img + 1) / 2
            out[prefix + "img_uint8_bgr"] = to_uint8_bgr(res.images)
    return out


def to_uint8_bgr(img01_B3HW: torch.Tensor) -> torch.Tensor:
    """Upstream's returned image from (img+1)/2: ·255 truncated to uint8, HWC, channels flipped to BGR."""
    return img01_B3HW.permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,)).long()


def uint8_tolerance(name: str) -> int:
    """``gen.*.img_uint8_bgr`` may differ by 1 where 127.5·(img+1) sits on an integer boundary."""
    return 1 if name.startswith("gen.") and name.endswith(".img_uint8_bgr") else 0


def fixture_files(cfg: dict) -> tuple[str, ...]:
    """Files an Infinity fixture must hold (weight file names come from its config)."""
    vae = str(cfg.get("vae", {}).get("file", "vae.pth"))
    inf = str(cfg.get("infinity", {}).get("file", "infinity.pth"))
    return (*FILES, vae, inf)
