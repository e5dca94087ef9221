"""Shared fixtures.

The real photo corpus lives beside the checkout (``../shared/corpus/photos``). A user's fresh clone
does not have it: corpus tests are then skipped. In CI (``CI=true``) a missing corpus is an error,
never a skip, so the corpus tests cannot silently stop running.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(os.environ.get("PINFER_CORPUS_DIR", ROOT.parent / "shared" / "corpus" / "photos"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".gif", ".bmp"}


def corpus_photos() -> list[Path]:
    """Every photo of the corpus (sorted), or [] when the corpus is absent."""
    if not CORPUS_DIR.is_dir():
        return []
    return sorted(p for p in CORPUS_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    photos = corpus_photos()
    if not photos:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the photo corpus is missing at {CORPUS_DIR}")
        pytest.skip(f"photo corpus not present at {CORPUS_DIR} (fresh clone)")
    return photos
