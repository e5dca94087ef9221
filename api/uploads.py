"""Request validation shared by the prediction and job routes: parameters and image bytes."""
from __future__ import annotations

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from shared.errors import ImageTooLarge, InvalidParameter, MissingImage
from shared.settings import Settings


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    # Form fields only for multipart: a raw image body must never be parsed as a form.
    source = request.form if request.mimetype == "multipart/form-data" else {}
    raw = request.args.get(name, source.get(name))
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParameter(f"`{name}` must be an integer from {lo} to {hi}, not {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidParameter(f"`{name}` must be from {lo} to {hi}, not {value}")
    return value


def float_param(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter(f"`{name}` must be a number of seconds from {lo:g} to {hi:g}") from None
    if not lo <= value <= hi:
        raise InvalidParameter(f"`{name}` must be from {lo:g} to {hi:g} seconds, not {value:g}")
    return value


def read_capped(stream, settings: Settings) -> bytes:
    """Read at most the upload limit + 1 byte, so an oversized file is refused without buffering it."""
    data = stream.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ImageTooLarge(f"the image is larger than the {settings.max_upload_bytes}-byte limit "
                            "(PINFER_MAX_UPLOAD_BYTES)", limit=settings.max_upload_bytes)
    return data


def single_image(request: Request, settings: Settings) -> bytes:
    """The image of a submission: multipart field ``image``, else the raw body.

    The body is capped at the upload limit (+ multipart overhead) before anything is read, so an
    oversized upload costs no memory.
    """
    request.max_content_length = settings.max_upload_bytes + 64 * 1024
    try:
        return _single_image(request, settings)
    except RequestEntityTooLarge:
        raise ImageTooLarge(f"the upload is larger than the {settings.max_upload_bytes}-byte limit "
                            "(PINFER_MAX_UPLOAD_BYTES)", limit=settings.max_upload_bytes) from None


def _single_image(request: Request, settings: Settings) -> bytes:
    if request.mimetype == "multipart/form-data":
        f = request.files.get("image")
        if f is None:
            raise MissingImage("send the image in the multipart field `image` (or as the raw request body)")
        data = read_capped(f.stream, settings)
    else:
        data = request.get_data(cache=False, parse_form_data=False)  # capped by MAX_CONTENT_LENGTH
        if len(data) > settings.max_upload_bytes:
            raise ImageTooLarge(f"the image is larger than the {settings.max_upload_bytes}-byte limit "
                                "(PINFER_MAX_UPLOAD_BYTES)", limit=settings.max_upload_bytes)
    if not data:
        raise MissingImage("the request carries no image: send it in the multipart field `image` "
                           "or as the raw request body")
    return data
