"""The core's connection pool, graceful drain, certificate rotation and outbound routing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from ambient.hbone import Allow, Deny, HboneTarget, TcpTarget, TunnelError
from ambient.identity import CertificateAuthority
from ambient.testing import exchange, refused_port, wait_until

SERVER = "spiffe://cluster.local/ns/default/sa/server"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
MB = 1024 * 1024


def plan(listener, authority, source=CLIENT, expect=SERVER):
    return HboneTarget(listener.local_address, authority, [expect], source)


def hold_open(client, target, n):
    """n tunnels that stay open (each proven to carry a byte) until the caller closes them."""
    socks = []
    for _ in range(n):
        s = client.connect(target)
        s.sendall(b"?")
        assert s.recv(1) == b"?"
        socks.append(s)
    return socks


@pytest.fixture
def planes(dataplane_factory, server_cert, client_cert):
    def make(**client_options):
        server = dataplane_factory(2)
        client = dataplane_factory(2, **client_options)
        server.load_identity(server_cert)
        client.load_identity(client_cert)
        return server, client

    return make


# --- pool -----------------------------------------------------------------------------------


def test_sequential_tunnels_share_one_pooled_connection(planes, echo):
    server, client = planes()
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    for i in range(20):
        assert exchange(client.connect(plan(listener, echo.address)), b"%d" % i) == b"%d" % i
    stats = client.stats()
    assert stats["hbone_connections_dialed"] == 1
    assert stats["hbone_streams_opened"] == 20
    assert server.stats()["tls_handshakes"] == 1


def test_a_burst_of_new_tunnels_dials_only_once(planes, echo):
    server, client = planes()
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    results: list[bytes] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                exchange(client.connect(plan(listener, echo.address)), b"b")
            )
        )
        for _ in range(30)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"b"] * 30
    assert client.stats()["hbone_connections_dialed"] == 1  # one dial per key at a time


def test_streams_beyond_the_limit_open_a_second_connection(planes, echo):
    server, client = planes(pool_max_streams=3)
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    socks = hold_open(client, plan(listener, echo.address), 7)
    try:
        assert client.stats()["hbone_connections_dialed"] == 3  # 3 + 3 + 1
        assert client.stats()["pool_connections"] == 3
    finally:
        for s in socks:
            s.close()


def test_different_source_identities_never_share_a_connection(planes, ca, echo):
    server, client = planes()
    other = ca.issue("spiffe://cluster.local/ns/default/sa/other-client")
    client.load_identity(other)
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    exchange(client.connect(plan(listener, echo.address)), b"1")
    exchange(client.connect(plan(listener, echo.address, source=other.identity)), b"2")
    exchange(client.connect(plan(listener, echo.address)), b"3")
    assert client.stats()["hbone_connections_dialed"] == 2


def test_idle_connections_are_released_after_the_timeout(planes, echo):
    server, client = planes(pool_idle_timeout=0.2)
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    exchange(client.connect(plan(listener, echo.address)), b"x")
    wait_until(lambda: client.stats()["pool_connections"] == 0, what="the idle connection to go")
    wait_until(lambda: listener.active == 0, what="the server to see the connection closed")
    exchange(client.connect(plan(listener, echo.address)), b"y")
    assert client.stats()["hbone_connections_dialed"] == 2


def test_a_connection_that_received_goaway_is_never_reused(planes, echo):
    server, client = planes()
    first = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    address = first.local_address
    live = hold_open(client, plan(first, echo.address), 1)[0]
    closing = threading.Thread(target=first.close, args=(30.0,))  # GOAWAY, then wait for `live`
    closing.start()
    wait_until(lambda: client.stats()["pool_connections_goaway"] == 1, what="GOAWAY at the client")
    # A new listener on the same address: a new stream must dial anew rather than use the old one.
    second = server.serve(address, SERVER, Allow(echo.address))
    assert exchange(client.connect(plan(second, echo.address)), b"new") == b"new"
    assert client.stats()["hbone_connections_dialed"] == 2
    live.sendall(b"old stream still flows")  # GOAWAY leaves existing streams alone
    assert live.recv(100) == b"old stream still flows"
    live.close()
    closing.join(10)
    assert not closing.is_alive()


# --- drain ----------------------------------------------------------------------------------


def slow_upload(sock, total, chunk=64 * 1024, pause=0.01):
    sent = 0
    while sent < total:
        sock.sendall(b"d" * chunk)
        sent += chunk
        time.sleep(pause)
    sock.shutdown(socket.SHUT_WR)
    return sock.recv(100)


def test_drain_lets_a_transfer_finish_within_the_deadline_and_refuses_new_ones(planes, app_factory):
    server, client = planes()
    counter = app_factory("count")
    listener = server.serve("127.0.0.1:0", SERVER, Allow(counter.address))
    sock = client.connect(plan(listener, counter.address))
    answer: list[bytes] = []
    upload = threading.Thread(target=lambda: answer.append(slow_upload(sock, 2 * MB)))
    upload.start()
    wait_until(lambda: server.stats()["active_tunnels"] == 1, what="the transfer to start")
    started = time.monotonic()
    assert server.drain(20.0) is True  # finished on its own
    assert time.monotonic() - started < 20
    upload.join()
    assert answer == [str(2 * MB).encode()]
    with pytest.raises(TunnelError):
        client.connect(plan(listener, counter.address))


def test_drain_cuts_a_transfer_longer_than_the_deadline(planes, app_factory):
    server, client = planes()
    counter = app_factory("count")
    listener = server.serve("127.0.0.1:0", SERVER, Allow(counter.address))
    sock = client.connect(plan(listener, counter.address))
    sock.settimeout(20)
    result: list[object] = []

    def endless():
        try:
            result.append(slow_upload(sock, 10_000 * MB))
        except OSError as e:
            result.append(e)

    upload = threading.Thread(target=endless)
    upload.start()
    wait_until(lambda: server.stats()["active_tunnels"] == 1, what="the transfer to start")
    started = time.monotonic()
    assert server.drain(0.5) is False  # had to cut
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5
    wait_until(lambda: counter.connections_ended == 1, what="the upstream to be closed")
    upload.join(20)
    assert result and isinstance(result[0], OSError | bytes)
    assert result[0] != str(10_000 * MB).encode()


# --- rotation -------------------------------------------------------------------------------


def test_rotating_a_certificate_keeps_live_tunnels_and_applies_to_new_connections(
    planes, echo, server_cert
):
    server, client = planes()
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    live = hold_open(client, plan(listener, echo.address), 1)[0]
    # Rotate the server to a certificate from a new CA, with both roots trusted during the change.
    new_ca = CertificateAuthority.create("cluster.local")
    rotated = new_ca.issue(SERVER)
    server.core.set_identity(
        SERVER, rotated.chain_pem, rotated.key_pem, server_cert.roots_pem + new_ca.roots_pem
    )
    # A client that trusts only the new root can connect now: new connections use the new cert.
    fresh_client_cert = new_ca.issue("spiffe://cluster.local/ns/default/sa/fresh")
    client.load_identity(fresh_client_cert)
    fresh = plan(listener, echo.address, source=fresh_client_cert.identity)
    assert exchange(client.connect(fresh), b"rotated") == b"rotated"
    live.sendall(b"still alive")
    assert live.recv(100) == b"still alive"
    live.close()


# --- outbound routing -------------------------------------------------------------------------


def test_outbound_listener_routes_each_connection_by_its_decision(planes, app_factory, echo):
    server, client = planes()
    plain_app = app_factory("count")
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    asked: list[tuple[str, str]] = []

    def route(source, destination):
        asked.append((source, destination))
        n = len(asked)
        if n == 1:
            return plan(listener, echo.address)
        if n == 2:
            return TcpTarget(plain_app.address)
        if n == 3:
            return Deny("not allowed out")
        raise RuntimeError("route bug")

    outbound = client.forward("127.0.0.1:0", route)
    host, port = outbound.local_address.rsplit(":", 1)

    def talk(payload):
        try:
            return exchange(socket.create_connection((host, int(port))), payload)
        except ConnectionResetError:
            return b""  # refused: closed with our bytes unread

    assert talk(b"via hbone") == b"via hbone"
    assert talk(b"plain") == b"5"
    assert talk(b"denied") == b""  # closed without a byte
    assert talk(b"broken route") == b""
    assert [d for _, d in asked] == [outbound.local_address] * 4
    stats = client.stats()
    assert stats["decisions_denied"] == 1 and stats["decision_errors"] == 1
    assert talk(b"") == b"" and len(asked) == 5  # still accepting after the errors


def test_outbound_to_an_unreachable_tcp_target_is_closed(planes):
    _, client = planes()
    outbound = client.forward("127.0.0.1:0", TcpTarget(refused_port()))
    host, port = outbound.local_address.rsplit(":", 1)
    with contextlib.suppress(ConnectionResetError):  # refused: closed with our bytes unread
        assert exchange(socket.create_connection((host, int(port))), b"x") == b""
    wait_until(lambda: client.stats()["upstream_connect_failures"] == 1, what="the failure count")


# --- bad input to the API -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "nowhere"}, "HboneTarget.address: expected 'ip:port'"),
        ({"authority": ""}, "HboneTarget.authority"),
        ({"identities": []}, "HboneTarget.identities: at least one"),
        ({"identities": ["server"]}, "HboneTarget.identities: expected a SPIFFE ID"),
        ({"source_identity": "me"}, "HboneTarget.source_identity: expected a SPIFFE ID"),
        ({"source_ip": "10.0.0.300"}, "HboneTarget.source_ip: expected an IP address"),
        ({"headers": [("bad header", "v")]}, "HboneTarget.headers: bad header name"),
    ],
)
def test_hbone_target_validates_every_field(kwargs, message):
    args = {
        "address": "127.0.0.1:15008",
        "authority": "10.0.0.1:80",
        "identities": [SERVER],
        "source_identity": CLIENT,
    }
    args.update(kwargs)
    source_ip = args.pop("source_ip", None)
    headers = args.pop("headers", None)
    with pytest.raises(ValueError, match=message):
        HboneTarget(**args, source_ip=source_ip, headers=headers)


def test_deny_status_must_be_an_error_status():
    with pytest.raises(ValueError, match="Deny.status: expected an HTTP error status"):
        Deny("x", status=200)


def test_set_identity_names_what_is_wrong(dataplane_factory, ca, server_cert, client_cert):
    dp = dataplane_factory(1)
    with pytest.raises(ValueError, match="is not a SPIFFE ID"):
        dp.core.set_identity("server", server_cert.chain_pem, server_cert.key_pem, ca.roots_pem)
    with pytest.raises(ValueError, match="URI SANs .* do not include that identity"):
        dp.core.set_identity(CLIENT, server_cert.chain_pem, server_cert.key_pem, ca.roots_pem)
    with pytest.raises(ValueError, match="does not match its certificate"):
        dp.core.set_identity(SERVER, server_cert.chain_pem, client_cert.key_pem, ca.roots_pem)
    with pytest.raises(ValueError, match="private key of .*: expected one PEM private key"):
        dp.core.set_identity(SERVER, server_cert.chain_pem, b"not a key", ca.roots_pem)
    with pytest.raises(ValueError, match="roots of .*: no CERTIFICATE block"):
        dp.core.set_identity(SERVER, server_cert.chain_pem, server_cert.key_pem, b"")
    with pytest.raises(ValueError) as info:
        dp.core.set_identity(SERVER, server_cert.chain_pem, b"garbage", ca.roots_pem)
    assert "garbage" not in str(info.value)  # key material is never echoed


def test_serving_without_a_loaded_identity_is_refused(dataplane_factory):
    dp = dataplane_factory(1)
    with pytest.raises(ValueError, match="no certificate loaded for .*sa/server"):
        dp.serve("127.0.0.1:0", SERVER, Allow("127.0.0.1:1"))


def test_listening_on_a_busy_or_bad_address_names_it(dataplane_factory, server_cert):
    dp = dataplane_factory(1)
    dp.load_identity(server_cert)
    with pytest.raises(ValueError, match="listen address: expected 'ip:port'"):
        dp.serve("localhost:15008", SERVER, Allow("127.0.0.1:1"))
    with pytest.raises(OSError, match="cannot listen on 192.0.2.1:15008"):
        dp.serve("192.0.2.1:15008", SERVER, Allow("127.0.0.1:1"))
