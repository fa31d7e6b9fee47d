"""A training checkpoint directory: writing it, restoring from it, exporting its model.

A checkpoint is a directory:

    model.safetensors   the model alone (maskrcnn.checkpoint.save: usable on its own)
    train_state.pt      optimizer, scheduler and grad-scaler state (tensors and numbers
                        only: loaded with weights_only=True)
    state.json          iteration, model id, metrics at that point

Ray Train copies the directory to ``STORAGE/NAME/checkpoint_<iteration>``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline import storage

MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
STATE_FILE = "state.json"


def save_checkpoint(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    iteration: int,
    metrics: dict[str, Any],
    init: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint directory (module doc) for ``model`` after ``iteration`` steps.

    ``init`` (a TrainSpec's --init record) goes into state.json and, as ``init``, into
    the model file's metadata: where the weights started and which classes were kept.
    """
    # lazy: the driver imports this module for export_model, and its flag and data errors
    # come before torchvision and maskrcnn load (1.2 s after torch, measured)
    from maskrcnn.checkpoint import model_id, save

    os.makedirs(directory, exist_ok=True)
    origin = init_metadata(init)
    save(model, os.path.join(directory, MODEL_FILE), {"init": json.dumps(origin)} if init else None)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
        },
        os.path.join(directory, TRAIN_STATE_FILE),
    )
    state = {"iteration": iteration, "model_id": model_id(model), "metrics": metrics}
    if init:
        state["init"] = origin
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def init_metadata(init: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of an --init record worth keeping with the weights (URI redacted)."""
    if not init:
        return {}
    keep = ("kind", "trainable_layers", "kept", "new")
    return {"uri": storage.redact(init["uri"]), **{k: init[k] for k in keep if k in init}}


def load_checkpoint(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> int:
    """Restore everything from a checkpoint directory; returns its iteration."""
    tensors = load_file(
        os.path.join(directory, MODEL_FILE), device=str(next(model.parameters()).device)
    )
    model.load_state_dict(tensors)
    state = torch.load(
        os.path.join(directory, TRAIN_STATE_FILE), map_location="cpu", weights_only=True
    )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"])


def export_model(checkpoint: Any, uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """Copy a Ray Train checkpoint's model file to ``uri`` (atomically); returns its state.json."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
        state = json.loads(f.read())
    with fs.open_input_stream(f"{path}/{MODEL_FILE}") as f:
        model_bytes = f.read()
    storage.atomic_write(uri, model_bytes, options)
    return state
