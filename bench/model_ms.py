"""Milliseconds per image of each model variant, in process, one thread: a quick check of a CPU.

    taskset -c 1 python -m bench.model_ms DIR:fp32/torchscript DIR:int8/torchscript DIR:fp32/onnx DIR:int8/onnx

Each argument is a model folder written by ``pinfer export-model`` and a ``precision/runtime`` to force.
Reports CPU time of the process (best of 20 calls at batch 1, of 4 at batch 16) so that other work
time-sharing the core does not count; run it on a quiet, pinned core all the same. ``make bench``
is the full side-by-side benchmark.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from shared.settings import Settings
from worker.runtime import ModelRuntime


def ms_per_image(runtime: ModelRuntime, x: np.ndarray, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        runtime.forward(x)
        best = min(best, time.process_time() - t0)
    return 1000 * best / len(x)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    x16 = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    for spec in argv:
        model_dir, _, key = spec.rpartition(":")
        precision, runtime = key.split("/")
        rt = ModelRuntime(Settings(model_dir=model_dir, precision=precision, runtime=runtime, max_batch=16),
                          threads=1)
        print(f"{rt.precision}/{rt.runtime}: batch 1 {ms_per_image(rt, x16[:1], 20):.1f} ms/img, "
              f"batch 16 {ms_per_image(rt, x16, 4):.1f} ms/img", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
