"""ImageNet-1k class names, in the index order of the model's 1000 logits.

The list is torchvision's ``_IMAGENET_CATEGORIES`` shipped as a text file (package data) so that the
API and workers can name classes without torch, numpy or torchvision.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    text = resources.files("shared").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line for line in text.splitlines() if line)
    if len(labels) != NUM_CLASSES:
        raise RuntimeError(f"shared/imagenet_classes.txt holds {len(labels)} names, expected {NUM_CLASSES}")
    return labels


def load_labels() -> list[str]:
    """The 1000 class names; read once, and a fresh list each call so callers cannot corrupt the cache."""
    return list(_labels())
