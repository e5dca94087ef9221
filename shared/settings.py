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
                        "Redis used as broker, image store and result store. `make up` starts a private one when unset.")
    port: int = _s("PINFER_PORT", 8000, "Port the API (or nginx in compose) listens on.")
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
    # --- backpressure ------------------------------------------------------------------------
    max_pending_images: int = _s("PINFER_MAX_PENDING_IMAGES", 20_000,
                                 "Images stored but not yet classified, all clients together (429 `overloaded`). "
                                 "Redis memory is bounded by this x the upload size.")
    max_pending_per_job: int = _s("PINFER_MAX_PENDING_PER_JOB", 2_000,
                                  "Images of one bulk job stored but not yet classified (429 `overloaded`).")
    retry_after_s: int = _s("PINFER_RETRY_AFTER_S", 2, "`Retry-After` sent with a 429.")
    # --- model / inference -------------------------------------------------------------------
    model_dir: str = _s("PINFER_MODEL_DIR", str(PROJECT_ROOT / "weights" / "build"),
                        "Folder holding `manifest.json` and the `model-<sha>.pt` it names, written by `pinfer export-model`.")
    precision: str = _s("PINFER_PRECISION", "fp32", "Inference precision; `bf16` needs AVX-512-BF16/AMX.",
                        ("fp32", "bf16"))
    resize: str = _s("PINFER_RESIZE", "exact",
                     "`exact` reproduces torchvision's Resize(256)+CenterCrop(224); `fast` decodes large JPEGs "
                     "at reduced scale first.", ("exact", "fast"))
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
                      "Name of the physical host for core leases; empty = this machine's hostname.")
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
                                 "A batch running longer is taken as hung: the worker process kills itself and "
                                 "its images are delivered again (counting toward PINFER_MAX_DELIVERIES). Must "
                                 "stay below PINFER_VISIBILITY_TIMEOUT_S.")
    # --- API server --------------------------------------------------------------------------
    api_threads: int = _s("PINFER_API_THREADS", 256,
                           "Threads per gunicorn API process (gthread); a long-poll holds one while it waits.")
    api_processes: int = _s("PINFER_API_PROCESSES", 2, "gunicorn API processes.")
    max_waiters: int = _s("PINFER_MAX_WAITERS", 192,
                          "Long-polls held at once per API process; past it `wait` answers at once (with "
                          "`Retry-After: 1`), so long-polls never take the threads submissions need.")
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
                     "interactive_window_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_env(name)} must be at least 1")
        if self.max_wait_ms < 1:
            raise ValueError("PINFER_MAX_WAIT_MS must be at least 1 (a worker never holds a lone image anyway)")
        if self.visibility_timeout_s < 5:
            raise ValueError("PINFER_VISIBILITY_TIMEOUT_S must be at least 5 seconds")
        if self.batch_time_limit_s >= self.visibility_timeout_s:
            raise ValueError("PINFER_BATCH_TIME_LIMIT_S must be below PINFER_VISIBILITY_TIMEOUT_S: a batch still "
                             "running when its messages become visible again would be delivered twice")

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
