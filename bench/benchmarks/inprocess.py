"""The in-process limit: decode -> preprocess -> batches of 16 -> model -> top-5 on one core, per variant.

No queue, no HTTP, no Redis: the most one worker could do. Each variant runs in a child process
pinned to the server core with one thread, loading the model exactly as a worker does (the
runtime factory of ``worker.runtime``, which verifies the artifact and warms up) and using the
worker's own ``shared.transforms.preprocess``. A variant that loads as something else (bf16 on a
CPU without bf16 units falls back to fp32; a runtime without the artifact) is skipped, not
measured under a false name.

    python -m bench.benchmarks.inprocess SPEC_JSON     (the child; prints one JSON line)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.core import Ctx, Figures
from bench.corpus import load_corpus, materialize
from bench.variants import Variant
from shared.settings import PROJECT_ROOT

NAME = "inprocess"
BATCH = 16


def run(ctx: Ctx, f: Figures) -> None:
    folder = materialize(ctx.corpus, ctx.tmp / "synthetic")
    passes = 1 if ctx.quick else 2
    for v in ctx.variants:
        why = v.unsupported()
        if why:
            f.skip(v, why)
            continue
        try:
            r = measure(ctx, v, folder, passes)
        except RuntimeError as exc:
            f.skip(v, str(exc))
            continue
        if (r["precision"], r["runtime"]) != (v.precision, v.runtime):
            f.skip(v, f"loads as {r['runtime']} {r['precision']} here (a fallback), not {v.runtime} {v.precision}")
            continue
        g = f.variant(v)
        g.add("images_per_s", r["images_per_s"], "img/s")
        g.add("preprocess_per_image", r["preprocess_ms_per_image"], "ms")
        g.add("model_per_image", r["model_ms_per_image"], "ms")
        g.add("model_per_image_batch1", r["model_ms_per_image_batch1"], "ms")
        g.add("images", r["images"])
        g.add("failed", r["failed"])
        print(f"  {v.name}: {r['images_per_s']:.1f} img/s (preprocess {r['preprocess_ms_per_image']:.1f} ms, "
              f"model {r['model_ms_per_image']:.1f} ms/image at batch {BATCH})", flush=True)
    f.note(f"decode+preprocess -> batches of {BATCH} -> model -> top-5, in a child pinned to core "
           f"{ctx.server_cores[0]} with 1 thread; {passes} pass(es) over {len(ctx.corpus)} images after warm-up; "
           "model_per_image_batch1: the same images one at a time (model only)")


def measure(ctx: Ctx, v: Variant, folder: Path, passes: int) -> dict:
    """Run the child for ``v``; RuntimeError (with the child's last words) when it fails."""
    core = ctx.server_cores[0]
    spec = {"core": core, "model_dir": str(ctx.model_dir), "env": v.env(), "corpus": str(folder),
            "synthetic_n": len(ctx.corpus), "passes": passes}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "bench.benchmarks.inprocess", json.dumps(spec)], cwd=PROJECT_ROOT,
                       env=env, capture_output=True, text=True, timeout=1200,
                       preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    if p.returncode != 0:
        last = [line for line in p.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {p.returncode}"]
        raise RuntimeError(f"cannot build it: {last[0][:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def load_runtime(settings):  # noqa: ANN001, ANN201 (the worker's runtime, whatever its class)
    """The model exactly as a worker loads it: ``worker.runtime.load_runtime(settings)`` where the
    code has a runtime factory (several runtimes), else ``ModelRuntime(settings)``."""
    import worker.runtime as wr

    factory = getattr(wr, "load_runtime", None)
    return factory(settings) if factory is not None else wr.ModelRuntime(settings)


def runtime_name(rt, info: dict) -> str:  # noqa: ANN001
    """The runtime a loaded model reports (``model.runtime`` of a result), else guessed from its
    class (code from before there were several runtimes: TorchScript)."""
    name = info.get("runtime")
    if isinstance(name, str) and name:
        return name
    cls = f"{type(rt).__module__}.{type(rt).__name__}".lower()
    return "onnx" if "onnx" in cls else "torchscript"


def child(spec: dict) -> dict:
    os.sched_setaffinity(0, {spec["core"]})
    import numpy as np

    from shared.errors import ImageError
    from shared.settings import Settings
    from shared.transforms import preprocess

    settings = Settings.from_env({**spec["env"], "PINFER_MODEL_DIR": spec["model_dir"]})
    datas = [i.data for i in load_corpus(Path(spec["corpus"]), spec["synthetic_n"]).images]
    rt = load_runtime(settings)
    info = rt.info.public()

    def one_pass() -> tuple[float, float, int, int, list]:
        t_pre = t_fwd = 0.0
        done = failed = 0
        kept = []
        for start in range(0, len(datas), BATCH):
            t0 = time.perf_counter()
            tensors = []
            for d in datas[start:start + BATCH]:
                try:
                    tensors.append(preprocess(d, settings))
                except ImageError:
                    failed += 1
            t1 = time.perf_counter()
            if tensors:
                for p in rt.forward(np.stack(tensors)):
                    rt.top_k(p, 5)
                done += len(tensors)
                kept.extend(tensors)
            t_pre += t1 - t0
            t_fwd += time.perf_counter() - t1
        return t_pre, t_fwd, done, failed, kept

    for d in datas[:BATCH]:  # warm the decoders and the allocator on real images
        preprocess(d, settings)
    t_pre = t_fwd = 0.0
    done = failed = 0
    for _ in range(spec["passes"]):
        a, b, c, e, kept = one_pass()
        t_pre, t_fwd, done, failed = t_pre + a, t_fwd + b, done + c, failed + e
    t1 = time.perf_counter()
    for x in kept:  # batch 1: what a lone image costs the model
        rt.forward(x[None])
    batch1 = (time.perf_counter() - t1) / max(1, len(kept)) * 1000
    total = t_pre + t_fwd
    return {"images_per_s": done / total, "images": done, "failed": failed, "seconds": total,
            "preprocess_ms_per_image": t_pre / done * 1000, "model_ms_per_image": t_fwd / done * 1000,
            "model_ms_per_image_batch1": batch1, "precision": info.get("precision", settings.precision),
            "runtime": runtime_name(rt, info),
            "affinity": sorted(os.sched_getaffinity(0))}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
