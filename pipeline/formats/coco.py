"""COCO-format datasets at any fsspec URI (local, s3://, memory://) as training samples.

``CocoDataset(annotations, image_root=None)`` reads the annotations JSON once,
checks every annotation without touching the images, and lists the image root
once to find missing files. Images are read and decoded only in ``load`` /
``__getitem__``.

What is skipped, and how it is reported: annotations with an unknown image or
category id, a degenerate box field, an empty, malformed or wrong-sized
segmentation; images with a missing file or no size. These are counted and
reported in one warning line when the dataset is built. An image that turns out
undecodable (or of another size than the JSON says) is found when it is
loaded: ``load`` then returns None, logs one warning for that file, counts it
in ``skipped_images`` and remembers it, so later epochs skip it without a
read. ``__iter__`` and ``collate`` drop those Nones, so one bad file never
stops a training loop.

Targets follow torchvision's convention. Boxes are the extent of each object's
mask, not the ``bbox`` field: the mask is the training target the box head and
mask head must agree on (the mask target is the mask cropped to the box), the
extent is exact where ``bbox`` fields are often rounded or loose, and it stays
exact when a trainer flips or resizes the mask. The ``bbox`` field is only
checked (a degenerate one marks a broken annotation) and kept for evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import storage
from pipeline.formats.coco_annotation import CocoObject, annotation_object
from pipeline.formats.decode import DecodeError, decode_image

logger = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.json"
Sample = tuple[torch.Tensor, dict[str, Any]]


@dataclass(slots=True)
class _Image:
    image_id: int
    file_name: str
    width: int
    height: int
    objects: list[CocoObject]


def _counts_text(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format dataset: ``dataset[i] -> (image, target)`` or None (see module doc).

    annotations: URI of the JSON, or of a directory holding ``annotations.json``.
    image_root: where ``file_name`` paths start; defaults to the JSON's directory.
    storage_options: fsspec options for both URIs (default: pipeline.storage's).
    train: True for training (a dataset without a single object is an error);
    False for evaluation, where images without objects are all fine.

    image: uint8 [3, H, W] RGB. target: boxes float32 [K, 4] x1, y1, x2, y2
    pixels; labels int64 [K] in 1..num_classes-1; masks uint8 [K, H, W];
    image_id int. Crowd objects are not in targets (they are in ``coco``).
    """

    def __init__(
        self,
        annotations: str,
        image_root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        train: bool = True,
    ) -> None:
        self._options = storage_options
        self.train = train
        fs, path = storage.get_fs(annotations, storage_options)
        if fs.isdir(path):
            annotations = storage.join(annotations, ANNOTATIONS_FILE)
            path = path.rstrip("/") + "/" + ANNOTATIONS_FILE
        self.annotations_uri = annotations
        self.name = storage.redact(annotations)
        if image_root is None:
            image_root = annotations.rsplit("/", 1)[0] if "/" in annotations else "."
        self.image_root = image_root
        self._fs = None
        self._coco = None
        try:
            with fs.open(path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name}: annotations file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.name}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise ValueError(
                f"{self.name}: not COCO format (needs 'images', 'annotations' and 'categories' lists)"
            )
        self._read_categories(data["categories"])
        self.skipped_annotations: Counter = Counter()
        self.skipped_images: Counter = Counter()
        self.failed_images: dict[int, str] = {}  # image_id -> reason, found at load time
        self._records = self._read_images(data["images"])
        listed_ids = {i.get("id") for i in data["images"] if isinstance(i, dict)}
        self._read_annotations(data["annotations"], listed_ids)
        if self.skipped_annotations or self.skipped_images:
            logger.warning(self.skip_summary())
        self._check_usable(len(data["images"]))

    # -- reading the JSON ------------------------------------------------------------

    def _read_categories(self, categories: list) -> None:
        by_id = {}
        for cat in categories:
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
                raise ValueError(f"{self.name}: a category without an integer id: {cat!r:.80}")
            if cat["id"] in by_id:
                raise ValueError(f"{self.name}: category id {cat['id']} listed twice")
            by_id[cat["id"]] = cat
        self.categories = [by_id[i] for i in sorted(by_id)]
        self.category_id_to_label = {c["id"]: k + 1 for k, c in enumerate(self.categories)}
        self.label_to_category_id = {k: c for c, k in self.category_id_to_label.items()}
        self.class_names = ["__background__"] + [
            str(c.get("name", f"category {c['id']}")) for c in self.categories
        ]
        self.num_classes = len(self.class_names)

    def _read_images(self, images: list) -> list[_Image]:
        fs, root = self.image_fs()
        root = root.rstrip("/")
        # One listing instead of one existence check per image (N requests on S3).
        present = {p[len(root) + 1 :] for p in fs.find(root) if p.startswith(root + "/")}
        records, seen = [], set()
        for info in images:
            image_id = info.get("id") if isinstance(info, dict) else None
            file_name = info.get("file_name") if isinstance(info, dict) else None
            if not isinstance(image_id, int) or not isinstance(file_name, str) or image_id in seen:
                self.skipped_images["bad image entry"] += 1
                continue
            seen.add(image_id)
            width, height = info.get("width"), info.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 < height):
                self.skipped_images["missing size"] += 1
                continue
            file_name = posixpath.normpath(file_name.lstrip("/"))
            if file_name not in present:
                self.skipped_images["missing file"] += 1
                continue
            records.append(_Image(image_id, file_name, width, height, []))
        return records

    def _read_annotations(self, annotations: list, listed_ids: set) -> None:
        by_id = {r.image_id: r for r in self._records}
        for ann in annotations:
            if not isinstance(ann, dict):
                self.skipped_annotations["invalid annotation"] += 1
                continue
            record = by_id.get(ann.get("image_id"))
            if record is None:
                # Annotations of images skipped above go with them, uncounted.
                if ann.get("image_id") not in listed_ids:
                    self.skipped_annotations["unknown image id"] += 1
                continue
            label = self.category_id_to_label.get(ann.get("category_id"))
            if label is None:
                self.skipped_annotations["unknown category id"] += 1
                continue
            obj, reason = annotation_object(ann, label, record.height, record.width)
            if obj is None:
                self.skipped_annotations[reason] += 1
                continue
            record.objects.append(obj)

    def _check_usable(self, listed: int) -> None:
        where = f"image root {storage.redact(self.image_root)}"
        if not self._records:
            why = _counts_text(self.skipped_images) or "the JSON lists no images"
            raise ValueError(f"{self.name}: no usable images ({listed} listed; {why}; {where})")
        if self.train and not any(not o.iscrowd for r in self._records for o in r.objects):
            why = _counts_text(self.skipped_annotations) or "no annotations"
            raise ValueError(f"{self.name}: no usable (non-crowd) annotations to train on ({why})")

    def skip_summary(self) -> str:
        """One line: what was skipped and why, e.g. '... skipped 3 annotations (...) and 2 images (...)'."""
        parts = []
        if self.skipped_annotations:
            n = sum(self.skipped_annotations.values())
            parts.append(f"{n} annotations ({_counts_text(self.skipped_annotations)})")
        if self.skipped_images:
            n = sum(self.skipped_images.values())
            parts.append(f"{n} images ({_counts_text(self.skipped_images)})")
        return f"{self.name}: skipped " + (" and ".join(parts) if parts else "nothing")

    # -- samples ---------------------------------------------------------------------

    def image_fs(self) -> tuple[Any, str]:
        """(filesystem, path) of the image root; the filesystem is made once per process."""
        # A filesystem made before a fork (DataLoader workers) may hold the
        # parent's connections and event loop: each process makes its own.
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs = storage.get_fs(self.image_root, self._options)
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None  # filesystems hold sessions and locks: rebuilt where unpickled
        state["_coco"] = None
        return state

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self._records]

    def load(self, i: int) -> Sample | None:
        """Sample ``i``, or None when its image cannot be read or decoded (logged once)."""
        record = self._records[i]
        if record.image_id in self.failed_images:
            return None
        fs, root = self.image_fs()
        try:
            data = fs.cat_file(root.rstrip("/") + "/" + record.file_name)
        except FileNotFoundError:
            return self._fail(record, "missing file", "removed since the dataset was listed")
        try:
            pixels = decode_image(data)  # EXIF-oriented, any mode to RGB, bomb limit on
        except DecodeError as exc:
            return self._fail(record, "undecodable", exc.reason)
        if pixels.shape[:2] != (record.height, record.width):
            got = f"{pixels.shape[1]}x{pixels.shape[0]}"
            return self._fail(
                record, "size mismatch", f"{got}, JSON says {record.width}x{record.height}"
            )
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), self.target(i)

    __getitem__ = load

    def _fail(self, record: _Image, reason: str, detail: str) -> None:
        self.failed_images[record.image_id] = reason
        self.skipped_images[reason] += 1
        logger.warning(
            "%s: skipped image %s: %s (%s)",
            self.name,
            storage.redact(storage.join(self.image_root, record.file_name)),
            reason,
            detail[:200],
        )
        return None

    def target(self, i: int) -> dict[str, Any]:
        """Target of sample ``i`` from the annotations alone (no image read)."""
        record = self._records[i]
        objects = [o for o in record.objects if not o.iscrowd]
        h, w = record.height, record.width
        if objects:
            masks = mask_utils.decode([o.rle for o in objects])  # [H, W, K], Fortran order
            masks = np.ascontiguousarray(masks.transpose(2, 0, 1))
        else:
            masks = np.zeros((0, h, w), dtype=np.uint8)
        return {
            "boxes": torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([o.label for o in objects], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": record.image_id,
        }

    def __iter__(self) -> Iterator[Sample]:
        """Every loadable sample in order; fails only when none at all could be loaded."""
        loaded = 0
        for i in range(len(self)):
            sample = self.load(i)
            if sample is not None:
                loaded += 1
                yield sample
        if len(self) and not loaded:
            raise ValueError(
                f"{self.name}: none of {len(self)} images could be loaded "
                f"({_counts_text(self.skipped_images)})"
            )

    @staticmethod
    def collate(batch: list[Sample | None]) -> tuple[list[torch.Tensor], list[dict]]:
        """DataLoader collate_fn: drops failed (None) samples; (images, targets) lists."""
        kept = [s for s in batch if s is not None]
        return [s[0] for s in kept], [s[1] for s in kept]

    def shard(self, rank: int, world_size: int) -> CocoDataset:
        """Images ``rank, rank + world_size, ...``: shards are disjoint and cover the dataset."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard: need 0 <= rank < world_size, got {rank} of {world_size}")
        view = copy.copy(self)
        view._records = self._records[rank::world_size]
        view._coco = None
        view.failed_images = dict(self.failed_images)
        view.skipped_images = Counter(self.skipped_images)
        return view

    @property
    def coco(self) -> COCO:
        """pycocotools COCO of this dataset's ground truth (crowd objects included).

        Holds the images and annotations kept, with original category ids and
        segmentations as compressed RLE; for COCOeval. Images found undecodable
        at load time are still in it: evaluate with ``params.imgIds`` set to
        the images actually predicted.
        """
        if self._coco is None:
            images, anns = [], []
            for r in self._records:
                images.append(
                    {
                        "id": r.image_id,
                        "file_name": r.file_name,
                        "width": r.width,
                        "height": r.height,
                    }
                )
                for o in r.objects:
                    segm = {"size": [r.height, r.width], "counts": o.rle["counts"].decode("ascii")}
                    anns.append(
                        {
                            "id": len(anns) + 1,
                            "image_id": r.image_id,
                            "category_id": o.category_id,
                            "segmentation": segm,
                            "area": o.area,
                            "bbox": o.bbox,
                            "iscrowd": int(o.iscrowd),
                        }
                    )
            gt = COCO()
            gt.dataset = {"images": images, "annotations": anns, "categories": self.categories}
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
                gt.createIndex()
            self._coco = gt
        return self._coco
