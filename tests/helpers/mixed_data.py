"""Image sets for bad-data-at-scale runs.

:func:`write_mixed_set` writes N files as a bucket of user images may hold them:
about 10% broken (every broken kind the segment tests use), a few in odd
modes, a few huge (sides more than 10x the tiny preset's max_size of 224; one
past Pillow's decompression-bomb limit, which pipeline/formats/decode.py keeps on), a
few tiny (1x1, 2x3, 5x5), and ordinary shapes pictures for the rest, in a
seeded random order so that the odd ones are spread through the listing.
:func:`write_clean_set` writes N ordinary pictures only. Both return, per file,
what segment must make of it (:class:`Expected`).

:func:`bad_image_files` is the set of odd and broken files the segment tests
use (tests/segment/test_driver.py builds its inputs from it).

Used by tests/fault/test_bad_data_at_scale.py and bench/bad_data_bench.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.formats.shapes import draw_shapes_image, png_bytes

# --- single files ------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """``image`` saved as ``fmt`` (a Pillow format name) to bytes; PNG by the pipeline's
    encoder (pipeline.formats.shapes.png_bytes)."""
    if fmt == "PNG":
        return png_bytes(image, **kwargs)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb: a PNG whose header claims width x height 1-bit pixels, with
    (nearly) no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def bomb_reason(width: int, height: int) -> str:
    """The error segment stores for an image over Pillow's pixel limit (pipeline/formats/decode.py)."""
    return f"decode: decompression bomb ({width * height} pixels > limit {Image.MAX_IMAGE_PIXELS})"


# Broken files: the exact reason segment stores for each (what the tests assert).
BAD_IMAGE_ERRORS = {
    "zero.jpg": "decode: empty file",
    "truncated.jpg": "decode: image file is truncated",
    "text.jpg": "decode: cannot identify image file",
    "bomb.png": bomb_reason(20000, 20000),
}
# Odd files that decode: (width, height) as viewed where it is not the stored size.
BAD_IMAGE_SIZES = {"rotated.JPG": (72, 96), "dot.png": (1, 1), "deep16.png": (90, 70)}


