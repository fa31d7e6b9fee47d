"""INPUT -> the sorted, de-duplicated image URIs a segment run covers, in chunks or whole.

INPUT is one of:

* a prefix (folder) at any fsspec URI, listed recursively; files whose name
  ends in an image extension (any case) are kept, everything else is ignored.
  The listing fans out over sub-prefixes (pipeline.segment.listing);
* a single image file;
* a ``.txt`` file with one URI per line (blank lines and ``#`` comments are
  skipped; a relative path is relative to the list file's folder);
* a ``.parquet`` file with a ``uri`` string column;
* an S3 Inventory report: its ``manifest.json`` (s3:// or a local copy), with
  CSV or Parquet data files; the image keys it lists in its source bucket
  (pipeline.segment.inventory).

:func:`iter_input_chunks` yields the URIs in their global sorted order, a chunk
at a time, without holding them all: a prefix streams piece by piece; a list's
or a report's URIs come in any order and may repeat anywhere, so they go
through a sort that spills sorted runs to local disk past SORT_RUN URIs
(listing.sorted_unique). :func:`list_inputs` is the whole list.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.storage import first_line, full_uri, get_fs, looks_secret, protocol_of, redact

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


CHUNK = 10_000  # URIs per chunk of iter_input_chunks


def is_image_name(path: str) -> bool:
    """True when ``path`` ends in one of IMAGE_EXTENSIONS, in any case."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_inputs(input_uri: str, options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the images INPUT names, sorted and unique (all of
    :func:`iter_input_chunks`, in memory).

    Raises FileNotFoundError when INPUT does not exist, ValueError when it
    names no image, PermissionError/OSError when storage refuses; every message
    names INPUT (redacted).
    """
    return [uri for chunk in iter_input_chunks(input_uri, options) for uri in chunk]


def iter_input_chunks(
    input_uri: str,
    options: dict[str, Any] | None = None,
    chunk: int = CHUNK,
    sort_run: int | None = None,
) -> Iterator[list[str]]:
    """The URIs of :func:`list_inputs`, in the same order, as lists of at most ``chunk``.

    ``sort_run`` (default listing.SORT_RUN) is how many URIs of a list or an inventory
    report are sorted in memory before a run spills to disk. Raises, while iterated, what
    list_inputs raises.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    with _naming_input(input_uri):
        yield from _iter_chunks(input_uri, options, chunk, sort_run)


def input_kind(input_uri: str, options: dict[str, Any] | None = None) -> str:
    """What INPUT is, checked with a request or two and without listing it: "list" (.txt,
    .parquet), "inventory" (an S3 Inventory manifest.json), "image", "prefix" (a local
    folder) or "remote-prefix" (a prefix on remote storage, which a listing fans out over
    in Ray tasks when Ray is up).

    Raises what list_inputs raises for a missing INPUT or one of no known kind.
    """
    with _naming_input(input_uri):
        return _kind(input_uri, options)[0]


@contextmanager
def _naming_input(input_uri: str) -> Iterator[None]:
    """Storage errors as OSError/PermissionError whose one line names INPUT."""
    try:
        yield
    except (FileNotFoundError, ValueError):
        raise  # these name INPUT already
    except OSError as exc:  # storage's own message is often one word ("Forbidden")
        reason = first_line(exc)
        if looks_secret(reason):
            reason = type(exc).__name__
        if isinstance(exc, PermissionError):
            raise PermissionError(
                f"INPUT {redact(input_uri)}: access denied ({reason}); check the credentials "
                "(AWS_* variables or --anon) and that they may list and read it"
            ) from exc
        raise OSError(f"INPUT {redact(input_uri)}: cannot list it ({reason})") from exc


def _kind(input_uri: str, options: dict[str, Any] | None) -> tuple[str, Any, str]:
    """(kind of :func:`input_kind`, fs, path); raises for a missing or unknown INPUT."""
    from pipeline.segment.listing import is_local

    fs, path = get_fs(input_uri, options)
    # A signed URL's name ends before its query string.
    lowered = (
        path.split("?", 1)[0] if protocol_of(input_uri) in ("http", "https") else path
    ).lower()
    if lowered.endswith((".txt", ".parquet", "manifest.json")):
        if not fs.isfile(path):
            raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such file")
        return ("inventory" if lowered.endswith("manifest.json") else "list"), fs, path
    if fs.isfile(path):
        if not is_image_name(path):
            raise ValueError(
                f"INPUT {redact(input_uri)} is neither an image ({', '.join(IMAGE_EXTENSIONS)}), "
                "a folder, a .txt list of URIs, a .parquet file with a `uri` column "
                "nor an S3 Inventory manifest.json"
            )
        return "image", fs, path
    if not fs.exists(path):
        raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such folder or prefix")
    return ("prefix" if is_local(fs) else "remote-prefix"), fs, path


def _iter_chunks(
    input_uri: str, options: dict[str, Any] | None, chunk: int, sort_run: int | None
) -> Iterator[list[str]]:
    from pipeline.segment import listing

    run = sort_run or listing.SORT_RUN
    kind, fs, path = _kind(input_uri, options)
    chunks: Iterable[list[str]]
    if kind == "list":
        is_parquet = path.split("?", 1)[0].lower().endswith(".parquet")
        listed = _read_uri_list(fs, path, input_uri, is_parquet, chunk)
        chunks = listing.sorted_unique(listed, chunk, run)
        what = "lists no URI"
    elif kind == "inventory":
        from pipeline.segment.inventory import iter_inventory

        chunks = listing.sorted_unique(iter_inventory(fs, path, input_uri), chunk, run)
        what = "(an S3 Inventory manifest) lists no image"
    elif kind == "image":
        chunks = [[full_uri(fs, path)]]
        what = "is empty"
    else:
        chunks = listing.iter_prefix(fs, path, chunk)
        what = f"holds no image (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)"
    empty = True
    for part in chunks:
        if part:
            empty = False
            yield part
    if empty:
        raise ValueError(f"INPUT {redact(input_uri)} {what}")


def _read_uri_list(
    fs: Any, path: str, input_uri: str, is_parquet: bool, chunk: int
) -> Iterator[list[str]]:
    """The list's URIs as written (resolved, not yet sorted), ``chunk`` or so at a time."""
    base = posixpath.dirname(full_uri(fs, path))
    if is_parquet:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            data = pq.ParquetFile(f)
            names = data.schema_arrow.names
            if "uri" not in names:
                raise ValueError(
                    f"INPUT {redact(input_uri)} has no `uri` column (columns: {', '.join(names)})"
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

    input_uri: str
    options: dict[str, Any] | None
    fans_out: bool
    _first: list[str] | None = None
    _rest: Iterator[list[str]] | None = None

    @classmethod
    def begin(cls, input_uri: str, options: dict[str, Any] | None = None) -> InputListing:
        """Raises what list_inputs raises."""
        if input_kind(input_uri, options) == "remote-prefix":
            return cls(input_uri, options, fans_out=True)
        rest = iter_input_chunks(input_uri, options)
        return cls(input_uri, options, fans_out=False, _first=next(rest), _rest=rest)

    def chunks(self) -> Iterator[list[str]]:
        """All of INPUT's URIs, sorted and unique, in chunks (iter_input_chunks); once."""
        if self._rest is None:
            self._rest = iter_input_chunks(self.input_uri, self.options)
        if self._first is not None:
            yield self._first
            self._first = None
        yield from self._rest
