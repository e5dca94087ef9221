"""The class-name list must match torchvision's _IMAGENET_CATEGORIES index for index."""
from __future__ import annotations

import subprocess
import sys

from shared.labels import load_labels


def test_labels_are_torchvision_imagenet_categories() -> None:
    labels = load_labels()
    assert len(labels) == 1000
    assert len(set(labels)) == 1000
    assert labels[0] == "tench"
    assert labels[1] == "goldfish"
    assert labels[207] == "golden retriever"
    assert labels[999] == "toilet tissue"
    # a few entries that other label files spell differently
    assert labels[134] == "crane bird" and labels[517] == "crane"
    assert labels[639] == "maillot tank suit"
    assert all(label == label.strip() and label for label in labels)


def test_load_labels_is_cached_but_returns_a_copy() -> None:
    first = load_labels()
    first[0] = "mutated"
    assert load_labels()[0] == "tench"


def test_labels_import_neither_torch_nor_numpy() -> None:
    code = ("import sys; from shared.labels import load_labels; load_labels(); "
            "print(sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
