"""Where segment's model comes from, loaded once on the driver and shipped to actors.

The driver reads the checkpoint through pipeline.storage (so --endpoint-url
and --anon apply), computes the model id, and puts the weights in Ray's object
store as safetensors bytes; each model actor builds its model from those bytes
once, so a thousand actors do not each read the checkpoint from a bucket.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from pipeline.storage import get_fs, redact

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class ModelSource:
    """A maskrcnn checkpoint (``checkpoint``) or torchvision weights (``torchvision``)."""

    checkpoint: str | None = None
    torchvision: str | None = None
    variant: str = "v1"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.torchvision is None):
            raise ValueError("give exactly one of --model URI or --torchvision-weights PATH")
        if self.variant not in ("v1", "v2"):
            raise ValueError(f"--variant must be v1 or v2, got {self.variant!r}")

    @property
    def uri(self) -> str:
        return self.checkpoint or self.torchvision or ""


def _read(uri: str, options: dict[str, Any] | None) -> bytes:
    fs, path = get_fs(uri, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model {redact(uri)}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"model {redact(uri)} is a folder, not a checkpoint file") from None


def model_from_bytes(data: bytes, uri: str = "checkpoint"):
    """A MaskRCNN (eval mode, CPU) from safetensors bytes written by maskrcnn.checkpoint."""
    from safetensors.torch import load as st_load

    from maskrcnn import MaskRCNN, MaskRCNNConfig
    from maskrcnn.checkpoint import FORMAT, CheckpointError, read_metadata

    if data[:4] in _PICKLE_MAGIC or data[:2] in _PICKLE_MAGIC:
        raise CheckpointError(
            f"model {uri}: is a pickle file, which can run code when loaded; convert it "
            "to safetensors with maskrcnn.checkpoint.save (or use --torchvision-weights "
            "for torchvision's .pth files)"
        )
    meta = read_metadata(data, f"model {uri}")
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"model {uri}: safetensors file without a maskrcnn config in its metadata "
            "(for torchvision weights use --torchvision-weights PATH --variant v1|v2)"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise CheckpointError(f"model {uri}: corrupted checkpoint ({exc})") from None
    model = MaskRCNN(MaskRCNNConfig.from_dict(json.loads(meta["config"])))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"model {uri}: weights do not fit its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.eval()


def load_model(source: ModelSource, options: dict[str, Any] | None = None):
    """(model, safetensors bytes for the actors) from ``source``; CPU, eval mode."""
    from maskrcnn.checkpoint import from_torchvision, state_dict_bytes

    data = _read(source.uri, options)
    if source.checkpoint is not None:
        model = model_from_bytes(data, redact(source.uri))
        return model, data
    import torch
    from safetensors.torch import load as st_load

    if data[:4] in _PICKLE_MAGIC or data[:2] in _PICKLE_MAGIC:
        # torchvision publishes pickles; weights_only=True loads tensors, never code.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        state = st_load(data)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model = from_torchvision(state, variant=source.variant, num_classes=source.num_classes)
    return model, state_dict_bytes(model)
