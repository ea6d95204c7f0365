"""``freqar eval``: score a model's samples against a data set, with a floor and a ceiling beside it.

Reference features (train split, held-out split, degraded held-out) are computed once per data set and
feature network and cached beside the data; every score is reported with FD/KID floor (train vs held-out,
real vs real) and ceiling (train vs blurred+noisy held-out), and FD is also normalised to that span.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOption
from ..io import atomic_path, write_json
from ..pipeline import Pipeline
from ..train.data import load_manifest_dataset
from .fid import (
    EvalError,
    FeatureNet,
    LinearProbe,
    degrade,
    extract,
    frechet_distance_to,
    inception_like_score,
    kid,
    precision_recall,
    psd_sqrt,
    stats,
)


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 500
    seed: int = 0
    batch: int = 25
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None  # VAR: divides the logits; FAR: scales the diffusion noise
    steps: str | None = None  # FAR diffusion steps per level, e.g. "25" or "ddim25" (default: the model's)
    late_from: int | None = None  # VAR: late-stage sampling (default: the model's)
    late_cfg: float | None = None
    late_temperature: float | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 200
    pr_k: int = 3


def reference_features(data: Path, net: FeatureNet, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Features of the train split, held-out split and the degraded held-out split (cached on disk)."""
    train = load_manifest_dataset(data, "train")
    held = load_manifest_dataset(data, "heldout")
    h = hashlib.sha256(train.images.numpy().tobytes() + held.images.numpy().tobytes()).hexdigest()[:16]
    path = (cache or data) / f"features-{net.name}-{h}.npz"
    if path.is_file():
        with np.load(path) as z:
            ref = {k: z[k] for k in z.files}
        ref.setdefault("heldout_labels", held.labels.numpy())  # caches written before it was stored
        return ref
    ref: dict[str, np.ndarray] = {}
    ref["train"], _ = extract(net, train.images)
    ref["heldout"], ref["heldout_logits"] = extract(net, held.images)
    ref["ceiling"], _ = extract(net, degrade(held.images))
    ref["train_labels"] = train.labels.numpy()
    ref["heldout_labels"] = held.labels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **ref)
    return ref


