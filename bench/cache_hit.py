"""Result-cache hit latency: the real Flask app in this process against a real private redis-server.

    python -m bench.cache_hit [N]

Measures POST /v1/predictions of an image whose result is cached (answered `succeeded`, no
inference) next to a miss (stored + queued; the publish is a no-op here), in the same conditions.
"""
from __future__ import annotations

import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from api import create_app
from pinfer.procs import start_redis
from shared.schema import WorkerState
from shared.settings import Settings
from shared.store import Store, cache_digest


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 300
    proc, url = start_redis(Path(tempfile.mkdtemp(prefix="pinfer-cache-bench-")))
    try:
        s = Settings(redis_url=url)
        store = Store(s)
        sha = "c" * 64
        store.heartbeat("bench", {"state": WorkerState.READY, "model": "resnet18", "sha256": sha, "pretrained": 0,
                                  "precision": s.precision, "resize": s.resize})
        buf = io.BytesIO()
        Image.effect_noise((640, 480), 40).convert("RGB").save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        result = {"top_k": [{"label": f"l{i}", "class_index": i, "score": 0.1} for i in range(5)],
                  "model": {"name": "resnet18", "sha256": sha, "pretrained": False, "precision": s.precision}}
        store.cache_put([(cache_digest(hashlib.sha256(data).hexdigest(), sha, s.precision, s.resize, 5), result)])
        client = create_app({"SETTINGS": s}).test_client()  # misses are queued; no worker takes them

        def timed(body: bytes, expect: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.post("/v1/predictions", data=body, content_type="image/jpeg")
                out.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == expect, r.get_data(as_text=True)
            return out

        timed(data, 200)  # warm-up
        hits = timed(data, 200)
        other = bytearray(data)
        misses = []
        for i in range(n):  # distinct bytes: every one a miss
            body = bytes(other) + i.to_bytes(4, "big")
            t0 = time.perf_counter()
            assert client.post("/v1/predictions", data=body, content_type="image/jpeg").status_code == 202
            misses.append((time.perf_counter() - t0) * 1000)
        for name, xs in (("hit (200, cached)", hits), ("miss (202, queued)", misses)):
            xs.sort()
            print(f"{name:20s} n={n} p50={statistics.median(xs):.2f} ms p99={xs[int(0.99 * (n - 1))]:.2f} ms "
                  f"({len(data)} bytes JPEG)")
    finally:
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
