"""``freqar calibrate``: choose SparseVAR's probe block s for a model from its own samples.

The paper fixes s per model by hand (its Figure 8 sweeps blocks on HART). Here s is measured: dense
generations tap every block at the stages whose ΔF SparseVAR reads (P-1 .. S-2), and for each sparse stage
k >= P the ΔF map of stage k-1, resized to stage k's grid as the policy resizes it, is compared with what
actually changes in the final image at each token from stage k on: the energy of f_final − f_{k-1} (the
canvas, i.e. VAR's summed latent, which the decoder turns into the image) pooled over the token's area.
That change is exactly what excluding the token from stage k on would remove. The score of a block is the
Spearman rank correlation of the two maps, averaged over samples and sparse stages (ranking, because Eq. 2
thresholds ΔF relative to its maximum); the AUC for the top quarter of changing tokens is reported beside.

The choice is stored with the model's weight fingerprint, so a retrained model at the same path never
picks up a stale choice: beside ``config.json`` for a model folder, else (bundled or preset models, whose
folder belongs to the package) under the user config dir ``$FREQAR_CONFIG_DIR`` (default
``$XDG_CONFIG_HOME/freqar`` or ``~/.config/freqar``) as ``calibration/<name>-<fingerprint>.json``. A
bundled model ships its calibration in its package folder, checked against the fingerprint like any other.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FreqarError
from .interfaces import Selection, StepOutput
from .io import read_json, write_json
from .pipeline import Pipeline
from .policies.sparsevar import SparseVARConfig, SparseVARPolicy, _resize, predictive_entropy

CALIBRATION_NAME = "sparsevar-calibration.json"
FORMAT = "freqar-calibration/1"
MIN_SAMPLES = 8


class CalibrationError(FreqarError):
    """Calibration cannot give a meaningful answer for this model or sample set."""


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 32
    seed: int = 0
    batch: int = 16
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    start_stage: int | None = None


# ----- the measurement -------------------------------------------------------------------------------
@dataclass
class _ProbeState:
    P: int
    S: int
    depth: int
    batch: int
    dF: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> (depth, B, l) ΔF per block
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> (B, l) of the guided logits
    canvas: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> canvas after it


class _ProbePolicy:
    """Dense generation that taps every block where SparseVAR reads ΔF and keeps the canvases."""

    name = "calibration-probe"

    def __init__(self, start_stage: int | None) -> None:
        self.start_stage = start_stage

    def begin(
        self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device
    ) -> _ProbeState:
        P, _ = SparseVARConfig(start_stage=self.start_stage).resolve(len(grids), depth)
        return _ProbeState(P, len(grids), depth, batch)

    def select(self, stage: int, st: _ProbeState) -> Selection:
        if st.P - 1 <= stage < st.S - 1:
            return Selection(taps=tuple(range(st.depth)))
        return Selection()

    def fill(
        self, stage: int, sel: Selection, logits_BnV: torch.Tensor, out: StepOutput, st: _ProbeState
    ) -> tuple[torch.Tensor, None]:
        if sel.taps:
            B = st.batch
            st.dF[stage] = torch.stack(
                [(out.taps[s][1][:B] - out.taps[s][0][:B]).float().square().mean(-1) for s in sel.taps]
            )
            st.entropy[stage] = predictive_entropy(logits_BnV)  # sparsevar signal=entropy's map
        return logits_BnV, None

    def observe_output(self, stage: int, canvas: torch.Tensor, st: _ProbeState) -> None:
        if stage >= st.P - 1:
            st.canvas[stage] = canvas.detach().float().clone()

    def stats(self, st: _ProbeState) -> list[dict]:
        return []


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ordinal ranks along the last dim (stable, so ties keep their order: deterministic)."""
    order = torch.argsort(x, dim=-1, stable=True)
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return r.double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of (..., n) maps (0 where a map is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-12), torch.zeros_like(den))


