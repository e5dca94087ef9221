"""Image bytes -> the normalised float32 tensor ResNet-18 expects, without torch.

``exact`` reproduces torchvision's ImageNet evaluation pipeline on PIL images, so predictions match
what the model was trained and validated with::

    Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(MEAN, STD)

``fast`` computes the same 224 x 224 window of the same resized image, only more cheaply:

* large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``), keeping
  the shorter side >= 256 so the rest only ever scales down;
* the crop is done before the resize: the crop window is mapped back to source coordinates and
  ``Image.resize(box=...)`` resamples only those pixels (Pillow's filter places its samples exactly
  where resize-then-crop would: this step alone moves a value by at most one 8-bit level, rounding);
* ``reducing_gap`` lets Pillow box-average by an integer factor before the bilinear filter when the
  window shrinks a lot (big PNGs, or JPEGs beyond libjpeg's 1/8);
* images not in RGB are cropped before they are converted, and a greyscale image is never
  converted at all (its one plane is broadcast to three channels while normalising);
* normalisation is one multiply-add per element with a precomputed per-channel scale and offset
  instead of torchvision's divide, subtract, divide (within 1e-6 of it).

The output contract is the same in both modes: float32 (3, H, W), C-contiguous. Tolerance: where
fast decodes at full scale and does not box-average (JPEGs whose shorter side is under 512 px,
other images under 1536 px), every value is within one 8-bit level, 1 / (255 * std), of exact: the
window is the same, a pixel may round the other way. Elsewhere the tests bound the mean difference;
the figures per format, and the speed-up, are measured by ``bench/preprocess_fast_vs_exact.py`` and
quoted in the README ("Preprocessing").

The worker pays for numpy here; the API never imports this module (it only probes, see images.py).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from shared.images import decode, to_rgb
from shared.settings import Settings

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
RESIZE = 256
RESIZE_MODES = ("exact", "fast")

REDUCING_GAP = 3.0
"""``fast``: Pillow box-averages by ``int(scale / REDUCING_GAP)`` before resampling, so the bilinear
filter always covers at least this many source pixels per output pixel. Pillow's documentation
calls 3.0 indistinguishable from a plain resize in most cases (2.0 is its thumbnail default)."""

# Modes whose conversion to RGB looks at the whole image (the value range of 32-bit images, see
# shared.images): converted before cropping, so a crop gives the same pixels as the whole image.
_CONVERT_BEFORE_CROP = frozenset({"I", "F"})


def preprocess(data: bytes, settings: Settings, *, out: np.ndarray | None = None, resize: int = RESIZE,
               input_size: int = INPUT_SIZE, mean: Sequence[float] = MEAN,
               std: Sequence[float] = STD) -> np.ndarray:
    """Decode ``data`` and return its (3, input_size, input_size) float32 tensor, in the
    ``settings.resize`` mode. Raises ``shared.errors.ImageError`` subclasses for bad images.

    ``out``: a float32 (3, input_size, input_size) C-contiguous array (e.g. ``batch[i]``) to write
    into instead of allocating. ``resize``/``input_size``/``mean``/``std`` default to the ImageNet
    values and exist so a worker can take them from the model manifest.
    """
    if settings.resize not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {settings.resize!r}")
    if settings.resize == "fast":
        img = decode(data, settings, draft_to=resize, rgb=False)
        return preprocess_image_fast(img, out=out, resize=resize, input_size=input_size, mean=mean, std=std)
    img = decode(data, settings)
    return preprocess_image(img, out=out, resize=resize, input_size=input_size, mean=mean, std=std)


def preprocess_image(img: Image.Image, *, out: np.ndarray | None = None, resize: int = RESIZE,
                     input_size: int = INPUT_SIZE, mean: Sequence[float] = MEAN,
                     std: Sequence[float] = STD) -> np.ndarray:
    """The part after decoding: resize the shorter side, centre-crop, scale to 0..1, normalise.

    Cropping happens on the PIL image, so numpy only ever sees input_size x input_size pixels.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = center_crop(resize_shorter(img, resize), input_size)
    pixels = np.asarray(img)  # (H, W, 3) uint8, one copy
    out = _output(out, input_size)
    # ToTensor then Normalize, in torchvision's order and precision (float32 throughout), in place.
    np.copyto(out, pixels.transpose(2, 0, 1), casting="unsafe")
    out /= np.float32(255)
    out -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return out


