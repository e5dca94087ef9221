"""Opening untrusted image bytes safely: a cheap header ``probe`` and a full ``decode`` to RGB.

The API process imports this module to refuse bad uploads at submit time, so it uses Pillow only
(no numpy, no torch). Both entry points share one set of checks, so an image refused by a worker
(``decode``) for its size or format would already have been refused at submit (``probe``).

Safety rules, and why:

* Pillow is only ever asked to try our six formats (``formats=`` of ``Image.open``): it never
  guesses other plugins, so an EPS upload can never reach Ghostscript and ICO/PSD/... are refused.
* ``Image.MAX_IMAGE_PIXELS`` is set to ``None`` for the whole process when this module is imported.
  Pillow's own bomb check runs inside ``Image.open`` *before* we see the size, and answers with a
  ``DecompressionBombWarning`` (over 89M pixels) or ``DecompressionBombError`` (over 179M) whatever
  PINFER_MAX_PIXELS says. With it off, our ``max_pixels`` check is the one that applies, always right
  after the header is read and before any pixel is allocated. The one format whose *opening*
  allocates pixels is WebP (libwebp's decoder allocates the canvas), so its size is read from the
  RIFF header by hand and checked before Pillow sees the file. Other code in the process must not
  open untrusted images with Pillow directly: it should go through this module.
* ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off: a truncated upload is an error, not a grey half.
* Every failure while decoding becomes a ``shared.errors.ImageError`` subclass: Pillow's decoders
  raise a zoo of types on hostile input (OSError, SyntaxError, ValueError, struct.error, EOFError,
  IndexError, ...) and a worker must be able to fail one image without failing its batch.

Kept as one file of about 320 lines on purpose: ``probe`` and ``decode`` must apply the same checks,
and the rules above only hold while both sit next to the one place that states them.
"""
from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageOps

from shared.errors import (
    BadAspectRatio,
    CorruptImage,
    ImageError,
    ImageTooLarge,
    TooManyPixels,
    UnsupportedFormat,
)
from shared.settings import Settings

# Our own max_pixels check replaces Pillow's (see the module docstring).
Image.MAX_IMAGE_PIXELS = None

SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
"""Formats accepted; Pillow's "MPO" (a JPEG with extra frames, as phones write) is reported as JPEG."""

# Pillow plugin IDs handed to Image.open; MPO files are opened by the JPEG plugin.
_PILLOW_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_ALIASES = {"MPO": "JPEG"}
_SUPPORTED_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF"

# Magic numbers of our formats: a file that starts like one of them but that Pillow cannot open is
# corrupt (422), not of an unsupported format (415).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

# A few formats clients commonly send by mistake, named in the error so the fix is obvious.
_OTHER_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"%!PS", 0, "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"%PDF", 0, "PDF"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
)


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. ``width``/``height`` are the header's: before EXIF orientation for JPEG,
    PNG and WebP (Pillow already swaps them for a rotated TIFF). The checks do not depend on
    orientation, and finding it in a PNG can take a full decode, so probe does not look."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe(data: bytes, settings: Settings) -> ImageInfo:
    """Read the header and apply every upload check, without decoding pixels (API submit path).

    Raises ImageTooLarge, UnsupportedFormat, CorruptImage (header of a supported format but
    unreadable), TooManyPixels or BadAspectRatio.
    """
    webp = _precheck(data, settings)
    if webp is not None:
        # Pillow would copy the whole file into libwebp and allocate the canvas just to report this.
        return webp
    return _open(data, settings)[1]