def auc_top(pred: torch.Tensor, target: torch.Tensor, q: float = 0.75) -> torch.Tensor:
    """Per-row ROC AUC of ``pred`` for the tokens whose ``target`` is in its top (1-q) (rank statistic)."""
    n = target.shape[-1]
    pos = _ranks(target) >= q * n
    n_pos = pos.sum(-1).double()
    n_neg = n - n_pos
    rank_sum = (_ranks(pred) + 1).masked_fill(~pos, 0).sum(-1)
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1)
    return torch.where(ok, auc, torch.full_like(auc, 0.5))


def calibrate(pipe: Pipeline, settings: CalibrationSettings) -> dict[str, Any]:
    """Score every block as ΔF source and return the choice with per-block and per-stage scores."""
    n = settings.samples
    if n < MIN_SAMPLES:
        raise CalibrationError(
            f"calibration needs at least {MIN_SAMPLES} samples, got {n}: block scores from fewer images "
            "are noise (use --samples 32 or more)"
        )
    if settings.batch < 1:
        raise CalibrationError(f"--batch must be >= 1, got {settings.batch}")
    depth = pipe.transformer.depth
    if depth < 2:
        raise CalibrationError(f"model '{pipe.name}' has {depth} block: there is no probe block to choose")
    grids = pipe.tokenizer.stage_grids()
    S = len(grids)
    P, _ = SparseVARConfig(start_stage=settings.start_stage).resolve(S, depth)
    if P >= S:
        raise CalibrationError(f"start stage {P} leaves no sparse stage in the {S}-stage schedule")
    rng = np.random.default_rng(settings.seed)
    labels = rng.integers(0, pipe.num_classes, size=n).tolist()
    probe = _ProbePolicy(settings.start_stage)
    rho: dict[int, list[torch.Tensor]] = {k: [] for k in range(P, S)}
    auc: dict[int, list[torch.Tensor]] = {k: [] for k in range(P, S)}
    rho_ent: list[torch.Tensor] = []
    for bi, i in enumerate(range(0, n, settings.batch)):
        out = pipe.generate(
            labels[i : i + settings.batch],
            seed=settings.seed + bi,
            cfg=settings.cfg,
            top_k=settings.top_k,
            top_p=settings.top_p,
            policy=probe,
        )
        st: _ProbeState = out.policy_state
        final = st.canvas[S - 1]
        for k in range(P, S):
            h, w = grids[k]
            ph, pw = grids[k - 1]
            change = (final - st.canvas[k - 1]).square().mean(dim=1, keepdim=True)
            target = F.interpolate(change, size=(h, w), mode="area").flatten(1)  # (B, l)
            dF = st.dF[k - 1]  # (depth, B, l_prev)
            D, B = dF.shape[:2]
            pred = _resize(dF.reshape(D * B, 1, ph, pw), (h, w)).reshape(D, B, h * w)
            rho[k].append(spearman(pred, target.expand(D, B, h * w)))  # (depth, B)
            auc[k].append(auc_top(pred, target.expand(D, B, h * w)))
            ent = _resize(st.entropy[k - 1].reshape(B, 1, ph, pw), (h, w)).reshape(B, h * w)
            rho_ent.append(spearman(ent, target))
    per_stage = {k: torch.cat(rho[k], dim=1).mean(dim=1) for k in rho}  # (depth,)
    per_stage_auc = {k: torch.cat(auc[k], dim=1).mean(dim=1) for k in auc}
    score = torch.stack(list(per_stage.values())).mean(dim=0)
    score_auc = torch.stack(list(per_stage_auc.values())).mean(dim=0)
    block = int(score.argmax())  # first maximum: the shallower block on a tie
    default_block = SparseVARConfig().resolve(S, depth)[1]
    return {
        "format": FORMAT,
        "model": pipe.name,
        "weights": weights_fingerprint(pipe),
        "block": block,
        "default_block": default_block,
        "start_stage": P,
        "depth": depth,
        "scores": {
            "spearman": [round(float(x), 6) for x in score],
            "auc_top_quarter": [round(float(x), 6) for x in score_auc],
            # the same measure for `sparsevar:signal=entropy` (reported; the choice stays a ΔF block)
            "entropy_spearman": round(float(torch.cat(rho_ent).mean()), 6),
        },
        "per_stage_spearman": {str(k): [round(float(x), 6) for x in v] for k, v in per_stage.items()},
        "settings": asdict(settings),
        "labels": labels,
        "note": "score = Spearman correlation of ΔF (stage k-1, block s, resized) with the energy of "
        "f_final - f_(k-1) per token of stage k, averaged over samples and sparse stages k >= P",
    }


