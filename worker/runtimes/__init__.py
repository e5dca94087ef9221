"""Inference backends, one module per runtime; only the chosen one is imported.

Every backend takes a verified artifact path, a precision and a thread count, and offers
``probs(batch) -> (N, classes) float32`` for a float32 NCHW batch. ``torchscript`` imports torch;
``ort`` imports onnxruntime and never torch, so a worker serving ONNX Runtime runs without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Backend(Protocol):
    runtime: str
    precision: str

    def probs(self, batch: np.ndarray) -> np.ndarray: ...


def load_backend(runtime: str, precision: str, path: Path, threads: int) -> Backend:
    """The backend for ``runtime`` loaded from ``path`` (already sha256-verified by the caller)."""
    if runtime == "torchscript":
        from worker.runtimes.torchscript import TorchScriptBackend

        return TorchScriptBackend(path, precision, threads)
    if runtime == "onnx":
        from worker.runtimes.ort import OrtBackend

        return OrtBackend(path, precision, threads)
    raise ValueError(f"unknown runtime {runtime!r}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum so large logits cannot overflow."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
