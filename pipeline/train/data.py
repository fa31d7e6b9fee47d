"""Training data for one Ray Train worker: a resumable sample order and augmentation.

Every worker reads its own shard of the COCO dataset (``CocoDataset.shard``).
The order of its samples and each sample's augmentation are a pure function
of (seed, rank, position in the stream), so a run restarted from the
checkpoint of iteration N draws exactly the batches it would have drawn
without the interruption, and no state beyond the iteration number needs
saving.

Augmentation: horizontal flip (image, masks and boxes together) per sample
and a random input scale per iteration. The model resizes every image to its
config's ``min_size``/``max_size``; scale jitter picks those two per iteration
around the config's values (:func:`train_input_size`, applied with
:func:`input_size`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.formats.coco import CocoDataset, Sample

# Draw = (index in the shard, flip?) of one sample of a batch.
Draw = tuple[int, bool]


def _epoch_order(n: int, seed: int, rank: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of range(n), flip flag per position) of one epoch of one worker."""
    rng = np.random.default_rng([seed, rank, epoch])
    return rng.permutation(n), rng.random(n) < 0.5


class BatchPlan:
    """Batches of draws for iterations ``start .. stop - 1`` of one worker.

    The worker's samples form an endless stream of epochs, each a fresh
    permutation of its ``n`` samples; iteration ``i`` takes positions
    ``i * batch_size .. (i + 1) * batch_size - 1`` of that stream. Usable as a
    DataLoader ``batch_sampler`` (an iterable of lists).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int,
        start: int,
        stop: int,
        flip: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(
                "BatchPlan: a worker's shard has no images (fewer images than workers?)"
            )
        self.n, self.batch_size, self.seed, self.rank = n, batch_size, seed, rank
        self.start, self.stop, self.flip = start, max(start, stop), flip

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[Draw]]:
        cached_epoch, order, flips = -1, None, None
        for it in range(self.start, self.stop):
            batch = []
            for pos in range(it * self.batch_size, (it + 1) * self.batch_size):
                epoch, offset = divmod(pos, self.n)
                if epoch != cached_epoch:
                    order, flips = _epoch_order(self.n, self.seed, self.rank, epoch)
                    cached_epoch = epoch
                batch.append((int(order[offset]), bool(flips[offset]) and self.flip))
            yield batch


def hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror a sample left to right.

    image: [3, H, W]; target boxes float32 [K, 4] x1, y1, x2, y2 pixels and
    masks [K, H, W]. A box's new x1 is W - x2 and its new x2 is W - x1, so a
    box that is the exact extent of its mask stays exact.
    """
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0] = width - target["boxes"][:, 2]
    boxes[:, 2] = width - target["boxes"][:, 0]
    flipped = dict(target, boxes=boxes, masks=target["masks"].flip(-1))
    return image.flip(-1), flipped


class AugmentedShard(torch.utils.data.Dataset):
    """``dataset[(index, flip)]`` -> a (possibly mirrored) sample, or None if unreadable."""

    def __init__(self, shard: CocoDataset) -> None:
        self.shard = shard

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, draw: Draw) -> Sample | None:
        index, flip = draw
        sample = self.shard.load(index)
        if sample is None or not flip:
            return sample
        return hflip(*sample)


def train_input_size(
    min_size: int, max_size: int, jitter: float, seed: int, rank: int, iteration: int
) -> tuple[int, int]:
    """(min_size, max_size) for one iteration: a uniform draw within +-jitter of the config's.

    Both sides scale by the same factor, so the aspect-ratio cap keeps its
    meaning. jitter 0 returns the config's sizes.
    """
    if jitter <= 0:
        return min_size, max_size
    lo, hi = round(min_size * (1 - jitter)), round(min_size * (1 + jitter))
    rng = np.random.default_rng([seed, rank, iteration, 1])
    side = int(rng.integers(max(lo, 8), hi + 1))
    return side, max(side, round(max_size * side / min_size))


@contextlib.contextmanager
def input_size(model: Any, min_size: int, max_size: int) -> Iterator[None]:
    """Within the block, ``model`` (a maskrcnn.MaskRCNN) resizes inputs to these sizes.

    The model reads min_size/max_size from its ``cfg`` at every call; the
    block gives it a copy with other sizes and puts the original back, so a
    checkpoint written after it holds the configured sizes.
    """
    original = model.cfg
    if (original.min_size, original.max_size) == (min_size, max_size):
        yield
        return
    model.cfg = original.replace(min_size=min_size, max_size=max_size)
    try:
        yield
    finally:
        model.cfg = original


class LastGoodBatch:
    """Stands in for a batch whose every image was unreadable: the last good batch.

    Every rank must step at every iteration (DDP's all-reduces line up), so a
    rank whose batch came back empty (each bad image logged once) repeats its
    last good batch, or its shard's first readable sample before it had one.
    """

    def __init__(self, shard: CocoDataset) -> None:
        self.shard = shard
        self.last: tuple[list, list] | None = None

    def __call__(self, images: list, targets: list) -> tuple[list, list]:
        """(images, targets), or the stand-in when ``images`` is empty."""
        if images:
            self.last = (images, targets)
            return images, targets
        self.last = self.last or CocoDataset.collate([next(iter(self.shard))])
        return self.last
