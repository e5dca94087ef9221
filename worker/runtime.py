"""The model inside one worker process: choose a variant, load it once, verify, warm up, classify batches.

Loaded from ``worker_process_init`` (never at import: torch/OpenMP state created before a fork can
hang children). The thread count equals the number of cores the process is pinned to, so two
pinned workers never fight over one core.

This module imports neither torch nor onnxruntime: the manifest names the variants (runtime x
precision), ``select_variant`` picks one from the settings, and only the chosen backend in
``worker.runtimes`` imports its library. A worker serving ONNX Runtime therefore never loads torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from shared.errors import InferenceError, ModelArtifactError
from shared.settings import Settings
from weights.manifest import Manifest, Variant, load_manifest, verify_variant
from worker.threads import torch_threads

log = logging.getLogger(__name__)

#: ``PINFER_PRECISION=auto`` tries variants in this order, fastest first (measured on one pinned core
#: at batch 16, see README "Precisions and runtimes"), and serves the first that passes the gate.
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("int8", "torchscript"),
    ("int8", "onnx"),
    ("bf16", "torchscript"),
    ("fp32", "onnx"),
    ("fp32", "torchscript"),
)
REFERENCE = ("fp32", "torchscript")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    pretrained: bool
    precision: str
    runtime: str = "torchscript"

    def public(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "pretrained": self.pretrained,
                "precision": self.precision, "runtime": self.runtime}


@dataclass(frozen=True)
class Choice:
    """The variant a worker serves and, in words, why (logged and shown by ``/readyz``)."""

    variant: Variant
    reason: str


def bf16_supported() -> bool:
    """AVX-512-BF16 or AMX: without them bf16 is emulated and slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _export_hint(precision: str, runtime: str) -> str:
    runtimes = "torchscript,onnx" if runtime == "auto" else runtime
    calib = " --calibration DIR" if precision in ("int8", "auto") else ""
    return f"`pinfer export-model --precision fp32,{precision if precision != 'auto' else 'int8'} " \
           f"--runtime {runtimes}{calib}`"


def select_variant(manifest: Manifest, precision: str, runtime: str, min_agreement: float,
                   bf16_ok: bool) -> Choice:
    """Which variant to serve.

    A forced precision (``fp32``/``bf16``/``int8``) takes that variant (the fastest runtime first,
    unless ``runtime`` forces one). ``auto`` takes the fastest variant whose measured top-1 agreement
    with fp32 is at least ``min_agreement``; a variant without measured fidelity never passes, and
    bf16 is skipped on CPUs without native bf16. The TorchScript fp32 reference always passes.
    """
    variants = {(v.precision, v.runtime): v for v in manifest.variant_list()}
    order = [key for key in AUTO_ORDER if runtime in ("auto", key[1])]
    have = ", ".join(sorted(f"{p}/{r}" for p, r in variants))
    if precision != "auto":
        ref = variants.get(REFERENCE)
        if ("bf16", "torchscript") not in variants and ref is not None:
            # bf16 is the fp32 TorchScript file run under autocast: it can be forced on any manifest.
            variants[("bf16", "torchscript")] = Variant("torchscript", "bf16", ref.artifact, ref.artifact_sha256)
        note = ""
        if precision == "bf16" and not bf16_ok:
            note = "; this CPU has no AVX-512-BF16/AMX, so bf16 would be emulated and slower: serving fp32"
            precision = "fp32"
        for key in order:
            if key[0] == precision and key in variants:
                return Choice(variants[key], f"PINFER_PRECISION={precision} forces {key[0]}/{key[1]}{note}")
        raise ModelArtifactError(f"PINFER_PRECISION={precision} with PINFER_RUNTIME={runtime}, but the model in "
                                 f"its folder has no such variant (it has {have}); export it with "
                                 f"{_export_hint(precision, runtime)}")
    passed_over = []
    for key in order:
        v = variants.get(key)
        if v is None:
            continue
        if key[0] == "bf16" and not bf16_ok:
            passed_over.append("bf16: this CPU has no AVX-512-BF16/AMX")
            continue
        if key == REFERENCE:
            why = "the fp32 reference"
        else:
            fid = v.fidelity or {}
            agreement = fid.get("top1_agreement")
            if agreement is None:
                passed_over.append(f"{v.key}: fidelity not measured (exported without --calibration)")
                continue
            if agreement < min_agreement:
                passed_over.append(f"{v.key}: top-1 agreement with fp32 {agreement:.4f} < PINFER_MIN_AGREEMENT "
                                   f"{min_agreement} on {fid.get('images', '?')} held-out photos")
                continue
            why = (f"top-1 agreement with fp32 {agreement:.4f} >= PINFER_MIN_AGREEMENT {min_agreement} "
                   f"on {fid.get('images', '?')} held-out photos")
        fell = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
        verb = "fell back to" if passed_over else "chose"
        return Choice(v, f"PINFER_PRECISION=auto {verb} {v.key} ({why}){fell}")
    raise ModelArtifactError(f"PINFER_PRECISION=auto with PINFER_RUNTIME={runtime}: no variant in the model "
                             f"folder passes (it has {have}; {'; '.join(passed_over) or 'none for this runtime'}); "
                             f"export the fp32 fallback with {_export_hint('fp32', runtime)}")


