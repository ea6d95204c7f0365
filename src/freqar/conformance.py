"""Check freqar against tensors recomputed by the upstream code (``shared/conformance`` fixture format).

Everything is driven by the fixture's ``config.json``: any scale schedule, per-block or shared AdaLN,
any size, any list of generations. Integer tensors must match exactly, floats within 1e-4 or the
per-tensor ``tolerances``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .conformance_far import FAR_FILES, compute_far_fixture
from .engine.generate import generate
from .engine.guidance import Guidance
from .engine.sampling import SamplerConfig
from .errors import FreqarError
from .io import load_safetensors, load_torch_file, read_json
from .models.var import VARConfig, VARTransformer
from .tokenizers.msvq import VQVAE, MSVQConfig

DEFAULT_TOL = 1e-4


@dataclass
class Row:
    name: str
    max_abs_err: float
    tol: float
    ok: bool
    note: str = ""


def _vae_config(v: dict) -> MSVQConfig:
    return MSVQConfig(
        vocab_size=v["vocab_size"],
        z_channels=v["z_channels"],
        ch=v["ch"],
        ch_mult=tuple(v["ch_mult"]),
        num_res_blocks=v.get("num_res_blocks", 2),
        dropout=v.get("dropout", 0.0),
        beta=v.get("beta", 0.25),
        using_znorm=v.get("using_znorm", False),
        quant_conv_ks=v.get("quant_conv_ks", 3),
        quant_resi=v.get("quant_resi", 0.5),
        share_quant_resi=v.get("share_quant_resi", 4),
        patch_nums=tuple(v["v_patch_nums"]),
        in_channels=v.get("in_channels", 3),
        using_sa=v.get("using_sa", True),
        using_mid_sa=v.get("using_mid_sa", True),
        groupnorm_groups=v.get("groupnorm_groups", 32),
    )


def _var_config(c: dict, vae: MSVQConfig) -> VARConfig:
    return VARConfig(
        depth=c["depth"],
        embed_dim=c["embed_dim"],
        num_heads=c["num_heads"],
        mlp_ratio=c.get("mlp_ratio", 4.0),
        norm_eps=c.get("norm_eps", 1e-6),
        shared_aln=c.get("shared_aln", False),
        attn_l2_norm=c.get("attn_l2_norm", True),
        num_classes=c["num_classes"],
        patch_nums=tuple(c["patch_nums"]),
        vocab_size=vae.vocab_size,
        z_channels=vae.z_channels,
    )


def _split(flat_BL: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    return list(flat_BL.split([p * p for p in patch_nums], dim=1))


def compute_var_fixture(fixture_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Recompute every tensor a VAR fixture describes, with freqar's modules and engine."""
    d = Path(fixture_dir)
    cfg = read_json(d / "config.json")
    if not str(cfg.get("format", "")).startswith("freqar-var-fixture/"):
        raise FreqarError(f"'{d / 'config.json'}': unsupported fixture format {cfg.get('format')!r}")
    try:
        vae_cfg = _vae_config(cfg["vae"])
        var_cfg = _var_config(cfg["var"], vae_cfg)
    except KeyError as e:
        raise FreqarError(f"'{d / 'config.json'}': missing key {e}") from None
    vae, var = VQVAE(vae_cfg).eval(), VARTransformer(var_cfg).eval()
    vae.load_official(load_torch_file(d / "vae.pth"), str(d / "vae.pth"))
    var.load_official(load_torch_file(d / "var.pth"), str(d / "var.pth"))
    expected = load_safetensors(d / "expected.safetensors")
    pn = vae_cfg.patch_nums
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if "input.images" in expected:
            img = expected["input.images"]
            out["input.images"] = img  # an input, echoed so that every stored tensor gets a row
            f = vae.encode_latent(img)
            idx_list, fhats = vae.quantize.encode(f)
            out["enc.f"] = f
            out["enc.idx"] = torch.cat(idx_list, dim=1)
            out["enc.fhat_per_scale"] = torch.stack(fhats)
            out["enc.fhat"] = fhats[-1]
            out["vae.recon"] = vae.decode_fhat(fhats[-1].clone())
        if "enc.idx" in expected:
            idx_list = _split(expected["enc.idx"], pn)
            out["vae.fhat_from_idx"] = vae.quantize.idx_to_fhat(idx_list)
            out["vae.recon_from_idx"] = vae.decode_indices(idx_list)
            x_tf = vae.quantize.teacher_forcing_input(idx_list)
            out["tf.x_BLCv_wo_first_l"] = x_tf
            tf = cfg.get("teacher_forcing", {})
            labels = torch.tensor(tf.get("labels", []), dtype=torch.long)
            if len(labels):
                out["tf.labels"] = labels
                out["tf.logits"] = var(labels, expected.get("tf.x_BLCv_wo_first_l", x_tf))
        for g in cfg.get("generations", []):
            prefix = g.get("prefix", f"gen.{g['name']}.")
            gen = torch.Generator().manual_seed(int(g["g_seed"]))
            labels = None if g.get("labels") is None else torch.tensor(g["labels"], dtype=torch.long)
            res = generate(
                var,
                vae,
                labels=labels,
                batch=int(g["B"]),
                num_classes=var_cfg.num_classes,
                guidance=Guidance(cfg=float(g["cfg"]), schedule="linear"),
                sampler=SamplerConfig(
                    top_k=int(g.get("top_k", 0)),
                    top_p=float(g.get("top_p", 0.0)),
                    smooth=bool(g.get("more_smooth")),
                ),
                generator=gen,
                record_logits=True,
            )
            assert res.logits is not None
            out[prefix + "labels"] = res.labels
            out[prefix + "idx"] = torch.cat(res.tokens, dim=1)
            out[prefix + "logits_cfg"] = torch.cat(res.logits, dim=1)
            out[prefix + "fhat"] = res.canvas
            out[prefix + "img"] = res.images
    return out


