"""Folders of images for the bulk-job tests: the real photo corpus, hard-linked into nested trees.

Without the corpus (a fresh clone) varied synthetic JPEG/PNG images stand in, so the bulk tests
still run; with ``CI=true`` a missing corpus is an error, as for the ``corpus`` fixture.
"""
from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.conftest import CORPUS_DIR, corpus_photos


def source_photos(workdir: Path) -> list[Path]:
    """The corpus photos, or (fresh clone only) 48 synthetic images written under ``workdir``."""
    photos = corpus_photos()
    if photos:
        return photos
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the photo corpus is missing at {CORPUS_DIR}")
    return synthetic_photos(workdir / "synthetic", 48)


def synthetic_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Noise, a gradient and a few shapes: different images give different classifications."""
    w, h = size
    img = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    overlay = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    img = Image.blend(img, overlay, rng.uniform(0.3, 0.8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):
        x0, x1 = sorted(rng.randrange(w) for _ in range(2))
        y0, y1 = sorted(rng.randrange(h) for _ in range(2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


def synthetic_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct images, two thirds JPEG, one third PNG, of varied sizes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        size = (rng.randint(120, 640), rng.randint(120, 480))
        img = synthetic_image(rng, size)
        if i % 3:
            path = folder / f"synthetic-{i:03d}.jpg"
            img.save(path, "JPEG", quality=rng.randint(70, 95))
        else:
            path = folder / f"synthetic-{i:03d}.png"
            img.save(path, "PNG")
        out.append(path)
    return out


def place(src: Path, dst: Path) -> None:
    """A hard link (ingest reads it as the regular file it is), or a copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def image_tree(root: Path, photos: list[Path], n: int) -> dict[str, Path]:
    """``n`` images under ``root``: copy k of every photo goes to ``set<k>/part<i%3>/`` (every fifth
    one two levels deeper), named ``<stem>-<k><suffix>``. Returns job name -> source photo (the
    name ``pinfer ingest ROOT`` gives it: the path relative to ROOT)."""
    names: dict[str, Path] = {}
    k = 0
    while len(names) < n:
        for i, src in enumerate(photos):
            if len(names) == n:
                break
            folder = Path(f"set{k:02d}", f"part{i % 3}", *(("deeper", "still") if i % 5 == 0 else ()))
            rel = folder / f"{src.stem}-{k}{src.suffix}"
            place(src, root / rel)
            names[rel.as_posix()] = src
        k += 1
    return names


def named_images(photos: list[Path], n: int, prefix: str) -> list[tuple[str, bytes]]:
    """``n`` (unique name, bytes) pairs cycling through ``photos``, for uploads through the SDK."""
    data = {p: p.read_bytes() for p in photos[:n]}
    return [(f"{prefix}/{i:04d}-{p.name}", data[p]) for i, p in
            ((i, photos[i % len(photos)]) for i in range(n))]


def truncated_jpeg() -> bytes:
    """The first half of a 640x480 JPEG: its header reads fine, its pixels cannot be decoded."""
    buf = io.BytesIO()
    synthetic_image(random.Random(7), (640, 480)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def add_broken_and_other_files(root: Path) -> tuple[dict[str, bytes], list[str]]:
    """Three image-named files that are not valid images, and three non-image files ingest must
    skip. Returns ({job name: bytes} of the broken ones, [relative paths of the skipped ones])."""
    broken = {
        "broken/truncated.jpg": truncated_jpeg(),
        "broken/not-an-image.jpg": b"this is a text file with a .jpg suffix\n" * 4,
        "broken/nested/empty.png": b"",
    }
    other = {
        "notes.txt": b"holiday photos\n",
        "set00/meta.json": b'{"camera": "none"}\n',
        "set01/part1/README": b"no suffix at all\n",
    }
    for rel, data in {**broken, **other}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return broken, list(other)
