"""Entry points used by ``freqar train``: build the task from a config and run (or export) the loop.

With ``export_only`` the latest checkpoint's EMA weights are exported without training and a Path is returned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import TokenizerTrainConfig, VARTrainConfig, to_dict
from .data import load_dataset
from .dist import DistContext
from .loop import TrainLoop, TrainResult


def _threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> TrainResult | Path:
    from .tokenizer import TokenizerTask

    ctx = ctx or DistContext()
    _threads(cfg.run.threads)
    data = load_dataset(cfg.data)
    task = TokenizerTask(cfg, data, ctx)
    loop = TrainLoop(task, {"task": "tokenizer", **to_dict(cfg)}, cfg.optim, cfg.run, out, ctx, progress)
    return loop.export_only() if export_only else loop.fit()


def train_var(
    cfg: VARTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> TrainResult | Path:
    from .var import VARTask

    ctx = ctx or DistContext()
    _threads(cfg.run.threads)
    data = load_dataset(cfg.data)
    task = VARTask(cfg, data, ctx, out)
    loop = TrainLoop(task, {"task": "var", **to_dict(cfg)}, cfg.optim, cfg.run, out, ctx, progress)
    return loop.export_only() if export_only else loop.fit()
