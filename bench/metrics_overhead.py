"""Cost per image of the worker's instrumentation (metrics + one log line), in isolation.

Runs exactly the calls worker/classify.py makes for one successful image (queue wait, preprocess,
inference and end-to-end histograms, the outcome counter, the bound context and the "classified"
log line) N times, with the log going to a file in the chosen PINFER_LOG_FORMAT, and prints the
cost per image next to the per-image time of bulk throughput (pass the measured img/s).

    .venv/bin/python -m bench.metrics_overhead --rate 31.1 [--format json] [-n 50000]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

from shared import logs
from worker import metrics as m


def per_image_cost(n: int, fmt: str) -> float:
    log = logging.getLogger("worker.classify")
    with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
        handler = logging.StreamHandler(f)
        logs.attach(handler, fmt)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        t0 = time.perf_counter()
        for i in range(n):
            m.QUEUE_WAIT.labels("bulk").observe(0.5)
            m.PREPROCESS.observe(0.01)
            m.INFERENCE.observe(0.3)
            m.IMAGES.labels("bulk", "succeeded", "none").inc()
            m.END_TO_END.labels("bulk").observe(0.9)
            with logs.bind(request_id="0123456789abcdef", prediction_id=f"p{i}", job_id="job"):
                log.info("classified", extra={"duration_ms": 900.0, "batch_size": 16, "inference_ms": 300.0})
            if i % 16 == 0:
                m.BATCH_SIZE.observe(16)
        dt = (time.perf_counter() - t0) / n
        log.removeHandler(handler)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--rate", type=float, default=31.1, help="bulk img/s of one worker (README benchmark)")
    ap.add_argument("--format", choices=("text", "json"), default="json")
    args = ap.parse_args()
    cost = per_image_cost(args.n, args.format)
    share = cost * args.rate
    print(f"instrumentation: {cost * 1e6:.1f} us/image ({args.format} log line included); "
          f"at {args.rate} img/s per worker ({1000 / args.rate:.1f} ms/image) that is {share * 100:.3f} % "
          f"of a worker's time")


if __name__ == "__main__":
    main()
