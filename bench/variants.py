"""The runtime x precision x resize matrix, as data, and the one model folder every variant serves.

A variant is the three settings a worker is started with (``PINFER_RUNTIME``, ``PINFER_PRECISION``,
``PINFER_RESIZE``). ``VARIANTS`` lists the ones ``make bench`` measures; add a row to measure one
more. A variant the installed code cannot build (a setting it does not know, an artifact the
exporter did not write, a runtime that falls back to another precision) is skipped with one printed
line saying why, never measured under a false name.

The model is one folder written by ``pinfer export-model`` with every precision it can build,
calibrated (int8) on the benchmark's own photos; seeded random-init weights, since the official
ones cannot be downloaded here (the speed is the same). ``PINFER_BENCH_MODEL_DIR`` names an
existing folder instead.
"""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from shared.settings import PROJECT_ROOT, Settings

RUNTIMES = ("torchscript", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
RESIZES = ("exact", "fast")


@dataclass(frozen=True)
class Variant:
    runtime: str
    precision: str
    resize: str

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.precision}-{self.resize}"

    def env(self) -> dict[str, str]:
        """The worker settings of this variant. ``PINFER_RUNTIME`` only where the code has that
        setting (before it did, TorchScript was the only runtime)."""
        env = {"PINFER_PRECISION": self.precision, "PINFER_RESIZE": self.resize}
        if has_setting("runtime"):
            env["PINFER_RUNTIME"] = self.runtime
        return env

    def unsupported(self) -> str | None:
        """Why the installed code cannot serve this variant, or None. (Static checks only; the
        in-process benchmark also refuses a runtime that loads as something else.)"""
        if self.runtime != "torchscript" and not has_setting("runtime"):
            return f"runtime {self.runtime!r}: this code has no PINFER_RUNTIME setting (TorchScript only)"
        try:
            Settings.from_env(self.env())
        except ValueError as exc:
            return f"settings refuse it: {exc}"
        return None


# The seeds' design runs TorchScript fp32 with torchvision's exact preprocessing: it comes first and
# is the reference of every "same settings" ratio.
REFERENCE = Variant("torchscript", "fp32", "exact")
VARIANTS: list[Variant] = [
    REFERENCE,
    Variant("torchscript", "fp32", "fast"),
    Variant("torchscript", "bf16", "exact"),
    Variant("torchscript", "bf16", "fast"),
    Variant("torchscript", "int8", "exact"),
    Variant("torchscript", "int8", "fast"),
    Variant("onnx", "fp32", "exact"),
    Variant("onnx", "fp32", "fast"),
    Variant("onnx", "int8", "exact"),
    Variant("onnx", "int8", "fast"),
]
# --quick: the reference and the candidates for "fastest" (fast resize), not the whole matrix.
QUICK_VARIANTS = [REFERENCE] + [v for v in VARIANTS if v.resize == "fast" and v.precision != "fp32"]


def has_setting(name: str) -> bool:
    return any(f.name == name for f in fields(Settings))


def select(patterns: list[str] | None, quick: bool) -> list[Variant]:
    """Variants whose name matches any glob in ``patterns`` (e.g. ``torchscript-*-fast``), in
    matrix order; default: all (``--quick``: the reduced set)."""
    if not patterns:
        return list(QUICK_VARIANTS if quick else VARIANTS)
    chosen = [v for v in VARIANTS if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    known = {v.name for v in VARIANTS}
    for p in patterns:  # a full name not in the matrix is still a valid variant
        parts = p.split("-")
        if p not in known and len(parts) == 3 and not any(c in p for c in "*?["):
            chosen.append(Variant(*parts))
    if not chosen:
        raise ValueError(f"no variant matches {patterns}; variants: {', '.join(sorted(known))}")
    return chosen


def export_models(out: Path, calibration: Path, log: Path) -> dict:
    """Export every variant this code can build into ``out`` (one manifest); returns what was
    done, for the JSON. Tries ``--precision``/``--runtime``/``--calibration`` with everything first,
    then without ONNX (onnxruntime missing), then a plain export (an exporter without variants);
    ``tried`` records each failure, ``bench/out/export.log`` has the exporter's output."""
    given = os.environ.get("PINFER_BENCH_MODEL_DIR")
    if given:
        return {"model_dir": given, "export": "given by PINFER_BENCH_MODEL_DIR", "manifest": read_manifest(Path(given))}
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pinfer.cli", "export-model", "--out", str(out), "--random-init", "--seed", "0"]
    every = ["--precision", ",".join(PRECISIONS), "--calibration", str(calibration)]
    attempts = [
        (base + every + ["--runtime", ",".join(RUNTIMES)], f"{','.join(PRECISIONS)} x {','.join(RUNTIMES)}"),
        (base + every, f"{','.join(PRECISIONS)}, default runtime only (no onnx: see `tried`)"),
        (base, "fp32 only (the exporter has no --precision yet)"),
    ]
    tried = []
    for cmd, what in attempts:
        with open(log, "ab") as fh:
            p = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
        if p.returncode == 0:
            return {"model_dir": str(out), "export": what, "tried": tried, "manifest": read_manifest(out)}
        tried.append(f"{' '.join(cmd[3:])}: exit {p.returncode}")
    raise RuntimeError(f"pinfer export-model failed every way (log: {log}): {tried}")


def read_manifest(model_dir: Path) -> dict | None:
    """The manifest as JSON (it carries the fidelity figures of each precision, once the exporter
    measures them)."""
    try:
        return json.loads((Path(model_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
