"""ztunnel's operational endpoints, each on its own address as Istio's ztunnel has them:

- admin (localhost only, default 15000): ``GET /config_dump`` (never key material),
  ``POST /logging?level=debug|info|warning|error``, ``POST /quitquitquit``;
- readiness (default 15021): ``GET /healthz/ready`` — 200 once config, certificates and
  listeners are ready, else 500 naming what is pending;
- metrics (default 15020): ``/metrics`` and ``/stats/prometheus`` (Prometheus text, served by
  ``prometheus_client``).

All run on threads of their own, apart from the data plane, with the standard library's HTTP
server.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CollectorRegistry, exposition

from .. import _core

log = logging.getLogger(__name__)

Response = tuple[HTTPStatus, bytes, str]
Route = Callable[[dict[str, list[str]]], Response]
LOG_LEVELS = {"debug", "info", "warning", "error"}
LOCALHOST = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
LOGGERS = ("", "ambient", "_core")


class Endpoint:
    """A small HTTP server: (method, path) -> handler, on its own thread."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[tuple[str, str], Route],
        *,
        localhost_only: bool = False,
    ) -> None:
        # Only the host's own localhost: in loopback mode pods live on other 127/8 addresses.
        if localhost_only and ipaddress.ip_address(address[0]) not in LOCALHOST:
            raise ValueError(
                f"admin address {address[0]}: the admin endpoint answers only on localhost "
                "(use 127.0.0.1 or ::1)"
            )

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self, method: str) -> None:
                url = urlsplit(self.path)
                route = routes.get((method, url.path))
                if localhost_only and not ipaddress.ip_address(self.client_address[0]).is_loopback:
                    self._send((HTTPStatus.FORBIDDEN, b"admin is localhost only\n", "text/plain"))
                elif route is None:
                    self._send((HTTPStatus.NOT_FOUND, b"not found\n", "text/plain"))
                else:
                    self._send(route(parse_qs(url.query)))

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def _send(self, response: Response) -> None:
                status, body, content_type = response
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Endpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _text(status: HTTPStatus, text: str) -> Response:
    return status, text.encode(), "text/plain; charset=utf-8"


def readiness(pending: Callable[[], list[str]]) -> dict[tuple[str, str], Route]:
    def ready(_: dict[str, list[str]]) -> Response:
        waiting = pending()
        if waiting:
            return _text(
                HTTPStatus.INTERNAL_SERVER_ERROR, "not ready: " + "; ".join(waiting) + "\n"
            )
        return _text(HTTPStatus.OK, "ready\n")

    return {("GET", "/healthz/ready"): ready}


def admin(
    config_dump: Callable[[], dict[str, Any]], quit: Callable[[], None]
) -> dict[tuple[str, str], Route]:
    def dump(_: dict[str, list[str]]) -> Response:
        return (
            HTTPStatus.OK,
            orjson.dumps(config_dump(), option=orjson.OPT_INDENT_2),
            "application/json",
        )

    def logging_level(query: dict[str, list[str]]) -> Response:
        level = (query.get("level") or [""])[0].lower()
        if level not in LOG_LEVELS:
            return _text(
                HTTPStatus.BAD_REQUEST,
                f"level: expected one of {', '.join(sorted(LOG_LEVELS))}, got {level!r}\n",
            )
        for name in LOGGERS:
            logging.getLogger(name).setLevel(level.upper())
        _core.reset_log_cache()  # the core caches levels; make it see the new one
        log.warning("log level set to %s", level)
        return _text(HTTPStatus.OK, f"log level: {level}\n")

    def quitquitquit(_: dict[str, list[str]]) -> Response:
        threading.Thread(target=quit, daemon=True).start()
        return _text(HTTPStatus.OK, "draining\n")

    return {
        ("GET", "/config_dump"): dump,
        ("POST", "/logging"): logging_level,
        ("POST", "/quitquitquit"): quitquitquit,
    }


def metrics(registry: CollectorRegistry) -> dict[tuple[str, str], Route]:
    def scrape(_: dict[str, list[str]]) -> Response:
        return HTTPStatus.OK, exposition.generate_latest(registry), exposition.CONTENT_TYPE_LATEST

    return {("GET", "/metrics"): scrape, ("GET", "/stats/prometheus"): scrape}
