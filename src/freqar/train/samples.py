"""Per-class sample grids: one row per class, labelled, for README figures and training check-ups."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..pipeline import Pipeline


def class_grid(
    pipe: Pipeline,
    per_class: int = 8,
    seed: int = 0,
    classes: list[int] | None = None,
    label_width: int = 150,
    **gen_kwargs: Any,
) -> Any:
    """Generate ``per_class`` images for each class (one batch per class, seeded) and tile them.

    Returns a PIL image: a label column on the left, then the samples of that class.
    """
    classes = list(range(pipe.num_classes)) if classes is None else classes
    names = pipe.class_names or [str(c) for c in range(pipe.num_classes)]
    rows = []
    for i, c in enumerate(classes):
        out = pipe.generate([c] * per_class, seed=seed + i, **gen_kwargs)
        rows.append(out.images)
    return labelled_rows(rows, [names[c] for c in classes], per_class, label_width)


def labelled_rows(rows: list[Any], names: list[str], per_row: int, label_width: int = 150) -> Any:
    """Tile image rows (each (n, 3, H, W) in [0, 1], n <= ``per_row``; short rows padded white) under a
    label column; a PIL image. Shared by the README grids and ``freqar eval``'s per-class picture."""
    from PIL import Image, ImageDraw

    tiles = []
    for r in rows:
        imgs = r.float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        side = imgs.shape[1]
        pad = np.full((per_row - imgs.shape[0], side, imgs.shape[2], 3), 255, np.uint8)
        tiles.append(np.concatenate(list(np.concatenate([imgs, pad])), axis=1))
    grid = np.concatenate(tiles, axis=0)
    side = grid.shape[0] // len(rows)
    canvas = Image.new("RGB", (label_width + grid.shape[1], grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((6, i * side + side // 2 - 6), name, fill=(0, 0, 0))
    return canvas
