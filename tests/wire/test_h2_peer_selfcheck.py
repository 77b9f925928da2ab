"""Self-check of the pure-Python HBONE peer: its client against its server on 127.0.0.1.

Each test runs its own event loop with ``asyncio.run`` (no pytest-asyncio). Upstreams are small
asyncio TCP servers written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from ambient.identity import CertificateAuthority, WorkloadCertificate
from ambient.peers import h2_hbone
from ambient.peers.h2_hbone import (
    HboneClient,
    HboneError,
    HboneServer,
    HboneStream,
    ReceivedConnect,
    forward,
    parse_authority,
)
from ambient.peers.h2_hbone import common as h2_common

TRUST_DOMAIN = "cluster.local"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
FOREIGN_ID = "spiffe://other.domain/ns/x/sa/y"
MiB = 1024 * 1024
# Where the `ambient` under test lives (installed or source tree), for the CLI subprocesses.
AMBIENT_ROOT = Path(h2_hbone.__file__).resolve().parents[3]  # .../ambient/peers/h2_hbone/

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TRUST_DOMAIN)


@pytest.fixture(scope="module")
def server_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(SERVER_ID)


@pytest.fixture(scope="module")
def client_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(CLIENT_ID)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run one test body in a fresh loop, bounded in time so a hang fails instead of stalling."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


class Upstream:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.addr: tuple[str, int] = ("", 0)
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.addr = (host, port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def authority(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"


async def echo_then_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything; at EOF send ``<eof:N>`` (N = bytes received) and half-close back."""
    total = 0
    while data := await reader.read(256 * 1024):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write(b"<eof:%d>" % total)
    writer.write_eof()
    await writer.drain()


@contextlib.asynccontextmanager
async def hbone_server(
    cert: WorkloadCertificate, **kwargs: Any
) -> AsyncIterator[tuple[HboneServer, tuple[str, int]]]:
    server = HboneServer(cert, **kwargs)
    addr = await server.start()
    try:
        yield server, addr
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def hbone_client(
    cert: WorkloadCertificate, addr: tuple[str, int], expected: list[str] | None = None
) -> AsyncIterator[HboneClient]:
    client = HboneClient(cert, addr, expected or [SERVER_ID])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def read_all(stream: HboneStream, n: int = 65536) -> bytes:
    parts = []
    while chunk := await stream.read(n):
        parts.append(chunk)
    return b"".join(parts)


async def write_all(stream: HboneStream, data: bytes, chunk: int = 200_000) -> None:
    for i in range(0, len(data), chunk):
        await stream.write(data[i : i + chunk])


async def good_round_trip(
    client_cert: WorkloadCertificate, addr: tuple[str, int], authority: str
) -> None:
    """A fresh, well-behaved client gets a working echo stream."""
    async with hbone_client(client_cert, addr) as client:
        stream = await client.open_stream(authority)
        await stream.write(b"ping")
        await stream.write_eof()
        assert await read_all(stream) == b"ping<eof:4>"


# ----------------------------------------------------------------------------------------------
# authority parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
        ("127.0.0.1", None),
        ("127.0.0.1:0", None),
        ("127.0.0.1:65536", None),
        ("127.0.0.1:http", None),
        ("127.0.0.1:-1", None),
        ("127.0.0.1:+80", None),
        ("::1:80", None),
        ("[::1]", None),
        ("[127.0.0.1]:80", None),
        ("[fe80::1%eth0]:80", None),
        ("example.com:80", None),
        ("01.2.3.4:80", None),
        ("", None),
    ],
)
def test_parse_authority(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_authority(text) == expected


# ----------------------------------------------------------------------------------------------
# data path


def test_bulk_both_ways_headers_and_identity(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """5 MiB each way (beyond the 4 MiB stream window) to the authority itself; headers arrive."""
    payload = os.urandom(5 * MiB)
    headers = {
        "forwarded": 'for="127.0.0.1:40000"',
        "baggage": "k8s.namespace.name=default,service.name=client",
        "traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00",
    }

    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert) as (server, addr),
            hbone_client(client_cert, addr) as client,
        ):
            assert client.server_identity == SERVER_ID
            stream = await client.open_stream(up.authority, headers)
            assert stream.status == 200
            assert stream.response_headers[":status"] == "200"
            writer = asyncio.create_task(write_all(stream, payload))
            got = bytearray()
            while len(got) < len(payload):
                chunk = await stream.read(256 * 1024)
                assert chunk, "stream ended early"
                got += chunk
            await writer
            await stream.write_eof()
            rest = await read_all(stream)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert rest == b"<eof:%d>" % len(payload)
        assert up.connections == 1
        assert server.received == [
            ReceivedConnect(
                method="CONNECT",
                authority=up.authority,
                headers=headers,
                peer_identity=CLIENT_ID,
            )
        ]

    run(body())


