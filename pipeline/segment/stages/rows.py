"""What every stage's rows start with: the image's key and :class:`ImageStatus`.

Every per-image failure becomes a row with status "error" and a reason "stage: why"
(read, decode, resize, model, encode); no exception leaves a stage because of one image,
so one bad file never fails a job. A stage reads its input's statuses into one
:class:`ImageStatus` per row, fails the images it cannot handle, and writes them back as
the columns uri, status, error, width, height.

Every stage also passes on the columns of CARRIED (the shard a row belongs to, and its
size) when its input has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.storage import first_line

CARRIED = ("shard", "shard_rows")  # columns every stage passes through

# A URL's query string (signed-URL parameters) inside an error message.
_URL_QUERY = re.compile(r"(\w+://[^\s'\"?]+)\?[^\s'\"]*")


@dataclass
class ImageStatus:
    """One image as far as the stages got: ok, or the reason it failed; its size (after
    EXIF orientation) once decoded, None on error."""

    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, reason: str) -> None:
        """This image ends here, as an error row that says ``reason``."""
        self.status, self.error, self.width, self.height = "error", reason, None, None


def reason(stage: str, exc: BaseException) -> str:
    """``stage: first line of the error``, without URL query strings (signatures)."""
    first = first_line(exc)
    if isinstance(exc, FileNotFoundError):
        first = "no such file"
    elif isinstance(exc, PermissionError):
        first = "access denied"
    first = _URL_QUERY.sub(r"\1", first)
    return f"{stage}: {first[:200]}"


def image_statuses(batch: pa.Table) -> list[ImageStatus]:
    """The :class:`ImageStatus` of each row of ``batch``."""
    columns = [batch.column(k).to_pylist() for k in ("status", "error", "width", "height")]
    return [ImageStatus(*values) for values in zip(*columns)]


def status_columns(uri: pa.Array | pa.ChunkedArray, images: list[ImageStatus]) -> dict:
    """The columns every stage's output starts with: uri, status, error, width, height."""
    return {
        "uri": uri,
        "status": pa.array([i.status for i in images], pa.string()),
        "error": pa.array([i.error for i in images], pa.string()),
        "width": pa.array([i.width for i in images], pa.int32()),
        "height": pa.array([i.height for i in images], pa.int32()),
    }


def carried(batch: pa.Table) -> dict[str, Any]:
    """The CARRIED columns ``batch`` has, to append to a stage's output."""
    return {k: batch.column(k) for k in CARRIED if k in batch.column_names}
