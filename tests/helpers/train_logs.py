"""Reading `maskrcnn train`'s log and Ray Train's checkpoint records, for the train and
node-loss tests."""

from __future__ import annotations

import json
import re

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def losses_by_iteration(text: str) -> dict[int, str]:
    """Iteration -> its logged losses (as printed, without the speed)."""
    return {int(i): loss for i, loss in re.findall(r"train: iter +(\d+)/\d+ +(loss .*?\))", text)}


def iteration_lines(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"train: iter +(\d+)/", text)]


def registered_checkpoint(read_text) -> int | None:
    """Iteration of the latest checkpoint Ray Train registered (its snapshot), or None."""
    text = read_text(SNAPSHOT)
    if not text:
        return None
    latest = json.loads(text).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name", "")
    return int(name.rsplit("_", 1)[1]) if name.startswith("checkpoint_") else None
