"""Fidelity of an accelerated image to the same-seed dense image: PSNR, SSIM and token agreement.

Shared by ``freqar bench`` (one batch per setting) and ``freqar eval --accel`` / ``freqar study``
(per-image means over many batches), so both report the same definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-image PSNR of identical images is infinite; means over a set count them at this value instead.
PSNR_CAP_DB = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, cap: float = PSNR_CAP_DB) -> torch.Tensor:
    """(N,) PSNR in dB of each image pair, identical pairs (and anything above ``cap``) at ``cap``."""
    mse = (a.float() - b.float()).square().flatten(1).mean(dim=1)
    db = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return db.clamp(max=cap)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM map (Gaussian window 11, σ 1.5) of (B, C, H, W) images in [0, 1], per channel (valid region).

    Images under 11 px are nearest-upsampled first (an integer factor), so every size has a score."""
    a, b = a.float(), b.float()
    side = min(a.shape[-2:])
    if side < 11:  # smaller than the window (tiny test models): nearest-upsample both alike
        size = (a.shape[-2] * -(-11 // side), a.shape[-1] * -(-11 // side))
        a, b = F.interpolate(a, size=size, mode="nearest"), F.interpolate(b, size=size, mode="nearest")
    C = a.shape[1]
    x = torch.arange(11, dtype=torch.float32, device=a.device) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(C, 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of (B, 3, H, W) images in [0, 1] (over images, channels and positions)."""
    return float(ssim_map(a, b).mean())


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) mean SSIM of each image pair."""
    return ssim_map(a, b).flatten(1).mean(dim=1)


def token_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Fraction of all stage tokens equal between two generations."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.numel() for x in a)


def finite(x: float) -> float | None:
    """JSON has no infinity: identical images (infinite PSNR) are stored as null."""
    return None if x == float("inf") else x
