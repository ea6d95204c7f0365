"""FAR training: KL and FAR losses go down, resume is exact, exports load and generate; the shipped
``far-emoji`` model loads offline and generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from freqar.cli import main
from freqar.registry import bundled_dir
from freqar.train.config import DataConfig, OptimConfig, RunConfig
from freqar.train.far import FARModelConfig, FARTrainConfig, FARTrainSettings, level_weights, train_far
from freqar.train.kl import KLLoss, KLModelConfig, KLTrainConfig, load_kl, train_kl
from test_train import _run_until
from train_helpers import write_manifest_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest_dataset(tmp_path_factory.mktemp("data") / "shapes")


def kl_cfg(data: Path, steps: int = 12, ckpt_every: int = 100) -> KLTrainConfig:
    """16 px -> a 4x4x4 latent (stride 4), a few thousand parameters."""
    return KLTrainConfig(
        model=KLModelConfig(embed_dim=4, ch=8, ch_mult=[1, 1, 2], num_res_blocks=1, groupnorm_groups=4),
        loss=KLLoss(l1_weight=0.5, kl_weight=1e-4, scale_images=16),
        data=DataConfig(path=str(data), size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0, ema_decay=0.9),
        run=RunConfig(steps=steps, batch_size=4, ckpt_every=ckpt_every, log_every=1),
    )


def far_cfg(
    data: Path, kl: Path, steps: int = 12, ckpt_every: int = 100, mask_prob: float = 0.5
) -> FARTrainConfig:
    return FARTrainConfig(
        model=FARModelConfig(
            encoder_embed_dim=32,
            encoder_depth=1,
            encoder_num_heads=2,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=2,
            buffer_size=2,
            diffloss_d=1,
            diffloss_w=32,
            diffusion_batch_mul=2,
        ),
        far=FARTrainSettings(kl=str(kl), label_drop=0.2, mask_prob=mask_prob, steps="3", cfg=2.0),
        data=DataConfig(path=str(data), size=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, ema_decay=0.9),
        run=RunConfig(steps=steps, batch_size=4, ckpt_every=ckpt_every, log_every=1),
    )


@pytest.fixture(scope="module")
def trained_kl(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("kl")
    train_kl(kl_cfg(data_dir), out, progress=False)
    return out


def test_kl_loss_decreases_and_exports(trained_kl: Path) -> None:
    hist = torch.load(trained_kl / "checkpoint.pt", weights_only=True)["history"]["loss"]
    assert hist[-3:].mean() < 0.7 * hist[:3].mean()
    info = json.loads((trained_kl / "kl" / "config.json").read_text())
    vae = load_kl(trained_kl)
    assert vae.cfg.latent_side == 4 and vae.cfg.embed_dim == 4
    assert vae.cfg.scale_factor == pytest.approx(1 / info["latent_std"], rel=1e-4)
    assert (trained_kl / "kl" / "recon.png").is_file()
    # the scale makes the training latents about unit-variance
    from freqar.train.data import load_dataset, to_unit

    imgs = to_unit(load_dataset(_data(trained_kl)).images[:16])
    assert vae.encode(imgs).std().item() == pytest.approx(1.0, rel=0.05)


def _data(run: Path) -> DataConfig:
    cfg = json.loads((run / "kl" / "config.json").read_text())["train_config"]["data"]
    return DataConfig(**cfg)


def test_kl_resume_is_exact(tmp_path: Path, data_dir: Path) -> None:
    full = train_kl(kl_cfg(data_dir, steps=4, ckpt_every=2), tmp_path / "full", progress=False)
    _run_until(train_kl, kl_cfg(data_dir, steps=4, ckpt_every=2), tmp_path / "cut", stop_after=2)
    resumed = train_kl(kl_cfg(data_dir, steps=4, ckpt_every=2), tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]


def test_far_loss_decreases_exports_and_generates(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """The diffusion loss on fixed latents, levels, t and noise: trained weights beat the initial ones."""
    from freqar.models.far_pipeline import create_far_model, is_far_model
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.far import FARTask

    cfg = far_cfg(data_dir, trained_kl, steps=30)
    task = FARTask(cfg, load_dataset(cfg.data), DistContext(), tmp_path)
    idx = torch.arange(8)
    z, labels = task.latents(idx, torch.Generator().manual_seed(0)), task.data.labels[idx]

    @torch.no_grad()
    def held_loss(model: torch.nn.Module) -> float:
        model.eval()
        g = torch.Generator().manual_seed(1)
        return sum(model(z, labels, generator=g, level=s)["loss"].item() for s in range(4)) / 4

    before = held_loss(task.module)
    res = train_far(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    task.module.load_state_dict(state)
    assert held_loss(task.module) < 0.8 * before
    assert res.export is not None and is_far_model(str(res.export))
    pipe = create_far_model(str(res.export))
    assert pipe.class_names == ["square", "disc", "stripes"]
    assert pipe.defaults.steps == "3" and pipe.defaults.cfg == 2.0
    assert pipe.tokenizer().levels == (0, 1, 2, 3)  # every core size of the 4x4 latent
    out = pipe.generate([0, 2], seed=0)
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    again = pipe.generate([0, 2], seed=0)
    assert torch.equal(out.images, again.images)


def test_far_resume_is_exact(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """Masked and unmasked batches, posterior draws, label drop: all a function of (seed, step)."""
    full = train_far(far_cfg(data_dir, trained_kl, steps=4, ckpt_every=2), tmp_path / "full", progress=False)
    _run_until(
        train_far, far_cfg(data_dir, trained_kl, steps=4, ckpt_every=2), tmp_path / "cut", stop_after=2
    )
    resumed = train_far(
        far_cfg(data_dir, trained_kl, steps=4, ckpt_every=2), tmp_path / "cut", progress=False
    )
    assert resumed.history["loss"] == full.history["loss"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_far_without_masking_leaves_the_mask_token_alone(
    tmp_path: Path, data_dir: Path, trained_kl: Path
) -> None:
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.far import FARTask

    cfg = far_cfg(data_dir, trained_kl, mask_prob=0.0)
    task = FARTask(cfg, load_dataset(cfg.data), DistContext(), tmp_path)
    assert not task.module.mask_token.requires_grad
    assert len(list(tmp_path.glob("moments-*.pt"))) == 1  # the encoded data set is cached


def test_frequency_aware_weights() -> None:
    w = level_weights("sin", 8)
    assert w is not None and len(w) == 8
    assert w[0] == pytest.approx(1 + math.sin(math.pi / 16)) and w[-1] == pytest.approx(2.0)
    assert all(b > a for a, b in zip(w, w[1:], strict=False))
    assert level_weights("none", 8) is None


def test_cli_train_kl_and_far(tmp_path: Path, data_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    y = tmp_path / "kl.yaml"
    y.write_text(
        "model: {embed_dim: 4, ch: 8, ch_mult: [1, 1, 2], groupnorm_groups: 4}\n"
        "loss: {scale_images: 8}\ndata: {size: 16}\nrun: {batch_size: 2, log_every: 1}\n"
    )
    kl = tmp_path / "kl"
    args = ["train", "tokenizer", "--kind", "kl", "--config", str(y), "--data", str(data_dir)]
    assert main([*args, "--out", str(kl), "--steps", "2", "--no-progress"]) == 0
    assert (kl / "kl" / "model.safetensors").is_file()
    f = tmp_path / "far.yaml"
    f.write_text(
        "model: {encoder_embed_dim: 16, encoder_depth: 1, encoder_num_heads: 2, decoder_embed_dim: 16,\n"
        "        decoder_depth: 1, decoder_num_heads: 2, buffer_size: 1, diffloss_d: 1, diffloss_w: 16}\n"
        "far: {steps: '2'}\ndata: {size: 16}\nrun: {batch_size: 2, log_every: 1}\n"
    )
    far = tmp_path / "far"
    fargs = ["train", "far", "--config", str(f), "--data", str(data_dir), "--out", str(far)]
    assert main([*fargs, "--tokenizer", str(kl), "--steps", "2", "--no-progress"]) == 0
    assert "trained far: 2 steps" in capsys.readouterr().out
    png = tmp_path / "x.png"
    assert (
        main(["generate", "--model", str(far / "model"), "--labels", "0,1", "--out", str(png), "--quiet"])
        == 0
    )
    assert png.is_file()
    # `freqar eval` scores the KL autoencoder's reconstructions as the bound for a FAR model
    from freqar.eval.run import reconstructions
    from freqar.models.far_pipeline import create_far_model
    from freqar.train.data import load_manifest_dataset

    held = load_manifest_dataset(data_dir, "heldout").images[:3]
    rec = reconstructions(create_far_model(str(far / "model")), held)
    assert rec is not None and rec.shape == (3, 3, 16, 16) and 0 <= rec.min() and rec.max() <= 1
    # bad input: one-line errors
    assert main([*fargs[:-1], str(tmp_path / "f2"), "--steps", "1"]) == 2
    assert "no autoencoder given (far.kl=" in capsys.readouterr().err
    assert main(["train", "var", "--kind", "kl", "--out", str(tmp_path / "v")]) == 2
    assert "--kind is only for `freqar train tokenizer`" in capsys.readouterr().err
    assert main([*fargs[:-1], str(tmp_path / "f3"), "--tokenizer", str(data_dir), "--steps", "1"]) == 2
    assert "no KL autoencoder export" in capsys.readouterr().err
    assert main([*fargs[:-1], str(tmp_path / "f4"), "--tokenizer", str(kl), "--set", "far.mask_prob=2"]) == 2
    assert "far.mask_prob must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.skipif(bundled_dir("far-emoji") is None, reason="far-emoji weights not in this checkout")
def test_far_emoji_ships_loads_and_generates(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from freqar.models.far_pipeline import FARPipeline, far_presets
    from freqar.registry import catalogue, create_model

    d = bundled_dir("far-emoji")
    assert d is not None
    assert sum(p.stat().st_size for p in d.iterdir()) <= 40 * 2**20
    assert "far-emoji" in far_presets() and any(r.name == "far-emoji" for r in catalogue("far-*"))
    pipe = create_model("far-emoji")  # the front door `freqar eval` uses
    assert isinstance(pipe, FARPipeline) and pipe.name == "far-emoji" and pipe.image_size == 128
    assert pipe.class_names is not None and len(pipe.class_names) == pipe.num_classes == 9
    assert pipe.tokenizer().levels == tuple(range(8))
    out = pipe.generate([0, 1], seed=0, steps="3")
    assert out.images.shape == (2, 3, 128, 128) and 0 <= out.images.min() and out.images.max() <= 1
    png = tmp_path / "x.png"
    args = ["generate", "--model", "far-emoji", "--labels", "0,1", "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(png)]) == 0 and png.is_file()
    assert "8 levels x 2 diffusion steps" in capsys.readouterr().out
    assert main([*args, "--vae", "x.ckpt", "--out", str(png)]) == 2
    assert "ships its own weights" in capsys.readouterr().err


def test_kl_init_starts_from_a_trained_export(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    import dataclasses

    from freqar.errors import CheckpointMismatch
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.kl import KLInit, KLTask

    cfg = dataclasses.replace(kl_cfg(data_dir), init=KLInit(path=str(trained_kl)))
    task = KLTask(cfg, load_dataset(cfg.data), DistContext())
    want = load_kl(trained_kl).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in task.module.vae.state_dict().items())
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ch=16))
    with pytest.raises(CheckpointMismatch, match="different autoencoder"):
        KLTask(other, load_dataset(cfg.data), DistContext())


def test_kl_decoder_only_keeps_latents_and_scale(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """init.decoder_only: encoder frozen (same latents, same exported scale), the decoder moves."""
    import dataclasses

    from freqar.errors import CheckpointMismatch
    from freqar.train.data import load_manifest_dataset, to_unit
    from freqar.train.kl import KLInit

    cfg = dataclasses.replace(kl_cfg(data_dir, steps=4), init=KLInit(path=str(trained_kl), decoder_only=True))
    train_kl(cfg, tmp_path / "ft", progress=False)
    before, after = load_kl(trained_kl), load_kl(tmp_path / "ft")
    assert after.cfg.scale_factor == before.cfg.scale_factor
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:4])
    assert torch.equal(before.encode(x), after.encode(x))
    sb, sa = before.state_dict(), after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if k.startswith("decoder."))
    with pytest.raises(CheckpointMismatch, match="init.path"):
        train_kl(dataclasses.replace(cfg, init=KLInit(decoder_only=True)), tmp_path / "x", progress=False)


def test_kl_wider_decoder_on_frozen_latents(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """A decoder-only run may change the decoder's width and depth: encoder, latents and scale stay; the new
    decoder starts fresh and learns; it swaps into a FAR export, which saves and reloads with it."""
    import dataclasses

    from freqar.errors import CheckpointMismatch, InvalidOption
    from freqar.models.far_pipeline import load_far_dir
    from freqar.tokenizers.kl import KLConfig
    from freqar.train.data import load_dataset, load_manifest_dataset, to_unit
    from freqar.train.decoder_swap import swap_decoder
    from freqar.train.dist import DistContext
    from freqar.train.kl import KLInit, KLTask

    base = kl_cfg(data_dir, steps=6)
    model = dataclasses.replace(base.model, decoder_ch=16, decoder_num_res_blocks=2)
    cfg = dataclasses.replace(base, model=model, init=KLInit(path=str(trained_kl), decoder_only=True))
    task = KLTask(cfg, load_dataset(cfg.data), DistContext())
    start = load_kl(trained_kl)
    assert torch.equal(task.module.vae.post_quant_conv.weight, start.post_quant_conv.weight)
    train_kl(cfg, tmp_path / "wide", progress=False)
    wide = load_kl(tmp_path / "wide")
    assert wide.cfg.decoder_ch == 16 and wide.cfg.decoder_num_res_blocks == 2
    assert wide.cfg.scale_factor == start.cfg.scale_factor
    n_dec = sum(p.numel() for p in wide.decoder.parameters())
    assert n_dec > 2 * sum(p.numel() for p in start.decoder.parameters())
    x = to_unit(load_manifest_dataset(data_dir, "train").images[:4])
    assert torch.equal(wide.encode(x), start.encode(x))
    assert wide.decode(wide.encode(x)).shape == x.shape
    # without decoder_only a different decoder is another autoencoder
    with pytest.raises(CheckpointMismatch, match="different autoencoder"):
        plain = dataclasses.replace(cfg, init=KLInit(path=str(trained_kl)))
        KLTask(plain, load_dataset(cfg.data), DistContext())
    # a deeper decoder of the same width starts exactly where the trained one ends
    deeper = dataclasses.replace(base.model, decoder_num_res_blocks=3)
    grown = KLTask(
        dataclasses.replace(base, model=deeper, init=KLInit(path=str(trained_kl), decoder_only=True)),
        load_dataset(cfg.data),
        DistContext(),
    ).module.vae
    assert len(grown.decoder.up[0].block) == 4 and len(start.decoder.up[0].block) == 2
    with torch.no_grad():
        mean = start.posterior(start.moments(x))[0]  # unscaled: the task's config has no scale until export
        want = start.decoder(start.post_quant_conv(mean))
        assert torch.allclose(grown.decoder(grown.post_quant_conv(mean)), want, atol=1e-5)
    # the unchanged fields are left out of the config, so older exports keep their fingerprint
    assert "decoder_ch" not in start.cfg.to_dict() and wide.cfg.to_dict()["decoder_ch"] == 16
    with pytest.raises(InvalidOption, match="decoder_ch"):
        KLConfig(ch=8, groupnorm_groups=4, decoder_ch=10)
    # swapped into a FAR model trained on the narrow decoder's latents: saved and reloaded intact
    first = train_far(far_cfg(data_dir, trained_kl, steps=2), tmp_path / "far", progress=False)
    pipe = load_far_dir(first.export)
    swap_decoder(pipe.vae, wide, "wide")
    assert pipe.vae.cfg.decoder_ch == 16
    out = pipe.generate([0, 1], seed=0).images
    again = load_far_dir(pipe.save(tmp_path / "far-wide"))
    assert again.vae.cfg.decoder_ch == 16 and torch.equal(again.generate([0, 1], seed=0).images, out)


def _far_ddp_worker(rank: int, world: int, port: int, data: str, kl: str, out: str, res: str) -> None:
    """One rank of a 2-process gloo FAR run; saves its live (not checkpointed) model for comparison."""
    import os

    from freqar.train.config import to_dict
    from freqar.train.data import load_dataset
    from freqar.train.dist import init_distributed, shutdown
    from freqar.train.far import FARTask
    from freqar.train.loop import TrainLoop

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ.update({**env, "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        cfg = far_cfg(Path(data), Path(kl), steps=3, ckpt_every=2)
        task = FARTask(cfg, load_dataset(cfg.data), ctx, Path(out))
        loop = TrainLoop(task, to_dict(cfg), cfg.optim, cfg.run, Path(out), ctx, progress=False)
        loop.fit()
        torch.save(loop.model.state_dict(), Path(res) / f"r{rank}.pt")
    finally:
        shutdown(ctx)


def test_far_ddp_two_processes_stay_identical(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """Masked and unmasked batches (mask_prob 0.5): every parameter gets a gradient on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    res = tmp_path / "res"
    res.mkdir()
    args = (2, port, str(data_dir), str(trained_kl), str(tmp_path / "run"), str(res))
    mp.spawn(_far_ddp_worker, args=args, nprocs=2, join=True)
    a, b = (torch.load(res / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a), "replicas differ"
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and all(torch.equal(a[k], ck["model"][k]) for k in a)
    assert not torch.equal(a["z_proj.weight"], _initial_far(data_dir, trained_kl, tmp_path)["z_proj.weight"])


def _initial_far(data: Path, kl: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.far import FARTask

    cfg = far_cfg(data, kl)
    return FARTask(cfg, load_dataset(cfg.data), DistContext(), tmp / "init").module.state_dict()


def test_far_init_starts_a_second_phase(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """far.init: the transformer starts from an export; another architecture or latent space is refused."""
    import dataclasses

    from freqar.errors import CheckpointMismatch
    from freqar.models.far_pipeline import load_far_dir
    from freqar.train.data import load_dataset
    from freqar.train.dist import DistContext
    from freqar.train.far import FARTask

    first = train_far(far_cfg(data_dir, trained_kl, steps=3), tmp_path / "p1", progress=False)
    cfg = far_cfg(data_dir, trained_kl, steps=2)
    cfg = dataclasses.replace(cfg, far=dataclasses.replace(cfg.far, init=str(tmp_path / "p1")))
    task = FARTask(cfg, load_dataset(cfg.data), DistContext(), tmp_path / "p2")
    want = load_far_dir(first.export).transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in task.module.state_dict().items())
    # deeper (more encoder, decoder and diffusion blocks of the same width): grown, same function at start
    deeper = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, encoder_depth=2, decoder_depth=3, diffloss_d=2)
    )
    grown = FARTask(deeper, load_dataset(cfg.data), DistContext(), tmp_path / "p5").module.eval()
    assert len(grown.encoder_blocks) == 2 and len(grown.decoder_blocks) == 3
    z = task.latents(torch.arange(4), torch.Generator().manual_seed(0))
    labels = task.data.labels[:4]
    base = task.module.eval()
    with torch.no_grad():
        for s in range(4):
            a = base(z, labels, generator=torch.Generator().manual_seed(s), level=s)["loss"]
            b = grown(z, labels, generator=torch.Generator().manual_seed(s), level=s)["loss"]
            assert torch.allclose(a, b, atol=1e-6)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, diffloss_w=48))
    with pytest.raises(CheckpointMismatch, match="different transformer"):
        FARTask(wider, load_dataset(cfg.data), DistContext(), tmp_path / "p3")
    other_kl = tmp_path / "kl-other"
    train_kl(
        dataclasses.replace(kl_cfg(data_dir, steps=2), run=RunConfig(steps=2, batch_size=4, seed=5)),
        other_kl,
        progress=False,
    )
    elsewhere = dataclasses.replace(cfg, far=dataclasses.replace(cfg.far, kl=str(other_kl)))
    with pytest.raises(CheckpointMismatch, match="another latent space"):
        FARTask(elsewhere, load_dataset(cfg.data), DistContext(), tmp_path / "p4")


