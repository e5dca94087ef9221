"""The model directory's manifest: what the artifact is, where its weights came from, and its sha256.

No torch import at module level: the API reads the manifest to report model info and must not pay
for (or even have) torch, and a worker serving ONNX Runtime must not either. ``publish`` is the only
writer and publishes atomically: every content-addressed ``model-<sha12>.pt|.onnx`` first,
``manifest.json`` last, so a worker that reads the manifest always finds the complete artifacts it
names.

One manifest describes several *variants* of the same weights (runtime x precision, see
``Variant``). The top-level ``artifact`` is always the TorchScript fp32 one: the reference every
other variant is measured against, and what a reader from before variants existed loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import ModelArtifactError

MANIFEST_NAME = "manifest.json"
WEIGHTS_SOURCES = ("official-download", "hub-cache", "local-file", "random-init", "fixture")
RUNTIMES = ("torchscript", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
EXTENSIONS = {"torchscript": ".pt", "onnx": ".onnx"}
_FIX = "re-run `pinfer export-model`"


@dataclass(frozen=True)
class Variant:
    """One servable form of the weights.

    ``fidelity`` is what the export measured against the fp32 reference on held-out photos
    (``top1_agreement``, ``top5_overlap``, ``max_abs_dprob``, ``images``); None for the reference
    itself, and for a variant exported without photos to measure on. bf16 shares the fp32
    TorchScript file (it is fp32 weights run under autocast), so its ``artifact`` is that file.
    """

    runtime: str
    precision: str
    artifact: str
    artifact_sha256: str
    fidelity: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.precision}/{self.runtime}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Variant":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Manifest:
    """Everything a worker needs to trust and preprocess for the artifact; ``artifact`` is a file name."""

    artifact: str
    artifact_sha256: str
    weights_source: str
    pretrained: bool
    weights_sha256: str | None = None
    architecture: str = "resnet18"
    name: str = "resnet18"
    input_size: int = 224
    resize: int = 256
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_classes: int = 1000
    torch_version: str = ""
    created_at: str = ""
    seed: int | None = None
    #: Every variant (``Variant.to_dict`` form); empty in manifests from before variants existed.
    variants: list[dict[str, Any]] = field(default_factory=list)
    #: How int8 was calibrated and fidelity measured: folder name, image counts, seed, file-list digest.
    calibration: dict[str, Any] | None = None

    def variant_list(self) -> list[Variant]:
        """The variants; an older manifest is its one TorchScript fp32 artifact."""
        if not self.variants:
            return [Variant("torchscript", "fp32", self.artifact, self.artifact_sha256)]
        return [Variant.from_dict(v) for v in self.variants]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """Unknown keys are ignored so an older reader accepts a newer manifest."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (artifacts are ~45 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Parse ``manifest.json``; any problem becomes a ModelArtifactError that says how to fix it."""
    return load_manifest(model_dir)[0]


