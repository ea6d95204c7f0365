"""Two CPU processes (gloo) train a few steps; their replicas must stay identical."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from train_helpers import ddp_dump_worker, write_manifest_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("gan", [False, True], ids=["plain", "adversarial"])
def test_two_process_ddp_replicas_identical(tmp_path: Path, gan: bool) -> None:
    """With ``gan`` the discriminator (owned by the task, outside DDP) must stay identical too."""
    data = write_manifest_dataset(tmp_path / "data")
    res = tmp_path / "res"
    res.mkdir()
    mp.spawn(
        ddp_dump_worker,
        args=(2, _free_port(), str(data), str(tmp_path / "run"), str(res), gan),
        nprocs=2,
        join=True,
    )
    a, b = (torch.load(res / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    parts = ("model", "ema", "disc") if gan else ("model", "ema")
    if gan:
        d0 = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["task_state"]["disc"]
        assert all(torch.equal(d0[k], a["disc"][k]) for k in d0)  # the critic is checkpointed
    for part in parts:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs between ranks"
    assert torch.equal(a["usage"], b["usage"])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4
    assert all(torch.equal(a["model"][k], ck["model"][k]) for k in a["model"])  # rank 0 wrote the checkpoint