def bad_image_files(rng: np.random.Generator) -> dict[str, bytes]:
    """name -> bytes: each broken kind (BAD_IMAGE_ERRORS) and each odd mode that decodes
    (16-bit, CMYK, grey, RGBA, palette, EXIF-rotated, 1x1)."""
    rgb = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(rgb), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96 wide x 72 high, viewed rotated: 72 wide x 96 high
    alpha = np.full((72, 96), 255, np.uint8)
    alpha[:, :40] = 0
    return {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"just some text, not a picture\n" * 4,
        "bomb.png": png_header_only(20000, 20000),
        "deep16.png": encode(
            Image.fromarray((rng.integers(0, 65536, (70, 90))).astype(np.uint16)), "PNG"
        ),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "grey.png": encode(Image.fromarray(rgb[:, :, 0], "L"), "PNG"),
        "rgba.png": encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "palette.GIF": encode(Image.fromarray(rgb).quantize(colors=32), "GIF"),
        "rotated.JPG": encode(Image.fromarray(rgb), "JPEG", exif=exif),
        "dot.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    }


def _stored_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# --- sets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What segment must make of one file.

    kind: plain, broken, odd, huge or tiny. error: the exact reason of its error
    row, or None when the row must be ok; size: (width, height) of an ok row.
    """

    kind: str
    error: str | None = None
    size: tuple[int, int] | None = None


# Huge images: (width, height, format). The tiny preset's max_size is 224, so every
# side here is more than 10x it. 81 megapixels is just under Pillow's limit
# (89,478,485); 12,000 x 9,000 is a real, decodable PNG over it: an error row.
HUGE_SIZES = ((3200, 2400, "JPEG"), (8000, 6000, "JPEG"), (9000, 9000, "PNG"), (12000, 9000, "PNG"))
TINY_SIZES = ((1, 1, "PNG"), (2, 3, "JPEG"), (5, 5, "PNG"))
PLAIN_SIDES = (96, 128, 160)
EXTENSIONS = {"PNG": "png", "JPEG": "jpg"}


def _shapes_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Shapes drawn on a small canvas, scaled (nearest) to width x height: big flat areas,
    as in a photo, without drawing every pixel of a huge image in numpy."""
    side = max(width, height) if max(width, height) <= 256 else 256
    picture = Image.fromarray(draw_shapes_image(rng, max(side, 32)).image)
    return picture.resize((width, height), Image.NEAREST)


def _plain(rng: np.random.Generator, index: int) -> tuple[str, bytes, Expected]:
    side = int(PLAIN_SIDES[rng.integers(len(PLAIN_SIDES))])
    picture = _shapes_picture(rng, side, side)
    fmt = "PNG" if index % 2 else "JPEG"
    data = encode(picture, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return EXTENSIONS[fmt], data, Expected("plain", size=(side, side))


def _sized(rng: np.random.Generator, kind: str, spec: tuple[int, int, str]):
    width, height, fmt = spec
    picture = _shapes_picture(rng, width, height)
    data = encode(picture, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    if width * height > Image.MAX_IMAGE_PIXELS:
        return EXTENSIONS[fmt], data, Expected(kind, error=bomb_reason(width, height))
    return EXTENSIONS[fmt], data, Expected(kind, size=(width, height))


def mixed_kinds(n: int, huge: int | None = None) -> list[str]:
    """The kind of each of ``n`` files (before shuffling): 10% broken, one of each odd
    mode, ``huge`` huge ones (default: one of each of HUGE_SIZES), one of each tiny size,
    plain for the rest."""
    bad = bad_image_files(np.random.default_rng(0))
    broken = max(len(BAD_IMAGE_ERRORS), round(0.10 * n))
    odd = len(bad) - len(BAD_IMAGE_ERRORS)
    huge = len(HUGE_SIZES) if huge is None else huge
    kinds = ["broken"] * broken + ["odd"] * odd + ["huge"] * huge + ["tiny"] * len(TINY_SIZES)
    if len(kinds) > n:
        raise ValueError(f"a mixed set needs at least {len(kinds)} images, got {n}")
    return kinds + ["plain"] * (n - len(kinds))


def write_mixed_set(
    root: Path, n: int, seed: int = 0, huge: int | None = None
) -> dict[str, Expected]:
    """Write ``n`` files under ``root`` (see the module doc); returns {path: Expected}."""
    rng = np.random.default_rng(seed)
    kinds = mixed_kinds(n, huge)
    order = rng.permutation(n)
    bad = bad_image_files(rng)
    broken_names = list(BAD_IMAGE_ERRORS)
    odd_names = [k for k in bad if k not in BAD_IMAGE_ERRORS]
    counters = {k: 0 for k in ("broken", "odd", "huge", "tiny", "plain")}
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}
    for position, kind in zip(order, kinds):
        j = counters[kind]
        counters[kind] += 1
        if kind == "broken":
            name = broken_names[j % len(broken_names)]
            data, exp = _broken(rng, name, j)
            ext = name.rsplit(".", 1)[1]
        elif kind == "odd":
            name = odd_names[j % len(odd_names)]
            data, ext = bad[name], name.rsplit(".", 1)[1]
            exp = Expected(kind, size=BAD_IMAGE_SIZES.get(name) or _stored_size(data))
        elif kind in ("huge", "tiny"):
            sizes = HUGE_SIZES if kind == "huge" else TINY_SIZES
            ext, data, exp = _sized(rng, kind, sizes[j % len(sizes)])
        else:
            ext, data, exp = _plain(rng, j)
        path = root / f"img{int(position):05d}-{kind}.{ext}"
        path.write_bytes(data)
        expected[str(path)] = exp
    return expected


def _broken(rng: np.random.Generator, name: str, j: int) -> tuple[bytes, Expected]:
    """A broken file of kind ``name`` (a key of BAD_IMAGE_ERRORS), its bytes different
    from the others of its kind, and its expected error row."""
    if name == "bomb.png":  # a different claimed size each time
        width, height = 20000 + j, 20000
        return png_header_only(width, height), Expected("broken", error=bomb_reason(width, height))
    if name == "zero.jpg":
        data = b""
    elif name == "text.jpg":
        data = f"note {j}: just some text, not a picture\n".encode() * 4
    else:  # truncated.jpg
        rgb = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        jpeg = encode(Image.fromarray(rgb), "JPEG", quality=95)
        data = jpeg[: len(jpeg) // 2]
    return data, Expected("broken", error=BAD_IMAGE_ERRORS[name])


def write_clean_set(root: Path, n: int, seed: int = 1) -> dict[str, Expected]:
    """``n`` ordinary shapes pictures under ``root``; returns {path: Expected}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}
    for i in range(n):
        ext, data, exp = _plain(rng, i)
        path = root / f"img{i:05d}-plain.{ext}"
        path.write_bytes(data)
        expected[str(path)] = exp
    return expected