def decode(data: bytes, settings: Settings, draft_to: int | None = None, *, rgb: bool = True) -> Image.Image:
    """Decode the first frame to an upright RGB image (worker path); never raises anything but
    ``ImageError`` subclasses, whatever the bytes.

    ``draft_to``: when set and the image is a JPEG at least twice that size on its shorter side,
    libjpeg decodes at 1/2, 1/4 or 1/8 scale (much faster for camera photos) while keeping the
    shorter side >= ``draft_to``, so a later resize to that size only ever scales down.

    ``rgb=False`` returns the upright image in the mode it was decoded in, for a caller that crops
    first and converts only the pixels it keeps (then it must call ``to_rgb``, which gives the same
    pixels as converting here).
    """
    _precheck(data, settings)
    img, info = _open(data, settings)
    try:
        if draft_to is not None and info.format == "JPEG" and min(info.width, info.height) >= 2 * draft_to:
            # Pillow picks scale = the largest of 8/4/2/1 not above min(W // tw, H // th); asking for
            # a square of draft_to makes that short // draft_to, so short / scale >= draft_to.
            img.draft("RGB", (draft_to, draft_to))
        img.load()
        _exif_transpose(img)
        return _to_rgb(img) if rgb else img
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the module docstring: untrusted bytes, any decoder error
        raise CorruptImage(f"the {info.format} image could not be decoded ({_describe(exc)})",
                           format=info.format) from None


# --- internals -----------------------------------------------------------------------------------
def _precheck(data: bytes, settings: Settings) -> ImageInfo | None:
    """Checks that need no parser: upload size, emptiness and, for WebP, the RIFF header (returned).

    libwebp allocates the whole canvas when Pillow opens a WebP file, so its size is read by hand and
    checked before Pillow ever sees one.
    """
    size = len(data)
    if size > settings.max_upload_bytes:
        raise ImageTooLarge(f"upload is {size} bytes; the limit is {settings.max_upload_bytes} bytes",
                            bytes=size, max_bytes=settings.max_upload_bytes)
    if size == 0:
        raise UnsupportedFormat(f"the upload is empty; send an image ({_SUPPORTED_TEXT})",
                                supported=sorted(SUPPORTED_FORMATS))
    head = bytes(data[:32])
    if _sniff(head) != "WEBP":
        return None
    header = _webp_header(head)
    if header is None:
        raise CorruptImage("the WebP header is unreadable", format="WEBP")
    width, height, mode = header
    _check_dimensions(width, height, settings)
    return ImageInfo(format="WEBP", width=width, height=height, mode=mode)


def _open(data: bytes, settings: Settings) -> tuple[Image.Image, ImageInfo]:
    """Open lazily (header only) and run the size checks; call after ``_precheck``."""
    head = bytes(data[:32])
    sniffed = _sniff(head)
    try:
        img = Image.open(BytesIO(data), formats=_PILLOW_FORMATS)
        fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
        width, height = img.size
        mode = img.mode
    except Exception as exc:  # noqa: BLE001 - plugins raise many types on a broken header
        if sniffed is not None:
            raise CorruptImage(f"the file starts like a {sniffed} image but its header is unreadable "
                               f"({_describe(exc)})", format=sniffed) from None
        raise _unsupported(head) from None
    if fmt not in SUPPORTED_FORMATS:  # cannot happen with formats= above; kept as a guard
        raise _unsupported(head)
    _check_dimensions(width, height, settings)
    return img, ImageInfo(format=fmt, width=width, height=height, mode=mode)


def _check_dimensions(width: int, height: int, settings: Settings) -> None:
    """The pixel and aspect limits, in that order (a 1 x 80M strip is reported as too many pixels)."""
    if width < 1 or height < 1:
        raise CorruptImage(f"the header declares an empty image ({width}x{height})", width=width, height=height)
    pixels = width * height
    if pixels > settings.max_pixels:
        raise TooManyPixels(f"the image is {width}x{height} = {pixels} pixels; the limit is "
                            f"{settings.max_pixels} pixels", width=width, height=height, pixels=pixels,
                            max_pixels=settings.max_pixels)
    ratio = max(width, height) / min(width, height)
    if ratio > settings.max_aspect_ratio:
        raise BadAspectRatio(f"the image is {width}x{height}, a {ratio:.1f}:1 aspect ratio; the limit is "
                             f"{settings.max_aspect_ratio:g}:1", width=width, height=height,
                             ratio=round(ratio, 2), max_aspect_ratio=settings.max_aspect_ratio)