def load_manifest(model_dir: str | os.PathLike) -> tuple[Manifest, str]:
    """``read_manifest`` plus the sha256 of the exact bytes parsed: a worker remembers which manifest
    its model came from, so a replaced manifest (a roll-out) is told apart from the one it serves."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        manifest = Manifest.from_dict(json.loads(raw.decode("utf-8")))
    except FileNotFoundError:
        raise ModelArtifactError(f"no model manifest at {path}; {_FIX}", path=str(path)) from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelArtifactError(f"unreadable model manifest {path} ({exc}); {_FIX}", path=str(path)) from None
    if not manifest.artifact or Path(manifest.artifact).name != manifest.artifact:
        raise ModelArtifactError(f"manifest {path} names no plain artifact file ({manifest.artifact!r}); {_FIX}",
                                 path=str(path))
    return manifest, digest


def _verify_file(model_dir: str | os.PathLike, artifact: str, expected: str) -> Path:
    if not artifact or Path(artifact).name != artifact:
        raise ModelArtifactError(f"manifest in {model_dir} names no plain artifact file ({artifact!r}); {_FIX}")
    path = Path(model_dir) / artifact
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelArtifactError(f"model artifact {path} named by the manifest is missing or unreadable "
                                 f"({exc.strerror or exc}); {_FIX}", path=str(path)) from None
    if actual != expected:
        raise ModelArtifactError(f"model artifact {path} sha256 mismatch: manifest expects "
                                 f"{expected}, file has {actual}; {_FIX}",
                                 path=str(path), expected_sha256=expected, actual_sha256=actual)
    return path


def verify_artifact(model_dir: str | os.PathLike) -> tuple[Manifest, Path]:
    """Return the manifest and the reference (TorchScript fp32) artifact path after checking its sha256."""
    manifest = read_manifest(model_dir)
    return manifest, _verify_file(model_dir, manifest.artifact, manifest.artifact_sha256)


def verify_variant(model_dir: str | os.PathLike, variant: Variant) -> Path:
    """The variant's artifact path after checking its sha256: every runtime loads only verified bytes."""
    return _verify_file(model_dir, variant.artifact, variant.artifact_sha256)


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, os.replace: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would lock out a worker running as another user
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _artifact_bytes(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    import torch  # lazily: only writers need it

    buf = io.BytesIO()
    torch.jit.save(source, buf)
    return buf.getvalue()


@dataclass(frozen=True)
class VariantBuild:
    """A variant to publish: its bytes (None = the reference TorchScript fp32 file) and fidelity."""

    runtime: str
    precision: str
    data: bytes | None = None
    fidelity: dict[str, Any] | None = None


def write_artifact(scripted_module_or_bytes_path: Any, model_dir: str | os.PathLike,
                   **manifest_fields: Any) -> Manifest:
    """Publish a TorchScript module (or its saved bytes / file path) as the only variant (fp32)."""
    return publish(scripted_module_or_bytes_path, model_dir, (), **manifest_fields)


def publish(reference: Any, model_dir: str | os.PathLike, extra: Any = (),
            **manifest_fields: Any) -> Manifest:
    """Publish the TorchScript fp32 reference and ``extra`` variants with their manifest, atomically.

    Each artifact gets a content-addressed name (``model-<sha12>.pt`` or ``.onnx``), the manifest is
    replaced last, then artifacts the new manifest does not name are deleted.
    """
    directory = Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = _artifact_bytes(reference)
    sha = hashlib.sha256(data).hexdigest()
    artifact = f"model-{sha[:12]}.pt"
    if manifest_fields.get("weights_source") not in WEIGHTS_SOURCES:
        raise ValueError(f"weights_source must be one of {WEIGHTS_SOURCES}")
    if not manifest_fields.get("torch_version"):
        import torch

        manifest_fields["torch_version"] = torch.__version__
    manifest_fields.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    files = {artifact: data}
    variants = [Variant("torchscript", "fp32", artifact, sha)]
    for build in extra:
        if build.runtime not in RUNTIMES or build.precision not in PRECISIONS:
            raise ValueError(f"unknown variant {build.precision}/{build.runtime}")
        if build.data is None:
            name, digest = artifact, sha
        else:
            digest = hashlib.sha256(build.data).hexdigest()
            name = f"model-{digest[:12]}{EXTENSIONS[build.runtime]}"
            files[name] = build.data
        variant = Variant(build.runtime, build.precision, name, digest, build.fidelity)
        variants = [v for v in variants if v.key != variant.key] + [variant]
    manifest_fields["variants"] = [dataclasses.asdict(v) for v in variants]
    manifest = Manifest(artifact=artifact, artifact_sha256=sha, **manifest_fields)
    for name, blob in files.items():
        _atomic_write(directory, name, blob)
    _fsync_dir(directory)
    _atomic_write(directory, MANIFEST_NAME, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())
    _fsync_dir(directory)
    for old in directory.glob("model-*"):
        if old.suffix in EXTENSIONS.values() and old.name not in files:
            old.unlink(missing_ok=True)
    return manifest
