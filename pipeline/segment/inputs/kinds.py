"""INPUT resolved once: its URI, storage options, filesystem and kind.

INPUT is one of:

* a prefix (folder) at any fsspec URI, listed recursively; files whose name
  ends in an image extension (any case) are kept, everything else is ignored.
  The listing fans out over sub-prefixes (prefix.py);
* a single image file;
* a ``.txt`` file with one URI per line (blank lines and ``#`` comments are
  skipped; a relative path is relative to the list file's folder);
* a ``.parquet`` file with a ``uri`` string column;
* an S3 Inventory report: its ``manifest.json`` (s3:// or a local copy), with
  CSV or Parquet data files; the image keys it lists in its source bucket
  (inventory.py).

An :class:`Input` opens INPUT's filesystem when it is made (no request) and looks up its
kind the first time it is asked (a request or two), so a run that never lists INPUT
(one that resumes, or finds OUTPUT complete) never touches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.segment.inputs.names import IMAGE_EXTENSIONS, is_image_name
from pipeline.segment.inputs.prefix import is_local
from pipeline.storage import first_line, full_uri, get_fs, looks_secret, protocol_of, redact

KINDS = ("list", "inventory", "image", "prefix", "remote-prefix")


@dataclass
class Input:
    """INPUT: ``uri`` with the storage ``options`` to reach it."""

    uri: str
    options: dict[str, Any] | None = None
    fs: Any = field(init=False, repr=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        with naming_input(self.uri):
            self.fs, self.path = get_fs(self.uri, self.options)

    @cached_property
    def kind(self) -> str:
        """One of KINDS: "list" (.txt, .parquet), "inventory" (an S3 Inventory
        manifest.json), "image", "prefix" (a local folder) or "remote-prefix" (a prefix on
        remote storage, which a listing fans out over in Ray tasks when Ray is up).

        Raises FileNotFoundError for a missing INPUT, ValueError for one of no known kind,
        PermissionError/OSError when storage refuses; every message names INPUT.
        """
        with naming_input(self.uri):
            return _kind(self.uri, self.fs, self.path)

    def show(self) -> str:
        """INPUT redacted, for messages."""
        return redact(self.uri)

    def normalized(self) -> str:
        """INPUT as one spelling (absolute local path, scheme kept), redacted: what a run's
        spec records and compares."""
        return redact(full_uri(self.fs, self.path.rstrip("/") or "/"))


def as_input(input_uri: str | Input, options: dict[str, Any] | None = None) -> Input:
    """``input_uri`` when it is an :class:`Input` already, else INPUT resolved."""
    return input_uri if isinstance(input_uri, Input) else Input(input_uri, options)


@contextmanager
def naming_input(input_uri: str) -> Iterator[None]:
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


def _kind(input_uri: str, fs: Any, path: str) -> str:
    """Input.kind; raises for a missing or unknown INPUT."""
    # A signed URL's name ends before its query string.
    lowered = (
        path.split("?", 1)[0] if protocol_of(input_uri) in ("http", "https") else path
    ).lower()
    if lowered.endswith((".txt", ".parquet", "manifest.json")):
        if not fs.isfile(path):
            raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such file")
        return "inventory" if lowered.endswith("manifest.json") else "list"
    if fs.isfile(path):
        if not is_image_name(path):
            raise ValueError(
                f"INPUT {redact(input_uri)} is neither an image ({', '.join(IMAGE_EXTENSIONS)}), "
                "a folder, a .txt list of URIs, a .parquet file with a `uri` column "
                "nor an S3 Inventory manifest.json"
            )
        return "image"
    if not fs.exists(path):
        raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such folder or prefix")
    return "prefix" if is_local(fs) else "remote-prefix"
