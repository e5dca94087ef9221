"""The in-process limit: decode -> preprocess -> batches of 16 -> model -> top-5 on one core, per variant.

No queue, no HTTP, no Redis: the most one worker could do. Each variant runs in a child process
pinned to the server core with one thread, loading the model exactly as a worker does (the
runtime factory of ``worker.runtime``, which verifies the artifact and warms up) and driving the
worker's own ``Classifier`` over batches of 16 queued images; its store is an in-process
fakeredis whose time is measured and subtracted (``store_per_image`` reports it). A variant that loads as something else (bf16 on a
CPU without bf16 units falls back to fp32; a runtime without the artifact) is skipped, not
measured under a false name.
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
CHILD = "import json, sys; from bench.benchmarks.inprocess import child; print(json.dumps(child(json.loads(sys.argv[1]))))"


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
        g.add("store_per_image", r["store_ms_per_image"], "ms")
        g.add("images", r["images"])
        g.add("failed", r["failed"])
        print(f"  {v.name}: {r['images_per_s']:.1f} img/s (preprocess {r['preprocess_ms_per_image']:.1f} ms, "
              f"model {r['model_ms_per_image']:.1f} ms/image at batch {BATCH})", flush=True)
    f.note(f"worker.classify.Classifier.run on batches of {BATCH} (decode, preprocess, model, top-5, results), "
           "minus the time in its (fakeredis) store, in a child pinned to core "
           f"{ctx.server_cores[0]} with 1 thread; {passes} pass(es) over {len(ctx.corpus)} images after warm-up; "
           "model_per_image_batch1: the same images one at a time (model only)")


def measure(ctx: Ctx, v: Variant, folder: Path, passes: int) -> dict:
    """Run the child for ``v``; RuntimeError (with the child's last words) when it fails."""
    core = ctx.server_cores[0]
    spec = {"core": core, "model_dir": str(ctx.model_dir), "env": v.env(), "corpus": str(folder),
            "synthetic_n": len(ctx.corpus), "passes": passes}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=PROJECT_ROOT,
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


class _Timed:
    """A proxy that adds the time spent in every method call of ``target`` to ``self.seconds``."""

    def __init__(self, target: object) -> None:
        self._target = target
        self.seconds = 0.0

    def __getattr__(self, name: str):  # noqa: ANN204
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def child(spec: dict) -> dict:
    """The worker's own ``Classifier.run`` over batches of 16 queued images, its store an
    in-process fakeredis whose time is measured and left out: what remains is everything the
    worker does per batch except talking to Redis (decode, preprocess, batching, forward, top-k,
    building results)."""
    os.sched_setaffinity(0, {spec["core"]})
    import fakeredis

    from shared.schema import INTERACTIVE, SUCCEEDED, new_id
    from shared.settings import Settings
    from shared.store import Store
    from worker.classify import Classifier, Item

    settings = Settings.from_env({**spec["env"], "PINFER_MODEL_DIR": spec["model_dir"],
                                  "PINFER_MAX_BATCH": str(BATCH)})
    datas = [i.data for i in load_corpus(Path(spec["corpus"]), spec["synthetic_n"]).images]
    rt = load_runtime(settings)
    info = rt.info.public()
    server = fakeredis.FakeServer()
    store = _Timed(Store(settings, fakeredis.FakeRedis(server=server, decode_responses=True),
                         fakeredis.FakeRedis(server=server)))
    runtime = _Timed(rt)
    clf = Classifier(settings, store, runtime, "bench-inprocess", interactive_waiting=lambda: False,
                     interactive_recent=lambda: False)

    def one_pass() -> tuple[float, list[str]]:
        pids = []
        for d in datas:  # queued as the API would queue them (not timed)
            pid = new_id()
            store.submit(pid, d, 5, INTERACTIVE)
            pids.append(pid)
        store.seconds = runtime.seconds = 0.0
        t0 = time.perf_counter()
        for start in range(0, len(pids), BATCH):
            clf.run([Item(pid) for pid in pids[start:start + BATCH]], may_defer=False)
        return time.perf_counter() - t0, pids

    one_pass()  # warm-up: decoders, allocator, the model's batch shapes
    total = t_store = t_model = 0.0
    done = failed = 0
    for _ in range(spec["passes"]):
        secs, pids = one_pass()
        total += secs
        t_store += store.seconds
        t_model += runtime.seconds
        recs = store.get_many(pids)
        done += sum(1 for r in recs if r is not None and r.status == SUCCEEDED)
        failed += sum(1 for r in recs if r is not None and r.status != SUCCEEDED)
    work = total - t_store
    import numpy as np

    from shared.transforms import preprocess

    xs = [preprocess(d, settings) for d in datas]
    t1 = time.perf_counter()
    for x in xs:  # batch 1: what a lone image costs the model
        rt.forward(np.asarray(x)[None])
    batch1 = (time.perf_counter() - t1) / max(1, len(xs)) * 1000
    n = max(1, done + failed)
    return {"images_per_s": done / work, "images": done, "failed": failed, "seconds": work,
            "preprocess_ms_per_image": (work - t_model) / n * 1000, "model_ms_per_image": t_model / n * 1000,
            "store_ms_per_image": t_store / n * 1000, "model_ms_per_image_batch1": batch1,
            "precision": info.get("precision", settings.precision), "runtime": runtime_name(rt, info),
            "affinity": sorted(os.sched_getaffinity(0))}
