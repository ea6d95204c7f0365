"""HART training: the hybrid tokenizer's two decoder inputs, losses going down, exact resume, the export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freqar.cli import main
from freqar.train.config import DataConfig, OptimConfig, RunConfig
from freqar.train.data import load_dataset, to_unit
from freqar.train.dist import DistContext
from freqar.train.hart import HARTModelConfig, HARTTask, HARTTrainConfig, HARTTrainSettings, train_hart
from freqar.train.hart_tokenizer import (
    HARTTokenizerTrainConfig,
    HybridSettings,
    HybridTrainModule,
    load_hybrid_tokenizer,
    train_hart_tokenizer,
)
from freqar.train.loop import TrainLoop
from train_helpers import tok_config, write_manifest_dataset


def hybrid_config(data: Path, steps: int = 6, skip: float = 0.5) -> HARTTokenizerTrainConfig:
    base = tok_config(data, steps=steps)
    parts = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return HARTTokenizerTrainConfig(**parts, hybrid=HybridSettings(skip_continuous_prob=skip))


def hart_config(data: Path, tokenizer: Path, steps: int = 6, ckpt_every: int = 100) -> HARTTrainConfig:
    return HARTTrainConfig(
        model=HARTModelConfig(
            depth=1, embed_dim=32, num_heads=2, context_token=2, context_dim=16, diff_width=32, diff_depth=1
        ),
        hart=HARTTrainSettings(tokenizer=str(tokenizer), label_drop=0.2, diffusion_batch_mul=2, cfg=1.5),
        data=DataConfig(path=str(data), size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, ema_decay=0.9),
        run=RunConfig(steps=steps, batch_size=4, ckpt_every=ckpt_every, log_every=1),
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def hybrid_tok(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("htok")
    train_hart_tokenizer(hybrid_config(data_dir, steps=12), out, progress=False)
    return out


def test_hybrid_decoder_sees_exact_latent_or_discrete_sum(data_dir: Path, hybrid_tok: Path) -> None:
    """skip 0: the decoder input is the encoder's latent; skip 1: the discrete sum without Phi at the end."""
    tok = load_hybrid_tokenizer(hybrid_tok)
    x = to_unit(load_dataset(DataConfig(path=str(data_dir), size=16)).images[:3])
    seen: list[torch.Tensor] = []
    tok.post_quant_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        f = tok.encode_latent(x)
        disc = tok.quantize_hybrid(f, skip_continuous=True).fhat
        for skip, want in ((0.0, f), (1.0, disc)):
            mod = HybridTrainModule(tok, skip)
            mod.generator = torch.Generator().manual_seed(0)
            mod(x)
            assert torch.allclose(seen[-1], want, atol=1e-6), skip
            assert mod.kept == 1.0 - skip
    # without the last-scale rule (VAR's Phi at every scale) the discrete sum differs
    assert not torch.allclose(tok.quantize.idx_to_fhat(tok.quantize_hybrid(f).idx), disc, atol=1e-4)


def test_hart_tokenizer_loss_decreases_and_exports(hybrid_tok: Path) -> None:
    hist = torch.load(hybrid_tok / "checkpoint.pt", weights_only=True)["history"]["loss"]
    assert hist[-3:].mean() < hist[:3].mean()
    info = json.loads((hybrid_tok / "tokenizer" / "config.json").read_text())
    assert info["hybrid"] == {"skip_continuous_prob": 0.5} and 0 < info["codebook_used"] <= 1


def test_hart_losses_decrease_and_export_generates(tmp_path: Path, data_dir: Path, hybrid_tok: Path) -> None:
    from freqar.registry import create_model

    cfg = hart_config(data_dir, hybrid_tok, steps=14)
    task = HARTTask(cfg, load_dataset(cfg.data), DistContext(), tmp_path)
    with torch.no_grad():
        _, before, _ = task.compute_loss(task.module, 0)
    loop = TrainLoop(task, {"task": "hart"}, cfg.optim, cfg.run, tmp_path, DistContext(), progress=False)
    res = loop.fit()
    with torch.no_grad():
        _, after, _ = task.compute_loss(loop.model, 0)
    assert after["ce"] < before["ce"] and after["diff"] < before["diff"], (before, after)
    assert np.mean(res.history["loss"][-3:]) < np.mean(res.history["loss"][:3])
    pipe = create_model(str(res.export))
    assert pipe.family == "hart" and pipe.class_names == ["square", "disc", "stripes"]
    out = pipe.generate([0, 2], seed=0, cfg=None, top_k=None, top_p=None)  # eval's call
    assert out.images.shape == (2, 3, 16, 16) and out.labels.tolist() == [0, 2]
    assert torch.equal(out.images, pipe.generate([0, 2], seed=0).images)
    png = tmp_path / "g.png"
    assert (
        main(["generate", "--model", str(res.export), "--labels", "1,2", "--out", str(png), "--quiet"]) == 0
    )
    assert png.is_file()
    late = ["generate", "--model", str(res.export), "--labels", "1", "--late-from", "2", "--out", str(png)]
    assert main([*late, "--quiet"]) == 2  # a trained HART refuses VAR's late-stage flags (one line)


def test_hart_resume_gives_the_same_next_losses(tmp_path: Path, data_dir: Path, hybrid_tok: Path) -> None:
    from test_train import _run_until

    full = train_hart(hart_config(data_dir, hybrid_tok, 3, ckpt_every=2), tmp_path / "full", progress=False)
    _run_until(train_hart, hart_config(data_dir, hybrid_tok, 3, ckpt_every=2), tmp_path / "cut", stop_after=2)
    resumed = train_hart(hart_config(data_dir, hybrid_tok, 3, ckpt_every=2), tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]


def test_cli_train_hart_tokenizer_then_hart(tmp_path: Path, data_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    y = tmp_path / "t.yaml"
    y.write_text(
        "model: {vocab_size: 16, z_channels: 4, ch: 8, ch_mult: [1, 2], num_res_blocks: 1, using_sa: false,\n"
        "        using_mid_sa: false, groupnorm_groups: 4, patch_nums: [1, 2, 4, 8]}\n"
        "hybrid: {skip_continuous_prob: 0.3}\ndata: {size: 16}\nrun: {batch_size: 2, log_every: 1}\n"
    )
    common = ["--data", str(data_dir), "--steps", "1", "--no-progress"]
    assert main(["train", "hart-tokenizer", "--config", str(y), "--out", str(tmp_path / "t"), *common]) == 0
    h = tmp_path / "h.yaml"
    h.write_text(
        "model: {depth: 1, embed_dim: 16, num_heads: 2, context_dim: 8, diff_width: 16, diff_depth: 1}\n"
        "data: {size: 16}\nrun: {batch_size: 2, log_every: 1}\n"
    )
    args = [
        "train",
        "hart",
        "--config",
        str(h),
        "--out",
        str(tmp_path / "h"),
        "--tokenizer",
        str(tmp_path / "t"),
    ]
    assert main([*args, *common]) == 0
    assert (tmp_path / "h" / "model" / "model.safetensors").is_file()
    bad = [
        "train",
        "hart",
        "--config",
        str(h),
        "--out",
        str(tmp_path / "h2"),
        *common,
        "--set",
        "hart.diffusion_batch_mul=0",
    ]
    assert main([*bad, "--tokenizer", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "hart.diffusion_batch_mul" in err and err.count("\n") == 1
