"""Tiny synthetic data and configs for the training tests (16 px images, 4 scales, builds in ms)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from freqar.train.config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TokenizerLoss,
    TokenizerModelConfig,
    TokenizerTrainConfig,
    VARModelConfig,
    VARTrainConfig,
    VARTrainSettings,
)

PATCH_NUMS = [1, 2, 4, 8]


def synthetic_images(n: int = 24, size: int = 16, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Coloured squares/discs on white: label 0 = square, 1 = disc, 2 = stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, labels = [], []
    for i in range(n):
        lab = i % 3
        img = np.full((size, size, 3), 255, np.uint8)
        col = rng.integers(0, 200, 3)
        c = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.2, size * 0.35)
        if lab == 0:
            m = (abs(yy - c[0]) < r) & (abs(xx - c[1]) < r)
        elif lab == 1:
            m = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r
        else:
            m = (xx // 3) % 2 == 0
        img[m] = col
        imgs.append(img)
        labels.append(lab)
    return np.stack(imgs), labels


def write_manifest_dataset(root: Path, n: int = 24, size: int = 16) -> Path:
    imgs, labels = synthetic_images(n, size)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "images.npz", images=imgs)
    rows = [
        {"label": lab, "caption": f"shape {lab}", "split": "heldout" if i % 8 == 7 else "train"}
        for i, lab in enumerate(labels)
    ]
    names = ["square", "disc", "stripes"]
    (root / "manifest.json").write_text(json.dumps({"class_names": names, "rows": rows, "size": size}))
    return root


def tok_config(data: Path, steps: int = 6, **run: int) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(
        model=TokenizerModelConfig(
            vocab_size=32,
            z_channels=8,
            ch=8,
            ch_mult=[1, 2],
            num_res_blocks=1,
            using_sa=False,
            using_mid_sa=False,
            groupnorm_groups=4,
            patch_nums=PATCH_NUMS,
        ),
        loss=TokenizerLoss(restart_every=2, restart_threshold=0.5),
        data=DataConfig(path=str(data), size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0, ema_decay=0.9),
        run=RunConfig(steps=steps, batch_size=4, ckpt_every=run.get("ckpt_every", 100), log_every=1),
    )


def gan_config(cfg, weight: float = 0.5, start: int = 1):  # type: ignore[no-untyped-def]
    """``cfg`` (tokenizer or KL) with the adversarial term on; one halving suits the 16 px test images."""
    import dataclasses

    loss = dataclasses.replace(cfg.loss, gan_weight=weight, gan_start=start, disc_channels=8, disc_layers=1)
    return dataclasses.replace(cfg, loss=loss)


def bank_runner(train_fn, cfg, out: Path):  # type: ignore[no-untyped-def]
    """``bad(path, **loss)``: trains ``cfg`` with ``loss.gen_latents=path`` (and other loss fields) into
    ``out``, for the tests of a latent bank's config errors."""
    import dataclasses

    def bad(path: Path, **loss: object) -> None:
        c = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, gen_latents=str(path), **loss))
        train_fn(c, out, progress=False)

    return bad


def var_config(data: Path, tokenizer: Path, steps: int = 6, **run: int) -> VARTrainConfig:
    return VARTrainConfig(
        model=VARModelConfig(depth=1, embed_dim=32, num_heads=2),
        var=VARTrainSettings(tokenizer=str(tokenizer), label_drop=0.2),
        data=DataConfig(path=str(data), size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, ema_decay=0.9),
        run=RunConfig(steps=steps, batch_size=4, ckpt_every=run.get("ckpt_every", 100), log_every=1),
    )


def ddp_dump_worker(
    rank: int, world: int, port: int, data: str, out: str, result_dir: str, gan: bool = False
) -> None:
    """Like ``ddp_worker`` but saves this rank's live model and EMA weights (and, with ``gan``, the
    discriminator of an adversarial run) for comparison."""
    import os

    import torch

    from freqar.train.config import to_dict
    from freqar.train.data import load_dataset
    from freqar.train.dist import init_distributed, shutdown
    from freqar.train.loop import TrainLoop
    from freqar.train.tokenizer import TokenizerTask

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        cfg = tok_config(Path(data), steps=4, ckpt_every=2)
        if gan:
            cfg = gan_config(cfg)
        task = TokenizerTask(cfg, load_dataset(cfg.data), ctx)
        loop = TrainLoop(task, to_dict(cfg), cfg.optim, cfg.run, Path(out), ctx, progress=False)
        loop.fit()
        dump = {"model": loop.model.state_dict(), "ema": loop.ema.state_dict(), "usage": task.usage}
        if task.adversary is not None:
            dump["disc"] = task.adversary.disc.state_dict()
        torch.save(dump, Path(result_dir) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)