def test_held_out_evaluation_for_kl_and_far(tmp_path: Path, data_dir: Path, trained_kl: Path) -> None:
    """run.eval_every on both FAR trainers: logged losses, training bit-identical to a run without it."""
    import dataclasses

    def ev(cfg, every: int = 2):  # type: ignore[no-untyped-def]
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval_every=every))

    kl_plain = train_kl(kl_cfg(data_dir, steps=3), tmp_path / "kl0", progress=False)
    kl_ev = train_kl(ev(kl_cfg(data_dir, steps=3)), tmp_path / "kl1", progress=False)
    assert kl_ev.history["loss"] == kl_plain.history["loss"]
    assert kl_ev.history["val_step"] == [2.0, 3.0] and all(p > 0 for p in kl_ev.history["val_psnr"])
    far_plain = train_far(far_cfg(data_dir, trained_kl, steps=3), tmp_path / "far0", progress=False)
    far_ev = train_far(ev(far_cfg(data_dir, trained_kl, steps=3)), tmp_path / "far1", progress=False)
    assert far_ev.history["loss"] == far_plain.history["loss"]
    a = torch.load(tmp_path / "far0" / "checkpoint.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "far1" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    vl, tl = far_ev.history["val_loss"], far_ev.history["train_eval_loss"]
    assert len(vl) == len(tl) == 2 and all(math.isfinite(x) for x in vl + tl)


def test_kl_adversarial_resume_is_exact(tmp_path: Path, data_dir: Path) -> None:
    """The KL autoencoder with the patch critic: the term changes training and resume stays exact."""
    from train_helpers import gan_config

    cfg = gan_config(kl_cfg(data_dir, steps=4, ckpt_every=2))
    full = train_kl(cfg, tmp_path / "full", progress=False)
    plain = train_kl(kl_cfg(data_dir, steps=4, ckpt_every=2), tmp_path / "plain", progress=False)
    assert full.history["loss"][1:] != plain.history["loss"][1:]
    _run_until(train_kl, cfg, tmp_path / "cut", stop_after=2)
    resumed = train_kl(cfg, tmp_path / "cut", progress=False)
    assert resumed.history["loss"] == full.history["loss"]


def test_kl_generated_latents_meet_the_critic_and_resume_exactly(
    tmp_path: Path, data_dir: Path, trained_kl: Path
) -> None:
    """loss.gen_latents on a KL autoencoder: a bank of 'z' latents is decoded beside the reconstructions and
    judged by the critic; the encoder (so the latents a FAR model was trained on) does not move; resume is
    exact; a bank without 'z', of the wrong shape, or outside a decoder-only critic run is a config error."""
    import dataclasses

    from freqar.errors import InvalidOption
    from freqar.io import save_safetensors
    from freqar.train.kl import KLInit
    from train_helpers import bank_runner, gan_config

    bank = tmp_path / "bank.safetensors"
    save_safetensors(bank, {"z": torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))})
    init = KLInit(path=str(trained_kl), decoder_only=True)
    base = gan_config(dataclasses.replace(kl_cfg(data_dir, steps=4, ckpt_every=2), init=init))
    cfg = dataclasses.replace(base, loss=dataclasses.replace(base.loss, gen_latents=str(bank)))
    full = train_kl(cfg, tmp_path / "full", progress=False)
    plain = train_kl(base, tmp_path / "plain", progress=False)
    assert full.history["loss"][0] == plain.history["loss"][0]  # before gan_start only the recon loss counts
    assert full.history["loss"][1:] != plain.history["loss"][1:]
    before, after = load_kl(trained_kl), load_kl(tmp_path / "full")
    for k, v in before.encoder.state_dict().items():
        assert torch.equal(v, after.encoder.state_dict()[k]), k
    assert any(
        not torch.equal(v, after.decoder.state_dict()[k]) for k, v in before.decoder.state_dict().items()
    )
    _run_until(train_kl, cfg, tmp_path / "cut", stop_after=2)
    assert train_kl(cfg, tmp_path / "cut", progress=False).history["loss"] == full.history["loss"]

    bad = bank_runner(train_kl, cfg, tmp_path / "bad")

    save_safetensors(tmp_path / "fhat.safetensors", {"fhat": torch.zeros(2, 4, 4, 4)})
    save_safetensors(tmp_path / "small.safetensors", {"z": torch.zeros(2, 4, 2, 2)})
    with pytest.raises(InvalidOption, match="has no 'z' tensor"):
        bad(tmp_path / "fhat.safetensors")
    with pytest.raises(InvalidOption, match=r"holds z \(2, 4, 2, 2\); this autoencoder needs \(N, 4, 4, 4\)"):
        bad(tmp_path / "small.safetensors")
    with pytest.raises(InvalidOption, match="needs init.decoder_only=true and loss.gan_weight > 0"):
        bad(bank, gan_weight=0.0)