def _sniff(head: bytes) -> str | None:
    """Which of our formats the first bytes announce, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def _webp_header(head: bytes) -> tuple[int, int, str] | None:
    """Canvas size and mode from the first chunk of a WebP file (VP8X, VP8 or VP8L), per the spec."""
    if len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        mode = "RGBA" if head[20] & 0x10 else "RGB"  # the ALPHA flag
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1, mode
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(head[26:28], "little") & 0x3FFF,
                int.from_bytes(head[28:30], "little") & 0x3FFF, "RGB")
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        mode = "RGBA" if bits >> 28 & 1 else "RGB"  # alpha_is_used
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1, mode
    return None


def _unsupported(head: bytes) -> UnsupportedFormat:
    """UnsupportedFormat naming what we accept and, when recognisable, what was sent."""
    detected = next((name for magic, at, name in _OTHER_MAGIC if head[at:at + len(magic)] == magic), None)
    what = f"{detected} images are not supported" if detected else "the upload is not an image in a supported format"
    details: dict[str, object] = {"supported": sorted(SUPPORTED_FORMATS)}
    if detected:
        details["detected"] = detected
    return UnsupportedFormat(f"{what}; send {_SUPPORTED_TEXT}", **details)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exif_transpose(img: Image.Image) -> None:
    """Turn the image upright per its EXIF (or XMP) orientation, in place (no copy when upright).

    A damaged EXIF block must not cost the user their image: if Pillow cannot read the orientation
    the pixels are used as stored.
    """
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - unreadable metadata, not unreadable pixels
        pass


def to_rgb(img: Image.Image) -> Image.Image:
    """``decode``'s conversion to RGB, for an image from ``decode(..., rgb=False)`` (or a crop of
    one); like ``decode`` it raises only ``ImageError`` subclasses."""
    try:
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in decode: any converter error is this image's fault
        raise CorruptImage(f"the image could not be converted to RGB ({_describe(exc)})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB with ``Image.convert("RGB")`` semantics (as torchvision's loader),
    except high-bit-depth greys, which ``convert`` would clip at 255 instead of scaling."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        # Same pixels as convert("RGB") (alpha dropped, palette colours kept), minus Pillow's
        # "should be converted to RGBA" warning.
        return img.convert("RGBA").convert("RGB")
    if mode.startswith("I;16"):
        # 16-bit samples: keep the high byte (what libpng does for 16-bit RGB).
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("RGB")
    if mode in ("I", "F"):
        return _scale_wide(img).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        pass
    try:
        return img.convert("RGBA").convert("RGB")
    except ValueError:
        raise UnsupportedFormat(f"images in colour mode {mode} are not supported", mode=mode) from None


def _scale_wide(img: Image.Image) -> Image.Image:
    """Map a 32-bit int or float image to 0..255 (mode L).

    The mode does not say the bit depth, so the value range decides: integers within 0..255 are
    already 8-bit, within 0..65535 they are 16-bit (high byte kept); floats within 0..1 are
    normalised; anything else is stretched from its minimum to its maximum.
    """
    lo, hi = img.getextrema()
    if img.mode == "I":
        if 0 <= lo and hi <= 255:
            return img.convert("L")
        if 0 <= lo and hi <= 65535:
            return img.point(lambda v: v * (1 / 256)).convert("L")
    else:
        if 0 <= lo and hi <= 1:
            return img.point(lambda v: v * 255).convert("L")
        if 0 <= lo and hi <= 255:
            return img.convert("L")
    if hi <= lo:
        return Image.new("L", img.size, 0)
    scale = 255 / (hi - lo)
    return img.point(lambda v: v * scale - lo * scale).convert("L")


__all__ = ["SUPPORTED_FORMATS", "ImageInfo", "probe", "decode", "to_rgb"]
