"""One way to reach files at any fsspec URI (local path, s3://, gs://, memory://).

Storage options come from flags and the usual environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Credentials never leave this
module in a printable form: use :func:`redact` on any URI before logging it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs


def protocol_of(uri: str) -> str:
    """'s3' for s3://b/k, 'file' for a local path."""
    proto = urlsplit(uri).scheme if "://" in uri else ""
    return proto or "file"


def storage_options(
    uri: str, endpoint_url: str | None = None, anon: bool | None = None
) -> dict[str, Any]:
    """fsspec storage options for ``uri``'s protocol from flags, then environment.

    Only S3 takes options here: an explicit ``endpoint_url`` (or
    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3) and anonymous access (``anon`` or
    MASKRCNN_S3_ANON=1). Credentials are left to the standard AWS chain.
    """
    if protocol_of(uri) not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {}
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if anon is None:
        anon = os.environ.get("MASKRCNN_S3_ANON", "").lower() in ("1", "true", "yes")
    if anon:
        opts["anon"] = True
    return opts


def get_fs(
    uri: str, options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for ``uri``; options default to :func:`storage_options`."""
    if options is None:
        options = storage_options(uri)
    options = dict(options)
    if protocol_of(uri) in ("s3", "s3a") and "endpoint_url" in options:
        # s3fs takes the endpoint inside client_kwargs only.
        endpoint = options.pop("endpoint_url")
        options.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
    return url_to_fs(uri, **options)


def join(base: str, *parts: str) -> str:
    """Join URI path parts with '/', keeping the scheme of ``base``."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` (protocol restored: s3://bucket/key, /local/path)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path.split('://', 1)[-1]}"


_SECRET_QUERY = re.compile(
    r"(?i)(x-amz-[a-z-]+|signature|sig|token|key|secret|credential|expires|se|sp|sv|sr|st)="
)


def redact(uri: str) -> str:
    """``uri`` with user info and any query string (signed URL parameters) removed."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username or parts.password:
        netloc = "***@" + netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def looks_secret(text: str) -> bool:
    """True when ``text`` contains something that looks like a signed-URL parameter."""
    return bool(_SECRET_QUERY.search(text))


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: the
    reason a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- retries and writes ---------------------------------------------------------------
T = TypeVar("T")

# Errors that retrying cannot fix: raise them at once.
PERMANENT_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
)


def retrying(fn: Callable[..., T], *args: Any, what: str = "", attempts: int = 5) -> T:
    """``fn(*args)`` retried with exponential backoff on transient storage errors.

    Anything but PERMANENT_ERRORS counts as transient (throttling, connection
    resets, timeouts: storage clients raise many types for these).
    """
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn(*args)
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:
            if attempt == attempts - 1:
                raise OSError(f"{what}: {exc}" if what else str(exc)) from exc
            time.sleep(delay)  # backoff before the next try
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def atomic_write(uri: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` so that readers see all of it or nothing.

    Local: a temp file beside the target, fsynced, then renamed over it. Object
    stores: one PUT (retried), which shows the whole object or none.
    """
    fs, path = get_fs(uri, options)
    if protocol_of(uri) == "file":
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    retrying(fs.pipe_file, path, data, what=f"writing {redact(uri)}")


def write_text(uri: str, text: str, options: dict[str, Any] | None = None) -> None:
    """``text`` as UTF-8 at ``uri``, atomically."""
    atomic_write(uri, text.encode(), options)


def write_json(uri: str, value: Any, options: dict[str, Any] | None = None) -> None:
    """``value`` as JSON at ``uri``, atomically."""
    write_text(uri, json.dumps(value), options)


def write_json_list(uri: str, items: Iterable[Any], options: dict[str, Any] | None = None) -> int:
    """Stream ``items`` as a JSON array (one item a line) to ``uri``; returns the count.

    Streamed rather than built in memory: a results list can outgrow it. Not atomic:
    the file is only ever a result for the user, never read back by a job.
    """
    fs, path = get_fs(uri, options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    n = 0
    with fs.open(path, "w") as f:
        f.write("[")
        for item in items:
            f.write(("\n" if n == 0 else ",\n") + json.dumps(item, separators=(",", ":")))
            n += 1
        f.write("\n]\n" if n else "]\n")
    return n
