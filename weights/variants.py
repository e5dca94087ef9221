"""Reduced-precision and ONNX variants of one model, built from the same weights, and their fidelity gate.

* TorchScript int8 -- torch.ao post-training static quantization in FX graph mode for the ``x86``
  backend (per-channel weights, observers calibrated on the user's photos), traced and frozen as
  TorchScript. The primary int8 path: as fast as ONNX Runtime's and in the design card's format.
* ONNX fp32 -- ``torch.onnx.export`` with a dynamic batch axis.
* ONNX int8 -- ``onnxruntime.quantization.quantize_static``: QDQ format, per-channel int8 weights,
  uint8 activations calibrated (MinMax) on the same photos.
* bf16 -- the fp32 TorchScript file run under autocast; nothing to build, only to measure.

Calibration estimates each activation's range (min/max per tensor), which fixes its int8 scale. A few
dozen typical photos already bound those ranges; past ~128 the ranges stop moving, so the default is
128 calibration photos plus up to 256 *other* photos of the same folder to measure fidelity on.
The split is deterministic: sorted file list, shuffled with a fixed seed, the first N calibrate.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import random
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

# the one list of what counts as an image file; the client distribution is always installed beside
# the server (Makefile, Dockerfile)
from pinfer_client.ingest import IMAGE_SUFFIXES
from shared.errors import ModelArtifactError
from weights.manifest import VariantBuild

CALIBRATION_IMAGES = 128
HOLDOUT_IMAGES = 256
CALIBRATION_SEED = 0
_INPUT = "input"
NO_CALIBRATION = (f"int8 needs calibration photos: pass --calibration DIR, a folder of your own photos "
                  f"(ideally {CALIBRATION_IMAGES}, plus up to {HOLDOUT_IMAGES} more to measure fidelity on; "
                  f"e.g. --calibration ../shared/corpus/photos)")
_BATCH = 16


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed photos: ``calib`` sets int8 ranges, ``holdout`` (disjoint) measures fidelity."""

    calib: np.ndarray
    holdout: np.ndarray
    info: dict


def split_calibration(folder: Path, n_calib: int = CALIBRATION_IMAGES, n_holdout: int = HOLDOUT_IMAGES,
                      seed: int = CALIBRATION_SEED) -> tuple[list[Path], list[Path]]:
    """Calibration and held-out file lists: sorted (by path relative to ``folder``), shuffled with ``seed``.

    Independent of directory listing order, so the same folder always gives the same artifacts.
    """
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    random.Random(seed).shuffle(files)
    return files[:n_calib], files[n_calib:n_calib + n_holdout]


def load_calibration(folder: Path, n_calib: int = CALIBRATION_IMAGES, n_holdout: int = HOLDOUT_IMAGES,
                     seed: int = CALIBRATION_SEED, min_calib: int = 8) -> CalibrationSet:
    """Decode and preprocess (exact mode, as served by default) the calibration and held-out photos."""
    from shared.errors import ImageError
    from shared.settings import Settings
    from shared.transforms import preprocess

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelArtifactError(f"--calibration {folder} is not a folder")
    calib_files, holdout_files = split_calibration(folder, n_calib, n_holdout, seed)
    settings = Settings(resize="exact")

    def load(files: list[Path]) -> np.ndarray:
        arrays = []
        for f in files:
            try:
                arrays.append(preprocess(f.read_bytes(), settings))
            except (ImageError, OSError) as exc:
                print(f"warning: skipping calibration image {f}: {exc}", file=sys.stderr)
        return np.stack(arrays) if arrays else np.zeros((0, 3, 224, 224), np.float32)

    calib, holdout = load(calib_files), load(holdout_files)
    if len(calib) < min_calib:
        raise ModelArtifactError(f"--calibration {folder} holds {len(calib)} usable photos; int8 needs at least "
                                 f"{min_calib} (ideally {CALIBRATION_IMAGES}, plus more to measure fidelity on)")
    digest = hashlib.sha256("\n".join(f.relative_to(folder).as_posix() for f in calib_files).encode()).hexdigest()
    info = {"folder": folder.name, "calibration_images": int(len(calib)), "holdout_images": int(len(holdout)),
            "seed": seed, "calibration_files_sha256": digest}
    if len(holdout) == 0:
        print(f"warning: --calibration {folder} has no photos left after the {len(calib)} used to calibrate: "
              f"fidelity cannot be measured, so PINFER_PRECISION=auto will not serve int8", file=sys.stderr)
    return CalibrationSet(calib, holdout, info)


