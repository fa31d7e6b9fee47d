"""Training curves: STORAGE/NAME/metrics/ while the run goes, curves.png at its end.

Rank 0 writes one JSON line per report (iteration, losses, lr, images_per_s, and the
AP metrics at evaluations) next to the checkpoints, in one object per checkpoint
interval: STORAGE/NAME/metrics/ITERATION.jsonl, named by its first iteration. Object
stores cannot append, so each report rewrites only the open interval's object (a few
lines), never the run's whole history; a checkpoint closes it. A resumed run drops the
lines after the iteration it resumed from, so replayed iterations are not listed twice.
Readers take the objects in name order (and a metrics.jsonl of a run from before).

The PNG is drawn with Pillow (matplotlib is not a dependency): loss on the left
axis, AP on the right, against iteration.
"""

from __future__ import annotations

import json
import math
from typing import Any

from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.formats.shapes import png_bytes

METRICS_DIR = "metrics"
LEGACY_METRICS_FILE = "metrics.jsonl"  # one file rewritten whole, before metrics/
CURVES_FILE = "curves.png"


def _chunk_name(iteration: int) -> str:
    return f"{iteration:08d}.jsonl"


def _parse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _metric_objects(run_uri: str, options: dict[str, Any]) -> tuple[Any, list[str]]:
    """(filesystem, paths): a legacy metrics.jsonl first, then metrics/*.jsonl by name."""
    fs, run_path = storage.get_fs(run_uri, options)
    paths = []
    if fs.exists(f"{run_path}/{LEGACY_METRICS_FILE}"):
        paths.append(f"{run_path}/{LEGACY_METRICS_FILE}")
    try:
        found = fs.ls(f"{run_path}/{METRICS_DIR}", detail=False)
    except FileNotFoundError:
        found = []
    paths += sorted(p for p in found if p.endswith(".jsonl"))
    return fs, paths


def read_metrics(run_uri: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The metric lines of a run, in order ([] when it has none yet)."""
    fs, paths = _metric_objects(run_uri, options)
    lines = []
    for path in paths:
        try:
            lines += _parse(fs.cat_file(path).decode())
        except FileNotFoundError:  # removed by a resumed run meanwhile
            continue
    return lines


class MetricsLog:
    """Rank 0's metrics of a run, continued from iteration ``start``."""

    def __init__(self, run_uri: str, options: dict[str, Any], start: int) -> None:
        self.dir, self.options = storage.join(run_uri, METRICS_DIR), options
        self.lines: list[dict[str, Any]] = []  # of the open interval
        self.uri: str | None = None  # its object
        self._drop_after(run_uri, start)

    def _drop_after(self, run_uri: str, start: int) -> None:
        """Remove the lines after iteration ``start`` (a resumed run replays them)."""
        fs, paths = _metric_objects(run_uri, self.options)
        for path in paths:
            lines = _parse(fs.cat_file(path).decode())
            kept = [m for m in lines if m["iteration"] <= start]
            if not kept:
                fs.rm_file(path)
            elif len(kept) < len(lines):
                uri = storage.full_uri(fs, path)
                storage.atomic_write(uri, self._text(kept), self.options)

    @staticmethod
    def _text(lines: list[dict[str, Any]]) -> bytes:
        return "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines).encode()

    def add(self, metrics: dict[str, Any], close: bool = False) -> None:
        """Append one report's metrics (plain numbers): rewrite the open interval's object;
        ``close`` (at a checkpoint) ends the interval, the next report opens another."""
        line = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        if self.uri is None:
            self.uri = storage.join(self.dir, _chunk_name(int(line["iteration"])))
        self.lines.append(line)
        storage.atomic_write(self.uri, self._text(self.lines), self.options)
        if close:
            self.lines, self.uri = [], None


def write_curves(run_uri: str, options: dict[str, Any]) -> str | None:
    """Draw STORAGE/NAME/curves.png from the run's metrics; its URI (None without them)."""
    lines = read_metrics(run_uri, options)
    if not lines:
        return None
    uri = storage.join(run_uri, CURVES_FILE)
    storage.atomic_write(uri, png_bytes(draw_curves(lines)), options)
    return uri


LOSS_COLOUR, AP_COLOURS = (31, 119, 180), {"bbox_AP": (214, 39, 40), "segm_AP": (44, 160, 44)}


def _series(lines: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(m["iteration"], float(m[key])) for m in lines if key in m and math.isfinite(m[key])]


def draw_curves(lines: list[dict[str, Any]], size: tuple[int, int] = (800, 450)) -> Any:
    """A PIL image: total loss (left axis) and bbox/segm AP (right axis, 0..1) vs iteration."""
    w, h = size
    left, right, top, bottom = 60, 60, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    loss = _series(lines, "loss")
    its = [m["iteration"] for m in lines] or [0]
    x0, x1 = min(its), max(max(its), min(its) + 1)
    loss_max = max([v for _, v in loss] or [1.0]) * 1.05 or 1.0

    def xy(it: float, v: float, vmax: float) -> tuple[float, float]:
        return (
            left + (it - x0) / (x1 - x0) * (w - left - right),
            h - bottom - v / vmax * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # ticks: iterations below, loss left, AP right
        f = i / 4
        x, y = left + f * (w - left - right), h - bottom - f * (h - top - bottom)
        draw.text((x - 10, h - bottom + 5), f"{x0 + f * (x1 - x0):.0f}", fill="black")
        draw.text((5, y - 5), f"{f * loss_max:.2f}", fill=LOSS_COLOUR)
        draw.text((w - right + 5, y - 5), f"{f:.2f}", fill="black")
    draw.text((w // 2 - 30, h - 18), "iteration", fill="black")
    legend = [("loss", LOSS_COLOUR)]
    if len(loss) > 1:
        draw.line([xy(i, v, loss_max) for i, v in loss], fill=LOSS_COLOUR, width=2)
    for key, colour in AP_COLOURS.items():
        points = [xy(i, v, 1.0) for i, v in _series(lines, key)]
        if points:
            legend.append((key.replace("_", " "), colour))
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for k, (label, colour) in enumerate(legend):
        draw.text((left + 10 + 90 * k, 10), label, fill=colour)
    return image
