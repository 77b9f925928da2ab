"""The pure-Python HBONE server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from h2.errors import ErrorCodes

from ambient.identity import SpiffeId, WorkloadCertificate

from .common import (
    ALPN_H2,
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    READ_SIZE,
    TLS_STREAM_LIMIT,
    TLS_WRITE_HIGH_WATER,
    HboneError,
    ReceivedConnect,
    _peer_uri_sans,
    _selected_alpn,
    _tls_context,
    _tune_socket,
    parse_authority,
)
from .connection import (
    HboneStream,
    _Connection,
    _splice,
)

log = logging.getLogger(__name__)


class HboneServer:
    """HBONE server: TLS 1.3 only, ALPN h2, client certificate REQUIRED and verified against roots;
    the client's certificate must carry a URI SAN spiffe://<this server's trust domain>/... else the
    connection is closed right after the handshake.

    Per stream: a non-CONNECT request gets 400, an ``:authority`` that is not ``ip:port`` 400,
    ``decide`` may deny with its own status (e.g. 401), an unreachable upstream 503; otherwise the
    server connects to the upstream (``decide``'s choice, else ``upstream``, else the authority
    itself), answers 200 and relays bytes both ways. ``received`` lists every request, in order.
    """

    def __init__(
        self,
        cert: WorkloadCertificate,
        *,
        upstream: tuple[str, int] | None = None,
        decide: Callable[[ReceivedConnect], tuple[int, tuple[str, int] | None]] | None = None,
    ) -> None:
        self._cert = cert
        self._upstream = upstream
        self._decide = decide
        self._trust_domain_prefix = f"spiffe://{SpiffeId.parse(cert.identity).trust_domain}/"
        self._ssl = _tls_context(cert, server_side=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # stream handlers
        self._handlers: set[asyncio.Task[None]] = set()  # connection handlers
        self.received: list[ReceivedConnect] = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (0 picks a free port) and return the bound address."""
        self._server = await asyncio.start_server(
            self._handle_connection, host, port, ssl=self._ssl, limit=TLS_STREAM_LIMIT
        )
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        """Stop listening, send GOAWAY on every connection, close them and their upstreams."""
        if self._server is not None:
            self._server.close()
        # Closing the connections ends their reader loops and fails their streams.
        await asyncio.gather(*(conn.aclose() for conn in list(self._connections)))
        streams = list(self._tasks)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """asyncio's per-connection callback: never raises, so one connection cannot hurt others."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels us. Return normally: on Python 3.11 asyncio's bookkeeping of
            # this callback's task logs "Exception in callback" for a cancelled task.
            writer.transport.abort()
        except Exception:
            log.exception("HBONE connection from %s failed", writer.get_extra_info("peername"))
            writer.transport.abort()
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        alpn = _selected_alpn(writer)
        sans = _peer_uri_sans(writer)
        identity = next((s for s in sans if s.startswith(self._trust_domain_prefix)), None)
        if alpn != ALPN_H2 or identity is None:
            log.warning(
                "dropping HBONE connection from %s: alpn=%r, URI SANs %r not in %s",
                peer,
                alpn,
                sans,
                self._trust_domain_prefix,
            )
            writer.transport.abort()
            return
        _tune_socket(writer)
        writer.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        stream_tasks: set[asyncio.Task[None]] = set()

        def on_request(stream: HboneStream, headers: dict[str, str]) -> None:
            stream.request_headers = headers
            received = ReceivedConnect(
                method=headers.get(":method", ""),
                authority=headers.get(":authority", ""),
                headers={k: v for k, v in headers.items() if not k.startswith(":")},
                peer_identity=identity,
            )
            self.received.append(received)
            t = self._spawn(self._serve_stream(stream, received))
            stream_tasks.add(t)
            t.add_done_callback(stream_tasks.discard)

        conn = _Connection(reader, writer, client_side=False, on_request=on_request)
        self._connections.add(conn)
        try:
            conn.start()
            await conn.run()
        finally:
            # The connection is gone: its streams' relays (and upstream sockets) go with it.
            for t in list(stream_tasks):
                t.cancel()
            await asyncio.gather(*stream_tasks, return_exceptions=True)
            self._connections.discard(conn)
            await conn.aclose()

    async def _serve_stream(self, stream: HboneStream, received: ReceivedConnect) -> None:
        try:
            await self._serve_stream_inner(stream, received)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except HboneError as e:
            log.debug("stream %d: %s", stream.stream_id, e)
            stream.reset()
        except Exception:
            log.exception(
                "stream %d (%s %s) failed", stream.stream_id, received.method, received.authority
            )
            stream.reset(ErrorCodes.INTERNAL_ERROR)

    async def _serve_stream_inner(self, stream: HboneStream, received: ReceivedConnect) -> None:
        if received.method != "CONNECT":
            stream._respond(400)
            return
        target = parse_authority(received.authority)
        if target is None:
            stream._respond(400)
            return
        status: int = 200
        chosen: tuple[str, int] | None = None
        if self._decide is not None:
            status, chosen = self._decide(received)
        if status != 200:
            stream._respond(status)
            return
        destination = chosen or self._upstream or target
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(
                    destination[0], destination[1], limit=READ_SIZE
                )
        except (OSError, TimeoutError) as e:
            log.debug("stream %d: upstream %s unreachable: %r", stream.stream_id, destination, e)
            stream._respond(503)
            return
        if stream._error is not None:  # reset or connection lost while connecting
            up_writer.transport.abort()
            return
        _tune_socket(up_writer)
        try:
            stream._respond(200)
        except BaseException:
            up_writer.transport.abort()
            raise
        await _splice(stream, up_reader, up_writer)


# ----------------------------------------------------------------------------------------------
# Client