def sample_labels(train_labels: np.ndarray, n: int, num_classes: int, seed: int) -> list[int]:
    """Labels in the training set's class proportions (a fixed, seeded draw)."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    rng = np.random.default_rng(seed)
    return rng.choice(num_classes, size=n, p=counts / counts.sum()).tolist()


def _defaults(pipe: Any) -> dict[str, Any] | None:
    d = getattr(pipe, "defaults", None)
    return asdict(d) if is_dataclass(d) and not isinstance(d, type) else None


def generate_kwargs(pipe: Pipeline, s: EvalSettings) -> dict[str, Any]:
    """The sampler options of ``s`` that apply to ``pipe``'s family; one that does not is an error, not
    silently ignored."""
    far = getattr(pipe, "family", "var") == "far"
    late = {"late_from": s.late_from, "late_cfg": s.late_cfg, "late_temperature": s.late_temperature}
    if far:
        late_flags = [("--" + k.replace("_", "-"), v) for k, v in late.items()]
        for flag, value in (("--top-k", s.top_k), ("--top-p", s.top_p), *late_flags):
            if value is not None:
                raise InvalidOption(
                    f"{flag} does not apply to FAR models ('{pipe.name}'): they sample with a diffusion head"
                )
        return {"cfg": s.cfg, "steps": s.steps, "temperature": s.temperature}
    if s.steps is not None:
        raise InvalidOption(f"--steps applies to FAR models (diffusion steps), not '{pipe.name}'")
    late = {k: v for k, v in late.items() if v is not None}
    if late and getattr(pipe, "family", "var") != "var":
        raise InvalidOption(f"--late-* options apply to VAR models, not '{pipe.name}' ({pipe.family})")
    return {"cfg": s.cfg, "top_k": s.top_k, "top_p": s.top_p, "temperature": s.temperature, **late}


def generate_samples(pipe: Pipeline, labels: list[int], s: EvalSettings) -> tuple[torch.Tensor, float]:
    """Images (N,3,H,W) in [0,1] for ``labels`` in batches (seed + batch index), and seconds per image."""
    kw = generate_kwargs(pipe, s)
    out, t0 = [], time.perf_counter()
    for bi, i in enumerate(range(0, len(labels), s.batch)):
        g = pipe.generate(labels[i : i + s.batch], seed=s.seed + bi, **kw)
        out.append(g.images.float().cpu().clamp(0, 1))
    return torch.cat(out), (time.perf_counter() - t0) / max(len(labels), 1)


class ReferenceScorer:
    """Scores sets of generated features against one data set's reference features.

    The train statistics (and S^1/2) and the floor/ceiling for each sample count are computed once, so
    scoring many settings (``eval --accel``, ``study``) costs one eigen-decomposition per set.
    """

    def __init__(self, ref: dict[str, np.ndarray], settings: EvalSettings) -> None:
        self.ref, self.settings = ref, settings
        self.mu, self.sigma = stats(ref["train"])
        self.sigma_half = psd_sqrt(self.sigma)
        self._bounds: dict[int, dict] = {}
        self._probe: LinearProbe | None = None

    def class_accuracy(self, feats: np.ndarray, labels: list[int] | np.ndarray) -> dict | None:
        """The linear probe's accuracy on ``feats`` against the labels they were generated for, beside its
        accuracy on the real held-out images; None for an unlabelled data set (one class)."""
        ref = self.ref
        if "train_labels" not in ref or int(np.max(ref["train_labels"])) < 1:
            return None
        if self._probe is None:
            self._probe = LinearProbe(ref["train"], ref["train_labels"])
        acc, per = self._probe.accuracy(feats, np.asarray(labels))
        out: dict = {"class_accuracy": acc, "class_accuracy_per_class": per}
        if "heldout_labels" in ref:
            out["class_accuracy_real"], out["class_accuracy_real_per_class"] = self._probe.accuracy(
                ref["heldout"], ref["heldout_labels"]
            )
        return out

    def fd_to_train(self, feats: np.ndarray) -> float:
        return frechet_distance_to(self.mu, self.sigma, self.sigma_half, feats)

    def _kid(self, feats: np.ndarray) -> float:
        s = self.settings
        return kid(
            self.ref["train"], feats, subsets=s.kid_subsets, subset_size=s.kid_subset_size, seed=s.seed
        )

    def bounds(self, n_ref: int) -> dict:
        """FD/KID floor (held-out real images) and ceiling (degraded held-out) at ``n_ref`` images."""
        if n_ref not in self._bounds:
            ref = self.ref
            self._bounds[n_ref] = {
                "fd_floor": self.fd_to_train(ref["heldout"][:n_ref]),
                "fd_ceiling": self.fd_to_train(ref["ceiling"][:n_ref]),
                "kid_floor": self._kid(ref["heldout"]),
                "kid_ceiling": self._kid(ref["ceiling"]),
                "inception_like_score_real": (
                    inception_like_score(ref["heldout_logits"]) if "heldout_logits" in ref else None
                ),
            }
        return self._bounds[n_ref]

    def score(
        self, feats: np.ndarray, logits: np.ndarray | None, labels: list[int] | np.ndarray | None = None
    ) -> dict:
        """FD/KID against the train split with floor, ceiling and normalised FD, IS-like, precision/recall.

        Floor/ceiling use as many images as the held-out split has (at most the sample count), and the
        model is also scored at that count (``fd_at_floor_count``) so the normalised FD compares like
        with like.
        """
        s = self.settings
        n_ref = min(feats.shape[0], self.ref["heldout"].shape[0])
        rng = np.random.default_rng(s.seed)
        sub = feats.shape[0] > n_ref
        fake_n = feats[rng.choice(feats.shape[0], n_ref, replace=False)] if sub else feats
        b = self.bounds(n_ref)
        full = self.fd_to_train(feats)
        res: dict = {
            "fd": full,
            "fd_at_floor_count": self.fd_to_train(fake_n) if sub else full,
            "fd_floor": b["fd_floor"],
            "fd_ceiling": b["fd_ceiling"],
            "kid": self._kid(feats),
            "kid_floor": b["kid_floor"],
            "kid_ceiling": b["kid_ceiling"],
            "inception_like_score": inception_like_score(logits) if logits is not None else None,
            "inception_like_score_real": b["inception_like_score_real"],
        }
        res["precision"], res["recall"] = precision_recall(self.ref["heldout"], fake_n, s.pr_k)
        span = res["fd_ceiling"] - res["fd_floor"]
        res["fd_normalized"] = (res["fd_at_floor_count"] - res["fd_floor"]) / span if span > 0 else None
        res["floor_ceiling_count"] = int(n_ref)
        if labels is not None:
            res.update(self.class_accuracy(feats, labels) or {})
        return res


def score_features(
    feats: np.ndarray, logits: np.ndarray | None, ref: dict[str, np.ndarray], settings: EvalSettings
) -> dict:
    """One set's scores (see :meth:`ReferenceScorer.score`)."""
    return ReferenceScorer(ref, settings).score(feats, logits)


