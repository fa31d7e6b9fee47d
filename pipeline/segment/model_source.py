"""Where segment's model comes from, loaded once on the driver and shipped to actors.

The driver reads the checkpoint through pipeline.storage (so --endpoint-url
and --anon apply), computes the model id, and puts the weights in Ray's object
store as safetensors bytes; each model actor builds its model from those bytes
once, so a thousand actors do not each read the checkpoint from a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.storage import get_fs, redact


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
    # lazy: maskrcnn loads torch and torchvision (2.5 s, measured); the CLI checks INPUT
    # before any model is read (tests/test_cli_args.py)
    from maskrcnn.checkpoint import model_from_safetensors

    return model_from_safetensors(
        data,
        f"model {uri}",
        pickle_hint="convert it to safetensors with maskrcnn.checkpoint.save (or use "
        "--torchvision-weights for torchvision's .pth files)",
        torchvision_hint="for torchvision weights use --torchvision-weights PATH --variant v1|v2",
    )


def read_model(source: ModelSource, options: dict[str, Any] | None = None) -> bytes:
    """``source``'s bytes: a missing file or a folder fails here, before torch loads."""
    return _read(source.uri, options)


def build_model(source: ModelSource, data: bytes):
    """(model, safetensors bytes for the actors) from ``source``'s bytes ``data``; CPU,
    eval mode."""
    from maskrcnn.checkpoint import (  # lazy: as in model_from_bytes
        from_torchvision,
        state_dict_bytes,
        torchvision_state_from_bytes,
    )

    if source.checkpoint is not None:
        return model_from_bytes(data, redact(source.uri)), data
    # torchvision publishes pickles; they load with weights_only=True: tensors, never code.
    state = torchvision_state_from_bytes(data, f"--torchvision-weights {redact(source.uri)}")
    model = from_torchvision(state, variant=source.variant, num_classes=source.num_classes)
    return model, state_dict_bytes(model)