def test_far_model_folder_feeds_the_decoder_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAR model folder is a KL source (load_kl, init.path) and scripts/sample_latents.py writes its 'z'
    bank: the final latents over the autoencoder's scale, which its decoder turns into the images."""
    import runpy
    import sys

    from freqar.io import load_safetensors
    from freqar.models.far_pipeline import load_far_dir
    from test_far import _tiny_pipe

    pipe = _tiny_pipe()
    pipe.class_names = ["square", "disc", "stripes"]
    pipe.save(tmp_path / "far")
    kl = load_kl(tmp_path / "far")
    want = pipe.vae.state_dict()
    assert want.keys() == kl.state_dict().keys() and all(
        torch.equal(v, want[k]) for k, v in kl.state_dict().items()
    )
    data = write_manifest_dataset(tmp_path / "shapes")
    out = tmp_path / "bank.safetensors"
    script = Path(__file__).resolve().parents[1] / "scripts" / "sample_latents.py"
    argv = [str(script), str(tmp_path / "far"), "--data", str(data), "--samples", "3", "--batch", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--seed", "7", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    bank = load_safetensors(out)
    assert bank["z"].shape == (3, 16, 8, 8) and bank["labels"].shape == (3,)
    again = load_far_dir(tmp_path / "far").generate(bank["labels"][:2].tolist(), seed=7)
    with torch.no_grad():
        images = pipe.vae.decoder(pipe.vae.post_quant_conv(bank["z"][:2])).add(1).div(2).clamp(0, 1)
    assert torch.allclose(images, again.images, atol=1e-5)
