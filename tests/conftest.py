"""Shared fixtures: tiny models built in code, the conformance fixture location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from freqar.models.var import VARConfig
from freqar.pipeline import Pipeline, build_pipeline
from freqar.tokenizers.msvq import MSVQConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))
# One throw-away multi-threaded exp call (first-call rounding flake on some CPU builds).
torch.exp(torch.linspace(-1, 1, 100_000))


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """One torch thread for a module of tiny models: on a shared machine more threads only wait.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A copy of shared/conformance/var_tiny lives in the repo so CI needs nothing outside the clone.
VAR_TINY_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "var_tiny"


def tiny_pipeline(
    patch_nums: tuple[int, ...] = (1, 2, 3, 4),
    shared_aln: bool = False,
    depth: int = 2,
    num_classes: int = 5,
    seed: int = 0,
) -> Pipeline:
    """A 2-block, width-32 VAR on a 2x-downsampling tokenizer: builds in milliseconds."""
    vae = MSVQConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=patch_nums)
    var = VARConfig(
        depth=depth,
        embed_dim=32,
        num_heads=2,
        num_classes=num_classes,
        patch_nums=patch_nums,
        vocab_size=32,
        z_channels=8,
        shared_aln=shared_aln,
    )
    pipe = build_pipeline("tiny", vae, var, init_seed=seed)
    # Random init leaves gammas near-zero-free defaults; randomise every parameter so blocks matter.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


@pytest.fixture
def tiny() -> Pipeline:
    return tiny_pipeline()


@pytest.fixture
def var_tiny_fixture() -> Path:
    if not (VAR_TINY_FIXTURE / "config.json").is_file():
        pytest.fail(f"conformance fixture missing: {VAR_TINY_FIXTURE}")
    return VAR_TINY_FIXTURE
