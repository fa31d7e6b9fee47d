"""decode_image on every odd or broken input a bucket may hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.formats.decode import DecodeError, decode_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=2).astype(
        np.uint8
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels (no pixel data needed)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_rgb_png_is_lossless():
    rgb = gradient_rgb()
    out = decode_image(encode(Image.fromarray(rgb), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, rgb)


def test_zero_bytes():
    with pytest.raises(DecodeError) as err:
        decode_image(b"")
    assert str(err.value) == "decode: empty file"


def test_text_named_jpg():
    with pytest.raises(DecodeError) as err:
        decode_image(b"this is not an image\n" * 10)
    assert str(err.value) == "decode: cannot identify image file"


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_jpeg(keep):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), "JPEG", quality=95)
    with pytest.raises(DecodeError) as err:
        decode_image(data[: int(len(data) * keep)])
    assert str(err.value) == "decode: image file is truncated"


def test_16bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 32 * 40).reshape(32, 40).astype(np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.shape == (32, 40, 3)
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    assert out.max() == 255 and out.min() == 0  # clipping would saturate most pixels
    assert 100 < out.mean() < 155


def test_cmyk_jpeg():
    rgb = gradient_rgb()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6


def test_greyscale():
    grey = gradient_rgb()[:, :, 0]
    out = decode_image(encode(Image.fromarray(grey, "L"), "PNG"))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_one_bit():
    bits = gradient_rgb()[:, :, 0] > 128
    out = decode_image(encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(out[:, :, 1], np.where(bits, 255, 0))


def test_rgba_composited_over_white():
    rgb = gradient_rgb()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 32:] = 255
    out = decode_image(encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[:, 32:], rgb[:, 32:])
    assert (out[:, :32] == 255).all()


def test_palette_png():
    rgb = gradient_rgb()
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    data = encode(palette_image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    np.testing.assert_array_equal(out, np.asarray(palette_image.convert("RGB")))


def test_palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    data = encode(image, "PNG", transparency=0)
    out = decode_image(data)
    assert (out[:, :4] == [0, 0, 255]).all()
    assert (out[:, 4:] == 255).all()  # index 0 is transparent -> white


def test_gif_first_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out.shape == (8, 8, 3) and abs(int(out.mean()) - 10) <= 2


def test_exif_rotated():
    rgb = gradient_rgb(48, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored rotated, view by rotating 90 degrees clockwise
    data = encode(Image.fromarray(rgb), "PNG", exif=exif)
    out = decode_image(data)
    assert out.shape == (64, 48, 3)  # width and height swapped
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))


def test_one_by_one():
    out = decode_image(encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"))
    assert out.shape == (1, 1, 3) and out.tolist() == [[[7, 8, 9]]]


def test_decompression_bomb_over_twice_the_limit():
    with pytest.raises(DecodeError) as err:
        decode_image(png_header_only(20000, 20000))
    assert str(err.value) == (
        f"decode: decompression bomb (400000000 pixels > limit {Image.MAX_IMAGE_PIXELS})"
    )


def test_decompression_bomb_just_over_the_limit_is_an_error_too():
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 10
    with pytest.raises(DecodeError) as err:
        decode_image(png_header_only(side, side))
    assert str(err.value).startswith("decode: decompression bomb (")


def test_16bit_float_tiff():
    values = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    data = encode(Image.fromarray(values, "F"), "TIFF")
    out = decode_image(data)
    np.testing.assert_array_equal(out[:, :, 0], np.rint(values * 255).astype(np.uint8))
