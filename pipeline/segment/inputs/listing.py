"""INPUT -> the sorted, de-duplicated image URIs a segment run covers, in chunks or whole.

:func:`iter_input_chunks` yields the URIs in their global sorted order, a chunk at a
time, without holding them all: a prefix streams piece by piece (prefix.py); a list's or
a report's URIs come in any order and may repeat anywhere, so they go through a sort that
spills sorted runs to local disk past SORT_RUN URIs (sort.py). :func:`list_inputs` is the
whole list; :class:`InputListing` a listing begun before the run decides to plan.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.segment.inputs.inventory import iter_inventory
from pipeline.segment.inputs.kinds import Input, as_input, naming_input
from pipeline.segment.inputs.names import IMAGE_EXTENSIONS
from pipeline.segment.inputs.prefix import iter_prefix
from pipeline.segment.inputs.sort import SORT_RUN, sorted_unique
from pipeline.storage import full_uri, protocol_of

CHUNK = 10_000  # URIs per chunk of iter_input_chunks


def list_inputs(input_uri: str | Input, options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the images INPUT names, sorted and unique (all of
    :func:`iter_input_chunks`, in memory).

    Raises FileNotFoundError when INPUT does not exist, ValueError when it
    names no image, PermissionError/OSError when storage refuses; every message
    names INPUT (redacted).
    """
    return [uri for chunk in iter_input_chunks(input_uri, options) for uri in chunk]


def iter_input_chunks(
    input_uri: str | Input,
    options: dict[str, Any] | None = None,
    chunk: int = CHUNK,
    sort_run: int | None = None,
) -> Iterator[list[str]]:
    """The URIs of :func:`list_inputs`, in the same order, as lists of at most ``chunk``.

    ``sort_run`` (default sort.SORT_RUN) is how many URIs of a list or an inventory
    report are sorted in memory before a run spills to disk. Raises, while iterated, what
    list_inputs raises.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    source = as_input(input_uri, options)
    with naming_input(source.uri):
        yield from _iter_chunks(source, chunk, sort_run or SORT_RUN)


def _iter_chunks(source: Input, chunk: int, run: int) -> Iterator[list[str]]:
    fs, path, kind = source.fs, source.path, source.kind
    chunks: Iterable[list[str]]
    if kind == "list":
        is_parquet = path.split("?", 1)[0].lower().endswith(".parquet")
        chunks = sorted_unique(_read_uri_list(source, is_parquet, chunk), chunk, run)
        what = "lists no URI"
    elif kind == "inventory":
        chunks = sorted_unique(iter_inventory(fs, path, source.uri), chunk, run)
        what = "(an S3 Inventory manifest) lists no image"
    elif kind == "image":
        chunks = [[full_uri(fs, path)]]
        what = "is empty"
    else:
        chunks = iter_prefix(fs, path, chunk)
        what = f"holds no image (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)"
    empty = True
    for part in chunks:
        if part:
            empty = False
            yield part
    if empty:
        raise ValueError(f"INPUT {source.show()} {what}")


def _read_uri_list(source: Input, is_parquet: bool, chunk: int) -> Iterator[list[str]]:
    """The list's URIs as written (resolved, not yet sorted), ``chunk`` or so at a time."""
    fs, path = source.fs, source.path
    base = posixpath.dirname(full_uri(fs, path))
    if is_parquet:
        with fs.open(path, "rb") as f:
            data = pq.ParquetFile(f)
            names = data.schema_arrow.names
            if "uri" not in names:
                raise ValueError(
                    f"INPUT {source.show()} has no `uri` column (columns: {', '.join(names)})"
                )
            for batch in data.iter_batches(columns=["uri"], batch_size=chunk):
                yield [_resolve(u, base) for u in batch.column(0).to_pylist() if u]
        return
    lines: list[str] = []
    with fs.open(path, "rt", encoding="utf-8-sig") as text:
        for line in text:
            for part in line.splitlines():  # the breaks str.splitlines makes, not only \n
                part = part.strip()
                if part and not part.startswith("#"):
                    lines.append(_resolve(part, base))
            if len(lines) >= chunk:
                yield lines
                lines = []
    if lines:
        yield lines


def _resolve(uri: str, base: str) -> str:
    """``uri`` itself when absolute (a scheme or a leading '/'), else under ``base``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    if protocol_of(base) == "file":
        return posixpath.normpath(posixpath.join(base, uri))
    return base.rstrip("/") + "/" + uri


@dataclass
class InputListing:
    """INPUT's listing, begun: its first chunk already read (so that a missing, empty or
    malformed INPUT fails at once), or, for a remote prefix, only checked to exist, its
    listing left to run once Ray is up (``fans_out``: the listing fans out over Ray tasks).
    """

    source: Input
    fans_out: bool
    _first: list[str] | None = None
    _rest: Iterator[list[str]] | None = None

    @classmethod
    def begin(cls, source: Input) -> InputListing:
        """Raises what list_inputs raises."""
        if source.kind == "remote-prefix":
            return cls(source, fans_out=True)
        rest = iter_input_chunks(source)
        return cls(source, fans_out=False, _first=next(rest), _rest=rest)

    def chunks(self) -> Iterator[list[str]]:
        """All of INPUT's URIs, sorted and unique, in chunks (iter_input_chunks); once."""
        if self._rest is None:
            self._rest = iter_input_chunks(self.source)
        if self._first is not None:
            yield self._first
            self._first = None
        yield from self._rest