def _batches(x: np.ndarray, size: int = _BATCH) -> Iterable[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """TorchScript and torch.ao.quantization announce their deprecation on every call; we know (see
    pyproject.toml: the torch pin keeps both; ONNX Runtime is the path that needs neither)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        yield


def torchscript_int8(model: torch.nn.Module, calib: np.ndarray, input_size: int = 224) -> bytes:
    """FX graph-mode post-training static quantization (x86 backend), traced and frozen as TorchScript."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _quiet_torch():
        torch.backends.quantized.engine = "x86"
        example = torch.zeros(1, 3, input_size, input_size)
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.inference_mode():
            for chunk in _batches(calib):
                prepared(torch.from_numpy(np.ascontiguousarray(chunk)))
        quantized = convert_fx(prepared).eval()
        with torch.inference_mode():
            frozen = torch.jit.freeze(torch.jit.trace(quantized, example))
        buf = io.BytesIO()
        torch.jit.save(frozen, buf)
    return buf.getvalue()


def onnx_fp32(model: torch.nn.Module, input_size: int = 224) -> bytes:
    """ONNX (opset 17) with a dynamic batch axis; input ``input`` (N,3,H,W) float32, output ``logits``."""
    example = torch.zeros(1, 3, input_size, input_size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(copy.deepcopy(model).eval(), (example,), str(path), input_names=[_INPUT],
                          output_names=["logits"], dynamic_axes={_INPUT: {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        return path.read_bytes()


def onnx_int8(fp32: bytes, calib: np.ndarray) -> bytes:
    """Static QDQ quantization, per-channel int8 weights, uint8 activations calibrated with MinMax.

    uint8 activations x int8 weights (U8S8) rather than ORT's default S8S8: on a CPU with AVX2 but
    no VNNI (this project's CI machine) U8S8 measured 1.8x faster (28.5 vs 51.5 ms/img at batch 16,
    one core), because ORT's x86 kernels are built around VPMADDUBSW (u8 x s8). ORT documents that
    this instruction can saturate; the fidelity gate measures the result, and ResNet-18's held-out
    agreement was unchanged.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{_INPUT: np.ascontiguousarray(c)} for c in _batches(calib)])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return out.read_bytes()


# --- measuring ---------------------------------------------------------------------------------------
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def probs_torchscript(data: bytes, x: np.ndarray, precision: str) -> np.ndarray:
    """Run a TorchScript artifact the way the worker's backend does (channels-last; bf16 = autocast)."""
    with _quiet_torch():
        if precision == "int8":
            torch.backends.quantized.engine = "x86"
        model = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        out = []
        with torch.inference_mode():
            for chunk in _batches(x):
                t = torch.from_numpy(np.ascontiguousarray(chunk)).contiguous(memory_format=torch.channels_last)
                if precision == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out.append(model(t).float().numpy())
                else:
                    out.append(model(t).float().numpy())
    return _softmax(np.concatenate(out))


def probs_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return _softmax(np.concatenate([session.run(None, {_INPUT: np.ascontiguousarray(c)})[0] for c in _batches(x)]))


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement, mean top-5 overlap and max |delta probability| of ``got`` against ``ref``."""
    if len(ref) == 0:
        return {}
    top5_ref = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    top5_got = np.argsort(-got, axis=1, kind="stable")[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_got)])
    return {"top1_agreement": round(float(np.mean(top5_ref[:, 0] == top5_got[:, 0])), 6),
            "top5_overlap": round(float(overlap), 6),
            "max_abs_dprob": round(float(np.max(np.abs(ref - got))), 6),
            "images": int(len(ref))}


def build_variants(model: torch.nn.Module, reference: bytes, precisions: Sequence[str], runtimes: Sequence[str],
                   calibration: CalibrationSet | None, input_size: int = 224) -> list[VariantBuild]:
    """Every requested variant besides the TorchScript fp32 ``reference``, each with its measured fidelity.

    fp32 is always built for each requested runtime: it is ``auto``'s last fallback. Fidelity is
    measured against the reference's own output on the held-out photos (none without calibration).
    """
    if "int8" in precisions and calibration is None:
        raise ModelArtifactError(NO_CALIBRATION)
    holdout = calibration.holdout if calibration is not None else np.zeros((0, 3, input_size, input_size), np.float32)
    ref = probs_torchscript(reference, holdout, "fp32") if len(holdout) else None

    def measured(got: np.ndarray | None) -> dict | None:
        return fidelity(ref, got) if ref is not None and got is not None else None

    def run(label: str, fn):  # noqa: ANN001 - small local helper
        try:
            return fn()
        except Exception as exc:
            raise ModelArtifactError(f"building the {label} variant failed: {exc}") from exc

    builds: list[VariantBuild] = []
    if "torchscript" in runtimes:
        if "bf16" in precisions:
            got = probs_torchscript(reference, holdout, "bf16") if ref is not None else None
            builds.append(VariantBuild("torchscript", "bf16", None, measured(got)))
        if "int8" in precisions:
            data = run("int8/torchscript", lambda: torchscript_int8(model, calibration.calib, input_size))
            got = probs_torchscript(data, holdout, "int8") if ref is not None else None
            builds.append(VariantBuild("torchscript", "int8", data, measured(got)))
    if "onnx" in runtimes:
        fp32 = run("fp32/onnx", lambda: onnx_fp32(model, input_size))
        builds.append(VariantBuild("onnx", "fp32", fp32, measured(probs_onnx(fp32, holdout) if ref is not None
                                                                  else None)))
        if "int8" in precisions:
            data = run("int8/onnx", lambda: onnx_int8(fp32, calibration.calib))
            builds.append(VariantBuild("onnx", "int8", data, measured(probs_onnx(data, holdout) if ref is not None
                                                                      else None)))
    return builds
