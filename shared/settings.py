"""Every knob of pinfer in one typed object.

``Settings.from_env()`` is called only at entry points (app factory, worker start, CLI); everything
below them receives a ``Settings``. Each field names its environment variable and documents itself,
and the README's settings table is generated from these fields (``pinfer settings --markdown``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def _s(env: str, default: Any, doc: str, choices: tuple = ()) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # --- connections -------------------------------------------------------------------------
    redis_url: str = _s("PINFER_REDIS_URL", "redis://127.0.0.1:6379/0",
                        "Redis used as broker, image store and result store. `make up` starts a private one when unset. "
                        "`sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]?master=NAME` follows the primary that "
                        "Redis Sentinel names (README, Redis failover).")
    port: int = _s("PINFER_PORT", 8000, "Port the API (or nginx in compose) listens on.")
    redis_wait_replicas: int = _s("PINFER_REDIS_WAIT_REPLICAS", 0,
                                  "Answer 202 only once this many Redis replicas hold the upload (Redis `WAIT`), "
                                  "else 503 `service_unavailable`: bounds what a failover can lose. 0 = off.")
    redis_wait_timeout_ms: int = _s("PINFER_REDIS_WAIT_TIMEOUT_MS", 500,
                                    "How long a submission waits for PINFER_REDIS_WAIT_REPLICAS replicas.")
    data_dir: str = _s("PINFER_DATA_DIR", "",
                       "Folder where `pinfer up` keeps its private Redis's data (append-only file), so a restart "
                       "resumes queued images, jobs and results. Empty = `$XDG_DATA_HOME/pinfer/<checkout>-<hash "
                       "of the checkout path>` (`~/.local/share/…`): survives reboots, and two checkouts never "
                       "share one by accident.")
    redis_maxmemory: int = _s("PINFER_REDIS_MAXMEMORY", 0,
                              "`maxmemory` (bytes) of the private Redis of `pinfer up` (`noeviction`: when full, "
                              "submissions get 503 and nothing stored is dropped). 0 = derived from the pending "
                              "bound: PINFER_MAX_PENDING_IMAGES x PINFER_MAX_UPLOAD_BYTES + 512 MiB, at most half "
                              "the machine's memory.")
    api_keys_file: str = _s("PINFER_API_KEYS_FILE", "",
                            "File of API keys (`pinfer api-key NAME` adds one; only sha256 hashes are stored). "
                            "Set: every `/v1` call needs `Authorization: Bearer <key>` and sees only what its key "
                            "created. Empty: no authentication (the loopback default of `make up`).")
    max_pending_per_key: int = _s("PINFER_MAX_PENDING_PER_KEY", 5_000,
                                  "Images of one API key stored but not yet classified (429 `overloaded`); only "
                                  "with PINFER_API_KEYS_FILE.")
    # --- upload limits -----------------------------------------------------------------------
    max_upload_bytes: int = _s("PINFER_MAX_UPLOAD_BYTES", 20 * MiB, "Largest accepted upload (413 `image_too_large`).")
    max_pixels: int = _s("PINFER_MAX_PIXELS", 50_000_000,
                         "Largest width x height (413 `too_many_pixels`); Pillow's own bomb limit is 89M.")
    max_aspect_ratio: float = _s("PINFER_MAX_ASPECT_RATIO", 25.0,
                                 "Largest long/short side ratio (422 `bad_aspect_ratio`): a 20000x1 strip would "
                                 "otherwise be scaled to 5 million x 256.")
    max_request_bytes: int = _s("PINFER_MAX_REQUEST_BYTES", 200 * MiB,
                                "Largest multi-image upload request to a bulk job (413 `request_too_large`).")
    default_top_k: int = _s("PINFER_DEFAULT_TOP_K", 5, "Labels returned when the request names no `top_k`.")
    max_top_k: int = _s("PINFER_MAX_TOP_K", 20, "Largest `top_k` a request may ask for.")
    max_wait_s: float = _s("PINFER_MAX_WAIT_S", 30.0, "Longest long-poll (`?wait=`) a request may ask for.")
    # --- retention ---------------------------------------------------------------------------
    result_ttl_s: int = _s("PINFER_RESULT_TTL_S", 86_400, "How long prediction and job records live.")
    image_ttl_s: int = _s("PINFER_IMAGE_TTL_S", 86_400,
                          "How long uploaded bytes wait for a worker; past it the image fails `image_expired`.")
    cache_ttl_s: int = _s("PINFER_CACHE_TTL_S", 86_400,
                          "How long a result is reused for an identical upload (same bytes, model sha256, "
                          "precision, resize mode and `top_k`): answered `succeeded` at once with `cached: true`, "
                          "no inference. 0 turns the cache off.")
    cache_max_entries: int = _s("PINFER_CACHE_MAX_ENTRIES", 50_000,
                                "Most results kept in the cache (about 1-2 KB each); the oldest go first.")
    # --- backpressure ------------------------------------------------------------------------
    max_pending_images: int = _s("PINFER_MAX_PENDING_IMAGES", 20_000,
                                 "Images stored but not yet classified, all clients together (429 `overloaded`). "
                                 "Redis memory is bounded by this x the upload size.")
    max_pending_per_job: int = _s("PINFER_MAX_PENDING_PER_JOB", 2_000,
                                  "Images of one bulk job stored but not yet classified (429 `overloaded`).")
    retry_after_s: int = _s("PINFER_RETRY_AFTER_S", 2, "`Retry-After` sent with a 429 (overloaded) or 503 (Redis unreachable).")
    # --- model / inference -------------------------------------------------------------------
    model_dir: str = _s("PINFER_MODEL_DIR", str(PROJECT_ROOT / "weights" / "build"),
                        "Folder holding `manifest.json` and the `model-<sha>.pt` it names, written by `pinfer export-model`.")
    precision: str = _s("PINFER_PRECISION", "auto",
                        "Inference precision. `auto`: the fastest exported variant whose top-1 agreement with fp32 "
                        "is at least PINFER_MIN_AGREEMENT, else int8 -> bf16 -> fp32 (bf16 only with "
                        "AVX-512-BF16/AMX). `fp32`, `bf16`, `int8` force a variant.",
                        ("auto", "fp32", "bf16", "int8"))
    runtime: str = _s("PINFER_RUNTIME", "auto",
                      "Inference runtime: `torchscript`, `onnx` (ONNX Runtime, no torch loaded) or `auto` (fastest "
                      "exported one for the precision).", ("auto", "torchscript", "onnx"))
    min_agreement: float = _s("PINFER_MIN_AGREEMENT", 0.995,
                              "Least top-1 agreement with fp32 (measured by `pinfer export-model` on held-out "
                              "calibration photos) for `auto` to serve a reduced-precision variant.")
    reload_check_s: float = _s("PINFER_RELOAD_CHECK_S", 2.0,
                               "How often a worker, between batches, looks whether `manifest.json` in "
                               "PINFER_MODEL_DIR was replaced (a `stat`; the file is hashed only when that "
                               "changed) and if so loads, verifies and warms the new model, then swaps it in "
                               "(README, Rolling out a model). 0 = only on `pinfer reload`.")
    resize: str = _s("PINFER_RESIZE", "fast",
                     "`fast` decodes large JPEGs at reduced scale and resamples only the 224 px centre window: "
                     "measured 1.6x cheaper than `exact` per photo, half an 8-bit level from it on average "
                     "(README, Preprocessing), hence the default. `exact` is torchvision's Resize(256)+"
                     "CenterCrop(224)+Normalize bit for bit.", ("exact", "fast"))
    max_batch: int = _s("PINFER_MAX_BATCH", 16, "Most images classified in one forward pass.")
    max_wait_ms: int = _s("PINFER_MAX_WAIT_MS", 10,
                          "Longest a worker holds an image while more messages that are already queued for it "
                          "arrive to fill the batch. A worker never waits for images not yet submitted: with "
                          "nothing else queued an image runs at once, as a batch of one.")
    bulk_chunk: int = _s("PINFER_BULK_CHUNK", 2,
                         "While interactive traffic is recent, bulk images per forward pass between checks for "
                         "waiting interactive work (otherwise bulk runs in full PINFER_MAX_BATCH batches).")
    interactive_window_s: int = _s("PINFER_INTERACTIVE_WINDOW_S", 60,
                                   "How long after an interactive submission bulk work keeps yielding in small chunks.")
    # --- workers -----------------------------------------------------------------------------
    workers: int = _s("PINFER_WORKERS", 0, "Worker processes `pinfer worker` starts; 0 = one per core in its affinity.")
    cores: str = _s("PINFER_CORES", "", "Cores to pin workers to (e.g. `0-3,6`); empty = the process's affinity.")
    core_lease: bool = _s("PINFER_CORE_LEASE", False,
                          "Claim a free core through a Redis lease keyed by host (compose replicas on one host).")
    host_id: str = _s("PINFER_HOST_ID", "",
                      "Name of the physical host for core leases; empty = the kernel's boot id, which every "
                      "container on one host shares (never the hostname: it differs per container).")
    visibility_timeout_s: int = _s("PINFER_VISIBILITY_TIMEOUT_S", 30,
                                   "Seconds after fetch before an unacknowledged message (its worker died) is "
                                   "delivered again. Must exceed the longest time a healthy worker holds one.")
    restore_interval_s: int = _s("PINFER_RESTORE_INTERVAL_S", 5,
                                 "How often each worker looks for messages of dead workers to deliver again.")
    max_deliveries: int = _s("PINFER_MAX_DELIVERIES", 3,
                             "Times an image may be in flight in a worker process that died before it is failed "
                             "`worker_crashed`. A crash is charged only to the images in the forward pass that "
                             "died, and an image is failed only once it has also crashed alone, so a healthy "
                             "image that shared a batch with a poison image always gets its result.")
    heartbeat_s: float = _s("PINFER_HEARTBEAT_S", 5.0, "How often a worker refreshes its heartbeat key.")
    worker_ttl_s: int = _s("PINFER_WORKER_TTL_S", 20, "A worker not seen for this long counts as gone (/readyz).")
    batch_time_limit_s: int = _s("PINFER_BATCH_TIME_LIMIT_S", 20,
                                 "A batch (or a model reload) running longer is taken as hung: the worker "
                                 "process kills itself and its images are delivered again (counting toward "
                                 "PINFER_MAX_DELIVERIES). Must stay below PINFER_VISIBILITY_TIMEOUT_S.")
    allow_untested_celery: bool = _s("PINFER_ALLOW_UNTESTED_CELERY", False,
                                     "Start workers even on celery / kombu / celery-batches versions that "
                                     "worker/celery_adapter.py (the library internals pinfer relies on) was not "
                                     "verified with, logging a warning instead of refusing. For trying a new "
                                     "release after tests/integration/test_celery_adapter.py passes on it.")
    # --- API server --------------------------------------------------------------------------
    api_threads: int = _s("PINFER_API_THREADS", 256,
                           "Threads per gunicorn API process (gthread); a long-poll holds one while it waits.")
    api_processes: int = _s("PINFER_API_PROCESSES", 2, "gunicorn API processes.")
    api_malloc_arenas: int = _s("PINFER_API_MALLOC_ARENAS", 2,
                                "glibc malloc arenas per API process (`mallopt(M_ARENA_MAX)`); 0 keeps glibc's "
                                "default of 8 per core, under which each new request thread may take an arena of "
                                "its own and memory keeps growing for hours. Ignored where `MALLOC_ARENA_MAX` "
                                "is set or the C library is not glibc.")
    max_waiters: int = _s("PINFER_MAX_WAITERS", 192,
                          "Long-polls held at once per API process; past it `wait` answers at once (with "
                          "`Retry-After: 1`), so long-polls never take the threads submissions need.")
    # --- webhooks ----------------------------------------------------------------------------
    webhook_secret: str = _s("PINFER_WEBHOOK_SECRET", "",
                             "Standard Webhooks signing secret (`whsec_` + base64 of 24-64 random bytes). Empty: "
                             "requests that name a `webhook` are refused (400 `invalid_webhook`).")
    webhook_allow_private: bool = _s("PINFER_WEBHOOK_ALLOW_PRIVATE", False,
                                     "Allow webhook URLs that resolve to loopback, link-local or private "
                                     "addresses (checked at registration and again at connect time).")
    webhook_max_attempts: int = _s("PINFER_WEBHOOK_MAX_ATTEMPTS", 8,
                                   "Delivery attempts of one event before its webhook is marked `failed`.")
    webhook_backoff_s: float = _s("PINFER_WEBHOOK_BACKOFF_S", 2.0,
                                  "Wait before the 2nd attempt; doubles after each failure (2, 4, 8 ... s).")
    webhook_timeout_s: float = _s("PINFER_WEBHOOK_TIMEOUT_S", 10.0,
                                  "Connect + read timeout of one delivery attempt; any 2xx answer counts as delivered.")
    webhook_concurrency: int = _s("PINFER_WEBHOOK_CONCURRENCY", 4,
                                  "Delivery threads per `pinfer worker` launcher (separate from the inference "
                                  "processes, so a slow receiver never slows classification); 0 = no delivery here.")
    # --- observability -----------------------------------------------------------------------
    metrics_port: int = _s("PINFER_METRICS_PORT", 9464,
                           "Base port of the workers' Prometheus endpoints: worker slot N of a launcher serves "
                           "`/metrics` on this + N (one worker per container in compose: this port). 0 = off.")
    metrics_dir: str = _s("PINFER_METRICS_DIR", "",
                          "Folder for prometheus_client's multiprocess files of one API server (emptied at "
                          "start); empty = a fresh temporary folder per server.")
    log_format: str = _s("PINFER_LOG_FORMAT", "text",
                         "`json`: one JSON object per line (request_id, prediction_id, job_id, worker, event, "
                         "duration_ms) from the API, workers, launcher and `pinfer up`; `text`: plain lines.",
                         ("text", "json"))
    # --- testing -----------------------------------------------------------------------------
    chaos_kill_marker: str = _s("PINFER_CHAOS_KILL_MARKER", "",
                                "Testing only: a worker that decodes an image containing these bytes kills "
                                "itself (simulates a decoder crash). Empty disables it.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``PINFER_*`` variables; ``overrides`` (field names) win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.metadata['env']} must be one of {', '.join(choices)}, "
                                 f"not {getattr(self, f.name)!r}")
        for name in ("max_upload_bytes", "max_pixels", "max_batch", "max_top_k", "max_deliveries", "bulk_chunk",
                     "interactive_window_s", "cache_max_entries", "max_pending_per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_env(name)} must be at least 1")
        if self.redis_wait_replicas < 0 or self.redis_wait_timeout_ms < 1:
            raise ValueError("PINFER_REDIS_WAIT_REPLICAS must be 0 or more and PINFER_REDIS_WAIT_TIMEOUT_MS at least 1")
        if self.webhook_max_attempts < 1 or self.webhook_backoff_s <= 0 or self.webhook_timeout_s <= 0:
            raise ValueError("PINFER_WEBHOOK_MAX_ATTEMPTS must be at least 1 and PINFER_WEBHOOK_BACKOFF_S, "
                             "PINFER_WEBHOOK_TIMEOUT_S above 0")
        if self.webhook_secret:
            from shared.webhooks import signer

            signer(self.webhook_secret)         # a malformed secret fails at start, not at the first delivery
        from shared.connections import validate_url

        validate_url(self.redis_url)
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("PINFER_METRICS_PORT must be a port number (0 turns the worker endpoints off)")
        if self.reload_check_s < 0:
            raise ValueError("PINFER_RELOAD_CHECK_S must be 0 (only on `pinfer reload`) or a number of seconds")
        if self.cache_ttl_s < 0:
            raise ValueError("PINFER_CACHE_TTL_S must be 0 (off) or a number of seconds")
        if self.redis_maxmemory < 0:
            raise ValueError("PINFER_REDIS_MAXMEMORY must be 0 (derived) or a number of bytes")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError("PINFER_MIN_AGREEMENT must be between 0 and 1")
        if self.max_wait_ms < 1:
            raise ValueError("PINFER_MAX_WAIT_MS must be at least 1 (a worker never holds a lone image anyway)")
        if self.visibility_timeout_s < 5:
            raise ValueError("PINFER_VISIBILITY_TIMEOUT_S must be at least 5 seconds")
        if self.batch_time_limit_s >= self.visibility_timeout_s:
            raise ValueError("PINFER_BATCH_TIME_LIMIT_S must be below PINFER_VISIBILITY_TIMEOUT_S: a batch still "
                             "running when its messages become visible again would be delivered twice")

    def data_path(self, environ: Mapping[str, str] | None = None) -> Path:
        """The private Redis's data folder: PINFER_DATA_DIR, else one per checkout under the XDG data
        dir (a hash of the checkout's path keeps two checkouts apart; the name keeps it readable)."""
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        env = os.environ if environ is None else environ
        base = Path(env.get("XDG_DATA_HOME") or Path(env.get("HOME") or Path.home()) / ".local" / "share")
        import hashlib

        tag = hashlib.sha256(str(PROJECT_ROOT).encode()).hexdigest()[:12]
        return base / "pinfer" / f"{PROJECT_ROOT.name}-{tag}"

    def derived_redis_maxmemory(self) -> int:
        """PINFER_REDIS_MAXMEMORY, or enough for the pending bound of full-size uploads plus records,
        capped at half the physical memory (Redis refusing writes beats the kernel's OOM killer)."""
        if self.redis_maxmemory:
            return self.redis_maxmemory
        want = self.max_pending_images * self.max_upload_bytes + 512 * MiB
        try:
            half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError, AttributeError):
            return want
        return min(want, half)

    @property
    def manifest_path(self) -> Path:
        return Path(self.model_dir) / "manifest.json"

    @classmethod
    def markdown_table(cls) -> str:
        """The README's settings table, generated so it cannot drift from the code."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        for f in fields(cls):
            default = f.default
            if f.name == "model_dir":
                default = "weights/build"
            shown = f"`{default}`" if default not in ("", None) else "(empty)"
            rows.append(f"| `{f.metadata['env']}` | {shown} | {f.metadata['doc']} |")
        return "\n".join(rows)


def _env(name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == name)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ValueError(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
