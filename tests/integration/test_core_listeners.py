"""Listener modes of the core (SOCKS5, original destination) and connection reports."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest

from ambient.hbone import Allow, Deny, HboneTarget, TcpTarget
from ambient.testing import exchange, refused_port, wait_until

SERVER = "spiffe://cluster.local/ns/default/sa/server"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def socks5_connect(
    proxy: str, host: str, port: int, *, command: int = 1
) -> tuple[socket.socket, int]:
    """A minimal SOCKS5 client (RFC 1928): returns the socket and the reply code."""
    phost, pport = proxy.rsplit(":", 1)
    sock = socket.create_connection((phost, int(pport)), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    sock.sendall(b"\x05" + bytes([command]) + b"\x00" + address + struct.pack("!H", port))
    reply = sock.recv(10)
    return sock, reply[1]


class Reports:
    """Collects connection reports: (subject, source, destination, sent, received, error)."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, subject, source, destination, sent, received, seconds, error):
        assert seconds >= 0
        with self.lock:
            self.items.append((subject, source, destination, sent, received, error))


@pytest.fixture
def plane(dataplane_factory, server_cert, client_cert):
    dp = dataplane_factory(2)
    dp.load_identity(server_cert)
    dp.load_identity(client_cert)
    return dp


def test_socks5_asks_the_route_with_the_requested_destination(plane, echo, app_factory):
    other = app_factory("count")
    asked: list[str] = []

    def route(source, destination):
        asked.append(destination)
        return TcpTarget(echo.address if destination.startswith("echo") else other.address)

    proxy = plane.forward("127.0.0.1:0", route, mode="socks5").local_address
    sock, code = socks5_connect(proxy, "echo.default.svc.cluster.local", 80)
    assert code == 0
    assert exchange(sock, b"by name") == b"by name"
    sock, code = socks5_connect(proxy, "10.9.8.7", 8080)
    assert code == 0
    assert exchange(sock, b"by ip") == b"5"
    assert asked == ["echo.default.svc.cluster.local:80", "10.9.8.7:8080"]


@pytest.mark.parametrize(
    ("plan", "code"),
    [
        (Deny("not allowed out"), 2),  # connection not allowed by ruleset
        (TcpTarget(refused_port()), 5),  # connection refused
    ],
)
def test_socks5_reports_refusals_with_their_code(plane, plan, code):
    proxy = plane.forward("127.0.0.1:0", plan, mode="socks5").local_address
    sock, reply = socks5_connect(proxy, "10.0.0.1", 80)
    sock.close()
    assert reply == code


def test_socks5_refuses_other_commands_and_garbage_and_keeps_serving(plane, echo):
    proxy = plane.forward("127.0.0.1:0", TcpTarget(echo.address), mode="socks5").local_address
    sock, code = socks5_connect(proxy, "10.0.0.1", 80, command=2)  # BIND
    sock.close()
    assert code == 7
    host, port = proxy.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not SOCKS at all: closed without an answer
        with contextlib.suppress(ConnectionResetError):  # or reset, with our bytes unread
            assert raw.recv(10) == b""
    sock, code = socks5_connect(proxy, "10.0.0.1", 80)
    assert code == 0 and exchange(sock, b"still") == b"still"


def test_original_destination_without_a_redirect_is_the_listener_itself(plane, echo):
    asked: list[str] = []
    listener = plane.forward(
        "127.0.0.1:0",
        lambda source, destination: asked.append(destination) or TcpTarget(echo.address),
        mode="original_dst",
    )
    host, port = listener.local_address.rsplit(":", 1)
    assert exchange(socket.create_connection((host, int(port))), b"x") == b"x"
    assert asked == [listener.local_address]


def test_unknown_mode_is_refused(plane):
    with pytest.raises(ValueError, match="mode: expected 'direct', 'original_dst' or 'socks5'"):
        plane.forward("127.0.0.1:0", TcpTarget("127.0.0.1:1"), mode="tproxy")


def test_hbone_streams_are_reported_with_bytes_tag_and_refusals(plane, echo):
    reports = Reports()

    def decide(request):
        if request.authority.endswith(":9"):
            return Deny("port 9 is closed to you", tag={"policy": "deny-9"})
        return Allow(echo.address, tag={"peer": request.peer_identity})

    listener = plane.serve("127.0.0.1:0", SERVER, decide, report=reports)
    plan = HboneTarget(listener.local_address, echo.address, [SERVER], CLIENT)
    assert exchange(plane.connect(plan), b"twelve bytes") == b"twelve bytes"
    with pytest.raises(ConnectionError):
        plane.connect(HboneTarget(listener.local_address, "127.0.0.1:9", [SERVER], CLIENT))
    wait_until(lambda: len(reports.items) == 2, what="two reports")
    allowed, denied = sorted(reports.items, key=lambda r: r[5] is not None)
    subject, _, destination, sent, received, error = allowed
    assert isinstance(subject, Allow) and subject.tag == {"peer": CLIENT}
    assert destination == echo.address and (sent, received, error) == (12, 12, None)
    subject, _, destination, sent, received, error = denied
    assert isinstance(subject, Deny) and subject.tag == {"policy": "deny-9"}
    assert destination == "127.0.0.1:9" and error == "denied: port 9 is closed to you"


def test_outbound_connections_are_reported(plane, echo):
    reports = Reports()
    dead = refused_port()
    targets = iter([TcpTarget(echo.address, tag="first"), TcpTarget(dead, tag="second")])
    listener = plane.forward("127.0.0.1:0", lambda s, d: next(targets), report=reports)
    host, port = listener.local_address.rsplit(":", 1)
    assert exchange(socket.create_connection((host, int(port))), b"abc") == b"abc"
    with contextlib.suppress(ConnectionResetError):  # refused: closed, bytes unread
        exchange(socket.create_connection((host, int(port))), b"abc")
    wait_until(lambda: len(reports.items) == 2, what="two reports")
    by_tag = {r[0].tag: r for r in reports.items}
    assert by_tag["first"][3:] == (3, 3, None)
    assert "TCP connect to" in by_tag["second"][5] and dead in by_tag["second"][5]


def _open_fds() -> set[int]:
    import os

    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize(
    "plan", ["not a plan", None, Allow("127.0.0.1:1")], ids=["string", "none", "inbound-verdict"]
)
def test_a_socket_handed_to_the_core_is_closed_when_it_is_refused(dataplane_factory, plan):
    """tunnel() detaches the socket: whatever is wrong with the call, the core owns the
    descriptor from then on and closes it, so a refused hand-over leaks nothing."""
    dp = dataplane_factory(1)
    before = _open_fds()
    for _ in range(50):
        ours, theirs = socket.socketpair()
        with pytest.raises(ValueError, match="plan"):
            dp.tunnel(theirs, plan, lambda error: None)
        ours.settimeout(5)
        assert ours.recv(1) == b""  # the core closed its end
        ours.close()
    assert len(_open_fds()) <= len(before)
