"""The emoji data builder on a tiny fake npm layout (tarballs built here, no network)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freqar.cli import main
from freqar.train import emoji
from freqar.train.emoji import DATASOURCE_TGZ, FLUENT_TGZ, DataError, build_emoji_dataset, codepoint_key

ENTRIES = [
    {
        "unified": "1F600",
        "name": "GRINNING FACE",
        "short_name": "grinning",
        "category": "Smileys & Emotion",
        "subcategory": "face-smiling",
        "sort_order": 1,
    },
    {
        "unified": "0023-FE0F-20E3",
        "name": "HASH KEY",
        "short_name": "hash",
        "category": "Symbols",
        "subcategory": "keycap",
        "sort_order": 3,
    },
    {
        "unified": "1F44B",
        "name": "WAVING HAND SIGN",
        "short_name": "wave",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "sort_order": 2,
        "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB"}},
    },
    {
        "unified": "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F",
        "name": "ENGLAND",
        "short_name": "flag-england",
        "category": "Flags",
        "subcategory": "subdivision-flag",
        "sort_order": 4,
    },
    {
        "unified": "1F34E",
        "name": "RED APPLE",
        "short_name": "apple",
        "category": "Food & Drink",
        "subcategory": "food-fruit",
        "sort_order": 5,
    },
]


def _webp(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), (*color, 255)), (size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    im.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_fake_packages(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache / FLUENT_TGZ, "w:gz") as tf:
        _add(tf, "package/package.json", b"{}")
        _add(tf, "package/assets/1f600.webp", _webp((250, 200, 0)))
        _add(tf, "package/assets/0023-fe0f-20e3.webp", _webp((0, 0, 250)))
        _add(tf, "package/assets/23-fe0f-20e3.webp", _webp((0, 0, 240)))  # duplicate without leading zeros
        _add(tf, "package/assets/1f44b.webp", _webp((250, 180, 120), (32, 34)))  # taller than wide
        _add(tf, "package/assets/1f44b-1f3fb.webp", _webp((250, 220, 200)))  # a skin tone
        _add(tf, "package/assets/1f3f4-e0067_e0062_e0065_e006e_e0067.webp", _webp((250, 250, 250)))
        _add(tf, "package/assets/1f34e.webp", b"RIFF corrupt")  # unreadable: skipped with a count
        _add(tf, "package/assets/1f9ff.webp", _webp((1, 2, 3)))  # no entry: unmatched
    with tarfile.open(cache / DATASOURCE_TGZ, "w:gz") as tf:
        _add(tf, "package/emoji.json", json.dumps(ENTRIES).encode())


def test_codepoint_key_normalises() -> None:
    assert codepoint_key("0023-FE0F-20E3") == codepoint_key("23-fe0f-20e3") == (0x23, 0x20E3)
    assert codepoint_key("1f3f4-e0067_e0062_e0065_e006e_e0067") == codepoint_key(ENTRIES[3]["unified"])


def test_build_from_fake_packages(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_fake_packages(cache)
    m = build_emoji_dataset(tmp_path / "out", cache, size=16, fetch=False, verify=False)
    assert m["count"] == 4 and m["skipped_corrupt"] == 1 and m["unmatched_files"] == 1
    assert [r["name"] for r in m["rows"]] == ["grinning face", "waving hand sign", "hash key", "england"]
    assert m["class_names"] == ["Flags", "People & Body", "Smileys & Emotion", "Symbols"]
    assert all(r["split"] in ("train", "heldout") for r in m["rows"]) and m["train"] + m["heldout"] == 4
    assert m["rows"][2]["unified"] == "0023-FE0F-20E3"
    imgs = np.load(tmp_path / "out" / "images.npz")["images"]
    assert imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
    assert imgs[0, 0, 0].tolist() == [255, 255, 255]  # transparent corner composited onto white
    assert imgs[0, 8, 8, 2] < 60  # the yellow square survives in the middle
    tones = build_emoji_dataset(tmp_path / "out2", cache, size=16, fetch=False, verify=False, with_tones=True)
    assert tones["count"] == 5
    tone_row = next(r for r in tones["rows"] if r["tone"])
    base_row = next(r for r in tones["rows"] if r["unified"] == "1F44B")
    assert tone_row["split"] == base_row["split"] and tone_row["label"] == base_row["label"]


def test_split_is_hash_based() -> None:
    assert emoji.heldout("1F600") == (int(emoji.hashlib.sha256(b"1F600").hexdigest(), 16) % 10 == 0)


def test_sha_mismatch_and_missing_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    make_fake_packages(cache)
    with pytest.raises(DataError, match="sha1"):
        build_emoji_dataset(tmp_path / "o", cache, size=16, fetch=False, verify=True)
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    rc = main(["data", "emoji", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("freqar: error: npm is not installed")


def test_npm_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(emoji.shutil, "which", lambda name: str(fake))
    with pytest.raises(DataError, match="offline.*ENOTFOUND"):
        emoji.npm_pack(tmp_path / "c")
