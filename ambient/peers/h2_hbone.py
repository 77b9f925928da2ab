"""HBONE in pure Python: HTTP/2 CONNECT over mutual TLS 1.3 with asyncio, ``h2`` and ``ssl``.

This is an independent implementation of the tunnel Istio's ztunnel speaks on port 15008, written
the way a Python developer would write it without our Rust core: plain asyncio streams, the
python-hyper ``h2`` state machine and the standard ``ssl`` module. It serves two purposes:

* a wire check for the Rust core (its client against the Rust server and the other way round);
* a benchmark baseline.

Wire facts (see the ztunnel reference, "HBONE on the wire"):

* TLS 1.3 only, ALPN ``h2`` on both sides, the client sends no SNI and does not resume sessions.
* The server requires a client certificate chained to the roots whose URI SAN is a SPIFFE ID in the
  server's own trust domain; the client requires one of the server's URI SANs to be one of the
  identities it expects.
* One ``CONNECT`` stream per proxied TCP connection, with only ``:method`` and ``:authority`` as
  pseudo-headers (RFC 7540 section 8.3, no ``:protocol``); ``200`` only once the upstream TCP
  connect succeeded; ``400`` for a non-CONNECT request or a bad authority; ``401`` when denied;
  ``503`` when the upstream is unreachable.
* HTTP/2 stream window 4 MiB, connection window 16 MiB, max frame size 1 MiB.
* Half-close is forwarded in both directions (END_STREAM <-> TCP FIN).

Run as a process (for benchmarks)::

    python -m ambient.peers.h2_hbone server --listen 127.0.0.1:15008 --upstream 127.0.0.1:5201 \\
        --ca-dir DIR --identity spiffe://cluster.local/ns/default/sa/server
    python -m ambient.peers.h2_hbone client --listen 127.0.0.1:9000 --server 127.0.0.1:15008 \\
        --authority 127.0.0.1:5201 --ca-dir DIR \\
        --identity spiffe://cluster.local/ns/default/sa/client \\
        --expect spiffe://cluster.local/ns/default/sa/server

Each prints ``ready <host>:<port>`` once listening and exits cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import h2.events
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from ambient.identity import CertificateAuthority, SpiffeId, WorkloadCertificate

__all__ = [
    "HboneClient",
    "HboneError",
    "HboneServer",
    "HboneStream",
    "ReceivedConnect",
    "format_hostport",
    "forward",
    "main",
    "parse_authority",
]

log = logging.getLogger(__name__)

ALPN_H2 = "h2"
STREAM_WINDOW = 4 * 1024 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE, as ztunnel
CONNECTION_WINDOW = 16 * 1024 * 1024  # connection window, opened by a WINDOW_UPDATE on stream 0
MAX_FRAME_SIZE = 1024 * 1024  # SETTINGS_MAX_FRAME_SIZE, as ztunnel
DEFAULT_WINDOW = 65_535  # RFC 7540 initial window of every connection
MAX_CONCURRENT_STREAMS = 1000  # what our server advertises (h2's own default is 100)
MAX_HEADER_LIST_SIZE = 64 * 1024
READ_SIZE = 256 * 1024  # socket reads when relaying
TLS_STREAM_LIMIT = 1024 * 1024  # asyncio StreamReader buffer limit on the TLS side
TLS_WRITE_HIGH_WATER = 1024 * 1024  # write buffer size before drain() blocks on the TLS side
CONNECT_TIMEOUT = 10.0  # upstream TCP connect
CLOSE_TIMEOUT = 2.0  # graceful TLS close before aborting


class HboneError(Exception):
    """An HBONE connection or stream failed; ``status`` is the HTTP status if the peer sent one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReceivedConnect:
    """What the server saw on one stream: the request line, its regular headers, and who sent it.

    ``headers`` holds the non-pseudo headers only (``forwarded``, ``baggage``, ``traceparent`` ...);
    the pseudo-headers are ``method`` and ``authority``. ``peer_identity``: the client's SPIFFE ID.
    """

    method: str
    authority: str
    headers: dict[str, str]
    peer_identity: str | None


# ----------------------------------------------------------------------------------------------
# TLS


