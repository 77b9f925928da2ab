"""The pure-Python HBONE client, and a local port forwarded through it."""

from __future__ import annotations

import asyncio
import logging
import ssl

from ambient.identity import WorkloadCertificate

from .common import (
    ALPN_H2,
    READ_SIZE,
    TLS_STREAM_LIMIT,
    TLS_WRITE_HIGH_WATER,
    HboneError,
    _close_writer,
    _h2_errors,
    _peer_uri_sans,
    _selected_alpn,
    _tls_context,
    _tune_socket,
    format_hostport,
)
from .connection import (
    HboneStream,
    _Connection,
    _splice,
)

log = logging.getLogger(__name__)


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
