"""ztunnel's operational endpoints, each on its own address as Istio's ztunnel has them:

- admin (default 127.0.0.1:15000): ``GET /config_dump`` (never key material),
  ``POST /logging?level=debug|info|warning|error``, ``POST /quitquitquit``; every route answers
  only requests from this host's localhost (127.0.0.1 or ::1), whose Host, if any, names
  localhost, and that carry no Origin (a browser page's request): else 403 saying why;
- readiness (default 15021): ``GET /healthz/ready`` — 200 once config, certificates and
  listeners are ready, 500 naming what is pending before, 503 ``draining`` once draining starts;
- metrics (default 15020): ``/metrics`` and ``/stats/prometheus`` (OpenMetrics text as Istio's
  ztunnel serves it, written by the core: :class:`ambient.telemetry.metrics.Exposition`).

Each endpoint survives hostile clients with fixed bounds (the constants below, in
:class:`Limits`): one asyncio thread does all of an endpoint's socket I/O, so an idle, slow or
keep-alive connection costs a file descriptor and a little buffer, never a thread; a request is
handed to a pool of :data:`WORKERS` threads only once it has arrived complete; a connection that
has not sent its complete request within :data:`REQUEST_TIMEOUT` seconds (counted from the
accept, or from the previous answer on a keep-alive connection) is closed. Beyond
:data:`MAX_CONNECTIONS` open connections, or :data:`MAX_QUEUED` requests waiting for a worker,
a connection is answered 503 and closed at once — overload is answered, not queued without
bound. Requests are parsed and answered by h11 (python-hyper's HTTP/1.1 state machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import orjson

from .. import _core

if TYPE_CHECKING:
    from ..telemetry.metrics import Exposition

log = logging.getLogger(__name__)

Response = tuple[HTTPStatus, bytes, str]
Route = Callable[[dict[str, list[str]]], Response]
LOG_LEVELS = {"debug", "info", "warning", "error"}
LOCALHOST = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
LOGGERS = ("", "ambient", "_core")
# What a Host header (or an absolute request target's authority) may name on admin.
LOCAL_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)

# Threads per endpoint that run handlers (routes render config_dump or metrics, or flip the log
# level). Sockets never hold one: they are all served by the endpoint's single I/O thread.
WORKERS = 4
# Seconds a connection gets to send its complete request (line, headers and body), from the
# accept or, on a keep-alive connection, from the previous answer; then it is closed unanswered.
# Counted for the whole request, so a client sending a byte at a time cannot stretch it.
REQUEST_TIMEOUT = 5.0
# Seconds a client gets to take a whole answer off the socket; then the connection is cut.
WRITE_TIMEOUT = 10.0
# Open connections per endpoint (each costs a file descriptor and the bytes of its request in
# progress, bounded below). A connection beyond them is answered 503 and closed unread.
MAX_CONNECTIONS = 1024
# Complete requests waiting for a worker beyond the WORKERS in progress; beyond them, 503.
MAX_QUEUED = 64
# The kernel's queue of connections not yet accepted (the I/O thread takes them as they come):
# a burst up to it waits there instead of being dropped. Linux caps it at net.core.somaxconn.
BACKLOG = 1024
# Longest request line (414) or header line (431), in bytes.
MAX_LINE = 8 * 1024
# Request line and headers together (431), and the number of header lines (431, as http.client).
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
# Longest request body (413). No route reads one; a small one is read and ignored.
MAX_BODY = 8 * 1024
# Seconds a stopping endpoint gives the requests in progress to be answered.
STOP_GRACE = 2.0
# accept() failures that a wait may cure (any other concerns that one connection only).
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Seconds an answered error (400, 413, 414, 431) waits for the client's remaining bytes before
# closing, so the close does not reset the connection before the client reads the answer.
LINGER = 1.0


@dataclass(frozen=True)
class Limits:
    """An endpoint's bounds; the defaults are the module's constants (tests shrink them)."""

    workers: int = WORKERS
    request_timeout: float = REQUEST_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_queued: int = MAX_QUEUED


class _Refused(Exception):
    """A request refused before it reaches a worker: answered with ``status`` and closed."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Closed(Exception):
    """The client closed its side in the middle of a request."""


