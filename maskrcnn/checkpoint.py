"""Checkpoints: one safetensors file with the config in its metadata; torchvision import.

Local paths use plain files; any other URI goes through fsspec (imported
only then). Pickle files are refused unless the caller opts in, and even
then load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from maskrcnn.config import MaskRCNNConfig
from maskrcnn.model import MaskRCNN

FORMAT = "maskrcnn-ray/1"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


# --- bytes in and out -------------------------------------------------------------
def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _read_bytes(uri: str) -> bytes:
    if _is_local(uri):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri}: no such checkpoint file")
        with open(path, "rb") as f:
            return f.read()
    try:
        with _open_remote(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{_redact(uri)}: no such checkpoint file") from exc


def _write_bytes(uri: str, data: bytes) -> None:
    if _is_local(uri):
        path = uri.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a reader never sees half a file
        return
    with _open_remote(uri, "wb") as f:  # one PUT on object stores: atomic
        f.write(data)


def _open_remote(uri: str, mode: str):
    """fsspec's file object for a remote ``uri``."""
    # lazy: maskrcnn/ runs without fsspec, which only remote URIs need (import: ~11 ms)
    import fsspec

    return fsspec.open(uri, mode)


def _redact(uri: str) -> str:
    return uri.split("?", 1)[0]


# --- our format ---------------------------------------------------------------------
def state_dict_bytes(model: MaskRCNN, metadata: dict[str, str] | None = None) -> bytes:
    """The model as safetensors bytes with the config in the header metadata, plus
    ``metadata`` (string values, e.g. where fine-tuning started)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {**(metadata or {})}
    meta.update(format=FORMAT, config=model.cfg.to_json(), model_id=model_id(model))
    return st_save(tensors, metadata=meta)


def save(model: MaskRCNN, uri: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` to one safetensors file at ``uri`` (local path or fsspec URI),
    with extra header ``metadata`` (string values) beside the config."""
    _write_bytes(uri, state_dict_bytes(model, metadata))


