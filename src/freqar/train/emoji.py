"""Build the Fluent 3D emoji data set from two npm tarballs (no unpacking, no network at import).

Recipe: ``@lobehub/fluent-emoji-3d`` gives the pictures (RGBA WebP, 256 px), ``emoji-datasource`` gives names
and categories. Files are joined to entries by a canonical code-point key (hex without leading zeros, with
U+FE0F / U+E007F dropped), de-duplicated per (entry, tone), alpha-composited onto white *before* resizing (so
transparent pixels never bleed), and split by a hash of the base code points so the split is stable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FreqarError
from ..io import atomic_path, write_json

FLUENT_PKG = "@lobehub/fluent-emoji-3d@1.1.0"
DATASOURCE_PKG = "emoji-datasource@16.0.0"
FLUENT_TGZ = "lobehub-fluent-emoji-3d-1.1.0.tgz"
DATASOURCE_TGZ = "emoji-datasource-16.0.0.tgz"
SHA1 = {
    FLUENT_TGZ: "ff0679b2bbbf6100dd9709d8952498f08f364ac6",
    DATASOURCE_TGZ: "7977edaa5b0099696bc720e43dd608d91ae2f208",
}
_SKIP_CODEPOINTS = {0xFE0F, 0xE007F}


class DataError(FreqarError):
    """A data set that cannot be fetched, read or built."""


def codepoint_key(text: str) -> tuple[int, ...]:
    """Canonical join key: hex code points split on '-'/'_', leading zeros and FE0F/E007F ignored."""
    parts = [p for p in re.split(r"[-_]", text.strip().lower()) if p]
    try:
        cps = tuple(int(p, 16) for p in parts)
    except ValueError:
        return ()
    return tuple(c for c in cps if c not in _SKIP_CODEPOINTS)


def heldout(base_unified: str, modulo: int = 10) -> bool:
    """Stable split: a base emoji is held out when sha256(upper-case unified) % modulo == 0."""
    return int(hashlib.sha256(base_unified.upper().encode()).hexdigest(), 16) % modulo == 0


def npm_pack(
    cache_dir: Path, packages: tuple[str, ...] = (FLUENT_PKG, DATASOURCE_PKG), timeout: float = 300
) -> None:
    """Fetch the tarballs with ``npm pack`` into ``cache_dir`` (skipped for tarballs already there)."""
    wanted = {FLUENT_PKG: FLUENT_TGZ, DATASOURCE_PKG: DATASOURCE_TGZ}
    missing = [p for p in packages if not (cache_dir / wanted.get(p, "?")).is_file()]
    if not missing:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "npm is not installed; install Node.js/npm, or run `npm pack "
            + " ".join(missing)
            + f"` elsewhere and copy the .tgz files into '{cache_dir}'"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(
            [npm, "pack", *missing, "--pack-destination", str(cache_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DataError(f"`npm pack` timed out after {timeout:.0f} s (offline?)") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        hint = lines[-1] if lines else f"exit code {res.returncode}"
        raise DataError(f"`npm pack` failed (offline or registry unreachable?): {hint}")


def verify_sha1(path: Path) -> None:
    """Check a known tarball's sha1 (what ``npm pack`` prints); unknown names are not checked."""
    want = SHA1.get(path.name)
    if want is None:
        return
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise DataError(f"'{path}' has sha1 {h.hexdigest()}, expected {want}; delete it and rebuild")


@dataclass(frozen=True)
class EmojiRow:
    """One kept image and its metadata."""

    member: str
    unified: str
    base: str
    tone: str
    name: str
    short_name: str
    category: str
    subcategory: str
    sort_order: int


def _entry_map(entries: list[dict]) -> dict[tuple[int, ...], tuple[dict, str, str]]:
    """key -> (base entry, unified of the variant, tone ('' for the base))."""
    out: dict[tuple[int, ...], tuple[dict, str, str]] = {}
    for e in entries:
        out[codepoint_key(e["unified"])] = (e, e["unified"], "")
        for tone, v in (e.get("skin_variations") or {}).items():
            out[codepoint_key(v["unified"])] = (e, v["unified"], tone)
    return out