def test_many_streams_share_one_connection(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """8 concurrent streams x 3 MiB each way: 24 MiB crosses the 16 MiB connection window."""
    payloads = [os.urandom(3 * MiB) for _ in range(8)]

    async def one(client: HboneClient, authority: str, payload: bytes) -> None:
        stream = await client.open_stream(authority)
        sender = asyncio.create_task(write_all(stream, payload))
        got = bytearray()
        while len(got) < len(payload):
            chunk = await stream.read(256 * 1024)
            assert chunk
            got += chunk
        await sender
        await stream.write_eof()
        assert await read_all(stream) == b"<eof:%d>" % len(payload)
        assert bytes(got) == payload

    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert, upstream=up.addr) as (server, addr),
            hbone_client(client_cert, addr) as client,
        ):
            await asyncio.gather(*(one(client, "127.0.0.1:1", p) for p in payloads))
        assert up.connections == 8
        assert len(server.received) == 8

    run(body())


def test_half_close_client_to_upstream(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """END_STREAM from the client becomes a FIN upstream; upstream's bytes keep flowing after it."""
    payload = os.urandom(6 * MiB)  # > the 4 MiB stream window

    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert) as (_, addr),
            hbone_client(client_cert, addr) as client,
        ):
            stream = await client.open_stream(up.authority)
            # The echo can only finish (and send its trailer) once it saw our FIN, so the trailer
            # proves the FIN went upstream and that the way back stayed open after it.
            sender = asyncio.create_task(write_all(stream, payload))
            received = asyncio.create_task(read_all(stream))
            await sender
            await stream.write_eof()
            data = await received
            assert data == payload + b"<eof:%d>" % len(payload)

    run(body())


