"""An independent check of the wire: HBONE peers written with python-hyper h2 and the stdlib ssl
module (ambient.peers.h2_hbone, not the Rust core) talk to the compiled core, both ways."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from ambient.hbone import Allow, HboneTarget, StreamRequest, TunnelError
from ambient.peers.h2_hbone import HboneClient, HboneError, HboneServer
from ambient.testing import exchange, wait_until

SERVER = "spiffe://cluster.local/ns/default/sa/server"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
MB = 1024 * 1024


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread, for Python peers beside the core."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def run(loop: asyncio.AbstractEventLoop, coro, timeout: float = 30):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture
def rust_server(dataplane_factory, server_cert):
    dp = dataplane_factory(2)
    dp.load_identity(server_cert)
    return dp


def address(listener) -> tuple[str, int]:
    host, port = listener.local_address.rsplit(":", 1)
    return host, int(port)


# --- python h2 client -> Rust server ------------------------------------------------------------


def test_h2_client_carries_bytes_both_ways_through_the_rust_server(
    loop, rust_server, client_cert, echo
):
    seen: list[StreamRequest] = []
    listener = rust_server.serve(
        "127.0.0.1:0", SERVER, lambda r: seen.append(r) or Allow(echo.address)
    )
    payload = b"w" * 6 * MB

    async def main() -> bytes:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        assert client.server_identity == SERVER
        stream = await client.open_stream(
            echo.address,
            {
                "forwarded": 'for="10.1.2.3:4567"',
                "baggage": "k8s.namespace.name=default,service.name=client",
                "traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00",
            },
        )

        async def upload() -> None:
            for i in range(0, len(payload), 256 * 1024):
                await stream.write(payload[i : i + 256 * 1024])
            await stream.write_eof()

        sender = asyncio.create_task(upload())
        chunks = []
        while data := await stream.read(1 << 20):
            chunks.append(data)
        await sender
        await client.close()
        return b"".join(chunks)

    assert run(loop, main()) == payload
    (request,) = seen
    assert request.peer_identity == CLIENT
    assert request.forwarded_for == "10.1.2.3:4567"
    assert request.baggage == {"k8s.namespace.name": "default", "service.name": "client"}
    assert request.header("traceparent").startswith("00-0123456789abcdef")


@pytest.mark.parametrize(
    ("method", "authority"),
    [
        ("GET", "127.0.0.1:80"),  # not a CONNECT
        ("POST", "127.0.0.1:80"),
        ("CONNECT", "127.0.0.1"),  # no port
        ("CONNECT", "echo.default.svc:80"),  # a name, not an address
        ("CONNECT", "127.0.0.1:70000"),  # port out of range
    ],
)
def test_h2_client_malformed_requests_get_400_and_the_connection_lives_on(
    loop, rust_server, client_cert, echo, method, authority
):
    listener = rust_server.serve("127.0.0.1:0", SERVER, Allow(echo.address))

    async def main() -> bytes:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        with pytest.raises(HboneError) as refused:
            await client.request(method, authority)
        assert refused.value.status == 400
        stream = await client.open_stream(echo.address)  # same connection, next stream
        await stream.write(b"after the 400")
        await stream.write_eof()
        data = await stream.read()
        await client.close()
        return data

    assert run(loop, main()) == b"after the 400"
    assert rust_server.stats()["hbone_requests_refused"] == 1


def test_h2_client_reset_closes_only_that_streams_upstream(
    loop, rust_server, client_cert, app_factory, echo
):
    sink = app_factory("count")
    listener = rust_server.serve(
        "127.0.0.1:0",
        SERVER,
        lambda r: Allow(sink.address if r.authority == sink.address else echo.address),
    )

    async def main() -> bytes:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        doomed = await client.open_stream(sink.address)
        await doomed.write(b"x" * 100_000)
        doomed.reset()
        await asyncio.to_thread(wait_until, lambda: sink.connections_ended == 1)
        survivor = await client.open_stream(echo.address)
        await survivor.write(b"survivor")
        await survivor.write_eof()
        data = await survivor.read()
        await client.close()
        return data

    assert run(loop, main()) == b"survivor"
    assert sink.received[0] <= 100_000  # whatever arrived before the reset, never more


def test_h2_client_vanishing_mid_stream_frees_the_upstream(
    loop, rust_server, client_cert, app_factory
):
    sink = app_factory("count")
    listener = rust_server.serve("127.0.0.1:0", SERVER, Allow(sink.address))

    async def vanish() -> None:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        stream = await client.open_stream(sink.address)
        await stream.write(b"y" * MB)
        conn = client._conn
        assert conn is not None
        conn.writer.transport.abort()  # the TCP connection dies: no END_STREAM, no GOAWAY

    run(loop, vanish())
    wait_until(lambda: sink.connections_ended == 1, what="the upstream to be closed")
    wait_until(lambda: rust_server.stats()["active_tunnels"] == 0, what="the tunnel to go")


def test_h2_client_from_another_trust_domain_is_refused_at_the_handshake(
    loop, rust_server, ca, echo
):
    listener = rust_server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    foreign = ca.issue("spiffe://other.domain/ns/default/sa/client")

    async def main() -> None:
        client = HboneClient(foreign, address(listener), [SERVER])
        try:
            await client.connect()  # TLS 1.3: the client finishes before the server checks it
            with pytest.raises(HboneError):
                await client.open_stream(echo.address)
        except HboneError:
            pass
        finally:
            await client.close()

    run(loop, main())
    # Counted once the server's handshake returns, after its alert reached the client.
    wait_until(lambda: rust_server.stats()["tls_handshake_failures"] == 1, what="the failure count")
    assert rust_server.stats()["hbone_requests_received"] == 0


# --- Rust client -> python h2 server ------------------------------------------------------------


@pytest.fixture
def h2_server(loop, server_cert, echo):
    host, port = echo.address.rsplit(":", 1)
    server = HboneServer(server_cert, upstream=(host, int(port)))
    host, port = run(loop, server.start())
    yield server, f"{host}:{port}"
    run(loop, server.close())


def test_rust_client_carries_bytes_through_the_h2_server(
    h2_server, dataplane_factory, client_cert, echo
):
    server, hbone_address = h2_server
    client = dataplane_factory(2)
    client.load_identity(client_cert)
    target = HboneTarget(
        hbone_address,
        echo.address,
        [SERVER],
        CLIENT,
        headers=[("baggage", "k8s.namespace.name=default")],
    )
    forward = client.forward("127.0.0.1:0", target)
    payload = bytes(range(256)) * 4 * 4096  # 4 MiB
    with socket.create_connection(address(forward)) as raw:
        local = "{}:{}".format(*raw.getsockname())
        assert exchange(raw, payload) == payload
    (received,) = server.received
    assert received.method == "CONNECT"
    assert received.authority == echo.address
    assert received.peer_identity == CLIENT
    assert received.headers["forwarded"] == f'for="{local}"'
    assert received.headers["baggage"] == "k8s.namespace.name=default"
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", received.headers["traceparent"])


def test_rust_client_reports_the_h2_servers_refusal(
    loop, server_cert, dataplane_factory, client_cert
):
    server = HboneServer(server_cert, decide=lambda r: (401, None))
    host, port = run(loop, server.start())
    try:
        client = dataplane_factory(1)
        client.load_identity(client_cert)
        with pytest.raises(TunnelError, match="401"):
            client.connect(HboneTarget(f"{host}:{port}", "127.0.0.1:80", [SERVER], CLIENT))
    finally:
        run(loop, server.close())


def test_rust_client_speaks_istio_settings_without_sni(
    loop, server_cert, dataplane_factory, client_cert
):
    """Read the Rust client's TLS ClientHello outcome and HTTP/2 preface with independent code."""
    seen: dict[str, object] = {}
    done = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file, roots_file = (Path(tmp) / n for n in ("c.pem", "k.pem", "r.pem"))
        cert_file.write_bytes(server_cert.chain_pem)
        key_file.write_bytes(server_cert.key_pem)
        roots_file.write_bytes(server_cert.roots_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert_file, key_file)
        ctx.load_verify_locations(roots_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    ctx.sni_callback = lambda sock, name, _ctx: seen.setdefault("sni", name)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as tls:
            seen["version"] = tls.version()
            seen["alpn"] = tls.selected_alpn_protocol()
            seen["cipher"] = tls.cipher()[0]
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            tls.sendall(conn.data_to_send())
            while "connect" not in seen:
                data = tls.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        seen["settings"] = {
                            k: v.new_value for k, v in event.changed_settings.items()
                        }
                    elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                        seen["connection_window_update"] = event.delta
                    elif isinstance(event, h2.events.RequestReceived):
                        seen["connect"] = dict(event.headers)
                        conn.send_headers(event.stream_id, [(":status", "503")], end_stream=True)
                tls.sendall(conn.data_to_send())
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    client = dataplane_factory(1)
    client.load_identity(client_cert)
    port = listener.getsockname()[1]
    with pytest.raises(TunnelError, match="503"):
        client.connect(HboneTarget(f"127.0.0.1:{port}", "10.0.0.7:8080", [SERVER], CLIENT))
    assert done.wait(10)
    listener.close()
    assert seen.get("sni") is None  # no SNI
    assert seen["version"] == "TLSv1.3" and seen["alpn"] == "h2"
    assert seen["cipher"] == "TLS_AES_256_GCM_SHA384"  # Istio's first preference
    settings = seen["settings"]
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 4 * MB
    assert settings[h2.settings.SettingCodes.MAX_FRAME_SIZE] == MB
    assert seen["connection_window_update"] == 16 * MB - 65535
    connect = seen["connect"]
    assert connect[b":method"] == b"CONNECT" and connect[b":authority"] == b"10.0.0.7:8080"
    assert b":scheme" not in connect and b":path" not in connect


def test_rust_client_keeps_an_idle_connection_alive_with_pings(
    loop, h2_server, dataplane_factory, client_cert, echo
):
    """Istio's keepalive: a PING every 10 s on an HBONE connection, answered by the peer."""
    _, hbone_address = h2_server
    pings: list[float] = []
    import h2.connection as h2conn  # count PINGs where the independent peer parses frames

    real_receive = h2conn.H2Connection.receive_data

    def counting_receive(self, data):
        events = real_receive(self, data)
        pings.extend(time.monotonic() for e in events if isinstance(e, h2.events.PingReceived))
        return events

    h2conn.H2Connection.receive_data = counting_receive
    try:
        client = dataplane_factory(1)
        client.load_identity(client_cert)
        target = HboneTarget(hbone_address, echo.address, [SERVER], CLIENT)
        started = time.monotonic()
        assert exchange(client.connect(target), b"x") == b"x"
        wait_until(lambda: pings, timeout=15, what="a keepalive PING")
        assert 9 <= pings[0] - started <= 12
        assert client.stats()["pool_connections"] == 1  # answered, so the connection lives on
    finally:
        h2conn.H2Connection.receive_data = real_receive


# --- copy semantics (as Istio's ztunnel) ----------------------------------------------------------


class Upstream:
    """An app that reads until its peer ends, and records how it ended: a FIN (b"") or a reset."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "{}:{}".format(*self.listener.getsockname())
        self.greeting = greeting
        self.endings: list[str] = []
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            try:
                while data := conn.recv(65536):
                    self.received += len(data)
                self.endings.append("fin")
            except ConnectionResetError:
                self.endings.append("reset")


@pytest.mark.parametrize("code", ["NO_ERROR", "CANCEL"])
def test_a_client_reset_with_no_error_or_cancel_ends_the_stream_cleanly(
    loop, rust_server, client_cert, code
):
    """RST_STREAM NO_ERROR or CANCEL is the client hanging up: the upstream gets a FIN, not a
    reset, and the stream is reported with no error (Istio's ztunnel reads them so)."""
    upstream = Upstream(greeting=b"hello")
    reports: list[tuple[object, str | None]] = []
    listener = rust_server.serve(
        "127.0.0.1:0",
        SERVER,
        Allow(upstream.address),
        report=lambda subject, src, dst, sent, received, seconds, error: reports.append(
            (subject, error)
        ),
    )

    async def main() -> None:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        stream = await client.open_stream(upstream.address)
        await stream.write(b"x" * 1000)
        assert await stream.read() == b"hello"
        stream.reset(getattr(h2.errors.ErrorCodes, code))
        await asyncio.to_thread(wait_until, lambda: bool(upstream.endings))
        await client.close()

    run(loop, main())
    assert upstream.endings == ["fin"] and upstream.received == 1000
    wait_until(lambda: bool(reports), what="the stream's report")
    assert reports[0][1] is None, reports


def test_a_protocol_error_reset_is_reported_as_an_error(loop, rust_server, client_cert):
    """Any other reset code is a failure of the stream, and its report says so."""
    upstream = Upstream(greeting=b"hello")
    reports: list[str | None] = []
    listener = rust_server.serve(
        "127.0.0.1:0",
        SERVER,
        Allow(upstream.address),
        report=lambda subject, src, dst, sent, received, seconds, error: reports.append(error),
    )

    async def main() -> None:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        stream = await client.open_stream(upstream.address)
        assert await stream.read() == b"hello"
        stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        await asyncio.to_thread(wait_until, lambda: bool(upstream.endings))
        await client.close()

    run(loop, main())
    wait_until(lambda: bool(reports), what="the stream's report")
    assert reports[0] is not None and "INTERNAL_ERROR" in reports[0], reports


def test_the_upstream_half_closing_lets_the_client_keep_sending(loop, rust_server, client_cert):
    """One direction ending (the app sends its answer and FIN) does not end the other: the client
    keeps sending until it half-closes too, and every byte arrives."""
    upstream = Upstream(greeting=b"early answer")
    listener = rust_server.serve("127.0.0.1:0", SERVER, Allow(upstream.address))

    async def main() -> bytes:
        client = HboneClient(client_cert, address(listener), [SERVER])
        await client.connect()
        stream = await client.open_stream(upstream.address)
        answer = await stream.read()
        for _ in range(20):
            await stream.write(b"z" * 50_000)
        await stream.write_eof()
        rest = b""
        while data := await stream.read():
            rest += data
        await client.close()
        return answer + rest

    assert run(loop, main()) == b"early answer"
    wait_until(lambda: upstream.endings == ["fin"], what="the upstream to see the client's FIN")
    assert upstream.received == 20 * 50_000
