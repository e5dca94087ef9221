"""How long a worker pauses to roll out a new model: ``Reloader.reload`` (read the manifest, verify the
artifact's sha256, load it, warm it up on every batch shape), in process, one thread.

    taskset -c 1 python -m bench.reload_ms [--precision fp32] [--runtime torchscript] [--reloads 3]

Exports a seeded random-init ResNet-18 into a temporary folder, loads it as a worker does, then
``--reloads`` times exports another seed into the same folder and times the reload (wall and CPU
time of the process: on a shared machine, CPU time is what time-sharing does not inflate).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from shared.settings import Settings
from weights.export import export_model
from worker.reload import CHANGED, Reloader
from worker.runtime import ModelRuntime


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reload_ms")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--runtime", default="torchscript", choices=("torchscript", "onnx"))
    ap.add_argument("--reloads", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runtimes = [args.runtime] if args.runtime == "torchscript" else ["torchscript", args.runtime]
        export_model(folder, random_init=True, seed=0, runtimes=runtimes)
        s = Settings(model_dir=str(folder), precision=args.precision, runtime=args.runtime, reload_check_s=0.0)
        reloader = Reloader(s, ModelRuntime(s, threads=1))
        for seed in range(1, args.reloads + 1):
            export_model(folder, random_init=True, seed=seed, runtimes=runtimes)
            wall, cpu = time.perf_counter(), time.process_time()
            if not reloader.reload(CHANGED):
                print(f"reload refused: {reloader.error}", file=sys.stderr)
                return 1
            print(f"reload {seed} ({args.precision}/{args.runtime}): {time.perf_counter() - wall:.2f} s wall, "
                  f"{time.process_time() - cpu:.2f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