# ----- where it lives ----------------------------------------------------------------------------------
def weights_fingerprint(pipe: Pipeline) -> str:
    """sha256 (16 hex) of every parameter and buffer: identifies the weights, wherever they came from."""
    h = hashlib.sha256()
    for part in pipe.parts():
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def user_config_dir() -> Path:
    """``$FREQAR_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/freqar``, else ``~/.config/freqar``."""
    if os.environ.get("FREQAR_CONFIG_DIR"):
        return Path(os.environ["FREQAR_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "freqar"


def default_calibration_path(pipe: Pipeline, model: str, fingerprint: str | None = None) -> Path:
    """Beside a model folder's config.json when writable, else in the user config dir."""
    d = Path(model)
    if (d / "config.json").is_file() and os.access(d, os.W_OK):
        return d / CALIBRATION_NAME
    fp = fingerprint or weights_fingerprint(pipe)
    return user_config_dir() / "calibration" / f"{pipe.name}-{fp}.json"


def model_folder(model: str) -> Path:
    """The folder a model's files live in: a bundled model's package-data folder (whose calibration ships
    with the wheel, so a fresh install gets the calibrated block), else ``model`` itself."""
    from .registry import bundled_dir

    return bundled_dir(model) or Path(model)


def save_calibration(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def find_calibration(
    pipe: Pipeline, model: str, explicit: str | os.PathLike[str] | None = None
) -> dict | None:
    """The stored calibration that matches these weights (``explicit``: that file, which must match)."""
    folder = model_folder(model)
    if explicit is None:  # look before hashing: a multi-GB model should not be hashed for nothing
        beside = folder / CALIBRATION_NAME
        user = sorted((user_config_dir() / "calibration").glob(f"{pipe.name}-*.json"))
        if not beside.is_file() and not user:
            return None
    fp = weights_fingerprint(pipe)
    if explicit is not None:
        res = read_json(explicit)
        if not isinstance(res, dict) or res.get("format") != FORMAT or "block" not in res:
            raise CalibrationError(f"'{explicit}' is not a freqar calibration file (format != {FORMAT})")
        if res.get("weights") != fp:
            raise CalibrationError(
                f"'{explicit}' was calibrated on other weights ({res.get('weights')}, this model {fp}); "
                "rerun freqar calibrate"
            )
        return res
    candidates = [
        folder / CALIBRATION_NAME,
        user_config_dir() / "calibration" / f"{pipe.name}-{fp}.json",
    ]
    for p in candidates:
        if p.is_file():
            try:
                res = read_json(p)
            except FreqarError:
                continue
            if isinstance(res, dict) and res.get("format") == FORMAT and res.get("weights") == fp:
                return res
    return None


def calibrated_block(
    pipe: Pipeline, model: str, explicit: str | os.PathLike[str] | None = None
) -> int | None:
    """The calibrated probe block for these weights, if one is stored (checked against the depth)."""
    res = find_calibration(pipe, model, explicit)
    if res is None:
        return None
    block = int(res["block"])
    if not 0 <= block < pipe.transformer.depth:
        raise CalibrationError(f"stored calibration block {block} is outside the model's depth")
    return block


def with_calibrated_block(policy: Any, pipe: Pipeline, model: str) -> Any:
    """A SparseVAR policy without an explicit block gets the calibrated one (others are returned as is)."""
    from .policies.skip import SkipPolicy

    if isinstance(policy, SkipPolicy) and policy.inner is not None:
        return SkipPolicy(policy.cfg, with_calibrated_block(policy.inner, pipe, model))
    if not isinstance(policy, SparseVARPolicy) or policy.cfg.block is not None:
        return policy
    block = calibrated_block(pipe, model)
    return policy if block is None else SparseVARPolicy(replace(policy.cfg, block=block))