def select_rows(
    member_names: list[str], entries: list[dict], with_tones: bool = False
) -> tuple[list[EmojiRow], int]:
    """Join image members to entries and de-duplicate; returns (rows in sort order, unmatched count)."""
    emap = _entry_map(entries)
    chosen: dict[tuple[str, str], str] = {}
    unmatched = 0
    for m in sorted(member_names):
        stem = Path(m).name[: -len(".webp")]
        hit = emap.get(codepoint_key(stem))
        if hit is None:
            unmatched += 1
            continue
        entry, unified, tone = hit
        if tone and not with_tones:
            continue
        slot = (unified, tone)
        prev = chosen.get(slot)
        exact = stem == unified.lower()
        if prev is None or (exact and Path(prev).name[: -len(".webp")] != unified.lower()):
            chosen[slot] = m
    rows = []
    for (unified, tone), m in chosen.items():
        entry = emap[codepoint_key(unified)][0]
        rows.append(
            EmojiRow(
                member=m,
                unified=unified,
                base=entry["unified"],
                tone=tone,
                name=str(entry.get("name") or entry.get("short_name") or unified).lower(),
                short_name=str(entry.get("short_name", "")),
                category=str(entry.get("category", "")),
                subcategory=str(entry.get("subcategory", "")),
                sort_order=int(entry.get("sort_order", 0)),
            )
        )
    rows.sort(key=lambda r: (r.sort_order, r.tone))
    return rows, unmatched


def composite_resize(data: bytes, size: int) -> np.ndarray:
    """Decode, centre on a white square, alpha-composite, then one LANCZOS resize -> uint8 (size, size, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    layer = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    layer.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    rgb = Image.alpha_composite(canvas, layer).convert("RGB")
    if side != size:
        rgb = rgb.resize((size, size), Image.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _read_entries(datasource_tgz: Path) -> list[dict]:
    try:
        with tarfile.open(datasource_tgz, "r:gz") as tf:
            f = tf.extractfile("package/emoji.json")
            if f is None:
                raise KeyError("package/emoji.json")
            entries = json.loads(f.read())
    except (tarfile.TarError, KeyError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read emoji.json from '{datasource_tgz}': {e}") from None
    if not isinstance(entries, list):
        raise DataError(f"'{datasource_tgz}': emoji.json is not a list")
    return entries


def build_emoji_dataset(
    out: Path,
    cache_dir: Path,
    size: int = 128,
    with_tones: bool = False,
    fetch: bool = True,
    verify: bool = True,
    progress: bool = False,
) -> dict:
    """Build ``out/images.npz`` (uint8 [N,H,W,3]) and ``out/manifest.json``; returns the manifest."""
    if size < 8:
        raise DataError(f"image size must be >= 8, got {size}")
    if fetch:
        npm_pack(cache_dir)
    fluent, source = cache_dir / FLUENT_TGZ, cache_dir / DATASOURCE_TGZ
    for p in (fluent, source):
        if not p.is_file():
            raise DataError(f"missing tarball '{p}' (run without --no-fetch, or `npm pack` it there)")
        if verify:
            verify_sha1(p)
    entries = _read_entries(source)
    try:
        tf = tarfile.open(fluent, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot open '{fluent}': {e}") from None
    with tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile() and m.name.endswith(".webp")}
        rows, unmatched = select_rows(list(members), entries, with_tones)
        imgs, kept, skipped = [], [], 0
        it = rows
        if progress:
            from tqdm import tqdm

            it = tqdm(rows, desc="emoji", unit="img")
        for r in it:
            f = tf.extractfile(members[r.member])
            try:
                imgs.append(composite_resize(f.read() if f else b"", size))
                kept.append(r)
            except Exception:  # corrupt or unreadable picture: skip and count
                skipped += 1
    if not kept:
        raise DataError("no images could be built (empty data set)")
    categories = sorted({r.category for r in kept})
    records = [
        {
            "unified": r.unified,
            "base": r.base,
            "tone": r.tone,
            "name": r.name,
            "short_name": r.short_name,
            "category": r.category,
            "subcategory": r.subcategory,
            "sort_order": r.sort_order,
            "label": categories.index(r.category),
            "caption": r.name,
            "split": "heldout" if heldout(r.base) else "train",
        }
        for r in kept
    ]
    out.mkdir(parents=True, exist_ok=True)
    arr = np.stack(imgs)
    with atomic_path(out / "images.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=arr)
    manifest = {
        "format": "freqar-dataset/1",
        "source": {"images": FLUENT_PKG, "metadata": DATASOURCE_PKG},
        "size": size,
        "with_tones": with_tones,
        "class_names": categories,
        "count": len(records),
        "train": sum(r["split"] == "train" for r in records),
        "heldout": sum(r["split"] == "heldout" for r in records),
        "skipped_corrupt": skipped,
        "unmatched_files": unmatched,
        "rows": records,
    }
    write_json(out / "manifest.json", manifest)
    return manifest
