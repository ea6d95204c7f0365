"""Image grids and PNG output with Pillow only (no torchvision)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import FreqarError
from .io import atomic_write


def make_grid(
    images_B3HW: torch.Tensor, nrow: int | None = None, pad: int = 2, fill: float = 1.0
) -> torch.Tensor:
    """Tile images in [0,1] into one (3, H', W') picture with ``pad`` pixels of ``fill`` between them."""
    B, C, H, W = images_B3HW.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = nrow
    nrows = math.ceil(B / ncol)
    grid = torch.full((C, nrows * (H + pad) + pad, ncol * (W + pad) + pad), fill, dtype=images_B3HW.dtype)
    for i in range(B):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y : y + H, x : x + W] = images_B3HW[i].detach().cpu()
    return grid


def to_pil(img_3HW: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [0,1] -> RGB Pillow image (rounded, clamped)."""
    arr = img_3HW.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before minutes of generation) when an output file cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise FreqarError(f"output path '{p}' is a directory")
    if not parent.is_dir():
        raise FreqarError(f"cannot write '{p}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise FreqarError(f"cannot write '{p}': permission denied")
    return p


def save_png(img: Image.Image | torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save atomically as PNG (a tensor is converted with :func:`to_pil`)."""
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    p = check_writable(path)
    atomic_write(p, lambda tmp: pil.save(tmp, format="PNG"))
    return p


def save_images(images_B3HW: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None) -> Path:
    """One image as is, several as a grid: the output rule every ``generate`` variant shares."""
    img = images_B3HW[0] if images_B3HW.shape[0] == 1 else make_grid(images_B3HW, nrow)
    return save_png(img, path)