def compare(
    fixture_dir: str | os.PathLike[str], computed: dict[str, torch.Tensor] | None = None
) -> list[Row]:
    """One row per expected tensor: max abs error against the fixture and pass/fail."""
    d = Path(fixture_dir)
    cfg = read_json(d / "config.json")
    tolerances = cfg.get("tolerances", {}) or {}
    expected = load_safetensors(d / "expected.safetensors")
    if computed is None and _is_hart(cfg):
        from .conformance_hart import compute_hart_fixture

        computed = compute_hart_fixture(d)
    if computed is None and _is_infinity(cfg):
        from .conformance_infinity import compute_infinity_fixture

        computed = compute_infinity_fixture(d)
    if computed is None:
        computed = compute_far_fixture(d) if _is_far(cfg) else compute_var_fixture(d)
    rows = []
    for name in sorted(expected, key=_order(cfg)):
        exp = expected[name]
        got = computed.get(name)
        float_tol = float(tolerances.get(name, DEFAULT_TOL))
        tol = float_tol if exp.is_floating_point() else _int_tolerance(cfg, name)
        if got is None:
            rows.append(Row(name, float("inf"), tol, False, "not computed"))
            continue
        if tuple(got.shape) != tuple(exp.shape):
            rows.append(
                Row(name, float("inf"), tol, False, f"shape {tuple(got.shape)} != {tuple(exp.shape)}")
            )
            continue
        if exp.is_floating_point():
            err = float((got.double() - exp.double()).abs().max()) if exp.numel() else 0.0
            ok = err <= tol
        else:
            diff = int((got.long() != exp.long()).sum().item())
            err = float((got.long() - exp.long()).abs().max()) if exp.numel() else 0.0
            ok = diff == 0 or err <= tol
        note = "" if exp.is_floating_point() or diff == 0 else f"{diff} of {exp.numel()} entries differ"
        rows.append(Row(name, err, tol, ok, note))
    return rows


def _is_far(cfg: object) -> bool:
    """FAR fixtures are recognised by their format tag (``freqar-far-fixture/N``)."""
    return isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("freqar-far-fixture/")


def _is_infinity(cfg: object) -> bool:
    """Infinity fixtures are recognised by their format tag (``freqar-infinity-fixture/N``)."""
    return isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("freqar-infinity-fixture/")


def _int_tolerance(cfg: dict, name: str) -> float:
    """Integer tensors are exact, except where a fixture format documents an allowed difference."""
    if _is_infinity(cfg):
        from .conformance_infinity import uint8_tolerance

        return float(uint8_tolerance(name))
    return 0.0


def _is_hart(cfg: object) -> bool:
    """HART fixtures are recognised by their format tag (``freqar-hart-fixture/N``)."""
    return isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("freqar-hart-fixture/")


def _order(cfg: dict):
    listed = list(cfg.get("tensors", {}))
    return lambda n: (listed.index(n) if n in listed else len(listed), n)


def run(fixture_dir: str | os.PathLike[str]) -> list[Row]:
    """Validate the fixture folder, then compare; raises FreqarError for missing files."""
    d = Path(fixture_dir)
    files = ("config.json", "vae.pth", "var.pth", "expected.safetensors")
    if (d / "config.json").is_file() and _is_far(read_json(d / "config.json")):
        files = FAR_FILES
    if (d / "config.json").is_file() and _is_hart(read_json(d / "config.json")):
        from .conformance_hart import FILES as HART_FILES

        files = HART_FILES
    if (d / "config.json").is_file() and _is_infinity(read_json(d / "config.json")):
        from .conformance_infinity import fixture_files

        files = fixture_files(read_json(d / "config.json"))
    for f in files:
        if not (d / f).is_file():
            raise FreqarError(f"fixture file missing: '{d / f}'")
    return compare(d)
