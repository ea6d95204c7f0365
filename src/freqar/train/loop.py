"""The shared training loop: AdamW, warm-up + cosine, EMA, clipping, atomic checkpoints, exact resume.

A *task* (tokenizer or VAR) supplies the module and the loss of one step; the loop owns everything else.
Data order and per-step randomness are pure functions of (seed, step, rank), and the checkpoint stores the
model, EMA, optimizer, schedule position, task state and RNG states, so a killed run resumes exactly.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CheckpointMismatch, FreqarError
from ..io import atomic_path
from .config import OptimConfig, RunConfig, config_diff
from .dist import DistContext, all_reduce_sum

CKPT_FORMAT = "freqar-train/1"
CKPT_NAME = "checkpoint.pt"


class TrainingDiverged(FreqarError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


class ResumeMismatch(FreqarError):
    """A run directory whose checkpoint was written with another config."""


class Task(Protocol):
    """What the loop needs from a tokenizer/VAR trainer."""

    name: str
    module: nn.Module

    def compute_loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]: ...

    def after_step(self, step: int, loop: TrainLoop) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, ema: nn.Module, run_dir: Path) -> Path: ...

    # Optional: ``validate(ema) -> {"val_loss": ..., "train_eval_loss": ...}`` for ``run.eval_every``; the
    # same loss on held-out images and on as many training images, with no randomness.


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``total``."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(total - optim.warmup_steps, 1)
    t = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norms, gains) do not."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay*ema + (1-decay)*model for parameters; buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    seconds: float
    export: Path | None
    history: dict[str, list[float]] = field(default_factory=dict)


class TrainLoop:
    """One run in ``run_dir``; resumes from ``run_dir/checkpoint.pt`` when present."""

    def __init__(
        self,
        task: Task,
        config: dict,
        optim: OptimConfig,
        run: RunConfig,
        run_dir: Path,
        ctx: DistContext,
        progress: bool | None = None,
    ) -> None:
        self.task, self.config, self.optim_cfg, self.run_cfg = task, config, optim, run
        self.run_dir, self.ctx = Path(run_dir), ctx
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.model = task.module.to(ctx.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = make_optimizer(self.model, optim)
        self.step = 0
        self.history: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
        self.ddp: nn.Module = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / CKPT_NAME

    # ----- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "task": self.task.name,
            "config": self.config,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step},
            "task_state": self.task.state_dict(),
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "rng": {"torch": torch.get_rng_state()},
        }

    def save(self) -> None:
        """Rank 0 writes the checkpoint atomically (a kill mid-write keeps the previous one)."""
        if self.ctx.is_main:
            state = self.state()
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)
            self.plot()
        self.ctx.barrier()

    def load(self) -> bool:
        """Resume from the checkpoint if there is one; refuse a different config or task."""
        if not self.ckpt_path.is_file():
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location=self.ctx.device, weights_only=True)
        except Exception as e:
            raise CheckpointMismatch(f"cannot read checkpoint '{self.ckpt_path}': {e}") from None
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise CheckpointMismatch(f"'{self.ckpt_path}' is not a freqar training checkpoint")
        if ck.get("task") != self.task.name:
            raise ResumeMismatch(
                f"'{self.run_dir}' holds a '{ck.get('task')}' run, not '{self.task.name}'; use another --out"
            )
        diff = config_diff(ck["config"], self.config)
        if diff:
            shown = "; ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
            raise ResumeMismatch(
                f"refusing to resume '{self.run_dir}' with a different config: {shown}; use another --out"
            )
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.task.load_state_dict(ck.get("task_state", {}))
        self.history = {k: [float(x) for x in v.tolist()] for k, v in ck.get("history", {}).items()}
        self.step = int(ck["step"])
        rng = ck.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        return True

    def plot(self) -> None:
        """Loss curve PNG beside the checkpoint (skipped quietly without matplotlib)."""
        if not self.history["step"]:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(self.history["step"], self.history["loss"], lw=1, label="training batches")
        if self.history.get("val_step"):
            for key, style, name in (
                ("train_eval_loss", "o-", "training images"),
                ("val_loss", "s-", "held-out"),
            ):
                if key in self.history:
                    ax.plot(self.history["val_step"], self.history[key], style, ms=3, lw=1.2, label=name)
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(f"{self.task.name}: {self.run_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.run_dir / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    def validate(self, bar: Any = None) -> None:
        """Held-out evaluation of the EMA weights (main process; it touches no random state, so the
        training numbers are those of a run without it); logged and kept in the history."""
        if not self.ctx.is_main:
            return
        t = time.perf_counter()
        metrics = self.task.validate(self.ema)  # type: ignore[attr-defined]
        self.history.setdefault("val_step", []).append(float(self.step))
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(float(v))
        line = (
            f"[{self.task.name}] step {self.step} held-out: "
            + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            + f" ({time.perf_counter() - t:.1f}s)"
        )
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    def export_only(self) -> Path:
        """Export the EMA weights of the latest checkpoint without training (e.g. to ship a run early)."""
        if not self.load():
            raise CheckpointMismatch(f"no checkpoint to export in '{self.run_dir}'")
        self.plot()
        return self.task.export(self.ema, self.run_dir)

    # ----- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        every = self.run_cfg.eval_every
        if every < 0:
            raise FreqarError(f"run.eval_every must be >= 0, got {every}")
        if every > 0 and not hasattr(self.task, "validate"):
            raise FreqarError(f"run.eval_every: the '{self.task.name}' trainer has no held-out evaluation")
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx.barrier()
        resumed = self.load()
        total = self.run_cfg.steps
        bar = None
        if self.ctx.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=self.task.name, unit="step", dynamic_ncols=True)
        elif self.ctx.is_main:
            what = "resuming" if resumed else "starting"
            print(f"[{self.task.name}] {what} at step {self.step}/{total} in {self.run_dir}", flush=True)
        t0 = time.perf_counter()
        t_log, imgs_log, steps_run = t0, 0, 0
        last_loss = float("nan")
        self.model.train()
        while self.step < total:
            step = self.step
            lr = lr_at(step, self.optim_cfg, total)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            loss, metrics, n = self.task.compute_loss(self.ddp, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            check = torch.stack([loss.detach().float(), gnorm.detach().float()]).to(self.ctx.device)
            all_reduce_sum(check, self.ctx)
            if not torch.isfinite(check).all():
                if bar is not None:
                    bar.close()
                kept = f"'{self.ckpt_path}'" if self.ckpt_path.is_file() else "none written yet"
                raise TrainingDiverged(
                    f"loss is {loss.item()} (grad norm {gnorm.item()}) at step {step}; stopped. "
                    f"Last good checkpoint: {kept}"
                )
            self.optimizer.step()
            decay = min(self.optim_cfg.ema_decay, (1 + step) / (10 + step))
            ema_update(self.ema, self.model, decay)
            self.step = step + 1
            metrics.update(self.task.after_step(step, self))
            last_loss = check[0].item() / self.ctx.world
            imgs_log += n * self.ctx.world
            steps_run += 1
            if self.step % self.run_cfg.log_every == 0 or self.step == total:
                now = time.perf_counter()
                ips = imgs_log / max(now - t_log, 1e-9)
                t_log, imgs_log = now, 0
                self.history["step"].append(float(self.step))
                self.history["loss"].append(last_loss)
                self.history["lr"].append(lr)
                if self.ctx.is_main:
                    post = {"loss": f"{last_loss:.4f}", "img/s": f"{ips:.1f}", "lr": f"{lr:.2e}"}
                    post.update({k: f"{v:.4g}" for k, v in metrics.items()})
                    if bar is not None:
                        bar.set_postfix(post, refresh=False)
                    else:
                        print(
                            f"[{self.task.name}] step {self.step}/{total} "
                            + " ".join(f"{k}={v}" for k, v in post.items()),
                            flush=True,
                        )
            if bar is not None:
                bar.update(1)
            if every > 0 and (self.step % every == 0 or self.step == total):
                self.validate(bar)
            if self.step % self.run_cfg.ckpt_every == 0 or self.step == total:
                self.save()
        if bar is not None:
            bar.close()
        export = None
        if self.ctx.is_main:
            export = self.task.export(self.ema, self.run_dir)
            self.plot()
        self.ctx.barrier()
        return TrainResult(self.run_dir, self.step, last_loss, time.perf_counter() - t0, export, self.history)
