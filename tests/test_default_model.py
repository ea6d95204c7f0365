"""The bundled default model (``emoji``): loads offline from package data and generates."""

from __future__ import annotations

import pytest

from freqar.registry import BUNDLED, bundled_dir, create_model, list_models


def test_bundled_presets_are_listed_only_when_installed() -> None:
    for name in BUNDLED:
        assert (name in list_models()) == (bundled_dir(name) is not None)


@pytest.mark.skipif(bundled_dir("emoji") is None, reason="emoji-default weights not in this checkout")
def test_emoji_default_loads_and_generates() -> None:
    from freqar.train.samples import class_grid

    d = bundled_dir("emoji")
    assert d is not None
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size <= 40 * 2**20
    pipe = create_model("emoji")
    assert pipe.name == "emoji" and pipe.image_size == 128
    assert pipe.class_names is not None and len(pipe.class_names) == pipe.num_classes
    assert pipe.tokenizer.cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    out = pipe.generate([0, 1], seed=0)
    assert out.images.shape == (2, 3, 128, 128)
    assert 0 <= out.images.min() and out.images.max() <= 1
    grid = class_grid(pipe, per_class=1, classes=[0], label_width=40)
    assert grid.size == (40 + 128, 128)
