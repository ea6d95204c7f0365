"""scripts/exclusion_bound.py: the reconstruction-domain bound on which tokens SparseVAR can leave out."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_pipeline
from train_helpers import write_manifest_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "exclusion_bound.py"


def _script() -> dict:
    return runpy.run_path(str(SCRIPT), run_name="exclusion_bound")


def test_reencode_drops_exactly_the_lowest_ranked_tokens() -> None:
    mod = _script()
    pipe = tiny_pipeline(num_classes=3)
    q = pipe.tokenizer.quantize
    f = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    _, fhats = q.encode(f)
    dense = mod["reencode_with_exclusion"](pipe, f, 2, 0.5, None)
    assert torch.equal(dense, fhats[-1])
    everything = mod["reencode_with_exclusion"](pipe, f, 2, 1.0, lambda si, cur, prev: cur)
    assert torch.equal(everything, fhats[-1])  # keep 1: nothing dropped, same bits
    # keep 0.5 from the last stage, ranked by the current residual: the dropped half is the low-energy half
    last = len(q.patch_nums) - 1
    seen: list[torch.Tensor] = []

    def rank(si: int, cur: torch.Tensor, prev: tuple | None) -> torch.Tensor:
        seen.append(cur)
        return cur

    half = mod["reencode_with_exclusion"](pipe, f, last, 0.5, rank)
    (cur,) = seen
    kept = torch.zeros_like(cur, dtype=torch.bool).scatter_(1, cur.topk(8, dim=1).indices, True)
    idx, _ = q.encode(f)
    vec = q.codes_to_map(idx[-1], 4) * kept.view(2, 1, 4, 4)
    want = fhats[-2] + q.residual(vec, last)
    assert torch.allclose(half, want, atol=1e-6) and not torch.equal(half, dense)
    assert all(bool(c[k].min() >= c[~k].max()) for c, k in zip(cur, kept, strict=True))  # per image


def test_script_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from freqar.eval import fid

    monkeypatch.setattr(fid, "lite0_feature_net", lambda: fid.random_feature_net(8))
    pipe = tiny_pipeline(num_classes=3)
    pipe.class_names = ["square", "disc", "stripes"]
    pipe.save(tmp_path / "model")
    data = write_manifest_dataset(tmp_path / "shapes", n=32, size=8)
    out = tmp_path / "bound"
    argv = [str(SCRIPT), str(tmp_path / "model"), "--data", str(data), "--keep", "0.5", "--start-stage", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--batch", "3", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    rep = json.loads((out / "bound.json").read_text())
    names = [r["criterion"] for r in rep["rows"]]
    assert names == ["dense", "current residual", "previous residual", "dF block s", "entropy", "random"]
    assert rep["rows"][0]["fd_increase"] == 0.0 and rep["images"] == 4
    assert set(rep["rows"][2]["spearman"]) == {"2", "3"}  # one correlation per sparse stage
    assert all(-1.0 <= v <= 1.0 for r in rep["rows"][2:] for v in r["spearman"].values())
    assert "| random |" in (out / "bound.md").read_text() and (out / "bound.png").stat().st_size > 0
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "--start-stage", "9", "--out", str(out)])
    with pytest.raises(SystemExit, match="--start-stage must be in"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