def preprocess_image_fast(img: Image.Image, *, out: np.ndarray | None = None, resize: int = RESIZE,
                          input_size: int = INPUT_SIZE, mean: Sequence[float] = MEAN,
                          std: Sequence[float] = STD) -> np.ndarray:
    """``fast`` after decoding (see the module docstring): the window ``preprocess_image`` would cut
    from the resized image, resampled straight from ``img`` (any mode ``decode`` returns with
    ``rgb=False``), converted to RGB after cropping, normalised in one multiply-add."""
    if img.mode in _CONVERT_BEFORE_CROP:
        img = to_rgb(img)
    box = resized_crop_box(img.size, resize, input_size)
    if box is None:  # a padded crop (only with a manifest where resize < input_size): the plain steps
        window = center_crop(resize_shorter(to_rgb(img), resize), input_size)
    else:
        same_size = img.size == _resized_size(*img.size, resize)
        if img.mode not in ("RGB", "L"):
            # Crop to the source pixels the filter reads and convert only those (to_rgb is per pixel
            # for these modes; RGBA must be flattened first anyway: Pillow's resize premultiplies it).
            safe = _support_box(img.size, box, input_size)
            img = to_rgb(img.crop(safe))
            box = (box[0] - safe[0], box[1] - safe[1], box[2] - safe[0], box[3] - safe[1])
        if same_size:  # nothing to resample: an integer crop
            window = img.crop(tuple(round(v) for v in box))
        else:
            window = img.resize((input_size, input_size), Image.Resampling.BILINEAR, box=box,
                                reducing_gap=REDUCING_GAP)
    pixels = np.asarray(window)  # (S, S, 3) or, for greyscale, (S, S) uint8
    chw = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]  # grey: broadcast to 3
    out = _output(out, input_size)
    scale, offset = _affine(tuple(mean), tuple(std))
    np.multiply(chw, scale, out=out)
    out += offset
    return out


def resized_crop_box(size: tuple[int, int], resize: int = RESIZE,
                     input_size: int = INPUT_SIZE) -> tuple[float, float, float, float] | None:
    """The region of an image of ``size`` that ``center_crop(resize_shorter(img, resize),
    input_size)`` shows, in the image's own coordinates; None when that crop pads (the resized
    image is smaller than the window) and so has no such region."""
    w, h = size
    new_w, new_h = _resized_size(w, h, resize)
    left, top = _crop_start(new_w, input_size), _crop_start(new_h, input_size)
    if left < 0 or top < 0:
        return None
    sx, sy = w / new_w, h / new_h
    # min(): float rounding must not put the box past the edge (Pillow refuses that).
    return (left * sx, top * sy, min(w, (left + input_size) * sx), min(h, (top + input_size) * sy))


def _support_box(size: tuple[int, int], box: tuple[float, float, float, float],
                 input_size: int) -> tuple[int, int, int, int]:
    """Integer bounds of the source pixels the bilinear filter reads for ``box`` (its support is
    one output pixel each side, in source pixels at least one), with a pixel of margin."""
    w, h = size
    sx = max((box[2] - box[0]) / input_size, 1.0)
    sy = max((box[3] - box[1]) / input_size, 1.0)
    return (max(0, int(box[0] - sx) - 1), max(0, int(box[1] - sy) - 1),
            min(w, int(box[2] + sx) + 2), min(h, int(box[3] + sy) + 2))


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``'s output size: shorter side ``size``, longer truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


@lru_cache(maxsize=8)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``scale``, ``offset`` with ``v * scale + offset == (v / 255 - mean) / std``,
    computed in float64 and rounded once to float32 (read-only: shared between calls)."""
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * s)).astype(np.float32).reshape(3, 1, 1)
    offset = (-m / s).astype(np.float32).reshape(3, 1, 1)
    scale.flags.writeable = offset.flags.writeable = False
    return scale, offset


def _output(out: np.ndarray | None, input_size: int) -> np.ndarray:
    if out is None:
        return np.empty((3, input_size, input_size), dtype=np.float32)
    if out.shape != (3, input_size, input_size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape (3, {input_size}, {input_size})")
    return out


def resize_shorter(img: Image.Image, size: int = RESIZE) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the shorter side becomes ``size``, the longer
    ``int(size * long / short)`` (truncated), bilinear with Pillow's default antialiasing support
    and no ``reducing_gap`` (torchvision passes none)."""
    w, h = img.size
    new_w, new_h = _resized_size(w, h, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """torchvision ``CenterCrop(size)``: offsets ``int(round((len - size) / 2))`` (Python's
    round-half-even); a side shorter than ``size`` is padded with black, ``(size - len) // 2``
    before it, as torchvision pads. PIL's crop fills outside the image with zeros."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    left, top = _crop_start(w, size), _crop_start(h, size)
    return img.crop((left, top, left + size, top + size))


def _crop_start(length: int, size: int) -> int:
    if length < size:
        return -((size - length) // 2)
    return int(round((length - size) / 2.0))


__all__ = ["MEAN", "STD", "INPUT_SIZE", "RESIZE", "RESIZE_MODES", "REDUCING_GAP", "preprocess",
           "preprocess_image", "preprocess_image_fast", "resized_crop_box", "resize_shorter", "center_crop"]
