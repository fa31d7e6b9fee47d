"""Input preparation: to float, resize (torchvision's rule, to the pixel), normalise, batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.config import MaskRCNNConfig


def to_float_image(image: Tensor, index: int = 0) -> Tensor:
    """An image as float32 in 0..1, checked; a grey image is repeated to RGB.

    Args:
        image (Tensor[3, H, W] or Tensor[1, H, W]): uint8 (0..255) or float (0..1).
        index (int): its position in the batch, for error messages.

    Returns:
        Tensor[3, H, W]: float32 in 0..1.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image {index}: expected a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image {index}: expected a [3, H, W] tensor, got shape {list(image.shape)}"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image {index}: empty image of shape {list(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise ValueError(f"image {index}: expected uint8 or float, got {image.dtype}")
    return image.float()


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale that brings the short side to min_size unless the long side passes max_size.

    Computed in double precision, as torchvision's eager transform does, so
    that resized sizes match to the pixel.

    Args:
        height (int): the image's height.
        width (int): the image's width.
        min_size (int): the short side wanted.
        max_size (int): the most the long side may be.

    Returns:
        float: the scale factor.
    """
    return min(min_size / min(height, width), max_size / max(height, width))


def normalize(image: Tensor, cfg: MaskRCNNConfig) -> Tensor:
    """(image - mean) / std per channel, with cfg.image_mean and cfg.image_std.

    Args:
        image (Tensor[3, H, W]): float RGB in 0..1.
        cfg (MaskRCNNConfig): image_mean and image_std.

    Returns:
        Tensor[3, H, W]: the normalised image, in the image's dtype.
    """
    mean = torch.tensor(cfg.image_mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def resize_to_model(image: Tensor, cfg: MaskRCNNConfig) -> Tensor:
    """An image exactly as the model takes it: normalised and resized.

    Normalised first, then resized bilinearly (half-pixel centres) to the
    size set by min_size / max_size: torchvision's order, so inputs match
    bit for bit. Safe to run in a CPU task ahead of the model
    (predict(original_sizes=...)).

    Args:
        image (Tensor[3, H, W]): uint8 (0..255) or float (0..1) RGB.
        cfg (MaskRCNNConfig): min_size, max_size, image_mean and image_std.

    Returns:
        Tensor[3, h, w]: float32, on the image's device.
    """
    img = normalize(to_float_image(image), cfg)
    scale = resize_scale(img.shape[-2], img.shape[-1], cfg.min_size, cfg.max_size)
    return F.interpolate(
        img[None],
        scale_factor=scale,
        mode="bilinear",
        recompute_scale_factor=True,
        align_corners=False,
    )[0]


def padded_size(h: int, w: int, size_divisible: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of size_divisible: the padded shape of a batch.

    Args:
        h (int): height.
        w (int): width.
        size_divisible (int): the multiple (cfg.size_divisible).

    Returns:
        tuple[int, int]: the padded (height, width).
    """
    return -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible


def batch_images(images: list[Tensor], size_divisible: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad model inputs into one batch, top-left aligned.

    Args:
        images (list[Tensor[3, h_i, w_i]]): resize_to_model() outputs.
        size_divisible (int): H and W are the largest h_i, w_i rounded up to its multiples.

    Returns:
        tuple[Tensor[B, 3, H, W], list[tuple[int, int]]]: the batch, in the images'
        dtype, and each image's (h_i, w_i) inside it.
    """
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h, w = padded_size(max(s[0] for s in sizes), max(s[1] for s in sizes), size_divisible)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    return batch, sizes
