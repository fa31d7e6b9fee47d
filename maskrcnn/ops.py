"""The compiled detection ops (torchvision's roi_align and nms), without torchvision's package.

Importing torchvision imports torch._dynamo through its ops module: 1.1 CPU-s per process
on this project's 2-core test machine when idle, 5.6 when it is loaded, paid by every
segment actor and train worker before its first image. The kernels themselves are one
compiled library inside the torchvision install; it is loaded here by path, which runs
its C++ op registrations and nothing else. Where the library is not found (another
torchvision layout), the package is imported, which loads it its own way.

The library registers no autograd for roi_align (torchvision registers it from Python),
so a roi_align that must be differentiated goes through ``torchvision.ops``.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

_LIBRARY_NAMES = ("_C_stable", "_C")  # torchvision 0.29's name, then older releases'


def _compiled_library() -> Path | None:
    """The path of torchvision's compiled op library, found without importing the package."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    for name in _LIBRARY_NAMES:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


@functools.cache
def _ops():
    """``torch.ops.torchvision``, its library loaded once per process."""
    library = _compiled_library()
    if library is None:
        import torchvision.ops  # noqa: F401  loads the library itself
    else:
        torch.ops.load_library(str(library))
    return torch.ops.torchvision


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign (torchvision's kernel) of ``rois`` over ``features``.

    Args:
        features (Tensor[B, C, H, W]): the feature maps.
        rois (Tensor[K, 5]): (batch index, x1, y1, x2, y2) in image pixels.
        output_size (tuple[int, int]): (height, width) of each crop.
        spatial_scale (float): feature pixels per image pixel.
        sampling_ratio (int): bilinear taps per bin side (> 0: fixed).
        aligned (bool): shift the RoI by half a pixel.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]]: the crops, in features' dtype.
    """
    if torch.is_grad_enabled() and features.requires_grad:
        from torchvision.ops import roi_align as differentiable

        return differentiable(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _ops().roi_align(
        features, rois, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned
    )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes non-maximum suppression keeps, by descending score.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2).
        scores (Tensor[N]): one score per box.
        iou_threshold (float): a box overlapping a higher-scoring kept box by more is dropped.

    Returns:
        Tensor[K]: int64 indices into boxes.
    """
    return _ops().nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """:func:`nms` within each group (class) separately; indices by descending score.

    Small sets run as one nms over boxes moved apart per group; past 4000 coordinates
    on CPU (100000 on GPU) one nms per group is faster. The split, and so the order of
    equal scores, is torchvision's, so detections match its models'.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        shift = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + shift[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = torch.where(groups == group)[0]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    indices = torch.where(kept)[0]
    return indices[scores[indices].sort(descending=True)[1]]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of (x1, y1, x2, y2) boxes: Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.max(a[:, None, :2], b[:, :2])
    bottom_right = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b - inter)


class FrozenBatchNorm2d(nn.Module):
    """A per-channel affine map kept as BatchNorm's four buffers (weight, bias,
    running_mean, running_var), none of them trained; torchvision's state-dict layout.

    Args:
        num_features (int): channels.
        eps (float): added to running_var (torchvision's COCO-trained v1 uses 0).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d's, not ours
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
