"""pinfer benchmarks: start a private stack per benchmark, measure, stop it.

    python -m bench.run [NAME ...] [--quick] [--out bench/out/results.json]
                        [--precision fp32|bf16] [--resize exact|fast] [--list]

NAME: latency inprocess throughput recovery bulk priority drain proxy (default: all, in that
order). Each benchmark prints its figures when it finishes; a summary table of every figure comes
at the end and everything (figures, units, notes, machine, settings) is written to ``--out``.
See bench/README.md for what each figure means and how to read it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.stack import (OUT_DIR, BenchError, BulkClient, Corpus, Stack, get_status, load_corpus, model_dir,
                         ready_times, run_threads, stats, submit, summarize_ms, wait_result)
from shared.settings import PROJECT_ROOT

BENCHMARKS = ("latency", "inprocess", "throughput", "recovery", "bulk", "priority", "drain", "proxy")
DEFAULT_OUT = OUT_DIR / "results.json"


# --------------------------------------------------------------------------------------- figures
@dataclass
class Figures:
    """What one benchmark reports: ordered (key, value, unit) rows plus free-text notes."""

    rows: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, unit: str = "") -> Any:
        self.rows.append((key, value, unit))
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def get(self, key: str) -> Any:
        return next((v for k, v, _ in self.rows if k == key), None)

    def as_json(self) -> dict:
        return {"figures": {k: _jsonable(v) for k, v, _ in self.rows},
                "units": {k: u for k, _, u in self.rows if u}, "notes": self.notes}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    return v


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return f"{v:.3f}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def print_table(title: str, rows: list[tuple[str, str, Any, str]], notes: list[str] = ()) -> None:
    print(f"\n== {title} ==")
    if rows:
        w1 = max(len(r[0]) for r in rows)
        w2 = max(len(r[1]) for r in rows)
        for bench, key, value, unit in rows:
            print(f"  {bench:<{w1}}  {key:<{w2}}  {fmt(value):>12} {unit}")
    for n in notes:
        print(f"  note: {n}")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    quick: bool
    precision: str
    resize: str
    corpus: Corpus
    tmp: Path
    cores: list[int]
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return model_dir(self.tmp)

    def stack(self, name: str, **kw: Any) -> Stack:
        env = {"PINFER_PRECISION": self.precision, "PINFER_RESIZE": self.resize, **kw.pop("env", {})}
        return Stack(name, self.model_dir, env=env, **kw)

    def inprocess(self, fresh: bool = False) -> dict:
        """In-process images/s on one pinned core. Measured once per run and reused; ``fresh``
        measures again (full mode only) so that a ratio compares figures taken minutes apart at
        most, not the whole run apart (the load of a shared machine drifts)."""
        if "inprocess" not in self.cache or (fresh and not self.quick):
            self.cache["inprocess"] = run_inprocess_child(self, self.cores[0])
        return self.cache["inprocess"]


def _timing_stats(recs: list[dict]) -> dict[str, float]:
    t = [r.get("timings") or {} for r in recs if r.get("status") == "succeeded"]
    if not t:
        return {}
    mean = lambda key: sum(x.get(key, 0) for x in t) / len(t)  # noqa: E731
    bs = [x.get("batch_size", 1) or 1 for x in t]
    return {"server_total_ms": mean("total_ms"), "server_queued_ms": mean("queued_ms"),
            "server_inference_ms": mean("inference_ms"), "batch_per_image": sum(bs) / len(bs),
            "batch_per_batch": len(bs) / sum(1 / b for b in bs), "batch_max": max(bs)}


def _statuses(recs: list[dict]) -> dict[str, int]:
    return dict(Counter(r.get("status", "?") for r in recs))


def _errors(recs: list[dict]) -> dict[str, int]:
    return dict(Counter((r.get("error") or {}).get("code", "?") for r in recs if r.get("status") == "failed"))


def interactive_latencies(base: str, data: bytes, n: int, warm: int,
                          before_each: Callable[[], Any] | None = None) -> tuple[list[float], list[dict], list[Any]]:
    """Sequential submit -> long-poll result; returns (seconds, records, before_each() values)."""
    for _ in range(warm):
        wait_result(base, submit(base, data)["id"], timeout=60)
    lat, recs, probes = [], [], []
    for _ in range(n):
        if before_each is not None:
            probes.append(before_each())
        t0 = time.perf_counter()
        rec = wait_result(base, submit(base, data)["id"], timeout=120)
        lat.append(time.perf_counter() - t0)
        recs.append(rec)
    return lat, recs, probes


# --------------------------------------------------------------------------------------- latency
def bench_latency(ctx: Ctx, f: Figures) -> None:
    img = ctx.corpus.mid_jpeg()
    n, warm = (20, 3) if ctx.quick else (40, 5)
    f.note(f"image {img.name} ({img.width}x{img.height}, {len(img.data) // 1024} KiB); {warm} warm-up, "
           f"then {n} sequential submit + GET ?wait=30")
    with ctx.stack("latency", workers=1) as st:
        lat, recs, _ = interactive_latencies(st.base, img.data, n, warm)
        problems = st.log_problems()
    s = summarize_ms(lat)
    f.add("p50", s["p50_ms"], "ms")
    f.add("p95", s["p95_ms"], "ms")
    f.add("mean", s["mean_ms"], "ms")
    f.add("max", s["max_ms"], "ms")
    ts = _timing_stats(recs)
    if ts:
        f.add("server_total_mean", ts["server_total_ms"], "ms")
        f.add("server_queued_mean", ts["server_queued_ms"], "ms")
        f.add("server_inference_mean", ts["server_inference_ms"], "ms")
        f.add("http_overhead_mean", s["mean_ms"] - ts["server_total_ms"], "ms")
        f.add("batch_size_max", ts["batch_max"])
    f.add("precision_served", recs[-1].get("model", {}).get("precision"))
    if problems:
        f.note(f"error lines in logs: {problems}")


# --------------------------------------------------------------------------------------- inprocess
def run_inprocess_child(ctx: Ctx, core: int) -> dict:
    """Run the in-process loop in a child pinned to ``core`` (the parent stays unaffected)."""
    folder = ctx.corpus.source
    if ctx.corpus.synthetic:  # hand the child the very same bytes instead of generating them again
        folder = str(ctx.tmp / "synthetic")
        if not Path(folder).is_dir():
            Path(folder).mkdir(parents=True)
            for im in ctx.corpus.images:
                (Path(folder) / im.name).write_bytes(im.data)
    spec = {"core": core, "model_dir": str(ctx.model_dir), "precision": ctx.precision, "resize": ctx.resize,
            "corpus": folder, "synthetic_n": len(ctx.corpus),
            "passes": 1 if ctx.quick else 2, "batch": 16}
    cmd = [sys.executable, "-m", "bench.run", "--child-inprocess", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if hasattr(os, "sched_setaffinity"):
        preexec = lambda: os.sched_setaffinity(0, {core})  # noqa: E731 (pinned from the start)
    else:  # pragma: no cover
        preexec = None
    p = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=preexec)
    if p.returncode != 0:
        raise BenchError(f"in-process child failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def inprocess_child(spec: dict) -> None:
    os.sched_setaffinity(0, {spec["core"]})
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from shared.errors import ImageError
    from shared.settings import Settings
    from shared.transforms import preprocess
    from worker.runtime import ModelRuntime

    settings = Settings(model_dir=spec["model_dir"], precision=spec["precision"], resize=spec["resize"])
    corpus = load_corpus(Path(spec["corpus"]), spec["synthetic_n"])
    datas = [i.data for i in corpus.images]
    rt = ModelRuntime(settings, threads=1)  # loads, verifies and warms up like a worker
    batch = spec["batch"]

    def one_pass() -> tuple[float, float, int, int]:
        t_pre = t_fwd = 0.0
        done = failed = 0
        for start in range(0, len(datas), batch):
            t0 = time.perf_counter()
            tensors = []
            for d in datas[start:start + batch]:
                try:
                    tensors.append(preprocess(d, settings))
                except ImageError:
                    failed += 1
            t1 = time.perf_counter()
            if tensors:
                probs = rt.forward(np.stack(tensors))
                for p in probs:
                    rt.top_k(p, 5)
                done += len(tensors)
            t_pre += t1 - t0
            t_fwd += time.perf_counter() - t1
        return t_pre, t_fwd, done, failed

    one_pass_small = datas[:batch]
    for d in one_pass_small:  # warm the decoders / allocator on real images
        preprocess(d, settings)
    t_pre = t_fwd = 0.0
    done = failed = 0
    for _ in range(spec["passes"]):
        a, b, c, d = one_pass()
        t_pre, t_fwd, done, failed = t_pre + a, t_fwd + b, done + c, failed + d
    total = t_pre + t_fwd
    print(json.dumps({"images_per_s": done / total, "images": done, "failed": failed, "seconds": total,
                      "preprocess_ms_per_image": t_pre / done * 1000, "model_ms_per_image": t_fwd / done * 1000,
                      "core": spec["core"], "threads": torch.get_num_threads(),
                      "affinity": sorted(os.sched_getaffinity(0)), "precision": rt.precision}))


def bench_inprocess(ctx: Ctx, f: Figures) -> None:
    r = ctx.inprocess()
    f.add("images_per_s", r["images_per_s"], "img/s")
    f.add("preprocess_per_image", r["preprocess_ms_per_image"], "ms")
    f.add("model_per_image", r["model_ms_per_image"], "ms")
    f.add("images", r["images"])
    f.add("failed", r["failed"])
    f.add("precision_used", r["precision"])
    f.note(f"decode+preprocess -> batches of 16 -> model, on core {r['core']} ({r['threads']} torch thread), "
           f"{'1 pass' if ctx.quick else '2 passes'} over {len(ctx.corpus)} images after warm-up")


# --------------------------------------------------------------------------------------- throughput
def bench_throughput(ctx: Ctx, f: Figures) -> None:
    imgs = ctx.corpus.images
    rounds = 1 if ctx.quick else 2
    with ctx.stack("throughput", workers=1) as st:
        for im in imgs[:3]:
            wait_result(st.base, submit(st.base, im.data)["id"], timeout=60)
        rates, recs_all, walls = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ids = run_threads(lambda im: submit(st.base, im.data)["id"], imgs, 16)
            t_sub = time.perf_counter() - t0
            recs = run_threads(lambda pid: wait_result(st.base, pid, timeout=300), ids, 16)
            wall = time.perf_counter() - t0
            walls.append(wall)
            rates.append(len(imgs) / wall)
            recs_all.extend(recs)
        problems = st.log_problems()
    rate = sum(rates) / len(rates)
    f.add("images_per_s", rate, "img/s")
    if rounds > 1:
        f.add("images_per_s_rounds", [round(r, 2) for r in rates], "img/s")
    f.add("submit_phase", t_sub, "s")
    ts = _timing_stats(recs_all)
    f.add("mean_batch_size_per_image", ts.get("batch_per_image", 0.0))
    f.add("mean_batch_size_per_batch", ts.get("batch_per_batch", 0.0))
    f.add("max_batch_size", ts.get("batch_max", 0))
    bs = Counter(r["timings"]["batch_size"] for r in recs_all if r.get("timings"))
    f.add("batch_size_histogram_images", dict(sorted(bs.items())))
    f.add("statuses", _statuses(recs_all))
    inp = ctx.inprocess(fresh=True)["images_per_s"]
    f.add("inprocess_images_per_s", inp, "img/s")
    f.add("ratio_to_inprocess", rate / inp)
    f.add("overhead_per_image", (1 / rate - 1 / inp) * 1000, "ms")
    f.note(f"{len(imgs)} images x {rounds} round(s): 16 threads submit all, then 16 threads long-poll; "
           "wall time from first submit to last result; 1 pinned worker")
    if problems:
        f.note(f"error lines in logs: {problems}")


# --------------------------------------------------------------------------------------- recovery
def bench_recovery(ctx: Ctx, f: Figures) -> None:
    n = 60
    items = ctx.corpus.repeated(n)
    with ctx.stack("recovery", workers=1) as st:
        st.wait_workers(1)  # its heartbeat names the pid to kill
        vis = st.full_env.get("PINFER_VISIBILITY_TIMEOUT_S") or "30 (default)"
        ids = run_threads(lambda im: submit(st.base, im.data)["id"], items, 8)
        deadline = time.monotonic() + 60
        running = 0
        while time.monotonic() < deadline:
            sts = run_threads(lambda pid: get_status(st.base, pid)["status"], ids, 8)
            running = sts.count("running")
            if running:
                break
            time.sleep(0.02)
        if not running:
            raise BenchError("no prediction reached `running` within 60 s")
        done_before = sum(1 for s in sts if s in ("succeeded", "failed"))
        victims = [w for w in st.ready_workers()]
        if not victims:
            raise BenchError("no ready worker to kill")
        victim = int(victims[0]["pid"])
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)

        new_ready: dict[str, float] = {}
        stop = threading.Event()

        log = st.worker_logs[0]
        n_ready = len(ready_times(log))

        def watch() -> None:  # when did the launcher's replacement say `ready.` (else: heartbeat)?
            while not stop.is_set():
                try:
                    times = ready_times(log)
                    if len(times) > n_ready:
                        new_ready["t"] = times[n_ready] - killed_at
                        return
                    if any(int(w["pid"]) != victim for w in st.ready_workers()):
                        new_ready["t"] = time.time() - killed_at
                        new_ready["via"] = "heartbeat"
                        return
                except Exception:
                    pass
                stop.wait(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            recs = run_threads(lambda pid: wait_result(st.base, pid, timeout=180), ids, 16)
        finally:
            stop.set()
            watcher.join(5)
        client_done = time.time() - killed_at
        problems = st.log_problems()
    fins = [r["finished_at"] for r in recs if r.get("finished_at")]
    recovery = max(fins) - killed_at
    redelivered = [r for r in recs if (r.get("attempts") or 0) > 1]
    f.add("recovery", recovery, "s")
    f.add("recovery_client_observed", client_done, "s")
    f.add("redelivered", len(redelivered))
    f.add("running_at_kill", running)
    f.add("finished_before_kill", done_before)
    f.add("new_worker_ready_after", new_ready.get("t", float("nan")), "s")
    after = sorted(fi - killed_at for fi in fins if fi > killed_at)
    f.add("finished_after_kill_within_10s", sum(1 for a in after if a <= 10))
    f.add("finished_after_kill_after_25s", sum(1 for a in after if a > 25))
    f.add("held_back_not_redelivered", sum(1 for r in recs if (r.get("attempts") or 0) <= 1
                                           and r.get("finished_at", 0) - killed_at > 25))
    if redelivered:
        f.add("redelivered_finished_after", min(r["finished_at"] for r in redelivered) - killed_at, "s")
    f.add("statuses", _statuses(recs))
    if _errors(recs):
        f.add("errors", _errors(recs))
    f.note(f"{n} images, 1 worker, PINFER_VISIBILITY_TIMEOUT_S={vis}; SIGKILL of the Celery worker "
           "process (pid from /readyz) while a batch was running; recovery = last finished_at - kill time")
    if problems:
        f.note(f"error lines in logs (a killed worker logs some): {problems}")


# --------------------------------------------------------------------------------------- bulk
def run_bulk_job(st: Stack, items, timeout: float, chunk: int = 16) -> dict:
    bc = BulkClient(st.base)
    try:
        jid = bc.create_job(f"bench-{st.name}")
        upload: dict[str, Any] = {}
        t0 = time.perf_counter()

        def uploader() -> None:
            try:
                for s in range(0, len(items), chunk):
                    bc.add_images(jid, [(im.name, im.data) for im in items[s:s + chunk]], stats_=upload)
                bc.close_job(jid)
                upload["seconds"] = time.perf_counter() - t0
            except Exception as exc:
                upload["error"] = repr(exc)

        th = threading.Thread(target=uploader, daemon=True)
        th.start()
        rows = bc.follow(jid, len(items), timeout)
        wall = time.perf_counter() - t0
        th.join(30)
        if "error" in upload:
            raise BenchError(f"upload failed: {upload['error']}")
        job = bc.get_job(jid)
        sample = [r["id"] for r in rows[: min(len(rows), 64)]]
        recs = [get_status(st.base, pid) for pid in sample]
        return {"wall": wall, "rows": rows, "upload_s": upload.get("seconds"), "job": job, "sample": recs,
                "client": bc.kind, "http_429": upload.get("429", 0)}
    finally:
        bc.close()


def bench_bulk(ctx: Ctx, f: Figures) -> None:
    mult = 1 if ctx.quick else 10
    items = ctx.corpus.repeated(len(ctx.corpus) * mult)
    rates, runs = {}, {}
    for k in (1, 2):
        with ctx.stack(f"bulk-{k}", workers=k) as st:
            r = run_bulk_job(st, items, timeout=len(items) / 3 + 120)
            r["problems"] = st.log_problems()
        runs[k] = r
        rates[k] = len(items) / r["wall"]
    inp = ctx.inprocess(fresh=True)["images_per_s"]
    for k, r in runs.items():
        rate = rates[k]
        f.add(f"images_per_s_{k}w", rate, "img/s")
        f.add(f"overhead_per_image_{k}w", (k / rate - 1 / inp) * 1000, "ms")
        f.add(f"upload_{k}w", r["upload_s"], "s")
        f.add(f"statuses_{k}w", dict(Counter(x.get("status") for x in r["rows"])))
        ts = _timing_stats(r["sample"])
        f.add(f"batch_size_sample_{k}w", ts.get("batch_per_image", 0.0))
        if r["http_429"]:
            f.add(f"http_429_{k}w", r["http_429"])
        if r["problems"]:
            f.note(f"{k} worker(s): error lines in logs: {r['problems']}")
        f.note(f"{k} worker(s): job counts {r['job']['counts']}, job rate_per_s {r['job'].get('rate_per_s')}")
    f.add("ratio_2w_1w", rates[2] / rates[1])
    f.add("inprocess_images_per_s", inp, "img/s")
    f.note(f"{len(items)} images (corpus x{mult}, names copy<i>/<file>), chunks of 16 via {r['client']}; "
           "rate = images / (first upload -> last result read); overhead = cores/rate - 1/inprocess_rate; "
           "batch_size_sample = mean timings.batch_size of the first 64 results")


# --------------------------------------------------------------------------------------- priority
def bench_priority(ctx: Ctx, f: Figures) -> None:
    n_bulk = 2000 if ctx.quick else 5000
    n_idle, n_loaded, warm = (20, 60, 3) if ctx.quick else (40, 60, 5)
    img = ctx.corpus.mid_jpeg()
    items = ctx.corpus.repeated(n_bulk)
    with ctx.stack("priority", workers=2) as st:
        idle, idle_recs, _ = interactive_latencies(st.base, img.data, n_idle, warm)
        bc = BulkClient(st.base)
        stop = threading.Event()
        upload: dict[str, Any] = {"in": 0}
        jid = bc.create_job("bench-priority")
        t_up = time.perf_counter()

        def uploader() -> None:
            try:
                for s in range(0, len(items), 16):
                    if stop.is_set():
                        return
                    upload["in"] += bc.add_images(jid, [(im.name, im.data) for im in items[s:s + 16]],
                                                  stop=stop, stats_=upload)
                upload["seconds"] = time.perf_counter() - t_up
                bc.close_job(jid)
            except Exception as exc:
                upload["error"] = repr(exc)

        th = threading.Thread(target=uploader, daemon=True)
        th.start()
        try:
            # Both workers busy: while interactive traffic is recent (the idle samples just sent
            # some) a worker claims PINFER_BULK_CHUNK bulk images at a time, so more running than
            # that means two are at work (heartbeat states lag by up to 5 s); else wait 3 s more.
            from shared.settings import Settings

            chunk = Settings.from_env(st.full_env).bulk_chunk
            deadline = time.monotonic() + 120
            first_success = None
            while True:
                s = stats(st.base)
                job = bc.get_job(jid)
                c = job["counts"]
                if c["succeeded"] and first_success is None:
                    first_success = time.monotonic()
                if s["queues"]["bulk"] > 0 and c["succeeded"] > 0 and (
                        c["running"] > chunk or time.monotonic() - first_success > 3):
                    break
                if "error" in upload:
                    raise BenchError(f"bulk upload failed: {upload['error']}")
                if time.monotonic() > deadline:
                    raise BenchError(f"bulk load did not start within 120 s: queues {s['queues']}, job {job['counts']}")
                time.sleep(0.1)
            done_at_start = job["counts"]["succeeded"] + job["counts"]["failed"]
            t_meas = time.perf_counter()

            def probe() -> int:
                return stats(st.base)["queues"]["bulk"]

            loaded, loaded_recs, backlog = interactive_latencies(st.base, img.data, n_loaded, 0, before_each=probe)
            meas_s = time.perf_counter() - t_meas
            job = bc.get_job(jid)
            bulk_done = job["counts"]["succeeded"] + job["counts"]["failed"] - done_at_start
            # batch sizes of bulk images finished while the interactive samples ran (results are in
            # finish order, so the cursor range is that window)
            rows, _, _ = bc.results(jid, done_at_start, limit=max(1, min(bulk_done, 40)))
            bulk_bs = [(get_status(st.base, r["id"]).get("timings") or {}).get("batch_size") for r in rows]
            bulk_bs = [b for b in bulk_bs if b]
        finally:
            stop.set()
            try:
                final = bc.cancel_job(jid)
            except Exception as exc:
                final = {"error": repr(exc)}
            th.join(30)
            bc.close()
        problems = st.log_problems()
    si, sl = summarize_ms(idle), summarize_ms(loaded)
    f.add("idle_p50", si["p50_ms"], "ms")
    f.add("idle_p95", si["p95_ms"], "ms")
    f.add("loaded_p50", sl["p50_ms"], "ms")
    f.add("loaded_p95", sl["p95_ms"], "ms")
    f.add("loaded_mean", sl["mean_ms"], "ms")
    f.add("loaded_max", sl["max_ms"], "ms")
    f.add("ratio_p95_loaded_idle", sl["p95_ms"] / si["p95_ms"])
    f.add("ratio_p50_loaded_idle", sl["p50_ms"] / si["p50_ms"])
    ts = _timing_stats(loaded_recs)
    if ts:
        f.add("loaded_server_queued_mean", ts["server_queued_ms"], "ms")
        f.add("loaded_server_inference_mean", ts["server_inference_ms"], "ms")
        f.add("loaded_batch_size_mean", ts["batch_per_image"])
    f.add("bulk_backlog_nonempty_frac", sum(1 for b in backlog if b > 0) / max(1, len(backlog)))
    f.add("bulk_images_per_s_during", bulk_done / meas_s, "img/s")
    if bulk_bs:
        f.add("bulk_batch_size_during", sum(bulk_bs) / len(bulk_bs))
    f.add("bulk_uploaded", upload["in"])
    f.add("bulk_http_429", upload.get("429", 0))
    f.add("job_final_counts", final.get("counts", final))
    slow = sorted(zip(loaded, loaded_recs), key=lambda x: -x[0])[:3]
    f.note("slowest loaded samples: " + "; ".join(
        f"{s * 1000:.0f} ms (queued {r.get('timings', {}).get('queued_ms')} ms, inference "
        f"{r.get('timings', {}).get('inference_ms')} ms, batch {r.get('timings', {}).get('batch_size')})"
        for s, r in slow))
    f.note(f"2 workers; idle {n_idle} samples first on the same stack, then bulk job of {n_bulk} images "
           f"(uploaded in 16s from a thread, 429 -> Retry-After), {n_loaded} sequential interactive "
           f"submissions of {img.name}; bulk job canceled at the end (goal: p95 ratio <= 2)")
    if problems:
        f.note(f"error lines in logs: {problems}")


# --------------------------------------------------------------------------------------- drain
def bench_drain(ctx: Ctx, f: Figures) -> None:
    n = 200 if ctx.quick else 600
    items = ctx.corpus.repeated(n)
    rates, steady = {}, {}
    for k in (1, 2):
        with ctx.stack(f"drain-{k}", workers=0) as st:
            ids = run_threads(lambda im: submit(st.base, im.data)["id"], items, 8)
            t0 = time.perf_counter()
            st.start_workers(k, wait=False)
            recs = [wait_result(st.base, pid, timeout=600) for pid in ids]
            wall = time.perf_counter() - t0
            r = st.redis_client()
            from shared import keys

            pipe = r.pipeline(transaction=False)
            for pid in ids:
                pipe.hget(keys.prediction(pid), "worker")
            who = pipe.execute()
            r.close()
            problems = st.log_problems()
        starts = [x["started_at"] for x in recs if x.get("started_at")]
        fins = [x["finished_at"] for x in recs if x.get("finished_at")]
        span = max(fins) - min(starts)
        rates[k] = n / span
        by_worker: dict[str, list[dict]] = {}
        for w, x in zip(who, recs):
            by_worker.setdefault(w or "?", []).append(x)
        # steady state: the window in which every worker was working
        lo = max(min(x["started_at"] for x in xs) for xs in by_worker.values())
        hi = min(max(x["finished_at"] for x in xs) for xs in by_worker.values())
        in_win = sum(1 for x in recs if lo <= x["finished_at"] <= hi)
        steady[k] = in_win / (hi - lo) if hi > lo else float("nan")
        f.add(f"images_per_s_{k}w", rates[k], "img/s")
        f.add(f"steady_images_per_s_{k}w", steady[k], "img/s")
        f.add(f"wall_incl_startup_{k}w", wall, "s")
        f.add(f"per_worker_{k}w", sorted(len(v) for v in by_worker.values()))
        f.add(f"worker_start_skew_{k}w", max(min(x["started_at"] for x in xs) for xs in by_worker.values())
              - min(starts), "s")
        ts = _timing_stats(recs)
        f.add(f"batch_size_per_batch_{k}w", ts.get("batch_per_batch", 0.0))
        bs = Counter(x["timings"]["batch_size"] for x in recs if x.get("timings"))
        f.add(f"batch_size_histogram_images_{k}w", dict(sorted(bs.items())))
        f.add(f"statuses_{k}w", _statuses(recs))
        if problems:
            f.note(f"{k} worker(s): error lines in logs: {problems}")
    f.add("ratio_2w_1w", rates[2] / rates[1])
    f.add("steady_ratio_2w_1w", steady[2] / steady[1])
    f.note(f"{n} interactive submissions queued with no worker, then `pinfer worker` PINFER_WORKERS=k; "
           "rate = N / (last finished_at - first started_at), i.e. without worker start-up "
           "(goal: ratio >= 1.85); steady = images finished while every worker was active / that window")


# --------------------------------------------------------------------------------------- proxy
def bench_proxy(ctx: Ctx, f: Figures) -> None:
    n = len(ctx.corpus) if ctx.quick else 300
    items = ctx.corpus.repeated(n)
    with ctx.stack("proxy", workers=2, apis=2, nginx=True) as st:
        paths = {"direct": st.api_bases[0], "nginx": st.nginx_base}
        for base in paths.values():  # warm-up: connections, both API processes, both workers
            run_threads(lambda im, b=base: wait_result(b, submit(b, im.data)["id"], timeout=60), items[:16], 16)
        rates: dict[str, list[float]] = {"direct": [], "nginx": []}
        statuses: Counter = Counter()
        for label in ("direct", "nginx", "direct", "nginx"):
            base = paths[label]
            t0 = time.perf_counter()
            recs = run_threads(lambda im, b=base: wait_result(b, submit(b, im.data)["id"], timeout=300), items, 16)
            rates[label].append(n / (time.perf_counter() - t0))
            statuses.update(r["status"] for r in recs)
        problems = st.log_problems()
    d = sum(rates["direct"]) / 2
    ng = sum(rates["nginx"]) / 2
    f.add("direct_images_per_s", d, "img/s")
    f.add("nginx_images_per_s", ng, "img/s")
    f.add("direct_passes", [round(x, 2) for x in rates["direct"]], "img/s")
    f.add("nginx_passes", [round(x, 2) for x in rates["nginx"]], "img/s")
    f.add("overhead_pct", (d - ng) / d * 100, "%")
    f.add("statuses", dict(statuses))
    f.note(f"{n} images per pass, 16 threads each submit + long-poll; passes direct, nginx, direct, nginx "
           "(mean of each); direct = API replica 1 alone, nginx = 1 nginx worker -> 2 API replicas "
           "(least_conn); same 2 workers (goal: overhead < 5 %)")
    if problems:
        f.note(f"error lines in logs: {problems}")


# --------------------------------------------------------------------------------------- main
RUNNERS: dict[str, Callable[[Ctx, Figures], None]] = {
    "latency": bench_latency, "inprocess": bench_inprocess, "throughput": bench_throughput,
    "recovery": bench_recovery, "bulk": bench_bulk, "priority": bench_priority, "drain": bench_drain,
    "proxy": bench_proxy,
}


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process + its waited-for
    descendants: every stack process, once the stack is stopped). The difference over a benchmark
    is what *other* work on the machine used: the noise indicator printed with each benchmark."""
    busy = 0.0
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-inprocess"]:
        inprocess_child(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="benchmarks: " + ", ".join(BENCHMARKS))
    ap.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller samples (2-4 minutes in all)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--resize", choices=("exact", "fast"), default="exact")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    unknown = [n for n in args.names if n not in RUNNERS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)

    def on_term(signum, _frame):  # SIGTERM behaves like Ctrl-C: finally blocks stop the stacks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    corpus = load_corpus()
    cores = sorted(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="pinfer-bench-"))
    ctx = Ctx(args.quick, args.precision, args.resize, corpus, tmp, cores)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpu": _cpu_model(),
            "cores": cores, "python": platform.python_version(), "git": _git_rev(), "quick": args.quick,
            "precision": args.precision, "resize": args.resize, "corpus": corpus.describe(),
            "corpus_synthetic": corpus.synthetic, "benchmarks": names,
            "model": os.environ.get("PINFER_BENCH_MODEL_DIR") or "random-init ResNet-18 (seed 0), exported to a temp dir",
            "inherited_pinfer_env": {k: v for k, v in os.environ.items() if k.startswith("PINFER_")},
            "loadavg_start": os.getloadavg()}
    print(f"pinfer bench: {', '.join(names)}{' (quick)' if args.quick else ''}; precision={args.precision} "
          f"resize={args.resize}; {len(cores)} cores; {corpus.describe()}")
    if corpus.synthetic:
        print("  NOTE: photo corpus not found (set PINFER_CORPUS_DIR): using SYNTHETIC JPEGs")
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    try:
        print("exporting a random-init model …", flush=True)
        ctx.model_dir  # noqa: B018 (export once, up front)
        for name in names:
            f = Figures()
            load0 = os.getloadavg()[0]
            cpu0 = cpu_snapshot()
            t0 = time.perf_counter()
            status, err = "ok", None
            print(f"\n-- {name} …", flush=True)
            try:
                RUNNERS[name](ctx, f)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                status, err = "error", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            secs = time.perf_counter() - t0
            cpu1 = cpu_snapshot()
            ncpu = os.cpu_count() or 1
            foreign = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (secs * ncpu) * 100
            results[name] = {"status": status, "error": err, "seconds": round(secs, 1),
                             "loadavg_1m_before": load0, "foreign_cpu_pct": round(foreign, 1), **f.as_json()}
            rows = [(name, k, v, u) for k, v, u in f.rows]
            busy = (f"; other processes used {foreign:.0f} % of the {ncpu} CPUs: NOISY" if foreign >= 10
                    else f"; other processes used {foreign:.0f} % of the CPUs")
            title = f"{name}: {secs:.0f} s{busy}" + ("" if status == "ok" else f" — FAILED: {err}")
            print_table(title, rows, f.notes)
            _write(args.out, meta, results, time.perf_counter() - t_all)
    except KeyboardInterrupt:
        print("\ninterrupted: stacks stopped; partial results written", file=sys.stderr)
        _write(args.out, meta, results, time.perf_counter() - t_all)
        return 130
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    summary = [(n, k, v, u) for n, r in results.items()
               for k, v in r["figures"].items() if not isinstance(v, (dict, list))
               for u in [r["units"].get(k, "")]]
    print_table(f"summary ({total:.0f} s; {'quick' if args.quick else 'full'}; precision={args.precision}, "
                f"resize={args.resize})", summary)
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    for n in failed:
        print(f"  FAILED {n}: {results[n]['error']}")
    print(f"\nresults: {args.out}")
    _write(args.out, meta, results, total)
    return 1 if failed else 0


def _write(out: Path, meta: dict, results: dict, total: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "total_seconds": round(total, 1), "loadavg_end": os.getloadavg()}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "benchmarks": results}, indent=2, default=str))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
