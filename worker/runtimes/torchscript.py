"""TorchScript: the design card's format. fp32 and int8 artifacts load as they are; bf16 is the fp32
artifact run under ``torch.autocast`` (only worth it with AVX-512-BF16 or AMX).

TorchScript is deprecated upstream (torch 2.13); the ONNX Runtime backend (``worker.runtimes.ort``)
is the serving path that does not depend on it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


class TorchScriptBackend:
    runtime = "torchscript"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        torch.set_num_threads(threads)
        if precision == "int8":
            # The int8 artifact was converted for the x86 quantized engine (fbgemm kernels + oneDNN).
            torch.backends.quantized.engine = "x86"
        self.precision = precision
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """Channels-last input lets oneDNN pick its fast convolution kernels: measured 1.55x faster in
        fp32 on one core of the CI machine (AMD EPYC, AVX-512: 30 -> 20 ms/image) and makes bf16 pay off."""
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            return torch.softmax(logits.float(), dim=1).numpy()