@dataclass(frozen=True)
class Plan:
    """What a worker would serve from the model folder as it is now, before anything is loaded: the
    manifest, the sha256 of its bytes, and the chosen variant. A roll-out compares it with what is
    served (``ModelRuntime.info``) to decide whether there is anything to load."""

    manifest: Manifest
    manifest_sha256: str
    choice: Choice

    @property
    def info(self) -> ModelInfo:
        v = self.choice.variant
        return ModelInfo(self.manifest.name, v.artifact_sha256, bool(self.manifest.pretrained), v.precision,
                         v.runtime)


def plan_model(settings: Settings) -> Plan:
    """Read the manifest and choose the variant (no artifact is read: cheap)."""
    manifest, digest = load_manifest(settings.model_dir)
    choice = select_variant(manifest, settings.precision, settings.runtime, settings.min_agreement,
                            bf16_supported())
    return Plan(manifest, digest, choice)


class ModelRuntime:
    """The variant chosen by the settings, behind one surface: ``forward``, ``top_k``, ``info``, ``warm_up``.

    ``precision``, ``runtime`` and ``selection`` (the reason) say what is served and why;
    ``manifest_sha256`` which manifest it came from. ``plan`` (from ``plan_model``) skips reading the
    manifest again.
    """

    def __init__(self, settings: Settings, threads: int | None = None, plan: Plan | None = None) -> None:
        from worker.runtimes import load_backend

        self.settings = settings
        threads = threads or torch_threads()  # pinned: its cores; unpinned: OMP_NUM_THREADS or 1
        self.threads = threads
        plan = plan or plan_model(settings)
        self.manifest: Manifest = plan.manifest
        self.manifest_sha256 = plan.manifest_sha256
        choice = plan.choice
        path = verify_variant(settings.model_dir, choice.variant)
        self.variant = choice.variant
        self.selection = choice.reason
        self.precision = choice.variant.precision
        self.runtime = choice.variant.runtime
        (log.warning if "fell back" in choice.reason or "emulated" in choice.reason else log.info)(
            "serving %s: %s", choice.variant.key, choice.reason)
        self.backend = load_backend(self.runtime, self.precision, path, threads)
        self.info = ModelInfo(self.manifest.name, choice.variant.artifact_sha256, bool(self.manifest.pretrained),
                              self.precision, self.runtime)
        self.warm_up()

    def warm_up(self) -> float:
        """Run the shapes a worker will see before it takes tasks, so the first request is not slow."""
        t0 = time.perf_counter()
        size = int(self.manifest.input_size)
        for n in (1, 1, 1, min(4, self.settings.max_batch), self.settings.max_batch):
            self.forward(np.zeros((n, 3, size, size), dtype=np.float32))
        return time.perf_counter() - t0

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) as float32 for a float32 NCHW batch."""
        try:
            return self.backend.probs(batch)
        except Exception as exc:  # the model is a black box: any failure is an inference error
            raise InferenceError(f"the model failed on a batch of {len(batch)}: {exc}") from exc

    @staticmethod
    def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the k best classes, best first (ties: lower index first)."""
        k = min(k, probs.shape[0])
        idx = np.argpartition(-probs, k - 1)[:k]
        order = np.lexsort((idx, -probs[idx]))
        idx = idx[order]
        return idx, probs[idx]
