"""Which file names are images: the one rule every kind of INPUT applies."""

from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def is_image_name(path: str) -> bool:
    """True when ``path`` ends in one of IMAGE_EXTENSIONS, in any case."""
    return path.lower().endswith(IMAGE_EXTENSIONS)
