"""Image bytes -> uint8 RGB array, for any file a bucket may hold.

EXIF orientation is applied (width and height are those of the image as
viewed), every Pillow mode is converted to 8-bit RGB, and Pillow's
decompression-bomb limit stays on. Anything that cannot be decoded raises
:class:`DecodeError` with a short, stable message of the form
``decode: <reason>`` that a batch job stores in its error column.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

# Truncated files must fail, not decode half an image silently.
Image.LOAD_TRUNCATED_IMAGES = False

# Alpha is composited over white: what a viewer shows on a page, and it keeps
# the colour under fully transparent pixels (often arbitrary) out of the model.
_ALPHA_BACKGROUND = (255, 255, 255)


class DecodeError(ValueError):
    """An image that cannot be decoded; ``str(err)`` is ``"decode: <reason>"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"decode: {reason}")
        self.reason = reason


def decode_image(data: bytes, uri: str = "") -> np.ndarray:
    """Decode encoded image bytes to a uint8 array [H, W, 3], RGB, EXIF-oriented.

    ``uri`` is only used to let callers keep it beside the error; the format is
    sniffed from the bytes, never trusted from the file name. Multi-frame files
    (GIF, TIFF) give their first frame.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # Over the limit -> warning, over twice the limit -> error: both refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size)
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
        image = _oriented(image)
        return _to_rgb(image)
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
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "truncated" in lowered:
        return "image file is truncated"
    if "cannot identify image file" in lowered:
        return "cannot identify image file"
    text = re.sub(r"\s*<[^>]*>", "", text)  # "<_io.BytesIO object at 0x...>"
    return text[:120] or type(exc).__name__


def _oriented(image: Image.Image) -> Image.Image:
    """``image`` rotated/flipped as its EXIF orientation says (a no-op without one)."""
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:
        # A broken EXIF block does not make the pixels unusable: keep them as stored.
        return image
    return oriented if oriented is not None else image


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
