"""How much of SparseVAR's FD cost comes from *which* tokens it excludes? A bound on real images.

SparseVAR decides before a stage runs which tokens to leave out, from signals of the previous stage (ΔF of a
probe block, or the entropy of its logits). This script asks how good any such signal can be on a given
VAR model and data set, without the sampler's noise: it re-encodes the held-out images scale by scale and,
from ``--start-stage`` on, drops ``1 - keep`` of each stage's tokens (zero residual, what SparseVAR does when
no anchor is similar enough), ranking the tokens by

- ``current residual``: the true residual left at this stage (an oracle: it needs the stage's own answer),
- ``previous residual``: the true residual of the previous stage, resized (the best any previous-stage
  signal could know about where detail sits),
- ``dF block s``: Eq. 1's ΔF of the probe block on the previous stage, teacher-forced (SparseVAR's signal),
- ``entropy``: the entropy of the previous stage's logits, teacher-forced,
- ``random``,

and scores the decoded images' FD against the train split. Later stages are re-encoded against what the
dropped tokens left, as a sampler's next stage would see it. It also prints each signal's mean per-image
Spearman correlation with the current residual, the quantity a signal has to predict.

Usage: python scripts/exclusion_bound.py [MODEL_DIR] --data data/emoji128 --keep 0.6 --start-stage 8
    [--block 1 --threads 1 --out DIR]    (writes DIR/bound.json, bound.md, bound.png)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freqar.calibrate import spearman
from freqar.eval.fid import extract, lite0_feature_net
from freqar.eval.run import EvalSettings, ReferenceScorer, reference_features
from freqar.io import atomic_write, write_json
from freqar.pipeline import Pipeline, load_pipeline_dir
from freqar.policies.sparsevar import _resize, predictive_entropy
from freqar.train.data import load_manifest_dataset, to_unit

CRITERIA = ("current residual", "previous residual", "dF block s", "entropy", "random")
# (stage, its residual energies (B, l), the previous stage's (energies, side) or None) -> ranking (B, l)
Score = Callable[[int, torch.Tensor, tuple[torch.Tensor, int] | None], torch.Tensor]


def stage_residual(pipe: Pipeline, rest_BChw: torch.Tensor, si: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What stage ``si`` codes from the latent left so far: its tokens (B, l, C), resized as the encoder
    does, and their mean square (B, l), how much this stage still has to add at each token."""
    z_BlC = pipe.tokenizer.quantize.next_input(rest_BChw, si)
    return z_BlC, z_BlC.square().mean(dim=-1)


