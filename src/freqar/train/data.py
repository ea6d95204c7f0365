"""Training data held in memory as one uint8 tensor: emoji manifests or any folder of images.

Small data sets (thousands of images at 64-256 px) fit in RAM, which keeps data order a pure function of
(seed, step) and so makes resume exact without saving loader state.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FreqarError
from .config import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(FreqarError):
    """An empty, unreadable or mismatched data set."""


@dataclass
class ImageSet:
    """``images`` uint8 (N, H, W, 3); ``labels`` long (N,) (0 when unlabelled); names for the classes."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    class_names: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[1])


def load_manifest_dataset(root: Path, split: str = "train") -> ImageSet:
    """A ``freqar data`` output folder (manifest.json + images.npz), restricted to one split."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        with np.load(root / "images.npz") as z:
            arr = z["images"]
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"cannot read data set '{root}': {e}") from None
    rows = manifest.get("rows", [])
    if len(rows) != arr.shape[0]:
        raise DatasetError(f"'{root}': manifest has {len(rows)} rows but images.npz has {arr.shape[0]}")
    if split not in ("train", "heldout", "all"):
        raise DatasetError(f"unknown split '{split}' (train, heldout, all)")
    keep = [i for i, r in enumerate(rows) if split == "all" or r.get("split") == split]
    if not keep:
        raise DatasetError(f"data set '{root}' has no images in split '{split}'")
    return ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(arr[keep])),
        labels=torch.tensor([int(rows[i].get("label", 0)) for i in keep], dtype=torch.long),
        captions=[str(rows[i].get("caption", "")) for i in keep],
        class_names=list(manifest.get("class_names") or ["all"]),
    )


def _read_labels(path: Path) -> dict[str, tuple[str, str]]:
    """CSV ``file,label[,caption]`` (header optional) -> {file: (label, caption)}."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with path.open(newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or (i == 0 and row[0].strip().lower() in ("file", "filename", "path")):
                    continue
                if len(row) < 2:
                    raise DatasetError(f"'{path}' line {i + 1}: expected file,label[,caption]")
                out[row[0].strip()] = (row[1].strip(), row[2].strip() if len(row) > 2 else "")
    except OSError as e:
        raise DatasetError(f"cannot read labels file '{path}': {e}") from None
    return out


def load_image(path: Path, size: int) -> np.ndarray:
    """Open any Pillow-readable image, composite transparency onto white, centre-crop square, resize."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(bg, rgba).convert("RGB")
    w, h = rgb.size
    s = min(w, h)
    rgb = rgb.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        rgb = rgb.resize((size, size), Image.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def load_image_folder(root: Path, size: int, labels_file: str = "") -> ImageSet:
    """Every image under ``root`` (sorted); unreadable files are skipped and counted.

    With a labels file only the files it lists are used; labels may be names (sorted to ids) or integers.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    table = _read_labels(Path(labels_file)) if labels_file else {}
    if table:
        files = [p for p in files if str(p.relative_to(root)) in table or p.name in table]
    imgs, labs, caps, skipped = [], [], [], 0
    for p in files:
        try:
            imgs.append(load_image(p, size))
        except Exception:  # corrupt/unsupported file: skip with a count
            skipped += 1
            continue
        lab, cap = table.get(str(p.relative_to(root)), table.get(p.name, ("", "")))
        labs.append(lab)
        caps.append(cap or p.stem.replace("_", " "))
    if not imgs:
        raise DatasetError(f"no readable images in '{root}'" + (f" ({skipped} skipped)" if skipped else ""))
    if table:
        if all(lab.lstrip("-").isdigit() for lab in labs):
            ids = [int(lab) for lab in labs]
            names = [str(i) for i in range(max(ids) + 1)]
        else:
            names = sorted(set(labs))
            ids = [names.index(lab) for lab in labs]
    else:
        ids, names = [0] * len(imgs), ["all"]
    return ImageSet(
        torch.from_numpy(np.stack(imgs)), torch.tensor(ids, dtype=torch.long), caps, names, skipped
    )