def test_half_close_upstream_to_client(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """A FIN from upstream becomes END_STREAM; the client can still send afterwards."""
    greeting = os.urandom(6 * MiB)  # > the 4 MiB stream window
    payload = os.urandom(6 * MiB)  # sent while the server is half-closed

    async def body() -> None:
        after_fin: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def greet_then_sink(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(greeting)
            writer.write_eof()
            await writer.drain()
            after_fin.set_result(await reader.read())  # everything until the client's FIN

        async with (
            Upstream(greet_then_sink) as up,
            hbone_server(server_cert) as (_, addr),
            hbone_client(client_cert, addr) as client,
        ):
            stream = await client.open_stream(up.authority)
            assert await read_all(stream) == greeting  # ends with END_STREAM
            await write_all(stream, payload)
            await stream.write_eof()
            assert await after_fin == payload

    run(body())


def test_flow_control_holds_back_a_fast_writer(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """When upstream does not read, the client's writes block instead of buffering without bound."""
    size = 64 * MiB
    chunk = os.urandom(MiB)

    async def body() -> None:
        release = asyncio.Event()
        sunk: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            total = 0
            while data := await reader.read(256 * 1024):
                total += len(data)
            sunk.set_result(total)

        async def send() -> None:
            for _ in range(size // len(chunk)):
                await stream.write(chunk)
            await stream.write_eof()

        async with (
            Upstream(slow_sink) as up,
            hbone_server(server_cert) as (_, addr),
            hbone_client(client_cert, addr) as client,
        ):
            stream = await client.open_stream(up.authority)
            sender = asyncio.create_task(send())
            await asyncio.sleep(1.0)
            assert not sender.done(), "64 MiB were accepted although nobody read them"
            release.set()
            await sender
            assert await sunk == size
            assert await read_all(stream) == b""

    run(body(), timeout=120)


# ----------------------------------------------------------------------------------------------
# refusals


def test_non_connect_gets_400(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert) as (server, addr),
            hbone_client(client_cert, addr) as client,
        ):
            with pytest.raises(HboneError) as err:
                await client.request("GET", up.authority)
            assert err.value.status == 400
            assert "400" in str(err.value)
            # the connection is still good
            stream = await client.open_stream(up.authority)
            await stream.write_eof()
            assert await read_all(stream) == b"<eof:0>"
        assert [r.method for r in server.received] == ["GET", "CONNECT"]
        assert up.connections == 1

    run(body())


def test_malformed_authority_gets_400(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    bad = [
        "example.com:80",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "::1:80",
        "[::1]",
        "1.2.3.4:http",
    ]

    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert, upstream=None) as (server, addr),
            hbone_client(client_cert, addr) as client,
        ):
            for authority in bad:
                with pytest.raises(HboneError) as err:
                    await client.open_stream(authority)
                assert err.value.status == 400, authority
        assert [r.authority for r in server.received] == bad
        assert up.connections == 0

    run(body())


def test_unreachable_upstream_gets_503(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def body() -> None:
        async with (
            hbone_server(server_cert) as (_, addr),
            hbone_client(client_cert, addr) as client,
        ):
            with pytest.raises(HboneError) as err:
                await client.open_stream(f"127.0.0.1:{closed_port}")
            assert err.value.status == 503

    run(body())


def test_decide_denies_with_401_or_picks_upstream(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"chosen upstream")
            writer.write_eof()
            await reader.read()

        async with Upstream(hello) as chosen:
            seen: list[ReceivedConnect] = []

            def decide(rc: ReceivedConnect) -> tuple[int, tuple[str, int] | None]:
                seen.append(rc)
                if rc.headers.get("x-deny") == "1":
                    return 401, None
                return 200, chosen.addr

            async with (
                hbone_server(server_cert, decide=decide) as (server, addr),
                hbone_client(client_cert, addr) as client,
            ):
                with pytest.raises(HboneError) as err:
                    await client.open_stream("127.0.0.1:9", {"x-deny": "1"})
                assert err.value.status == 401
                stream = await client.open_stream("127.0.0.1:9")
                assert await read_all(stream) == b"chosen upstream"
                await stream.write_eof()
            assert seen == server.received
            assert [r.peer_identity for r in seen] == [CLIENT_ID, CLIENT_ID]
            assert chosen.connections == 1

    run(body())


# ----------------------------------------------------------------------------------------------
# identities


def test_client_rejects_unexpected_server_identity(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        async with Upstream(echo_then_trailer) as up, hbone_server(server_cert) as (server, addr):
            client = HboneClient(
                client_cert, addr, ["spiffe://cluster.local/ns/default/sa/someone-else"]
            )
            with pytest.raises(HboneError, match="identity"):
                await client.connect()
            await client.close()
            with pytest.raises(HboneError, match="not connected"):
                await client.open_stream(up.authority)
            await good_round_trip(client_cert, addr, up.authority)
        assert len(server.received) == 1

    run(body())


def test_server_drops_foreign_clients_and_keeps_serving(
    ca: CertificateAuthority, server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """Clients outside the server's trust domain never get a stream; a good client still works."""
    other_ca = CertificateAuthority.create("other.domain")
    # (a) as briefed: a certificate (and roots) of another trust domain's CA. The chains fail both
    #     ways, so the client already refuses the server.
    foreign = other_ca.issue(FOREIGN_ID)
    # (b) the same certificate, but the client also trusts our roots: now the *server* must refuse
    #     the chain.
    foreign_trusting_us = dataclasses.replace(foreign, roots_pem=other_ca.roots_pem + ca.roots_pem)
    # (c) a valid chain from our CA whose SPIFFE ID is in another trust domain: only the server's
    #     trust-domain check after the handshake can catch it.
    wrong_domain = ca.issue(FOREIGN_ID)

    async def attempt(cert: WorkloadCertificate, addr: tuple[str, int], authority: str) -> None:
        client = HboneClient(cert, addr, [SERVER_ID])
        try:
            with pytest.raises(HboneError):
                await client.connect()
                # TLS 1.3: the client may finish its handshake before the server judged its
                # certificate; then the refusal shows on the first stream.
                await client.open_stream(authority)
        finally:
            await client.close()

    async def body() -> None:
        async with Upstream(echo_then_trailer) as up, hbone_server(server_cert) as (server, addr):
            for cert in (foreign, foreign_trusting_us, wrong_domain):
                await attempt(cert, addr, up.authority)
            assert server.received == []
            assert up.connections == 0
            await good_round_trip(client_cert, addr, up.authority)
        assert [r.peer_identity for r in server.received] == [CLIENT_ID]

    run(body())


def test_client_sends_no_sni_and_speaks_tls13_h2(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        seen: list[tuple[str | None, str | None]] = []
        names: list[str | None] = []
        ctx = h2_common._tls_context(server_cert, server_side=True)

        def record_sni(_sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            names.append(name)

        ctx.sni_callback = record_sni
        done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ssl_object = writer.get_extra_info("ssl_object")
            seen.append((ssl_object.version(), ssl_object.selected_alpn_protocol()))
            preface = await reader.readexactly(24)
            assert preface == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            done.set()
            writer.close()

        srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        addr = srv.sockets[0].getsockname()[:2]
        try:
            client = HboneClient(client_cert, addr, [SERVER_ID])
            await client.connect()
            await done.wait()
            await client.close()
        finally:
            srv.close()
            await srv.wait_closed()
        assert names == [None]
        assert seen == [("TLSv1.3", "h2")]

    run(body())


def test_wire_settings_windows_and_connect_shape(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """A bare h2 peer on each side checks SETTINGS, the connection window, CONNECT headers."""
    expected_settings = {
        SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB,
        SettingCodes.MAX_FRAME_SIZE: MiB,
    }
    window_delta = 16 * MiB - 65_535

    def settings_of(events: list[h2.events.Event]) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in events:
            if isinstance(e, h2.events.RemoteSettingsChanged):
                out.update({k: v.new_value for k, v in e.changed_settings.items()})
        return out

    def conn_window_updates(events: list[h2.events.Event]) -> list[int]:
        return [
            e.delta for e in events if isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0
        ]

    async def body() -> None:
        # our client -> bare h2 server
        captured: list[h2.events.Event] = []

        async def bare_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            while not any(isinstance(e, h2.events.RequestReceived) for e in captured):
                data = await reader.read(65536)
                assert data
                captured.extend(conn.receive_data(data))
            request = next(e for e in captured if isinstance(e, h2.events.RequestReceived))
            conn.send_headers(request.stream_id, [(":status", "200")], end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
            await reader.read()

        ctx = h2_common._tls_context(server_cert, server_side=True)
        srv = await asyncio.start_server(bare_server, "127.0.0.1", 0, ssl=ctx)
        try:
            addr = srv.sockets[0].getsockname()[:2]
            async with hbone_client(client_cert, addr) as client:
                stream = await client.open_stream("10.0.0.1:80", {"Traceparent": "00-ab-cd-00"})
                assert await stream.read() == b""
        finally:
            srv.close()
            await srv.wait_closed()
        settings = settings_of(captured)
        assert {k: settings[k] for k in expected_settings} == expected_settings
        assert settings[SettingCodes.ENABLE_PUSH] == 0
        assert conn_window_updates(captured) == [window_delta]
        request = next(e for e in captured if isinstance(e, h2.events.RequestReceived))
        sent: list[Any] = list(request.headers)  # str, as header_encoding asks
        assert sent == [
            (":method", "CONNECT"),
            (":authority", "10.0.0.1:80"),
            ("traceparent", "00-ab-cd-00"),
        ]

        # bare h2 client -> our server
        async with hbone_server(server_cert) as (_, addr):
            client_ctx = h2_common._tls_context(client_cert, server_side=False)
            reader, writer = await asyncio.open_connection(
                *addr, ssl=client_ctx, server_hostname=""
            )
            conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            events: list[h2.events.Event] = []
            while not (conn_window_updates(events) and settings_of(events)):
                data = await reader.read(65536)
                assert data
                events.extend(conn.receive_data(data))
            writer.write(conn.data_to_send())
            writer.close()
        settings = settings_of(events)
        assert {k: settings[k] for k in expected_settings} == expected_settings
        assert conn_window_updates(events) == [window_delta]

    run(body())


# ----------------------------------------------------------------------------------------------
# resets, vanished peers


def test_reset_closes_only_that_streams_upstream(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        ended: list[asyncio.Future[bytes]] = []

        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            ended.append(fut)
            got = b""
            try:
                while data := await reader.read(65536):
                    got += data
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            fut.set_result(got)

        async with (
            Upstream(record) as up,
            hbone_server(server_cert) as (_, addr),
            hbone_client(client_cert, addr) as client,
        ):
            first = await client.open_stream(up.authority)
            second = await client.open_stream(up.authority)
            await first.write(b"one")
            assert await first.read() == b"one"
            first.reset()
            with pytest.raises(HboneError):
                await first.read()
            with pytest.raises(HboneError):
                await first.write(b"more")
            assert await ended[0] == b"one"  # upstream socket of the reset stream is closed
            await second.write(b"two")
            assert await second.read() == b"two"
            assert not ended[1].done()
            await second.write_eof()
            assert await read_all(second) == b""
            assert await ended[1] == b"two"

    run(body())


def test_vanished_client_closes_its_upstreams_and_server_keeps_serving(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    async def body() -> None:
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hi")
            with contextlib.suppress(ConnectionError):
                await reader.read()
            closed.set_result(None)

        async with (
            Upstream(hold) as holder,
            Upstream(echo_then_trailer) as echo,
            hbone_server(server_cert) as (_, addr),
        ):
            client = HboneClient(client_cert, addr, [SERVER_ID])
            await client.connect()
            stream = await client.open_stream(holder.authority)
            assert await stream.read() == b"hi"
            assert client._conn is not None
            client._conn.writer.transport.abort()  # the peer vanishes without GOAWAY or FIN
            await closed
            with pytest.raises(HboneError):
                await stream.read()
            await client.close()
            await good_round_trip(client_cert, addr, echo.authority)

    run(body())


def test_garbage_peer_does_not_hurt_server(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    """A client that completes TLS and then sends no valid HTTP/2 is dropped; others are served."""

    async def body() -> None:
        async with Upstream(echo_then_trailer) as up, hbone_server(server_cert) as (server, addr):
            ctx = h2_common._tls_context(client_cert, server_side=False)
            reader, writer = await asyncio.open_connection(*addr, ssl=ctx, server_hostname="")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # the server answers with its preface and a GOAWAY, then closes
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            writer.close()
            await good_round_trip(client_cert, addr, up.authority)
        assert len(server.received) == 1

    run(body())


# ----------------------------------------------------------------------------------------------
# forward() and the command line


def test_forward_relays_tcp_with_half_close(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    payload = os.urandom(2 * MiB)

    async def body() -> None:
        async with (
            Upstream(echo_then_trailer) as up,
            hbone_server(server_cert) as (server, addr),
            hbone_client(client_cert, addr) as client,
        ):
            listener = await forward(("127.0.0.1", 0), client, up.authority)
            try:
                port = listener.sockets[0].getsockname()[1]

                async def one() -> None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(payload)
                    writer.write_eof()
                    await writer.drain()
                    data = await reader.read()
                    writer.close()
                    assert data == payload + b"<eof:%d>" % len(payload)

                await asyncio.gather(one(), one(), one())
            finally:
                listener.close()
                await listener.wait_closed()
        assert len(server.received) == 3
        assert all(r.headers["forwarded"].startswith('for="127.0.0.1:') for r in server.received)

    run(body())


def test_command_line_server_and_client(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.create(TRUST_DOMAIN).save(ca_dir)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(AMBIENT_ROOT), os.environ.get("PYTHONPATH")])),
    )

    async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "ambient.peers.h2_hbone", *args,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=str(AMBIENT_ROOT),
        )  # fmt: skip
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        assert line.startswith("ready "), line
        host, _, port = line.split()[1].rpartition(":")
        return proc, (host, int(port))

    async def body() -> None:
        async with Upstream(echo_then_trailer) as up:
            server, server_addr = await spawn(
                "server", "--listen", "127.0.0.1:0", "--upstream", up.authority,
                "--ca-dir", str(ca_dir), "--identity", SERVER_ID,
            )  # fmt: skip
            client, client_addr = await spawn(
                "client", "--listen", "127.0.0.1:0",
                "--server", f"{server_addr[0]}:{server_addr[1]}", "--authority", "127.0.0.1:1",
                "--ca-dir", str(ca_dir), "--identity", CLIENT_ID, "--expect", SERVER_ID,
            )  # fmt: skip
            try:
                reader, writer = await asyncio.open_connection(*client_addr)
                writer.write(b"x" * 100_000)
                writer.write_eof()
                assert await reader.read() == b"x" * 100_000 + b"<eof:100000>"
                writer.close()
            finally:
                for proc in (client, server):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                rcs = [await asyncio.wait_for(p.wait(), 15) for p in (client, server)]
            assert rcs == [0, 0]

    run(body())
