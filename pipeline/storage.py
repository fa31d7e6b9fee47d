"""One way to reach files at any fsspec URI (local path, s3://, gs://, memory://).

Storage options come from flags and the usual environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Credentials never leave this
module in a printable form: use :func:`redact` on any URI before logging it.
"""

from __future__ import annotations

import os
import re
from typing import Any
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