def _load_pickle_weights_only(data: bytes, uri: str):
    """torch.load with weights_only=True; anything but tensors is a CheckpointError naming uri."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{_redact(uri)}: pickle holds objects other than tensors; refused"
        ) from exc


def read_metadata(data: bytes, uri: str = "checkpoint") -> dict[str, str]:
    """The safetensors header metadata, or CheckpointError naming ``uri``."""
    if len(data) < 8:
        raise CheckpointError(f"{uri}: truncated checkpoint ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CheckpointError(
            f"{uri}: not a safetensors file, or truncated (header says {n} bytes)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{uri}: corrupted safetensors header ({exc})") from exc
    return header.get("__metadata__") or {}


def is_pickle(data: bytes) -> bool:
    """True when ``data`` starts like a torch pickle (zip archive or pickle protocol 2..5)."""
    return data[:4] in _PICKLE_MAGIC or data[:2] in _PICKLE_MAGIC


def model_from_safetensors(
    data: bytes, name: str, *, pickle_hint: str, torchvision_hint: str
) -> MaskRCNN:
    """A model (CPU, eval mode, channels-last: MaskRCNN's default layout) from
    safetensors bytes written by :func:`save`.

    Every failure is a CheckpointError whose message starts with ``name`` (the
    file as the caller names it); a pickle is refused with ``pickle_hint`` (what
    to do instead), a safetensors file without our config with
    ``torchvision_hint`` (how to import torchvision weights there).
    """
    if is_pickle(data):
        raise CheckpointError(
            f"{name}: is a pickle file, which can run code when loaded; {pickle_hint}"
        )
    meta = read_metadata(data, name)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{name}: safetensors file without a maskrcnn config in its metadata "
            f"({torchvision_hint})"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # SafetensorError, or whatever a damaged file raises
        raise CheckpointError(f"{name}: corrupted checkpoint ({exc})") from exc
    model = MaskRCNN(MaskRCNNConfig.from_dict(json.loads(meta["config"])))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: weights do not fit the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.eval()


def load(
    uri: str, map_location: str | torch.device = "cpu", allow_pickle: bool = False
) -> MaskRCNN:
    """A model (eval mode, channels-last: MaskRCNN's default layout) from a checkpoint
    written by :func:`save`, config from its metadata, on ``map_location``.

    A pickle (.pt/.pth) is refused unless ``allow_pickle``; then it must hold
    {"config": dict, "state_dict": ...} and loads with weights_only=True.
    """
    data = _read_bytes(uri)
    if allow_pickle and is_pickle(data):
        obj = _load_pickle_weights_only(data, uri)
        if not (isinstance(obj, dict) and "config" in obj and "state_dict" in obj):
            raise CheckpointError(f"{_redact(uri)}: pickle lacks 'config' and 'state_dict'")
        model = MaskRCNN(MaskRCNNConfig.from_dict(obj["config"]))
        model.load_state_dict(obj["state_dict"])
        return model.to(map_location).eval()
    model = model_from_safetensors(
        data,
        _redact(uri),
        pickle_hint="convert it to safetensors, or pass allow_pickle=True if you trust it "
        "(it is then loaded with weights_only=True)",
        torchvision_hint="for torchvision weights use from_torchvision",
    )
    return model.to(map_location)


def model_id(model: MaskRCNN) -> str:
    """A short stable hash of the architecture (the config) and the weights: 16 hex digits.

    Run options (fast, the layout) are not in the config, and every tensor is
    hashed as a contiguous CPU copy, so neither they nor the device change it.
    """
    h = hashlib.sha256(model.cfg.to_json().encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- torchvision import ---------------------------------------------------------------
# (pattern, replacement) over torchvision key names, old and new spellings.
_TV_RULES: list[tuple[str, str]] = [
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.weight$", r"backbone.fpn.lateral.\1.0.weight"),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.bias$", r"backbone.fpn.lateral.\1.0.bias"),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.(\d)\.", r"backbone.fpn.lateral.\1.\2."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.weight$", r"backbone.fpn.output.\1.0.weight"),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.bias$", r"backbone.fpn.output.\1.0.bias"),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.(\d)\.", r"backbone.fpn.output.\1.\2."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn\.head\.conv\.(\d)\.0\.", r"rpn.head.conv.\1.0."),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.deltas."),
    (r"^roi_heads\.box_head\.([0-3])\.(\d)\.", r"roi_heads.box_head.convs.\1.\2."),
    (r"^roi_heads\.box_head\.5\.", "roi_heads.box_head.fc6."),
    (
        r"^roi_heads\.mask_head\.mask_fcn(\d)\.",
        lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.0.",
    ),
    (r"^roi_heads\.mask_head\.(\d)\.(\d)\.", r"roi_heads.mask_head.convs.\1.\2."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.logits."),
]


def _rename_torchvision_key(key: str) -> str:
    for pattern, repl in _TV_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def coco_class_names() -> list[str]:
    """torchvision's 91 COCO category names (index = label; "N/A" for unused ids)."""
    # lazy: only torchvision imports need them, and torchvision's package is slow to import
    # (maskrcnn/ops.py)
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def torchvision_state_from_bytes(
    data: bytes, name: str, allow_pickle: bool = True
) -> dict[str, torch.Tensor]:
    """A torchvision state dict from .pth (weights_only=True) or .safetensors bytes.

    Unwraps a training checkpoint's {"model": state_dict}; CheckpointErrors name ``name``.
    """
    if is_pickle(data):
        if not allow_pickle:
            raise CheckpointError(f"{name}: pickle refused")
        sd = _load_pickle_weights_only(data, name)
    else:
        try:
            sd = st_load(data)
        except Exception as exc:
            raise CheckpointError(
                f"{name}: neither a torch pickle nor safetensors ({exc})"
            ) from exc
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return sd


def from_torchvision(
    state_dict_or_path: dict[str, torch.Tensor] | str,
    variant: str = "v1",
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    allow_pickle: bool = True,
) -> MaskRCNN:
    """Our model (CPU, eval mode, channels-last) from a torchvision maskrcnn_resnet50_fpn
    ("v1") or _v2 ("v2") state dict.

    Accepts a dict or a path/URI to a .pth (loaded with weights_only=True) or
    .safetensors file. v1 uses FrozenBatchNorm epsilon 0, as torchvision's
    COCO-trained model does; predictions match torchvision's on the same images.
    """
    if variant not in ("v1", "v2"):
        raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
    if isinstance(state_dict_or_path, str):
        sd = torchvision_state_from_bytes(
            _read_bytes(state_dict_or_path), _redact(state_dict_or_path), allow_pickle
        )
    else:
        sd = state_dict_or_path
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in sd:
        raise CheckpointError(f"not a torchvision Mask R-CNN state dict (no {key})")
    found = sd[key].shape[0]
    if num_classes is not None and num_classes != found:
        raise CheckpointError(f"weights have {found} classes, not num_classes={num_classes}")
    if class_names is None and found == 91:
        class_names = coco_class_names()
    preset = "r50-fpn" if variant == "v1" else "r50-fpn-v2"
    extra: dict[str, Any] = {"frozen_bn_eps": 0.0} if variant == "v1" else {}
    cfg = MaskRCNNConfig.preset(preset, num_classes=found, class_names=class_names, **extra)
    model = MaskRCNN(cfg)
    renamed = {_rename_torchvision_key(k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not fit torchvision {variant}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]} (is it the other variant?)"
        )
    return model.eval()
