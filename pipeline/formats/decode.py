"""Image bytes -> uint8 RGB array, for any file a bucket may hold.

EXIF orientation is applied (width and height are those of the image as
viewed), every Pillow mode is converted to 8-bit RGB, and Pillow's
decompression-bomb limit stays on. Anything that cannot be decoded raises
:class:`DecodeError` with a short, stable message of the form
``decode: <reason>`` that a batch job stores in its error column.

:func:`decode_for_model` also shrinks a huge image (at least REDUCE_FROM times
the size the model takes it at) by an integer box filter while decoding it
(JPEG: in the decoder itself), so that a 50-megapixel photo costs neither its
full size in float32 copies nor seconds of resizing; the pixel limit still
applies to the size the file declares.
"""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline.storage import first_line

# Truncated files must fail, not decode half an image silently.
Image.LOAD_TRUNCATED_IMAGES = False

# Alpha is composited over white: what a viewer shows on a page, and it keeps
# the colour under fully transparent pixels (often arbitrary) out of the model.
_ALPHA_BACKGROUND = (255, 255, 255)

# decode_for_model shrinks images whose sides are at least this many times what
# the model resizes them to. Below it, the image reaches the model's resize whole,
# so results equal predict() on the decoded image bit for bit; above it, a box
# filter first (an antialiased reduction, not what the model's bilinear resize
# alone gives) keeps memory and time near those of an ordinary image.
REDUCE_FROM = 4
# Modes Pillow's reduce() averages as colours (not, e.g., palette indices).
_REDUCIBLE_MODES = ("RGB", "L")


class DecodeError(ValueError):
    """An image that cannot be decoded; ``str(err)`` is ``"decode: <reason>"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"decode: {reason}")
        self.reason = reason


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to a uint8 array [H, W, 3], RGB, EXIF-oriented.

    The format is sniffed from the bytes, never trusted from a file name (callers
    keep the URI beside the error). Multi-frame files (GIF, TIFF) give their first
    frame.
    """
    return _decode(data, None)[0]


def decode_for_model(
    data: bytes, min_size: int, max_size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """(rgb, (height, width)): uint8 [h, w, 3] RGB, EXIF-oriented, and the full size as viewed.

    For a model that resizes images to ``min_size`` / ``max_size`` (the
    short side to min_size unless the long side passes max_size): an image at
    least REDUCE_FROM times larger than that is shrunk by the integer factor
    :func:`reduction_factor` gives, so [h, w] stays at least the model's input
    size; any other image is returned whole (h, w = height, width), as
    :func:`decode_image` returns it.
    """
    return _decode(data, (min_size, max_size))


def reduction_factor(width: int, height: int, min_size: int, max_size: int) -> int:
    """The integer factor decode_for_model shrinks a width x height image by (1: none).

    floor(1 / scale), scale being the model's resize scale, when that is at
    least REDUCE_FROM: the shrunk image is still no smaller than the model's input.
    """
    scale = min(min_size / min(width, height), max_size / max(width, height))
    factor = math.floor(1.0 / scale)
    return factor if factor >= REDUCE_FROM else 1


def _decode(data: bytes, model_size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    if not data:
        raise DecodeError("empty file")
    drafted = 1
    try:
        with warnings.catch_warnings():
            # Over the limit -> warning, over twice the limit -> error: both refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size)
            stored_w, stored_h = image.size
            factor = reduction_factor(stored_w, stored_h, *model_size) if model_size else 1
            if factor > 1 and image.format == "JPEG":
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding: most of the factor, free.
                target = (-(-stored_w // factor), -(-stored_h // factor))
                draft = image.draft(None, target)
                if draft is not None:
                    drafted = max(1, round(stored_w / draft[1][2]))
            image.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(_bomb_reason(str(exc))) from None
    except MemoryError:
        raise DecodeError("out of memory") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise DecodeError(_short_reason(exc)) from None
    try:
        image, swapped = _oriented(image)
        size = (stored_w, stored_h) if swapped else (stored_h, stored_w)
        rest = factor // drafted
        if rest < 2:
            return _to_rgb(image), size
        if image.mode in _REDUCIBLE_MODES:
            return _to_rgb(image.reduce(rest)), size
        return np.array(Image.fromarray(_to_rgb(image)).reduce(rest)), size
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("out of memory") from None
    except Exception as exc:
        raise DecodeError(_short_reason(exc)) from None


def _check_pixels(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit and pixels > limit:
        raise DecodeError(f"decompression bomb ({pixels} pixels > limit {limit})")
    if pixels == 0:
        raise DecodeError("image has no pixels")


def _bomb_reason(message: str) -> str:
    # Pillow's message names twice the limit past which it refuses outright;
    # report the configured limit, which is what refusing here is about.
    numbers = [int(n) for n in re.findall(r"\d+", message)]
    if numbers and Image.MAX_IMAGE_PIXELS:
        return f"decompression bomb ({numbers[0]} pixels > limit {Image.MAX_IMAGE_PIXELS})"
    return "decompression bomb"


def _short_reason(exc: BaseException) -> str:
    """A one-line reason without object addresses or byte counts that vary."""
    text = first_line(exc)
    lowered = text.lower()
    if "truncated" in lowered:
        return "image file is truncated"
    if "cannot identify image file" in lowered:
        return "cannot identify image file"
    text = re.sub(r"\s*<[^>]*>", "", text)  # "<_io.BytesIO object at 0x...>"
    return text[:120] or type(exc).__name__


def _oriented(image: Image.Image) -> tuple[Image.Image, bool]:
    """(``image`` rotated/flipped as its EXIF orientation says, whether its axes swapped).

    A no-op without an orientation.
    """
    try:
        swapped = image.getexif().get(0x0112) in (5, 6, 7, 8)  # transposes and 90-degree turns
        oriented = ImageOps.exif_transpose(image)
    except Exception:
        # A broken EXIF block does not make the pixels unusable: keep them as stored.
        return image, False
    return (oriented, swapped) if oriented is not None else (image, False)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] from a Pillow image of any mode.

    16-bit and 32-bit integer greyscale is scaled to 8 bits (not clipped);
    float images in 0..1 are scaled by 255, other ranges are stretched to 0..255.
    """
    mode = image.mode
    if mode == "RGB":
        rgb = np.asarray(image)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        rgb = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    elif mode.startswith("I;16") or mode in ("I", "F"):
        rgb = np.repeat(_scale_to_uint8(np.asarray(image), mode)[:, :, None], 3, axis=2)
    else:  # 1, L, P, CMYK, YCbCr, LAB, HSV
        try:
            rgb = np.asarray(image.convert("RGB"))
        except ValueError:
            raise DecodeError(f"unsupported image mode {mode}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DecodeError(f"unsupported image mode {mode}")
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:  # Pillow's buffers are read-only
        rgb = np.array(rgb, order="C")
    return rgb


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel integer or float pixels [H, W] -> uint8 [H, W]."""
    values = values.astype(np.float64)
    if mode == "F":
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = values
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else values * 0.0
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 65535.0:  # 16-bit data (I;16, or I from a 16-bit file)
            scaled = values / 257.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else values * 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
