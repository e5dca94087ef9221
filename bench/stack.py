"""Start and stop a pinfer stack for a benchmark, plus the HTTP helpers the benchmarks share.

A :class:`Stack` is the same processes a user runs (``pinfer.procs``): a private redis-server,
``pinfer worker`` launchers (pinned Celery workers, ``PINFER_WORKERS=k``), one or more gunicorn
API servers and optionally nginx in front of them (``tests/topology.py`` renders the production
``deploy/nginx.conf`` for loopback). Everything listens on 127.0.0.1 only. ``with Stack(...)``
always stops what it started, in reverse order, and SIGKILLs leftovers (only descendants of the
processes it started, matched by pid *and* start time so a recycled pid is never hit).

Logs of each stack go to ``bench/out/logs/<stack name>/`` (redis.log, api-<port>.log,
workers-<n>.log, nginx/): after a run, grep them for errors.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import requests
from requests.adapters import HTTPAdapter

from pinfer import procs
from pinfer.procs import Proc, free_port, start_redis, wait_until
from shared.settings import PROJECT_ROOT

TERMINAL = ("succeeded", "failed", "canceled")
OUT_DIR = PROJECT_ROOT / "bench" / "out"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".gif", ".bmp"}


# --------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class BenchImage:
    name: str
    data: bytes
    width: int = 0
    height: int = 0

    @property
    def is_jpeg(self) -> bool:
        return self.data[:3] == b"\xff\xd8\xff"


@dataclass
class Corpus:
    images: list[BenchImage]
    source: str          # folder, or "synthetic"
    synthetic: bool

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        mb = sum(len(i.data) for i in self.images) / 1e6
        kind = "SYNTHETIC JPEGs (photo corpus absent)" if self.synthetic else f"photos from {self.source}"
        return f"{len(self.images)} {kind}, {mb:.1f} MB"

    def mid_jpeg(self) -> BenchImage:
        """The JPEG of median byte size (the `latency` image)."""
        jpegs = sorted((i for i in self.images if i.is_jpeg), key=lambda i: (len(i.data), i.name))
        return (jpegs or sorted(self.images, key=lambda i: len(i.data)))[len(jpegs or self.images) // 2]

    def repeated(self, n: int) -> list[BenchImage]:
        """``n`` images, the corpus cycled, each with a unique name ``copy{i}/{file}``."""
        out = []
        for k in range(n):
            img = self.images[k % len(self.images)]
            out.append(BenchImage(f"copy{k // len(self.images)}/{img.name}", img.data, img.width, img.height))
        return out


def corpus_dir() -> Path:
    return Path(os.environ.get("PINFER_CORPUS_DIR") or PROJECT_ROOT.parent / "shared" / "corpus" / "photos")


def load_corpus(folder: Path | None = None, synthetic_n: int = 141) -> Corpus:
    """The photo corpus, or ``synthetic_n`` synthetic JPEGs (deterministic) when it is absent."""
    folder = Path(folder) if folder else corpus_dir()
    if folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            from PIL import Image

            imgs = []
            for p in paths:
                data = p.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                except Exception:
                    w = h = 0
                imgs.append(BenchImage(p.name, data, w, h))
            return Corpus(imgs, str(folder), False)
    return Corpus(synthetic_images(synthetic_n), "synthetic", True)


def synthetic_images(n: int = 141, seed: int = 0) -> list[BenchImage]:
    """Photo-like JPEGs (smooth gradients + noise, q=90) in the corpus's usual sizes."""
    import numpy as np
    from PIL import Image

    sizes = [(640, 480), (500, 375), (1024, 768), (800, 600), (375, 500), (1600, 1200), (320, 240),
             (2048, 1536), (500, 333), (1280, 720)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([(xx / w) * 255, (yy / h) * 255, ((xx + yy) / (w + h)) * 255], axis=-1)
        base = base * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 18, size=(h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(BenchImage(f"synthetic_{i:03d}_{w}x{h}.jpg", buf.getvalue(), w, h))
    return out


# --------------------------------------------------------------------------------------- model
_MODEL_LOCK = threading.Lock()
_MODEL_DIR: dict[str, Path] = {}


def model_dir(root: Path) -> Path:
    """A seeded random-init artifact (official weights are not downloadable here; speed is identical).

    ``PINFER_BENCH_MODEL_DIR`` (a folder with a verified artifact, e.g. the official one) wins."""
    given = os.environ.get("PINFER_BENCH_MODEL_DIR")
    if given:
        return Path(given)
    with _MODEL_LOCK:
        if "dir" not in _MODEL_DIR:
            from weights.export import export_model

            d = Path(root) / "model"
            d.mkdir(parents=True, exist_ok=True)
            export_model(d, random_init=True, seed=0)
            _MODEL_DIR["dir"] = d
        return _MODEL_DIR["dir"]


# --------------------------------------------------------------------------------------- HTTP
_local = threading.local()


def session() -> requests.Session:
    """One pooled session per thread (requests.Session is not meant to be shared across threads)."""
    s = getattr(_local, "session", None)
    if s is None:
        s = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=8)
        s.mount("http://", adapter)
        _local.session = s
    return s


class BenchError(RuntimeError):
    pass


def submit(base: str, data: bytes, timeout: float = 30.0, retries_429: int = 20) -> dict:
    """POST /v1/predictions; retries a 429/503 after Retry-After (bounded). Returns the 202 body."""
    for attempt in range(retries_429 + 1):
        r = session().post(f"{base}/v1/predictions", files={"image": ("image", data)}, timeout=timeout)
        if r.status_code == 202:
            return r.json()
        if r.status_code in (429, 503) and attempt < retries_429:
            time.sleep(_retry_after(r, 1.0))
            continue
        raise BenchError(f"submit: HTTP {r.status_code}: {r.text[:300]}")
    raise BenchError("unreachable")


def wait_result(base: str, pid: str, timeout: float = 120.0, wait: float = 30.0) -> dict:
    """Long-poll (``?wait=``) until the prediction is terminal; BenchError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        w = max(0.0, min(wait, left))
        r = session().get(f"{base}/v1/predictions/{pid}", params={"wait": f"{w:.3f}"}, timeout=w + 30)
        if r.status_code != 200:
            raise BenchError(f"result {pid}: HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        if body.get("status") in TERMINAL:
            return body
        if time.monotonic() >= deadline:
            raise BenchError(f"result {pid}: still {body.get('status')!r} after {timeout:.0f}s")
        if time.monotonic() - (deadline - left) < 0.05:
            time.sleep(0.05)  # answered at once (waiter cap reached): do not spin


def get_status(base: str, pid: str) -> dict:
    r = session().get(f"{base}/v1/predictions/{pid}", timeout=10)
    r.raise_for_status()
    return r.json()


def stats(base: str) -> dict:
    """``/v1/stats`` (the /readyz body, always 200)."""
    r = session().get(f"{base}/v1/stats", timeout=10)
    r.raise_for_status()
    return r.json()


def _retry_after(resp: requests.Response, default: float) -> float:
    try:
        return max(0.05, float(resp.headers.get("Retry-After", default)))
    except ValueError:
        return default


# --------------------------------------------------------------------------------------- bulk
class BulkClient:
    """Bulk-job calls through the SDK (client/sdk.py) when it is importable, else raw requests."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.sdk = None
        self.kind = "raw requests"
        try:
            from client.sdk import Client  # noqa: WPS433 (optional, written by another part)

            if all(hasattr(Client, m) for m in ("create_job", "add_images", "close_job", "results", "cancel_job")):
                self.sdk = Client(base, timeout=60.0, retries=3)
                self.kind = "client.sdk.Client"
        except Exception:
            self.sdk = None

    def create_job(self, name: str) -> str:
        if self.sdk is not None:
            return self.sdk.create_job(name=name)["id"]
        r = session().post(f"{self.base}/v1/jobs", json={"name": name}, timeout=30)
        if r.status_code != 201:
            raise BenchError(f"create job: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["id"]

    def add_images(self, jid: str, items: Sequence[tuple[str, bytes]], stop: threading.Event | None = None,
                   stats_: dict | None = None) -> int:
        """Upload until every item is in the job (429: wait Retry-After and send the rest again).
        Returns the number of items in; stops early (returning what got in) when ``stop`` is set."""
        stats_ = stats_ if stats_ is not None else {}
        pending = list(items)
        got = 0
        while pending:
            if stop is not None and stop.is_set():
                break
            if self.sdk is not None:
                res = self.sdk.add_images(jid, pending, overload_retries=0)
                names_in = res.names_in
                overloaded = bool(res.pending)
                delay = res.retry_after if res.retry_after is not None else 1.0
            else:
                files = [("images", (n, d, "application/octet-stream")) for n, d in pending]
                r = session().post(f"{self.base}/v1/jobs/{jid}/images", files=files, timeout=120)
                if r.status_code not in (202, 429):
                    raise BenchError(f"add images: HTTP {r.status_code}: {r.text[:300]}")
                body = r.json()
                names_in = {d["name"] for k in ("accepted", "duplicates", "rejected") for d in body.get(k) or []}
                overloaded = r.status_code == 429
                delay = _retry_after(r, 1.0)
            got += sum(1 for n, _ in pending if n in names_in)
            pending = [(n, d) for n, d in pending if n not in names_in]
            if pending and overloaded:
                stats_["429"] = stats_.get("429", 0) + 1
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
            elif pending:
                raise BenchError(f"add images: {len(pending)} not accepted without a 429")
        return got

    def close_job(self, jid: str) -> None:
        if self.sdk is not None:
            self.sdk.close_job(jid)
            return
        session().post(f"{self.base}/v1/jobs/{jid}/close", timeout=30).raise_for_status()

    def cancel_job(self, jid: str) -> dict:
        if self.sdk is not None:
            return self.sdk.cancel_job(jid)
        r = session().delete(f"{self.base}/v1/jobs/{jid}", timeout=60)
        r.raise_for_status()
        return r.json()

    def get_job(self, jid: str) -> dict:
        r = session().get(f"{self.base}/v1/jobs/{jid}", timeout=30)
        r.raise_for_status()
        return r.json()

    def results(self, jid: str, cursor: int, limit: int = 1000) -> tuple[list[dict], int, str]:
        if self.sdk is not None:
            return self.sdk.results(jid, cursor=cursor, limit=limit)
        import json

        r = session().get(f"{self.base}/v1/jobs/{jid}/results", params={"cursor": cursor, "limit": limit},
                          timeout=60)
        r.raise_for_status()
        rows = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        return rows, int(r.headers.get("X-Next-Cursor", cursor + len(rows))), r.headers.get("X-Job-Status", "")

    def follow(self, jid: str, expected: int, timeout: float, poll: float = 0.2) -> list[dict]:
        """Read results with the cursor until ``expected`` lines (or the job finished and the cursor
        caught up); BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        rows: list[dict] = []
        cursor = 0
        while True:
            page, cursor, status = self.results(jid, cursor)
            rows.extend(page)
            if len(rows) >= expected or (status in ("finished", "canceled") and not page):
                return rows
            if time.monotonic() > deadline:
                raise BenchError(f"job {jid}: {len(rows)}/{expected} results after {timeout:.0f}s (status {status})")
            if not page:
                time.sleep(poll)

    def close(self) -> None:
        if self.sdk is not None:
            try:
                self.sdk.close()
            except Exception:
                pass


# --------------------------------------------------------------------------------------- processes
# pinfer.procs' commands, API and workers each in a session of their own (Redis always is): a
# Ctrl-C (SIGINT to the terminal's process group) then reaches only the benchmark, which stops the
# stack in order (API, workers, then Redis) instead of every process at once.
def start_api(env: dict, port: int, log: Path) -> Proc:
    return procs.start_api(env, port, log, new_session=True)


def start_workers(env: dict, log: Path) -> Proc:
    return procs.start_workers(env, log, new_session=True)


def _proc_identity(pid: int) -> tuple[int, float] | None:
    try:
        import psutil

        return pid, psutil.Process(pid).create_time()
    except Exception:
        return None


def descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, create_time) of every live descendant of ``pid``."""
    try:
        import psutil

        return [(c.pid, c.create_time()) for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def kill_leftovers(idents: Iterable[tuple[int, float]], grace: float = 5.0) -> int:
    """SIGKILL processes from ``idents`` still alive after ``grace`` s (same pid AND start time)."""
    try:
        import psutil
    except ImportError:
        return 0
    alive = []
    for pid, ctime in idents:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.01:
                alive.append(p)
        except Exception:
            pass
    if not alive:
        return 0
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except Exception:
            pass
    return len(alive)


@dataclass
class Stack:
    """A private pinfer deployment on loopback. Use as a context manager.

    ``workers``: k for one ``pinfer worker`` launcher with PINFER_WORKERS=k (0: start none yet);
    ``apis``: gunicorn servers (each PINFER_API_PROCESSES processes); ``nginx``: put nginx in front.
    ``env``: extra PINFER_* settings (defaults are the production ones).
    """

    name: str
    model_dir: Path
    workers: int = 1
    apis: int = 1
    nginx: bool = False
    env: dict[str, str] = field(default_factory=dict)
    log_root: Path = OUT_DIR / "logs"
    ready_timeout: float = 180.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.log_root) / self.name
        self.redis: Proc | None = None
        self.redis_url = ""
        self.api_procs: list[Proc] = []
        self.api_bases: list[str] = []
        self.worker_procs: list[Proc] = []
        self.worker_logs: list[Path] = []
        self.nginx_proc: subprocess.Popen | None = None
        self.nginx_base: str | None = None
        self.full_env: dict[str, str] = {}
        self._idents: list[tuple[int, float]] = []

    # -- lifecycle --
    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        """The first API server, straight (no nginx)."""
        return self.api_bases[0]

    def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis, self.redis_url = start_redis(self.workdir / "redis")
        self._remember(self.redis.popen.pid)
        self.full_env = {**os.environ, "PINFER_REDIS_URL": self.redis_url, "PINFER_MODEL_DIR": str(self.model_dir),
                         "PINFER_PRECISION": "fp32", "PINFER_RESIZE": "exact", "PYTHONUNBUFFERED": "1",
                         "PINFER_CACHE_TTL_S": "0",  # benchmarks measure inference, not cache hits
                         **{k: str(v) for k, v in self.env.items()}}
        self.full_env.pop("PINFER_WORKERS", None)
        for _ in range(self.apis):
            port = free_port()
            proc = start_api(self.full_env, port, self.workdir / f"api-{port}.log")
            self.api_procs.append(proc)
            self._remember(proc.popen.pid)
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda b=base: requests.get(b + "/healthz", timeout=2).ok, 60, f"API {base}", proc.popen)
            self.api_bases.append(base)
        if self.nginx:
            self._start_nginx()
        if self.workers:
            self.start_workers(self.workers)

    def _start_nginx(self) -> None:
        from tests.topology import nginx_binary, render_nginx_conf, start_nginx

        if nginx_binary() is None:
            raise BenchError("nginx is not installed (looked on PATH and in /usr/sbin)")
        listen = f"127.0.0.1:{free_port()}"
        conf = render_nginx_conf([b.removeprefix("http://") for b in self.api_bases], listen,
                                 self.workdir / "nginx", worker_processes=1)
        self.nginx_proc = start_nginx(conf, wait_for=listen, timeout=15)
        self._remember(self.nginx_proc.pid)
        self.nginx_base = f"http://{listen}"
        wait_until(lambda: requests.get(self.nginx_base + "/healthz", timeout=2).ok, 30, "nginx -> API")

    def start_workers(self, k: int, wait: bool = True) -> Proc:
        """One more ``pinfer worker`` launcher with PINFER_WORKERS=k; waits until its k workers are
        ready (Celery's ``ready.`` log line, or a READY heartbeat, whichever comes first)."""
        before = {int(w["pid"]) for w in self.ready_workers()}
        env = {**self.full_env, "PINFER_WORKERS": str(k)}
        log = self.workdir / f"workers-{len(self.worker_procs)}.log"
        self.worker_logs.append(log)
        proc = start_workers(env, log)
        self.worker_procs.append(proc)
        self._remember(proc.popen.pid)
        if wait:
            wait_until(lambda: _ready_lines(log) >= k or len(self.ready_workers()) >= len(before) + k,
                       self.ready_timeout, f"{k} ready workers", proc.popen)
        return proc

    def wait_workers(self, n: int, proc: Proc | None = None, exclude: set[int] = frozenset(),
                     timeout: float | None = None) -> list[dict]:
        """Wait until ``n`` workers (not in ``exclude``) have sent a READY/BUSY heartbeat."""
        wait_until(lambda: len([w for w in self.ready_workers() if int(w["pid"]) not in exclude]) >= n,
                   timeout or self.ready_timeout, f"{n} ready workers", proc.popen if proc else None)
        for w in self.ready_workers():  # remember the Celery processes for the final clean-up
            self._remember(int(w["pid"]))
        return self.ready_workers()

    def ready_workers(self) -> list[dict]:
        return [w for w in stats(self.base)["workers"] if w.get("state") in ("READY", "BUSY")]

    def stop_workers(self, timeout: float = 30.0) -> None:
        for p in self.worker_procs:
            self._remember(p.popen.pid)
            p.stop(signal.SIGTERM, timeout)
        self.worker_procs.clear()

    def stop(self) -> None:
        """Stop everything (nginx, APIs, workers, redis) and SIGKILL whatever is left."""
        for pid, _ in list(self._idents):
            self._idents.extend(descendants(pid))
        errors = []
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.terminate()
            try:
                self.nginx_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx_proc.kill()
        for p in self.api_procs:  # signal all first, then wait: they stop in parallel
            if p.popen.poll() is None:  # SIGINT: gunicorn's quick shutdown (nothing is in flight now)
                p.popen.send_signal(signal.SIGINT)
        for p in self.worker_procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.api_procs + self.worker_procs:
            try:
                p.stop(signal.SIGTERM, 30)
            except Exception as exc:
                errors.append(exc)
        if self.redis is not None:
            self.redis.stop(signal.SIGTERM, 10)
        kill_leftovers(self._idents, grace=3.0)
        self.api_procs.clear()
        self.worker_procs.clear()

    def _remember(self, pid: int) -> None:
        ident = _proc_identity(pid)
        if ident:
            self._idents.append(ident)

    # -- helpers --
    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def log_problems(self) -> dict[str, int]:
        """Count error-looking lines per log file (Traceback, ERROR, CRITICAL, 5xx in access logs)."""
        out: dict[str, int] = {}
        for path in sorted(self.workdir.rglob("*.log")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            n = sum(1 for line in text.splitlines()
                    if "Traceback" in line or " ERROR" in line or "CRITICAL" in line or "[error]" in line
                    or '" 500 ' in line or '" 502 ' in line or '" 503 ' in line or '"status":50' in line)
            if n:
                out[str(path.relative_to(self.workdir))] = n
        return out


_READY_AT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): \w+/MainProcess\] \S+@\S+ ready\.\s*$", re.M)


def ready_times(log: Path) -> list[float]:
    """Unix times of the ``<name>@<host> ready.`` lines of a workers log (Celery's local-time stamps)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [time.mktime(time.strptime(m[0], "%Y-%m-%d %H:%M:%S")) + int(m[1]) / 1000
            for m in _READY_AT.findall(text)]


def _ready_lines(log: Path) -> int:
    """Celery workers that logged ``<name>@<host> ready.`` (consumer started, model loaded)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(r"@\S+ ready\.\s*$", text, flags=re.M))


# --------------------------------------------------------------------------------------- stats
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), numpy's default method."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_ms(xs: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean/max of seconds, in ms."""
    ms = [x * 1000 for x in xs]
    return {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "mean_ms": sum(ms) / len(ms),
            "max_ms": max(ms), "n": len(ms)}


def run_threads(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``fn`` over ``items`` with a thread pool; results in order; the first exception is raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))
