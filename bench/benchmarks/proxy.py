"""nginx in front of two API replicas against one API directly (target overhead < 5 %).

Two workers, two gunicorn API servers, nginx (``deploy/nginx.conf`` rendered for loopback by
``pinfer.topology``, one nginx worker). Passes direct, nginx, direct, nginx of 16 clients each
classifying images (submit + long-poll), after a warm-up on each path.
"""
from __future__ import annotations

import time
from collections import Counter

from bench.core import Ctx, Figures
from bench.http import classify, run_threads

NAME = "proxy"


def run(ctx: Ctx, f: Figures) -> None:
    v = ctx.service_variant()
    n = len(ctx.corpus) if ctx.quick else 300
    items = ctx.corpus.repeated(n)
    with ctx.stack("proxy", v, cores=ctx.all_cores, workers=2, apis=2, nginx=True) as st:
        paths = {"direct": st.api_bases[0], "nginx": st.nginx_base}
        for base in paths.values():  # warm-up: connections, both API processes, both workers
            run_threads(lambda im, b=base: classify(b, im.data), items[:16], 16)
        rates: dict[str, list[float]] = {"direct": [], "nginx": []}
        statuses: Counter = Counter()
        for label in ("direct", "nginx", "direct", "nginx"):
            base = paths[label]
            t0 = time.perf_counter()
            recs = run_threads(lambda im, b=base: classify(b, im.data), items, 16)
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
    f.add("variant", v.name)
