"""pinfer end to end, per variant: one pinned worker, HTTP submit -> stored result (long-poll).

Every server process (redis-server, gunicorn, the worker launcher and its one worker) runs on the
server core; the load generator's threads run on the other. Per variant, on a fresh stack:
* idle: one client, one image at a time (the corpus JPEG of median size): p50/p95;
* throughput: 16 concurrent clients, each classifying one photo after another (submit, then
  long-poll), over the whole corpus (twice in a full run): images/s, p50/p95 under load, batch
  sizes, and the share of the same variant's in-process limit.
"""
from __future__ import annotations

from bench.core import Ctx, Figures, add_load_figures, batch_histogram, served, statuses, timing_stats
from bench.http import closed_loop, closed_loops, sequential_latencies

NAME = "e2e"
CLIENTS = 16


def run(ctx: Ctx, f: Figures) -> None:
    img = ctx.corpus.mid_jpeg()
    n_idle, warm = (20, 3) if ctx.quick else (40, 5)
    rounds = 1 if ctx.quick else 2
    built = {v.name for v in ctx.built()}
    for v in ctx.variants:
        if v.name not in built:
            f.skip(v, "not built (see inprocess)")
            continue
        g = f.variant(v)
        with ctx.stack(f"e2e-{v.name}", v, workers=1) as st, ctx.as_client():
            idle, idle_recs, _ = sequential_latencies(st.base, img.data, n_idle, warm)
            closed_loop(st.base, [im.data for im in ctx.corpus.images[:CLIENTS]], CLIENTS)  # warm-up
            wall, lat, recs = closed_loops(st.base, [im.data for im in ctx.corpus.images], CLIENTS, rounds)
            problems = st.log_problems()
        si, rate = add_load_figures(g, idle, lat, recs, wall)
        ti = timing_stats(idle_recs)
        if ti:
            g.add("idle_server_total_mean", ti["server_total_ms"], "ms")
            g.add("idle_server_queued_mean", ti["server_queued_ms"], "ms")
            g.add("idle_server_inference_mean", ti["server_inference_ms"], "ms")
            g.add("idle_http_overhead_mean", si["mean_ms"] - ti["server_total_ms"], "ms")
        ts = timing_stats(recs)
        g.add("mean_batch_size_per_image", ts.get("batch_per_image", 0.0))
        g.add("mean_batch_size_per_batch", ts.get("batch_per_batch", 0.0))
        g.add("batch_size_histogram_images", batch_histogram(recs))
        g.add("statuses", statuses(recs))
        inp = ctx.inprocess_rate(v)
        if inp:
            g.add("inprocess_images_per_s", inp, "img/s")
            g.add("ratio_to_inprocess", rate / inp)
            g.add("overhead_per_image", (1 / rate - 1 / inp) * 1000, "ms")
        model = served(recs[-1]) if recs else {}
        g.add("served_precision", model.get("precision"))
        if model.get("runtime"):
            g.add("served_runtime", model.get("runtime"))
        if model.get("precision") not in (None, v.precision) or model.get("runtime") not in (None, v.runtime):
            g.note(f"MISMATCH: results name {model.get('runtime')} {model.get('precision')}, not {v.name}")
        if problems:
            g.note(f"error lines in logs: {problems}")
        print(f"  {v.name}: {rate:.1f} img/s at {CLIENTS} clients; idle p50 {si['p50_ms']:.1f} ms, "
              f"p95 {si['p95_ms']:.1f} ms", flush=True)
    f.note(f"1 worker; idle: {warm} warm-up then {n_idle} sequential classifications of {img.name}; throughput: "
           f"{CLIENTS} clients in a closed loop over {len(ctx.corpus)} images x {rounds} round(s), "
           "images / wall time; servers on core(s) " + ",".join(map(str, ctx.server_cores)) +
           ", load generator on " + ",".join(map(str, ctx.client_cores)))
