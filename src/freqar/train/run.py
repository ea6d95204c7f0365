"""Entry points used by ``freqar train``: build the task from a config and run (or export) the loop.

With ``export_only`` the latest checkpoint's EMA weights are exported without training and a Path is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import TokenizerTrainConfig, VARTrainConfig, to_dict
from .data import ImageSet, load_dataset
from .dist import DistContext
from .loop import TrainLoop, TrainResult


def _threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def run_task(
    name: str,
    cfg: Any,
    make_task: Callable[[ImageSet, DistContext], Any],
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> TrainResult | Path:
    """The one way every ``freqar train`` kind runs: threads, data, ``make_task(data, ctx)``, the loop
    (resumable; the stored config carries ``task=name``), or only the export of the latest checkpoint."""
    ctx = ctx or DistContext()
    _threads(cfg.run.threads)
    task = make_task(load_dataset(cfg.data), ctx)
    loop = TrainLoop(task, {"task": name, **to_dict(cfg)}, cfg.optim, cfg.run, out, ctx, progress)
    return loop.export_only() if export_only else loop.fit()


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> TrainResult | Path:
    from .tokenizer import TokenizerTask

    return run_task(
        "tokenizer", cfg, lambda data, c: TokenizerTask(cfg, data, c), out, ctx, progress, export_only
    )


def train_var(
    cfg: VARTrainConfig,
    out: Path,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    export_only: bool = False,
) -> TrainResult | Path:
    from .var import VARTask

    return run_task("var", cfg, lambda data, c: VARTask(cfg, data, c, out), out, ctx, progress, export_only)
