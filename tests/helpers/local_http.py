"""A static file server on loopback (stands in for a signed URL's host), as a fixture.

Use it in a test module with ``from local_http import http_server_fixture  # noqa: F401``
and a test parameter ``http_server``.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(name="http_server")
def http_server_fixture(tmp_path):
    """(root, base URL): files under tmp_path/www served at base URL; query strings ignored."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
