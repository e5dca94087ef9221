"""Every benchmark, registered here and only here, in run order.

A benchmark is a module with ``NAME``, a docstring (what it measures, shown by ``--list``) and
``run(ctx, figures)``. ``inprocess`` runs first: it finds which variants build here and their
in-process limits, which ``e2e`` and ``baseline`` compare with and which pick the fastest variant
for the service benchmarks after them. To add one: write the module, add it to the tuple below.
"""
from __future__ import annotations

from types import ModuleType

from bench.benchmarks import baseline, bulk, drain, e2e, inprocess, priority, proxy, recovery

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (
    inprocess, e2e, baseline, bulk, priority, drain, recovery, proxy,
)}


def summary(name: str) -> str:
    """The first line of a benchmark's docstring."""
    return (BENCHMARKS[name].__doc__ or "").strip().splitlines()[0]