def _plain(status: HTTPStatus, text: str) -> bytes:
    """A whole HTTP/1.1 answer with a text body, before closing, written without a worker."""
    body = text.encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The next request's bytes (request line, headers, body), within the size bounds; raise
    :class:`_Closed` at end of stream (``EOFError`` if nothing of a request came)."""
    head = bytearray()
    headers: list[bytes] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line longer than the reader's limit (MAX_LINE)
            if not head:
                raise _Refused(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long") from None
            raise _Refused(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long"
            ) from None
        if not line:
            if not head:
                raise EOFError
            raise _Closed
        if not line.endswith(b"\n"):
            raise _Closed
        head += line
        if len(head) > MAX_HEAD:
            raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large")
        if len(head) == len(line):  # the request line
            if line.strip():
                continue
            return bytes(head)  # an empty request line is answered by closing
        if line in (b"\r\n", b"\n"):
            break
        headers.append(line)
        if len(headers) > MAX_HEADERS:
            raise _Refused(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"more than {MAX_HEADERS} header lines",
            )
    length = 0
    lengths: set[bytes] = set()
    expect_continue = False
    for header in headers:
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"transfer-encoding":
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        if name == b"content-length":
            lengths.add(value)
        elif name == b"expect" and value.lower() == b"100-continue":
            expect_continue = True
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit():
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        length = int(value)
    if length > MAX_BODY:
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"bodies are at most {MAX_BODY} bytes")
    if length:
        if expect_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            head += await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise _Closed from None
    return bytes(head)


def _local_host(value: str) -> bool:
    return LOCAL_HOST.fullmatch(value.strip()) is not None


class Endpoint:
    """A small HTTP server: (method, path) -> handler. One thread runs the socket I/O (asyncio),
    ``limits.workers`` threads run the handlers; see the module's docstring for the bounds."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[tuple[str, str], Route],
        *,
        localhost_only: bool = False,
        limits: Limits = Limits(),
    ) -> None:
        ip = ipaddress.ip_address(address[0])
        # Only the host's own localhost: in loopback mode pods live on other 127/8 addresses.
        if localhost_only and ip not in LOCALHOST:
            raise ValueError(
                f"admin address {address[0]}: the admin endpoint answers only on localhost "
                "(use 127.0.0.1 or ::1)"
            )
        self.limits = limits
        self._answer = _Answerer(routes, localhost_only)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(BACKLOG)
        except OSError:
            self._sock.close()
            raise
        host, port = str(self._sock.getsockname()[0]), self._sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix=f"http {self.address}")
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name=f"http {self.address}", daemon=True
        )
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future[None] | None = None
        # Touched only on the I/O thread: the open connections, the requests with the workers.
        self._transports: set[asyncio.BaseTransport] = set()
        self._busy: set[asyncio.BaseTransport] = set()  # a request read, its answer not sent
        self._setups: set[asyncio.Task[None]] = set()  # accepted, no transport yet
        self._resume: asyncio.TimerHandle | None = None  # accepting again after EMFILE
        self._queued = 0

    def start(self) -> Endpoint:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop_serving)
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    def _stop_serving(self) -> None:
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)

    async def _serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        self._sock.setblocking(False)
        loop.add_reader(self._sock, self._accept)
        self._started.set()
        await self._stopping
        loop.remove_reader(self._sock)
        if self._resume is not None:
            self._resume.cancel()
        self._sock.close()  # connections the kernel queued but nobody accepted are reset
        # Close the connections waiting for a request at once, those with a request in progress
        # once it is answered (or STOP_GRACE has passed), until their sockets are closed (a
        # transport leaves the set as its socket closes) and their tasks ended; asyncio.run
        # cancels what is left a second later.
        current = asyncio.current_task()
        grace = loop.time() + STOP_GRACE
        while loop.time() < grace + 1.0:
            late = loop.time() >= grace
            for transport in list(self._transports):
                if late or transport not in self._busy:
                    transport.abort()  # type: ignore[attr-defined]
            if not self._transports and not asyncio.all_tasks() - {current}:
                break
            await asyncio.sleep(0.01)

    def _accept(self) -> None:
        """The listener is readable: accept what the kernel has queued, up to BACKLOG at once."""
        loop = asyncio.get_running_loop()
        for _ in range(BACKLOG):
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in RESOURCE_ERRORS:  # that connection is gone already
                    log.debug("http %s: accept: %s", self.address, e)
                    continue
                # Out of descriptors or memory: leave the connections in the kernel's queue
                # and try again in a second.
                log.warning("http %s: cannot accept connections: %s", self.address, e)
                loop.remove_reader(self._sock)
                self._resume = loop.call_later(1.0, loop.add_reader, self._sock, self._accept)
                return
            conn.setblocking(False)
            task = loop.create_task(self._setup(conn))
            self._setups.add(task)
            task.add_done_callback(self._setups.discard)

    async def _setup(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Protocol(self._transports, self._connection), conn
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:
            log.debug("http %s: connection setup: %s", self.address, e)
            conn.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        # drain() returns only once every byte is with the kernel: a close never waits on a
        # client that does not read.
        transport.set_write_buffer_limits(0)
        peer = writer.get_extra_info("peername") or ("", 0)
        if len(self._transports) > self.limits.max_connections:  # this one included
            log.debug(
                "http %s: %s refused, %d connections open",
                self.address,
                peer,
                self.limits.max_connections,
            )
            writer.write(_plain(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n"))
            transport.abort()  # what the kernel did not take at once is dropped
            return
        try:
            await self._serve_connection(reader, writer, peer)
        except (_Closed, EOFError, OSError):  # closed, reset or timed out: nothing to answer
            pass
        except _Refused as refused:
            writer.write(_plain(refused.status, refused.reason + "\n"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._linger(reader, writer), LINGER)
        finally:
            self._busy.discard(transport)
            transport.abort()  # everything answered is already with the kernel

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any
    ) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        while True:
            raw = await asyncio.wait_for(_read_request(reader, writer), limits.request_timeout)
            self._busy.add(writer.transport)
            if self._queued >= limits.workers + limits.max_queued:
                writer.write(_plain(HTTPStatus.SERVICE_UNAVAILABLE, "busy, try again\n"))
                await asyncio.wait_for(writer.drain(), limits.write_timeout)
                return
            self._queued += 1
            try:
                answer, close = await loop.run_in_executor(self._pool, self._handle, raw, peer)
            finally:
                self._queued -= 1
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), limits.write_timeout)
            self._busy.discard(writer.transport)
            if close:
                return

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send what is buffered, half-close, and read what the client still sends until it
        closes: closing with unread bytes would reset the connection, answer and all."""
        await writer.drain()
        writer.write_eof()
        while await reader.read(MAX_LINE):
            pass

    def _handle(self, raw: bytes, peer: Any) -> tuple[bytes, bool]:
        """On a worker: parse and answer the complete request."""
        return self._answer(raw, peer)


class _Protocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, keeping the endpoint's set of open connections from their
    first moment to their last (a handler may not have started yet when the endpoint stops)."""

    def __init__(
        self,
        transports: set[asyncio.BaseTransport],
        connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        super().__init__(asyncio.StreamReader(MAX_LINE), connected)
        self._open = transports
        self._tracked: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tracked = transport
        self._open.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self._tracked)
        super().connection_lost(exc)


# The methods routes may have; another is answered 501, as a server that does not know it.
METHODS = frozenset({"GET", "POST"})


class _Answerer:
    """Answers one complete request (already read whole by the I/O thread) on a worker: parsed
    and answered by h11 (python-hyper's HTTP/1.1 state machine), the answer as bytes for the
    I/O thread to write, and whether the connection closes after it (HTTP/1.0 without
    keep-alive, ``Connection: close``, an error)."""

    def __init__(self, routes: dict[tuple[str, str], Route], localhost_only: bool) -> None:
        self.routes = routes
        self.localhost_only = localhost_only

    def __call__(self, raw: bytes, peer: Any) -> tuple[bytes, bool]:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.receive_data(raw)
        try:
            request = conn.next_event()
            if not isinstance(request, h11.Request):
                return b"", True  # blank lines and nothing else: closed unanswered
            # The body (no route reads one), up to the end of the message.
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as e:
            status = HTTPStatus(e.error_status_hint)
            return _plain(status, f"bad request: {e}\n"), True
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        response, close = self._dispatch(method, target, headers, peer)
        status, body, content_type = response
        out = conn.send(
            h11.Response(
                status_code=status,
                reason=HTTPStatus(status).phrase,
                headers=[
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(body))),
                    *([("Connection", "close")] if close else []),
                ],
            )
        )
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out += conn.send(h11.EndOfMessage()) or b""
        # Kept alive only when both sides are done (h11: HTTP/1.0, `Connection: close`...).
        return out, close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE

    def _dispatch(
        self, method: str, target: str, headers: list[tuple[str, str]], peer: Any
    ) -> tuple[Response, bool]:
        """The route's answer, and whether the connection must close after it."""
        if method not in METHODS:
            return _text(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {method!r}\n"), False
        url = urlsplit(target)
        refusal = self._refusal(url.netloc, headers, peer) if self.localhost_only else None
        if refusal is not None:
            log.info("admin: refused %s %s from %s: %s", method, url.path, peer[0], refusal)
            return _text(HTTPStatus.FORBIDDEN, f"refused: {refusal}\n"), False
        route = self.routes.get((method, url.path))
        if route is None:
            return (HTTPStatus.NOT_FOUND, b"not found\n", "text/plain"), False
        try:
            return route(parse_qs(url.query)), False
        except Exception:
            log.exception("http %s %s", method, url.path)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n"), True

    @staticmethod
    def _refusal(url_netloc: str, headers: list[tuple[str, str]], peer: Any) -> str | None:
        """Why admin refuses this request, or None."""
        try:
            ip = ipaddress.ip_address(str(peer[0]))
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip not in LOCALHOST:
            return f"admin answers only this host's localhost (127.0.0.1 or ::1), not {peer[0]}"
        hosts = [v for k, v in headers if k == "host"]
        if len(hosts) > 1:
            return "more than one Host header"
        for host in [*hosts, *([url_netloc] if url_netloc else [])]:
            if not _local_host(host):
                return (
                    f"Host {host!r} is not localhost (a browser page reaching admin through "
                    "DNS rebinding?)"
                )
        origin = next((v for k, v in headers if k == "origin"), None)
        if origin is not None:
            return (
                f"a request with an Origin header ({origin!r}) comes from a browser page; "
                "admin takes requests from local tools only"
            )
        return None


def _text(status: HTTPStatus, text: str) -> Response:
    return status, text.encode(), "text/plain; charset=utf-8"


def readiness(
    pending: Callable[[], list[str]], draining: Callable[[], bool]
) -> dict[tuple[str, str], Route]:
    """``/healthz/ready``: 503 ``draining`` from the moment ``draining()`` is true (before the
    listeners close, as Istio's ztunnel), else 500 naming what is ``pending()``, else 200."""

    def ready(_: dict[str, list[str]]) -> Response:
        if draining():
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
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
        _core.sync_level()  # the core filters records where they happen; tell it the new level
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


def metrics(exposition: Exposition) -> dict[tuple[str, str], Route]:
    def scrape(_: dict[str, list[str]]) -> Response:
        # Istio's ztunnel's body (OpenMetrics text) and its default content type.
        return HTTPStatus.OK, exposition.text().encode(), "text/plain; charset=utf-8"

    return {("GET", "/metrics"): scrape, ("GET", "/stats/prometheus"): scrape}
