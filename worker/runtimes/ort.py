"""ONNX Runtime: fp32 and int8 (static QDQ, per-channel) artifacts, without torch.

The seed documents recommend ONNX Runtime for CPU serving, and it is the serving path that does not
depend on TorchScript (deprecated upstream). One session per worker process: ``intra_op`` threads =
the cores the process is pinned to, one inter-op thread, sequential execution (a ResNet has no
parallel branches worth a second pool).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.runtimes import softmax


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


class OrtBackend:
    runtime = "onnx"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        self.precision = precision
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def probs(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return softmax(self.session.run(None, {self.input_name: x})[0])