def evaluate(
    pipe: Pipeline,
    data: Path,
    out: Path,
    settings: EvalSettings,
    net: FeatureNet,
    cache: Path | None = None,
) -> dict:
    """Generate ``settings.samples`` images, score them against the train split, write ``out/eval.json``."""
    if settings.samples < 2:
        raise EvalError("--samples must be >= 2")
    ref = reference_features(data, net, cache)
    labels = sample_labels(ref["train_labels"], settings.samples, pipe.num_classes, settings.seed)
    imgs, sec_per_img = generate_samples(pipe, labels, settings)
    feats, logits = extract(net, imgs)
    scorer = ReferenceScorer(ref, settings)
    res = scorer.score(feats, logits, labels)
    rec = reconstructions(pipe, load_manifest_dataset(data, "heldout").images, settings.batch)
    if rec is not None:  # the tokenizer's own bound: no transformer on this tokenizer can score below it
        b = scorer.bounds(rec.shape[0])
        res["fd_reconstruction"] = scorer.fd_to_train(extract(net, rec)[0])
        span = b["fd_ceiling"] - b["fd_floor"]
        res["fd_reconstruction_normalized"] = (
            (res["fd_reconstruction"] - b["fd_floor"]) / span if span > 0 else None
        )
    res["settings"] = {
        **asdict(settings),
        "model": pipe.name,
        "model_defaults": _defaults(pipe),  # what the None options above resolved to
        "data": str(data),
        "feature_net": net.name,
        "heldout_count": int(ref["heldout"].shape[0]),
        "train_count": int(ref["train"].shape[0]),
        "floor_ceiling_count": res.pop("floor_ceiling_count"),
        "seconds_per_image": sec_per_img,
        "note": "FD on EfficientNet-Lite0 pooled features: a stand-in for Inception FID, "
        "not comparable with published FIDs",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", res)
    _save_preview(imgs[:64], out / "samples.png")
    _save_by_class(pipe, imgs, labels, res.get("class_accuracy_per_class"), out / "samples_by_class.png")
    return res


@torch.no_grad()
def reconstructions(pipe: Pipeline, images_BHWC: torch.Tensor, batch: int = 25) -> torch.Tensor | None:
    """Held-out images through the pipeline's discrete tokenizer (encode -> codes -> decode), or FAR's KL
    autoencoder (posterior mode -> decode), in [0, 1]; None for other tokenizers (hybrid)."""
    tok = pipe.tokenizer
    if getattr(pipe, "family", "") == "far":
        tok = pipe.vae  # type: ignore[attr-defined]

        def roundtrip(b: torch.Tensor) -> torch.Tensor:
            return tok.decode(tok.encode(b))

    elif hasattr(tok, "encode") and hasattr(tok, "decode_indices"):

        def roundtrip(b: torch.Tensor) -> torch.Tensor:
            return tok.decode_indices(tok.encode(b))

    else:
        return None
    x = images_BHWC.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    size = pipe.image_size
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    dev = pipe.device
    out = [roundtrip(x[i : i + batch].to(dev)).float().cpu() for i in range(0, x.shape[0], max(batch, 1))]
    return torch.cat(out).add(1).div(2).clamp(0, 1)


def _save_by_class(
    pipe: Pipeline, imgs: torch.Tensor, labels: list[int], acc: list | None, path: Path, per_row: int = 8
) -> None:
    """The evaluated samples, one row per class (the first ``per_row`` of each), labelled with the class
    name and the probe's class accuracy: which categories come out recognisable, at a glance."""
    from ..train.samples import labelled_rows

    names = pipe.class_names or [str(c) for c in range(pipe.num_classes)]
    lab = torch.tensor(labels)
    rows, row_names = [], []
    for c in range(len(names)):
        idx = (lab == c).nonzero().flatten()[:per_row]
        if idx.numel() == 0:
            continue
        rows.append(imgs[idx])
        a = acc[c] if acc is not None and c < len(acc) else None
        row_names.append(names[c] + (f"\nacc {a:.2f}" if a is not None else ""))
    if not rows:
        return
    canvas = labelled_rows(rows, row_names, per_row)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _save_preview(imgs: torch.Tensor, path: Path) -> None:
    from PIL import Image

    n = imgs.shape[0]
    cols = min(8, n)
    rows = -(-n // cols)
    h = imgs.shape[-1]
    grid = torch.ones(3, rows * h, cols * h)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * h : (c + 1) * h] = imgs[i]
    arr = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
