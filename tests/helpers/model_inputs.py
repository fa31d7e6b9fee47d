"""Test images for model tests, shared by the test modules that need them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_noise_images(sizes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """uint8 [3, H, W] images of blurred noise, one per (H, W) in ``sizes``.

    Blurred (5x5 box filter), so a random model finds blob-like structure and
    detects something; the same seed gives the same pixels.
    """
    g = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes:
        noise = torch.randint(0, 256, (1, 3, h, w), generator=g).float()
        images.append(F.avg_pool2d(noise, 5, 1, 2)[0].to(torch.uint8))
    return images
