"""INPUT -> the sorted, de-duplicated list of image URIs a segment run covers.

INPUT is one of:

* a prefix (folder) at any fsspec URI, listed recursively; files whose name
  ends in an image extension (any case) are kept, everything else is ignored;
* a single image file;
* a ``.txt`` file with one URI per line (blank lines and ``#`` comments are
  skipped; a relative path is relative to the list file's folder);
* a ``.parquet`` file with a ``uri`` string column.
"""

from __future__ import annotations

import posixpath
from typing import Any

from pipeline.storage import full_uri, get_fs, looks_secret, protocol_of, redact

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def is_image_name(path: str) -> bool:
    """True when ``path`` ends in one of IMAGE_EXTENSIONS, in any case."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_inputs(input_uri: str, options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the images INPUT names, sorted and unique.

    Raises FileNotFoundError when INPUT does not exist, ValueError when it
    names no image, PermissionError/OSError when storage refuses; every message
    names INPUT (redacted).
    """
    try:
        return _list_inputs(input_uri, options)
    except (FileNotFoundError, ValueError):
        raise  # these name INPUT already
    except OSError as exc:  # storage's own message is often one word ("Forbidden")
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if looks_secret(reason):
            reason = type(exc).__name__
        if isinstance(exc, PermissionError):
            raise PermissionError(
                f"INPUT {redact(input_uri)}: access denied ({reason}); check the credentials "
                "(AWS_* variables or --anon) and that they may list and read it"
            ) from exc
        raise OSError(f"INPUT {redact(input_uri)}: cannot list it ({reason})") from exc


def _list_inputs(input_uri: str, options: dict[str, Any] | None) -> list[str]:
    fs, path = get_fs(input_uri, options)
    # A signed URL's name ends before its query string.
    lowered = (
        path.split("?", 1)[0] if protocol_of(input_uri) in ("http", "https") else path
    ).lower()
    if lowered.endswith(".txt") or lowered.endswith(".parquet"):
        if not fs.isfile(path):
            raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such file")
        uris = _read_uri_list(fs, path, input_uri)
        what = "lists no URI"
    elif fs.isfile(path):
        if not is_image_name(path):
            raise ValueError(
                f"INPUT {redact(input_uri)} is neither an image ({', '.join(IMAGE_EXTENSIONS)}), "
                "a folder, a .txt list of URIs nor a .parquet file with a `uri` column"
            )
        uris = [full_uri(fs, path)]
        what = "is empty"
    else:
        if not fs.exists(path):
            raise FileNotFoundError(f"INPUT {redact(input_uri)}: no such folder or prefix")
        uris = [full_uri(fs, p) for p in fs.find(path) if is_image_name(p)]
        what = f"holds no image (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)"
    uris = sorted(set(uris))
    if not uris:
        raise ValueError(f"INPUT {redact(input_uri)} {what}")
    return uris


def _read_uri_list(fs: Any, path: str, input_uri: str) -> list[str]:
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            if "uri" not in schema.names:
                raise ValueError(
                    f"INPUT {redact(input_uri)} has no `uri` column (columns: {', '.join(schema.names)})"
                )
            f.seek(0)
            column = pq.read_table(f, columns=["uri"]).column("uri")
        lines = [u for u in column.to_pylist() if u]
    else:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
    base = posixpath.dirname(full_uri(fs, path))
    return [_resolve(u, base) for u in lines]


def _resolve(uri: str, base: str) -> str:
    """``uri`` itself when absolute (a scheme or a leading '/'), else under ``base``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    if protocol_of(base) == "file":
        return posixpath.normpath(posixpath.join(base, uri))
    return base.rstrip("/") + "/" + uri
