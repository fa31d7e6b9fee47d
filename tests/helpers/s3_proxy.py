"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server).

Requests are forwarded as they are; by their arrival number some are answered
``503 SlowDown`` (S3's throttling reply), some have their connection reset before
any reply, and some are delayed. Faults are spread by counter, not at random, so a
retried request meets a different fate and every run injects the same share.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyS3Proxy:
    """``with FlakyS3Proxy(upstream) as proxy: proxy.endpoint_url`` (counts in proxy.faults).

    Of every ``every`` requests, one is a 503 SlowDown, one a reset connection and one
    delayed by ``delay`` seconds; ``permanent`` answers every request 403 AccessDenied.
    """

    def __init__(self, upstream: str, every: int = 5, delay: float = 0.5) -> None:
        self.upstream = urlsplit(upstream)
        self.every = every
        self.delay = delay
        self.permanent = False
        self.faults = {"requests": 0, "slowdown": 0, "reset": 0, "delayed": 0}
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FlakyS3Proxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fate(self) -> str:
        with self._lock:
            n = next(self._counter)
            self.faults["requests"] += 1
            fate = {1: "slowdown", 2: "reset", 3: "delayed"}.get(n % self.every, "ok")
            if fate != "ok":
                self.faults[fate] += 1
            return fate

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.permanent:
                    return self._reply(403, b"<Error><Code>AccessDenied</Code></Error>")
                fate = proxy._fate()
                if fate == "slowdown":
                    return self._reply(503, SLOWDOWN)
                if fate == "reset":  # RST instead of a reply: what a dropped connection gives
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.close_connection = True
                    return None
                if fate == "delayed":
                    time.sleep(proxy.delay)  # a slow response, not synchronisation
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = proxy.upstream.netloc  # signatures cover the Host header
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