def _load_cert_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    """Load the chain and key; ``ssl`` only reads files, so use a private, short-lived directory."""
    with tempfile.TemporaryDirectory(prefix="hbone-") as tmp:  # created 0700
        chain_path = os.path.join(tmp, "chain.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
        with open(chain_path, "wb") as f:
            f.write(cert.chain_pem)
        ctx.load_cert_chain(chain_path, key_path)


def _tls_context(cert: WorkloadCertificate, *, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only, mutually authenticated context offering only ALPN ``h2``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        ctx.check_hostname = False  # identity is checked on the URI SAN, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED  # server side: client certificate required
    ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    _load_cert_chain(ctx, cert)
    ctx.set_alpn_protocols([ALPN_H2])
    if server_side:
        ctx.num_tickets = 0  # no session resumption
    return ctx


def _peer_uri_sans(writer: asyncio.StreamWriter) -> list[str]:
    """The URI SANs of the verified peer certificate (empty if there is none)."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return []
    peer = ssl_object.getpeercert()
    if not peer:
        return []
    return [str(value) for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


def _selected_alpn(writer: asyncio.StreamWriter) -> str | None:
    ssl_object = writer.get_extra_info("ssl_object")
    return None if ssl_object is None else ssl_object.selected_alpn_protocol()


def _tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive on (asyncio already sets TCP_NODELAY on TCP sockets)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def _close_writer(writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
    """Close a transport: gracefully (bounded in time) or by abort."""
    if abort:
        writer.transport.abort()
        return
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


# ----------------------------------------------------------------------------------------------
# Addresses


def parse_authority(authority: str) -> tuple[str, int] | None:
    """Parse a CONNECT ``:authority``: ``ipv4:port`` or ``[ipv6]:port``; None if invalid."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    try:
        if host.startswith("[") and host.endswith("]"):
            v6 = ipaddress.IPv6Address(host[1:-1])
            if v6.scope_id is not None:
                return None
            return str(v6), port
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        return None


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_hostport(text: str) -> tuple[str, int]:
    """Parse a command-line ``host:port`` (host may be a name, an IPv4 or a bracketed IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------------
# One HTTP/2 connection (either side)


@contextlib.contextmanager
def _h2_errors(what: str) -> Iterator[None]:
    """Turn h2 state errors on send into HboneError."""
    try:
        yield
    except h2.exceptions.H2Error as e:
        raise HboneError(f"{what}: {e!r}") from e


class _Connection:
    """An h2 state machine over an asyncio TLS stream, with the streams it carries.

    A reader task feeds received bytes to h2 and dispatches the events; senders call h2 directly
    (asyncio is single-threaded, so no lock is needed between awaits) and flush its output. The
    reader never waits for the write buffer to drain (that could deadlock two peers that both send);
    only stream writers do, which is where back-pressure belongs.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client_side: bool,
        on_request: Callable[[HboneStream, dict[str, str]], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client_side = client_side
        self.on_request = on_request
        self.h2 = H2Connection(H2Configuration(client_side=client_side, header_encoding="utf-8"))
        settings: dict[SettingCodes, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        }
        if client_side:
            settings[SettingCodes.ENABLE_PUSH] = 0
        # Replace the defaults before the preface so that one SETTINGS frame carries ours; h2 reads
        # the inbound frame size limit from max_inbound_frame_size, fixed at construction.
        self.h2.local_settings = Settings(client=client_side, initial_values=settings)
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.streams: dict[int, HboneStream] = {}
        self.closed = False
        self.goaway = False
        self.error: HboneError | None = None
        self._slot_freed = asyncio.Event()
        self._close_started = False

    # -- output

    def start(self) -> None:
        """Queue the preface: SETTINGS, then widen the connection window to 16 MiB."""
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()

    def flush(self) -> None:
        """Hand whatever h2 queued to the transport (never blocks)."""
        data = self.h2.data_to_send()
        if data and not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Wait for the transport's write buffer to drain."""
        try:
            await self.writer.drain()
        except OSError as e:  # ConnectionError and ssl.SSLError included
            raise self._lost_error(e) from e

    def ack(self, stream_id: int, size: int) -> None:
        """Return ``size`` consumed bytes to the peer's windows (h2 batches the WINDOW_UPDATEs)."""
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    # -- input

    async def run(self) -> None:
        """Read and dispatch until the peer goes away; then fail every stream."""
        error: BaseException | None = None
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.warning("HTTP/2 protocol error from peer: %r", e)
                    self.flush()  # the GOAWAY h2 queued
                    error = e
                    break
                for event in events:
                    self._dispatch(event)
                self.flush()
        except OSError as e:
            error = e
        finally:
            self._lost(self._lost_error(error))
            if not self.writer.is_closing():
                self.writer.close()  # answers the peer's close_notify; the connection is done

    def _lost_error(self, cause: BaseException | None) -> HboneError:
        if self.error is not None:
            return self.error
        if cause is None:
            return HboneError("HBONE connection closed by peer")
        return HboneError(f"HBONE connection lost: {cause!r}")

    def _lost(self, error: HboneError) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        self._slot_freed.set()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if stream is None or stream._error is not None:
                self.ack(event.stream_id, event.flow_controlled_length)
            else:
                self.ack(event.stream_id, padding)  # padding is never read, return it now
                stream._feed(event.data)
        elif isinstance(event, h2.events.RequestReceived):
            headers = {_text(k): _text(v) for k, v in event.headers}
            stream = HboneStream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            if self.on_request is None:
                stream.reset(ErrorCodes.REFUSED_STREAM)
            else:
                self.on_request(stream, headers)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response({_text(k): _text(v) for k, v in event.headers})
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                code = event.error_code
                name = code.name if isinstance(code, ErrorCodes) else str(code)
                stream._fail(HboneError(f"stream {event.stream_id} reset by peer ({name})"))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream._window.set()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._window.set()
            self._slot_freed.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            code = event.error_code or 0
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            error = HboneError(f"GOAWAY from peer ({name})")
            last = event.last_stream_id or 0
            for stream_id, stream in list(self.streams.items()):
                outbound = (stream_id % 2 == 1) == self.client_side
                if code != ErrorCodes.NO_ERROR or (outbound and stream_id > last):
                    stream._fail(error)
            if code != ErrorCodes.NO_ERROR:
                self.error = self.error or error
        # SettingsAcknowledged, PingReceived (h2 answers it), PingAckReceived, PriorityUpdated,
        # TrailersReceived, InformationalResponseReceived ...: nothing to do.

    def forget(self, stream: HboneStream) -> None:
        """Drop a finished stream; unread data it had is returned to the connection window."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._slot_freed.set()

    async def wait_for_slot(self) -> None:
        """Wait until the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows one more outbound stream."""
        while (
            not self.closed
            and self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams
        ):
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def aclose(self, *, graceful: bool = True) -> None:
        """Send GOAWAY (if still possible) and close the transport, gracefully or by abort."""
        if self._close_started:
            if not graceful:
                self.writer.transport.abort()
            return
        self._close_started = True
        if not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection()
            self.flush()
        self._lost(self.error or HboneError("HBONE connection closed locally"))
        await _close_writer(self.writer, abort=not graceful)


class HboneStream:
    """One CONNECT stream: a bidirectional byte pipe with HTTP/2 flow control and half-close.

    ``status`` and ``response_headers`` are the response the client received (on the server side
    ``request_headers`` holds the request instead). Reads return ``b""`` once the peer sent
    END_STREAM; a reset or a lost connection raises :class:`HboneError`.
    """

    def __init__(self, conn: _Connection, stream_id: int, *, expect_response: bool = False) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.status: int = 0
        self.response_headers: dict[str, str] = {}
        self.request_headers: dict[str, str] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes already consumed from _chunks[0]
        self._eof = False  # END_STREAM received
        self._sent_eof = False  # END_STREAM sent
        self._error: HboneError | None = None
        self._readable = asyncio.Event()
        self._window = asyncio.Event()
        self._response: asyncio.Future[None] | None = (
            asyncio.get_running_loop().create_future() if expect_response else None
        )

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} status={self.status}>"

    # -- public API

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at END_STREAM. Consumed bytes reopen the peer's window."""
        if n <= 0:
            return b""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        head = self._chunks[0]
        start = self._offset
        available = len(head) - start
        if available <= n:
            self._chunks.popleft()
            self._offset = 0
            data = head if start == 0 else head[start:]
        else:
            data = head[start : start + n]
            self._offset = start + n
        self._conn.ack(self.stream_id, len(data))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``, in frames no larger than the peer allows, waiting for window as needed."""
        view = memoryview(data)
        total = len(view)
        offset = 0
        h2conn = self._conn.h2
        while offset < total:
            self._check_writable()
            with _h2_errors(f"stream {self.stream_id}"):
                window = h2conn.local_flow_control_window(self.stream_id)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            size = min(total - offset, window, h2conn.max_outbound_frame_size)
            chunk = data if size == total else view[offset : offset + size]
            with _h2_errors(f"stream {self.stream_id}"):
                h2conn.send_data(self.stream_id, chunk)
            offset += size
            self._conn.flush()
            await self._conn.drain()

    async def write_eof(self) -> None:
        """Half-close: send END_STREAM; reading goes on until the peer half-closes too."""
        self._check_writable()
        with _h2_errors(f"stream {self.stream_id}"):
            self._conn.h2.end_stream(self.stream_id)
        self._sent_eof = True
        self._conn.flush()
        if self._eof:
            self._conn.forget(self)
        await self._conn.drain()

    def reset(self, error_code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abort the stream with RST_STREAM (CANCEL by default); pending reads and writes fail."""
        if self._error is None and not (self._eof and self._sent_eof) and not self._conn.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.h2.reset_stream(self.stream_id, error_code)
            self._conn.flush()
        self._fail(HboneError(f"stream {self.stream_id} reset locally"))

    # -- connection callbacks

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._sent_eof:
            raise HboneError(f"stream {self.stream_id}: write after write_eof()")

    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._readable.set()

    def _on_end(self) -> None:
        self._eof = True
        self._readable.set()
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                HboneError(f"stream {self.stream_id} ended without response")
            )
        if self._sent_eof:
            self._conn.forget(self)

    def _on_response(self, headers: dict[str, str]) -> None:
        self.response_headers = headers
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        if self._response is not None and not self._response.done():
            self._response.set_result(None)

    def _fail(self, error: HboneError) -> None:
        if self._error is None:
            self._error = error
        if not self._eof:  # an incomplete inbound byte stream is worthless: return its window
            unread = sum(len(c) for c in self._chunks) - self._offset
            self._chunks.clear()
            self._offset = 0
            self._conn.ack(self.stream_id, unread)
        self._readable.set()
        self._window.set()
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._conn.forget(self)

    def _respond(self, status: int) -> None:
        """Server side: send the response headers; anything but 200 also ends the stream."""
        if self._error is not None:
            return
        end = status != 200
        with _h2_errors(f"stream {self.stream_id}"):
            self._conn.h2.send_headers(self.stream_id, [(":status", str(status))], end_stream=end)
        self._conn.flush()
        if end:
            self._sent_eof = True
            self._conn.forget(self)  # data the client may still send is acked and dropped


async def _splice(
    stream: HboneStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Relay bytes both ways between a stream and a TCP socket, forwarding half-closes.

    If either direction fails (reset, lost connection, socket error), the stream is reset and the
    socket aborted; if both end cleanly, the socket is closed.
    """

    async def stream_to_socket() -> None:
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def socket_to_stream() -> None:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                await stream.write_eof()
                return
            await stream.write(data)

    tasks = [asyncio.create_task(stream_to_socket()), asyncio.create_task(socket_to_stream())]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        for error in errors:
            log.debug("stream %d relay ended: %r", stream.stream_id, error)
        clean = not errors
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if clean:
            writer.close()
        else:
            stream.reset()
            writer.transport.abort()


# ----------------------------------------------------------------------------------------------
# Server


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


class HboneClient:
    """HBONE client: TLS 1.3 only, ALPN h2, sends NO SNI (no server name, no host name check),
    presents its certificate, verifies the server chain against the roots, and accepts the server
    only if one of its URI SANs equals one of ``expected_identities`` (else :class:`HboneError` is
    raised before any HTTP/2 byte is sent). One connection carries many CONNECT streams.
    """

    def __init__(
        self, cert: WorkloadCertificate, server: tuple[str, int], expected_identities: list[str]
    ) -> None:
        self._cert = cert
        self._server = server
        self._expected = list(expected_identities)
        self._ssl = _tls_context(cert, server_side=False)
        self._conn: _Connection | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.server_identity: str | None = None

    async def connect(self) -> None:
        """TLS handshake, peer identity check, HTTP/2 preface."""
        if self._conn is not None:
            raise HboneError("already connected")
        host, port = self._server
        try:
            # server_hostname="" (not None: asyncio would default it to the host) means no SNI.
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self._ssl, server_hostname="", limit=TLS_STREAM_LIMIT
            )
        except (OSError, ssl.SSLError) as e:
            raise HboneError(f"TLS connection to {format_hostport(host, port)} failed: {e}") from e
        alpn = _selected_alpn(writer)
        sans = _peer_uri_sans(writer)
        matched = next((s for s in sans if s in self._expected), None)
        if alpn != ALPN_H2 or matched is None:
            await _close_writer(writer, abort=True)
            if alpn != ALPN_H2:
                raise HboneError(
                    f"server {format_hostport(host, port)} did not negotiate ALPN h2 ({alpn!r})"
                )
            raise HboneError(
                f"server {format_hostport(host, port)} identity {sans} is none of the expected "
                f"{self._expected}"
            )
        self.server_identity = matched
        _tune_socket(writer)
        writer.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        conn = _Connection(reader, writer, client_side=True)
        conn.start()
        self._conn = conn
        self._reader_task = asyncio.create_task(conn.run())

    async def open_stream(
        self, authority: str, headers: dict[str, str] | None = None
    ) -> HboneStream:
        """Open a CONNECT stream to ``authority`` and wait for the response.

        ``headers`` are sent as regular headers (names lower-cased), e.g. ``forwarded``,
        ``baggage``, ``traceparent``. Raises :class:`HboneError` with ``status`` set for any
        response but 200.
        """
        return await self.request("CONNECT", authority, headers)

    async def request(
        self, method: str, authority: str, headers: dict[str, str] | None = None
    ) -> HboneStream:
        """Send an arbitrary request (for tests: non-CONNECT methods get ``:scheme``/``:path``)."""
        conn = self._conn
        if conn is None:
            raise HboneError("not connected: call connect() first")
        await conn.wait_for_slot()
        if conn.closed or conn.goaway:
            raise conn.error or HboneError("HBONE connection is going away")
        pseudo = [(":method", method), (":authority", authority)]
        if method != "CONNECT":
            pseudo += [(":scheme", "https"), (":path", "/")]
        regular = [(k.lower(), v) for k, v in (headers or {}).items()]
        with _h2_errors(f"{method} {authority}"):
            stream_id = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(stream_id, pseudo + regular)
        stream = HboneStream(conn, stream_id, expect_response=True)
        conn.streams[stream_id] = stream
        conn.flush()
        assert stream._response is not None
        try:
            await conn.drain()
            await stream._response
        except asyncio.CancelledError:
            stream.reset()
            raise
        except HboneError as e:
            raise HboneError(f"{method} {authority} failed: {e}") from e
        if stream.status != 200:
            stream.reset()
            raise HboneError(
                f"{method} {authority} refused with HTTP {stream.status}", status=stream.status
            )
        return stream

    async def close(self) -> None:
        """GOAWAY, close the connection and every stream on it."""
        conn, task = self._conn, self._reader_task
        self._conn = self._reader_task = None
        if conn is not None:
            await conn.aclose()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def forward(listen: tuple[str, int], client: HboneClient, authority: str) -> asyncio.Server:
    """A local TCP listener: each accepted connection becomes one CONNECT stream over ``client``.

    Bytes are relayed both ways with half-close kept. The request carries ``forwarded: for="..."``
    with the local peer's address, as ztunnel sends it.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("peername")
            headers = {"forwarded": f'for="{format_hostport(peer[0], peer[1])}"'} if peer else {}
            try:
                stream = await client.open_stream(authority, headers)
            except HboneError as e:
                log.warning("forward to %s failed: %s", authority, e)
                writer.transport.abort()
                return
            await _splice(stream, reader, writer)
        except Exception:
            log.exception("forwarded connection failed")
            writer.transport.abort()

    return await asyncio.start_server(handle, listen[0], listen[1], limit=READ_SIZE)


# ----------------------------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ambient.peers.h2_hbone",
        description="Pure-Python HBONE (HTTP/2 CONNECT over mutual TLS 1.3) server or client.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="mode", required=True)

    server = sub.add_parser("server", help="terminate HBONE and relay each stream to TCP")
    server.add_argument("--listen", type=_parse_hostport, default=("127.0.0.1", 15008))
    server.add_argument(
        "--upstream",
        type=_parse_hostport,
        default=None,
        help="connect every stream here (default: the CONNECT authority)",
    )
    server.add_argument(
        "--ca-dir", required=True, help="directory written by CertificateAuthority.save"
    )
    server.add_argument("--identity", required=True, help="this server's SPIFFE ID")

    client = sub.add_parser(
        "client", help="accept TCP locally and tunnel each connection over HBONE"
    )
    client.add_argument("--listen", type=_parse_hostport, default=("127.0.0.1", 9000))
    client.add_argument(
        "--server", type=_parse_hostport, required=True, help="HBONE server host:port"
    )
    client.add_argument("--authority", required=True, help="CONNECT :authority (ip:port)")
    client.add_argument(
        "--ca-dir", required=True, help="directory written by CertificateAuthority.save"
    )
    client.add_argument("--identity", required=True, help="this client's SPIFFE ID")
    client.add_argument(
        "--expect",
        action="append",
        required=True,
        help="an acceptable server SPIFFE ID (repeatable)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    cert = CertificateAuthority.load(args.ca_dir).issue(args.identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.mode == "server":
        server = HboneServer(cert, upstream=args.upstream)
        host, port = await server.start(*args.listen)
        print(f"ready {format_hostport(host, port)}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()
    else:
        client = HboneClient(cert, args.server, args.expect)
        await client.connect()
        listener = await forward(args.listen, client, args.authority)
        sockname = listener.sockets[0].getsockname()
        print(f"ready {format_hostport(str(sockname[0]), int(sockname[1]))}", flush=True)
        try:
            await stop.wait()
        finally:
            listener.close()
            await client.close()
            await listener.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_run(args))
    except HboneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
