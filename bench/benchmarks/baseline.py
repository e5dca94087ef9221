"""The seed documents' design (bench/baselines/flask_sync.py) under gunicorn on the server core.

Run twice: with TorchScript fp32 + exact, as the seeds have it, and with the fastest variant the
in-process benchmark found, so pinfer is compared with the naive design both as written and with
the same runtime and precision. Per run: idle p50/p95 (one client, one image at a time) and the
throughput of 8 concurrent clients over the corpus, the seed documents' load.
"""
from __future__ import annotations

from bench.core import Ctx, Figures, add_load_figures, statuses
from bench.http import closed_loops, sequential_latencies
from bench.variants import REFERENCE

NAME = "baseline"
CLIENTS = 8


def run(ctx: Ctx, f: Figures) -> None:
    img = ctx.corpus.mid_jpeg()
    n_idle, warm = (20, 3) if ctx.quick else (40, 5)
    rounds = 1 if ctx.quick else 2
    fastest = ctx.fastest()
    f.add("fastest_variant", fastest.name)
    for v in dict.fromkeys([REFERENCE, fastest]):
        g = f.variant(v)
        with ctx.stack(f"baseline-{v.name}", v, baseline=True) as st, ctx.as_client():
            idle, _, _ = sequential_latencies(st.base, img.data, n_idle, warm)
            wall, lat, recs = closed_loops(st.base, [im.data for im in ctx.corpus.images], CLIENTS, rounds)
            problems = st.log_problems()
        si, rate = add_load_figures(g, idle, lat, recs, wall)
        g.add("statuses", statuses(recs))
        inp = ctx.inprocess_rate(v)
        if inp:
            g.add("ratio_to_inprocess", rate / inp)
        if problems:
            g.note(f"error lines in logs: {problems}")
        print(f"  baseline {v.name}: {rate:.1f} img/s at {CLIENTS} clients; idle p50 {si['p50_ms']:.1f} ms",
              flush=True)
    f.note(f"synchronous Flask, batch 1, 1 gunicorn sync worker on core(s) {ctx.server_cores}; {CLIENTS} clients "
           f"in a closed loop over {len(ctx.corpus)} images x {rounds} round(s); idle: {n_idle} sequential")
