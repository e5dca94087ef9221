"""What every benchmark shares: its figures, the run's context, and small statistics.

A benchmark is a module of ``bench/benchmarks/`` with ``NAME``, a docstring and ``run(ctx, f)``;
``bench/benchmarks/__init__.py`` lists them, in run order, in one place. ``run`` adds figures to
``f`` (per variant with ``f.variant(v)``), raises :class:`Skip` when it cannot apply, and starts
processes only through ``bench.stack.Stack``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bench.corpus import Corpus
from bench.stack import Stack
from bench.variants import REFERENCE, Variant


class Skip(Exception):
    """This benchmark (or variant) cannot run here; the message says why and is printed."""


# --------------------------------------------------------------------------------------- figures
@dataclass
class Figures:
    """Ordered (key, value, unit) rows, free-text notes, and per-variant children."""

    rows: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    variants: dict[str, "Figures"] = field(default_factory=dict)
    skipped: str | None = None

    def add(self, key: str, value: Any, unit: str = "") -> Any:
        self.rows.append((key, value, unit))
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def get(self, key: str) -> Any:
        return next((v for k, v, _ in self.rows if k == key), None)

    def variant(self, v: Variant) -> "Figures":
        return self.variants.setdefault(v.name, Figures())

    def skip(self, v: Variant, reason: str) -> None:
        self.variant(v).skipped = reason
        print(f"  SKIP {v.name}: {reason}", flush=True)

    def as_json(self) -> dict:
        out: dict[str, Any] = {"figures": {k: _jsonable(v) for k, v, _ in self.rows},
                               "units": {k: u for k, _, u in self.rows if u}, "notes": self.notes}
        if self.variants:
            out["variants"] = {name: {"status": "skipped" if ch.skipped is not None else "ok",
                                      "reason": ch.skipped, **ch.as_json()}
                               for name, ch in self.variants.items()}
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return None if v != v else round(v, 4)
    return v


# --------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    """One run: its options, photos, model folder, cores and the figures measured so far."""

    quick: bool
    corpus: Corpus
    corpus_dir: Path
    tmp: Path
    model_dir: Path
    variants: list[Variant]
    server_cores: list[int]
    client_cores: list[int]
    service: str = "fastest"
    results: dict[str, Figures] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def all_cores(self) -> list[int]:
        return sorted(set(self.server_cores) | set(self.client_cores))

    def stack(self, name: str, variant: Variant, cores: list[int] | None = None, **kw: Any) -> Stack:
        """A stack serving ``variant``, its processes pinned to ``cores`` (default: the server core)."""
        env = {**variant.env(), **kw.pop("env", {})}
        return Stack(name, self.model_dir, env=env, cores=cores or self.server_cores, **kw)

    def as_client(self) -> "_Affinity":
        """``with ctx.as_client():`` the load generator's threads run on the client core(s)."""
        return _Affinity(self.client_cores)

    def built(self) -> list[Variant]:
        """Variants the in-process benchmark could build (all selected ones if it did not run)."""
        inp = self.results.get("inprocess")
        if inp is None:
            return [v for v in self.variants if v.unsupported() is None]
        return [v for v in self.variants if v.name in inp.variants and inp.variants[v.name].skipped is None]

    def inprocess_rate(self, v: Variant) -> float | None:
        inp = self.results.get("inprocess")
        if inp is None or v.name not in inp.variants:
            return None
        return inp.variants[v.name].get("images_per_s")

    def fastest(self) -> Variant:
        """The built variant with the highest in-process rate (the reference without figures)."""
        rated = [(self.inprocess_rate(v) or 0.0, v) for v in self.built()]
        rated = [rv for rv in rated if rv[0] > 0]
        return max(rated, key=lambda rv: rv[0])[1] if rated else REFERENCE


    def service_variant(self) -> Variant:
        """The variant the service benchmarks (bulk, priority, drain, recovery, proxy) run:
        ``--service-variant``, by default the fastest built one."""
        if self.service == "fastest":
            return self.fastest()
        return next((v for v in self.variants if v.name == self.service), Variant(*self.service.split("-")))


class _Affinity:
    def __init__(self, cores: list[int]) -> None:
        self.cores = cores

    def __enter__(self) -> None:
        self.before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(self.cores))

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self.before)


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
    if not ms:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "mean_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    return {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "mean_ms": sum(ms) / len(ms),
            "max_ms": max(ms), "n": len(ms)}


def add_load_figures(g: Figures, idle: Sequence[float], loaded: Sequence[float], recs: list[dict],
                     wall: float) -> tuple[dict[str, float], float]:
    """The figures every served benchmark reports (images/s, idle and loaded p50/p95); returns the
    idle summary and the rate for the caller's own figures."""
    si, sl = summarize_ms(idle), summarize_ms(loaded)
    rate = len(recs) / wall
    g.add("images_per_s", rate, "img/s")
    g.add("idle_p50", si["p50_ms"], "ms")
    g.add("idle_p95", si["p95_ms"], "ms")
    g.add("loaded_p50", sl["p50_ms"], "ms")
    g.add("loaded_p95", sl["p95_ms"], "ms")
    return si, rate


def timing_stats(recs: list[dict]) -> dict[str, float]:
    """Means of the server's per-image timings and batch sizes over the succeeded records."""
    t = [r.get("timings") or (r.get("result") or {}).get("timings") or {} for r in recs if r.get("status") == "succeeded"]
    t = [x for x in t if x]
    if not t:
        return {}
    mean = lambda key: sum(x.get(key, 0) for x in t) / len(t)  # noqa: E731
    bs = [x.get("batch_size", 1) or 1 for x in t]
    return {"server_total_ms": mean("total_ms"), "server_queued_ms": mean("queued_ms"),
            "server_inference_ms": mean("inference_ms"), "batch_per_image": sum(bs) / len(bs),
            "batch_per_batch": len(bs) / sum(1 / b for b in bs), "batch_max": max(bs)}


def batch_histogram(recs: list[dict]) -> dict[int, int]:
    bs = Counter((r.get("timings") or {}).get("batch_size") for r in recs if r.get("timings"))
    return dict(sorted((k, v) for k, v in bs.items() if k))


def statuses(recs: list[dict]) -> dict[str, int]:
    return dict(Counter(r.get("status", "?") for r in recs))


def errors(recs: list[dict]) -> dict[str, int]:
    return dict(Counter((r.get("error") or {}).get("code", "?") for r in recs if r.get("status") == "failed"))


def served(rec: dict) -> dict:
    """What computed a record: the ``model`` block of a result (precision, runtime, sha)."""
    return rec.get("model") or (rec.get("result") or {}).get("model") or {}