def load_dataset(cfg: DataConfig) -> ImageSet:
    """Dispatch on the folder: a manifest means a ``freqar data`` build, anything else is an image folder."""
    if not cfg.path:
        raise DatasetError("no data path given (data.path=DIR)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: '{root}'")
    if (root / "manifest.json").is_file():
        ds = load_manifest_dataset(root, cfg.split)
        if ds.size != cfg.size:
            raise DatasetError(
                f"data set '{root}' is {ds.size} px but the config wants data.size={cfg.size}; "
                f"rebuild it with --size {cfg.size} or set data.size={ds.size}"
            )
        return ds
    return load_image_folder(root, cfg.size, cfg.labels)


def load_validation_set(cfg: DataConfig, val_data: str, train: ImageSet) -> ImageSet:
    """Held-out images for ``run.eval_every``: ``val_data`` when given (a ``freqar data`` folder's held-out
    split, or an image folder labelled by a ``labels.csv`` inside it), else the held-out split of the
    training manifest. Its classes must be the training set's, or the conditional loss compares nothing."""
    if val_data:
        root = Path(val_data)
        if not root.is_dir():
            raise DatasetError(f"run.val_data folder not found: '{root}'")
        if (root / "manifest.json").is_file():
            try:
                ds = load_manifest_dataset(root, "heldout")
            except DatasetError:
                ds = load_manifest_dataset(root, "all")
        else:
            lab = root / "labels.csv"
            ds = load_image_folder(root, cfg.size, str(lab) if lab.is_file() else "")
    else:
        root = Path(cfg.path)
        if not (root / "manifest.json").is_file() or cfg.split != "train":
            raise DatasetError(
                "run.eval_every needs held-out images: train on data.split=train of a `freqar data` "
                "folder, or give run.val_data=DIR"
            )
        ds = load_manifest_dataset(root, "heldout")
    if ds.size != train.size:
        raise DatasetError(f"held-out images '{root}' are {ds.size} px but training uses {train.size} px")
    if ds.class_names != train.class_names:
        raise DatasetError(
            f"held-out images '{root}' have classes {ds.class_names[:4]} but training has "
            f"{train.class_names[:4]}"
        )
    return ds


def train_eval_indices(train: ImageSet, val: ImageSet, seed: int) -> torch.Tensor:
    """As many training images as the held-out set has (a fixed draw): the held-out loss's comparison."""
    n = min(len(val), len(train))
    return torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]


@torch.no_grad()
def reconstruction_scores(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    val: ImageSet,
    train: ImageSet,
    seed: int,
    l1_weight: float,
    device: str,
    batch: int = 32,
) -> dict[str, float]:
    """The autoencoders' held-out evaluation: MSE + ``l1_weight``·L1 of ``reconstruct`` (images in [-1, 1])
    on the held-out images and on as many training images, and the held-out PSNR."""

    def loss_and_mse(images: torch.Tensor) -> tuple[float, float]:
        loss_sum, mse_sum = 0.0, 0.0
        for i in range(0, images.shape[0], batch):
            x = to_unit(images[i : i + batch]).to(device)
            rec = reconstruct(x)
            mse = F.mse_loss(rec, x, reduction="none").flatten(1).mean(1)
            l1 = F.l1_loss(rec, x, reduction="none").flatten(1).mean(1)
            loss_sum += (mse + l1_weight * l1).sum().item()
            mse_sum += mse.sum().item()
        return loss_sum / images.shape[0], mse_sum / images.shape[0]

    val_loss, val_mse = loss_and_mse(val.images)
    train_loss, _ = loss_and_mse(train.images[train_eval_indices(train, val, seed)])
    psnr = -10 * math.log10(val_mse / 4 + 1e-12)  # images span [-1, 1]: peak-to-peak 2
    return {"val_loss": val_loss, "train_eval_loss": train_loss, "val_psnr": psnr}


def to_unit(images_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    return images_BHWC.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's sample ids at ``step``: a fresh permutation per epoch, a pure function of the inputs."""
    per_step = batch * world
    if n < per_step:
        reps = -(-per_step // n)
        base = torch.arange(n).repeat(reps)
    else:
        base = torch.arange(n)
    m = base.numel()
    steps_per_epoch = m // per_step
    epoch, i = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = base[torch.randperm(m, generator=g)]
    start = i * per_step + rank * batch
    return perm[start : start + batch]


def step_generator(seed: int, step: int, rank: int, salt: int = 0) -> torch.Generator:
    """Per-step randomness (flips, label dropout) independent of history, so resume is exact."""
    return torch.Generator().manual_seed(((seed * 7919 + step) * 131 + rank) * 17 + salt)
