"""Shared fixtures.

The real photo corpus lives beside the checkout (``../shared/corpus/photos``). A user's fresh clone
does not have it: corpus tests are then skipped. In CI (``CI=true``) a missing corpus is an error,
never a skip, so the corpus tests cannot silently stop running.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pinfer_client.ingest import IMAGE_SUFFIXES  # the one list of what counts as an image file

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(os.environ.get("PINFER_CORPUS_DIR", ROOT.parent / "shared" / "corpus" / "photos"))


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


@pytest.fixture(scope="session")
def resnet_variants(tmp_path_factory) -> Path:
    """A random-init ResNet-18 exported as fp32 + int8 for TorchScript and ONNX Runtime, calibrated on
    16 photos and measured on 16 others: the corpus when present, else synthetic images (fresh clone).

    Session-scoped because the int8 export of the full network takes a while; kept to the variants the
    tests need (bf16 is the fp32 TorchScript file run under autocast and needs no export).
    """
    from tests.integration._images import synthetic_photos
    from weights.export import export_model

    photos = CORPUS_DIR if corpus_photos() else None
    if photos is None:
        photos = tmp_path_factory.mktemp("calibration")
        synthetic_photos(photos, 32)
    d = tmp_path_factory.mktemp("resnet-variants")
    export_model(d, random_init=True, seed=0, precisions=("fp32", "int8"), runtimes=("torchscript", "onnx"),
                 calibration=photos, calibration_images=16, holdout_images=16)
    return d
