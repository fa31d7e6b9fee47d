"""A maskrcnn checkpoint read outside the segment and train jobs.

`maskrcnn evaluate --model` runs one over annotated images; the demo compares
one with the model a segment OUTPUT's manifest names. jobs/ reaches maskrcnn/
through here.
"""

from __future__ import annotations

from typing import Any


def load_checkpoint(uri: str, device: str = "cpu") -> Any:
    """The maskrcnn.MaskRCNN in the safetensors checkpoint at ``uri``, on ``device``."""
    # lazy: jobs/evaluate imports this before its --device check, which fails without
    # the model's modules
    from maskrcnn.checkpoint import load

    return load(uri, map_location=device)


def checkpoint_model_id(uri: str) -> str:
    """The model id of the checkpoint at ``uri``: what a segment OUTPUT records as "model"."""
    from maskrcnn.checkpoint import model_id  # lazy: see load_checkpoint

    return model_id(load_checkpoint(uri))
