"""ztunnel's admin endpoint (localhost): readiness and a config dump — never key material.

Served with the standard library's HTTP server on its own thread, apart from the data plane.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

log = logging.getLogger(__name__)


class AdminServer:
    """``GET /healthz/ready`` (200 once nothing is pending, else 500 listing what is) and
    ``GET /config_dump`` (JSON)."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        pending: Callable[[], list[str]],
        config_dump: Callable[[], dict[str, Any]],
    ) -> None:
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz/ready":
                    waiting = admin.pending()
                    if waiting:
                        body = ("not ready: " + "; ".join(waiting) + "\n").encode()
                        self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "text/plain")
                    else:
                        self._send(HTTPStatus.OK, b"ready\n", "text/plain")
                elif self.path == "/config_dump":
                    body = orjson.dumps(admin.config_dump(), option=orjson.OPT_INDENT_2)
                    self._send(HTTPStatus.OK, body, "application/json")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

            def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("admin: " + format, *args)

        self.pending = pending
        self.config_dump = config_dump
        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self.address = "{}:{}".format(*self.server.server_address[:2])
        self._thread = threading.Thread(target=self.server.serve_forever, name="admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
