"""Real processes on loopback: redis-server, `pinfer worker` (pinned Celery workers), gunicorn.

``make_stack(workers=N, **settings)`` starts a private Redis and the same commands a user runs,
waits for /readyz, and stops everything at the end of the module. Each stack has its own Redis,
so tests never need to flush a database under running workers.
"""
from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
from PIL import Image

from pinfer.procs import Proc, free_port, start_api, start_redis, start_workers, wait_until
from shared.schema import TERMINAL  # noqa: F401 (tests import it from here)
from shared.settings import Settings
from shared.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A fast-loading fixture artifact (tests/fixtures/models.py): for tests whose workers restart
    often (poison kills) or whose forward passes must be quick (batching)."""
    from tests.fixtures.models import make_fixture_model

    d = tmp_path_factory.mktemp("tiny-model")
    make_fixture_model("tiny", d)
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A seeded random-init artifact: the official weights cannot be downloaded here."""
    from weights.export import export_model

    d = tmp_path_factory.mktemp("model")
    export_model(d, random_init=True, seed=0)
    return d


@dataclass
class Stack:
    base: str
    redis_url: str
    env: dict
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def store(self) -> Store:
        return Store(self.settings)

    def submit(self, data: bytes, top_k: int | None = None, expect: int = 202) -> dict:
        params = {"top_k": top_k} if top_k else None
        r = self.http.post(f"{self.base}/v1/predictions", files={"image": ("img", data)}, params=params,
                           timeout=30)
        assert r.status_code == expect, r.text
        return r.json()

    def result(self, pid: str, timeout: float = 120) -> dict:
        """Long-poll until terminal (the API's own wait, no client-side sleeping)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(f"{self.base}/v1/predictions/{pid}", params={"wait": 10}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            if body["status"] in TERMINAL or time.monotonic() > deadline:
                return body

    def workers(self) -> list[dict]:
        return [w for w in self.store.live_workers() if w.get("state") in ("READY", "BUSY")]

    def wait_ready(self, n_workers: int, timeout: float = 120, exclude_pids: set[int] = frozenset()) -> None:
        wait_until(lambda: len([w for w in self.workers() if int(w["pid"]) not in exclude_pids]) >= n_workers,
                   timeout, f"{n_workers} ready workers")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(signal.SIGTERM, 60)


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory, model_dir) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(workers: int = 1, api: bool = True, **env_overrides: str) -> Stack:
        workdir = tmp_path_factory.mktemp("stack")
        redis_proc, url = start_redis(workdir / "redis")
        env = {**os.environ, "PINFER_REDIS_URL": url, "PINFER_MODEL_DIR": str(model_dir),
               "PINFER_WORKERS": str(workers), "PINFER_PRECISION": "fp32", "PINFER_RESIZE": "exact",
               "PINFER_API_PROCESSES": "2", "PINFER_API_THREADS": "32", "PINFER_MAX_WAITERS": "24",
               # the result cache off: these tests resubmit images and must see real inference
               # (tests/integration/test_cache.py turns it on)
               "PINFER_CACHE_TTL_S": "0", "PYTHONUNBUFFERED": "1"}
        env.update({k: str(v) for k, v in env_overrides.items()})
        port = free_port()
        stack = Stack(f"http://127.0.0.1:{port}", url, env, workdir, [redis_proc])
        stacks.append(stack)
        if workers:
            stack.procs.append(start_workers(env, workdir / "workers.log"))
        if api:
            stack.procs.append(start_api(env, port, workdir / "api.log"))
            wait_until(lambda: requests.get(stack.base + "/healthz", timeout=2).ok, 60, "API", stack.procs[-1].popen)
        if workers:
            stack.wait_ready(workers)
        return stack

    yield make
    for s in stacks:
        s.stop()


def jpeg(color=(200, 30, 30), size=(320, 240), extra: bytes = b"") -> bytes:
    """A small synthetic JPEG; ``extra`` is appended after EOI (decoders ignore it)."""
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 16):  # some structure so different colours give different outputs
        img.paste((color[2], color[0], color[1]), (x, 0, x + 8, size[1]))
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue() + extra