def resize_to(x_Bl: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """A (B, src²) map resized to (B, dst²) exactly as SparseVAR resizes ΔF to the next grid."""
    return _resize(x_Bl.view(-1, 1, src, src).float(), (dst, dst)).flatten(1)


@torch.no_grad()
def teacher_forced_signals(
    pipe: Pipeline, idx_list: list[torch.Tensor], labels: torch.Tensor, block: int
) -> dict:
    """Per stage: ΔF of ``block`` and the logits' entropy (as the policy computes it) on the exact codes
    ``idx_list``, (B, l) each."""
    q, model = pipe.tokenizer.quantize, pipe.transformer
    taps: dict[str, torch.Tensor] = {}

    def tap(_mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        taps["dF"] = (out - args[0]).float().square().mean(dim=-1)

    handle = model.blocks[block].register_forward_hook(tap)
    try:
        logits = model(labels, q.teacher_forcing_input(idx_list)).float()
    finally:
        handle.remove()
    ent = predictive_entropy(logits)
    splits = [pn * pn for pn in q.patch_nums]
    return {"dF": list(taps["dF"].split(splits, dim=1)), "entropy": list(ent.split(splits, dim=1))}


@torch.no_grad()
def reencode_with_exclusion(pipe: Pipeline, f_BChw: torch.Tensor, P: int, keep: float, score: Score | None):
    """f_hat after coding every stage, with ``1 - keep`` of the tokens of stages >= P given a zero residual
    (lowest ``score`` first); None = dense."""
    q = pipe.tokenizer.quantize
    B, C = f_BChw.shape[:2]
    f_rest, f_hat = f_BChw.clone(), torch.zeros_like(f_BChw)
    prev_energy = None
    for si, pn in enumerate(q.patch_nums):
        z, energy = stage_residual(pipe, f_rest, si)
        vec = q.codes_to_map(q.nearest_code(z.reshape(-1, C)).view(B, pn * pn), pn)
        if score is not None and si >= P:
            s = score(si, energy, prev_energy)
            kept = torch.zeros_like(s, dtype=torch.bool).scatter_(
                1, s.topk(round(keep * pn * pn), dim=1).indices, True
            )
            vec = vec * kept.view(B, 1, pn, pn)
        h = q.residual(vec, si)
        f_hat.add_(h)
        f_rest.sub_(h)
        prev_energy = (energy, pn)
    return f_hat


def criterion(name: str, signals: dict, grids: list[int], seed: int) -> Score:
    """The ranking for one criterion: a function of (stage, current residual, previous residual)."""

    def fn(si: int, cur: torch.Tensor, prev: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        if name == "current residual":
            return cur
        if name == "previous residual":
            assert prev is not None
            return resize_to(prev[0], prev[1], grids[si])
        if name == "random":
            g = torch.Generator().manual_seed(seed + si)
            return torch.rand(cur.shape, generator=g)
        key = "dF" if name == "dF block s" else "entropy"
        return resize_to(signals[key][si - 1], grids[si - 1], grids[si])

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "model_dir", nargs="?", default=str(Path(__file__).parents[1] / "src/freqar/assets/emoji-default")
    )
    ap.add_argument("--data", required=True, help="a `freqar data` folder (held-out split, train statistics)")
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--start-stage", type=int, default=8)
    ap.add_argument("--block", type=int, default=1, help="SparseVAR's probe block s for the ΔF criterion")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline_dir(a.model_dir)
    pipe.tokenizer.eval().requires_grad_(False)  # decoded images are kept: no graph behind them
    pipe.transformer.eval().requires_grad_(False)
    grids = list(pipe.tokenizer.quantize.patch_nums)
    if not 1 <= a.start_stage < len(grids) or not 0 < a.keep <= 1:
        raise SystemExit(f"--start-stage must be in [1, {len(grids) - 1}] and --keep in (0, 1]")
    net = lite0_feature_net()
    ref = reference_features(Path(a.data), net, None)
    held = load_manifest_dataset(Path(a.data), "heldout")
    scorer = ReferenceScorer(ref, EvalSettings(samples=len(held), batch=a.batch, seed=a.seed))
    names = ["dense", *CRITERIA]
    images: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    rho: dict[str, dict[int, list[float]]] = {
        n: {si: [] for si in range(a.start_stage, len(grids))} for n in CRITERIA
    }
    for i in tqdm(range(0, len(held), a.batch), desc="held-out batches", unit="batch"):
        with torch.no_grad():
            f = pipe.tokenizer.encode_latent(to_unit(held.images[i : i + a.batch]))
        idx_list, dense_fhats = pipe.tokenizer.quantize.encode(f)
        sig = teacher_forced_signals(pipe, idx_list, held.labels[i : i + a.batch], a.block)
        images["dense"].append(pipe.tokenizer.decode(dense_fhats[-1]))
        for n in CRITERIA:
            fhat = reencode_with_exclusion(
                pipe, f, a.start_stage, a.keep, criterion(n, sig, grids, a.seed + i)
            )
            images[n].append(pipe.tokenizer.decode(fhat))
        # each signal's agreement with the residual it has to predict, on the dense encoding
        prev_fhat = None
        for si in range(len(grids)):
            _, cur = stage_residual(pipe, f - dense_fhats[si - 1] if si else f, si)
            if si >= a.start_stage:
                for n in CRITERIA:
                    if n != "current residual":
                        s = criterion(n, sig, grids, a.seed + i)(si, cur, prev_fhat)
                        rho[n][si].extend(spearman(s, cur).tolist())
            prev_fhat = (cur, grids[si])
    rows = []
    base = None
    for n in names:
        feats, _ = extract(net, torch.cat(images[n]))
        fd = scorer.fd_to_train(feats)
        base = fd if n == "dense" else base
        r = {"criterion": n, "fd": fd, "fd_increase": fd / base - 1}
        if n in rho and n != "current residual":
            r["spearman"] = {str(si): float(np.mean(v)) for si, v in rho[n].items()}
        rows.append(r)
    b = scorer.bounds(len(held))
    report = {
        "model": a.model_dir,
        "data": a.data,
        "keep": a.keep,
        "start_stage": a.start_stage,
        "block": a.block,
        "images": len(held),
        "fd_floor": b["fd_floor"],
        "fd_ceiling": b["fd_ceiling"],
        "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bound.json", report)
    atomic_write(out / "bound.md", lambda p: p.write_text(markdown(report)))
    plot(report, out / "bound.png")
    print(markdown(report))


def markdown(r: dict) -> str:
    stages = sorted({s for x in r["rows"] for s in x.get("spearman", {})}, key=int)
    head = "| ranking | FD | FD increase | " + " | ".join(f"Spearman, stage {s}" for s in stages) + " |"
    lines = [
        f"Held-out reconstructions ({r['images']} images), stages >= {r['start_stage']} keep"
        f" {r['keep']:.0%} of their tokens (zero residual for the rest);"
        f" FD floor {r['fd_floor']:.1f}, ceiling {r['fd_ceiling']:.1f}.",
        "",
        head,
        "|" + "---|" * (3 + len(stages)),
    ]
    for x in r["rows"]:
        sp = x.get("spearman", {})
        cells = [f"{sp[s]:+.2f}" if s in sp else "—" for s in stages]
        name = x["criterion"].replace("block s", f"block {r['block']}")
        lines.append(
            f"| {name} | {x['fd']:.1f} | {100 * x['fd_increase']:+.1f}% | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in r["rows"] if x["criterion"] != "dense"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.barh([x["criterion"] for x in rows], [100 * x["fd_increase"] for x in rows], color="tab:red")
    ax.axvline(5, color="k", ls=":", lw=1, label="+5% (the target)")
    ax.set_xlabel("FD increase over dense reconstructions (%)")
    ax.set_title(f"which tokens to drop: keep {r['keep']:.0%} from stage {r['start_stage']}")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
