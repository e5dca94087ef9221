"""One error tree for pinfer.

Every error a client can see has a stable machine-readable ``code`` and the HTTP
``status`` the API answers with; the API maps them to JSON in a single handler
(``api/errors.py``) and the worker stores ``code``/``message`` in failed results,
so the same code means the same thing at submit time and in a result.
"""
from __future__ import annotations


class PinferError(Exception):
    """Base class: raised when pinfer refuses or fails something, with a code a client can act on."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        out: dict = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


# --- bad requests ---------------------------------------------------------------------------
class BadRequest(PinferError):
    """Raised when a request parameter is missing or malformed (not the image itself)."""

    code = "bad_request"
    status = 400


class InvalidParameter(BadRequest):
    """Raised when a parameter such as ``top_k`` or ``wait`` is out of range or not a number."""

    code = "invalid_parameter"


class InvalidWebhook(BadRequest):
    """Raised when a ``webhook`` URL is malformed, unresolvable, or resolves to a refused address."""

    code = "invalid_webhook"


class MissingImage(BadRequest):
    """Raised when a submission carries no image (no ``image`` field and an empty body)."""

    code = "missing_image"


class Unauthorized(PinferError):
    """Raised when API keys are on and a ``/v1`` call has no valid ``Authorization: Bearer`` key."""

    code = "unauthorized"
    status = 401


class NotFound(PinferError):
    """Raised when a prediction or job ID is unknown or its record has expired."""

    code = "not_found"
    status = 404


class Conflict(PinferError):
    """Raised when a job is asked to do something its state forbids (add images after close)."""

    code = "conflict"
    status = 409


class IdempotencyMismatch(PinferError):
    """Raised when an ``Idempotency-Key`` is reused with a different request: the key names one
    request, so the second is refused rather than silently answered with the first one's result."""

    code = "idempotency_mismatch"
    status = 422


class IdempotencyInProgress(PinferError):
    """Raised when a request with the same ``Idempotency-Key`` is still being handled; retry after
    ``retry_after_s`` to get its answer."""

    code = "idempotency_in_progress"
    status = 409

    def __init__(self, message: str, retry_after_s: int = 1, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


# --- image errors: at submit (from the header) or in the worker (full decode) -------------------
class ImageError(PinferError):
    """Raised when an image cannot be classified; subclasses say why."""

    code = "invalid_image"
    status = 422


class UnsupportedFormat(ImageError):
    """Raised when the bytes are not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)."""

    code = "unsupported_format"
    status = 415


class ImageTooLarge(ImageError):
    """Raised when the upload exceeds PINFER_MAX_UPLOAD_BYTES."""

    code = "image_too_large"
    status = 413


class TooManyPixels(ImageError):
    """Raised when width x height exceeds PINFER_MAX_PIXELS (decompression-bomb guard)."""

    code = "too_many_pixels"
    status = 413


class BadAspectRatio(ImageError):
    """Raised when the long side is more than PINFER_MAX_ASPECT_RATIO times the short side."""

    code = "bad_aspect_ratio"
    status = 422


class CorruptImage(ImageError):
    """Raised when the image header is valid but the data is truncated or cannot be decoded."""

    code = "corrupt_image"
    status = 422


class ImageExpired(ImageError):
    """Raised (in the worker) when the stored bytes expired before a worker reached them."""

    code = "image_expired"
    status = 410


# --- capacity / availability --------------------------------------------------------------------
class Overloaded(PinferError):
    """Raised when accepting more would exceed a pending-image bound; the client retries later."""

    code = "overloaded"
    status = 429

    def __init__(self, message: str, retry_after_s: int = 2, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(PinferError):
    """Raised when Redis or the broker cannot be reached; nothing was accepted. ``retry_after_s`` tells
    the client when to try again (sent as ``Retry-After``), so clients back off instead of hammering."""

    code = "service_unavailable"
    status = 503

    def __init__(self, message: str, retry_after_s: int = 2, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


# --- failures that exist only as stored results or process exits ----------------------------------
class ResultError(PinferError):
    """Base of failures a client only ever reads in a result (or an operator in a log), never as an
    HTTP answer: ``status`` is None. Should one reach the API's handler anyway, it answers 500."""

    status = None


class WorkerCrashed(ResultError):
    """Stored when an image ran PINFER_MAX_DELIVERIES times and its worker process died each time
    (at least once with no other image in the forward pass): failed instead of looping forever."""

    code = "worker_crashed"


class InferenceError(ResultError):
    """Raised when the model itself fails on a batch (bad artifact, runtime error)."""

    code = "inference_error"


class Canceled(ResultError):
    """Stored when the image's job was canceled before it ran."""

    code = "canceled"


class ModelArtifactError(ResultError):
    """Raised when the model artifact is missing, or its sha256 does not match its manifest."""

    code = "model_artifact_error"


class WeightsUnavailable(ResultError):
    """Raised when export-model finds no official weights (no --weights, no hub cache, no network)."""

    code = "weights_unavailable"
