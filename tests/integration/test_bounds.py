"""The data plane's bounds, each pushed past: the decision queue, the connection caps per
listener and per source, the time an HBONE connection may stay without a stream, and the log
output of a flood of bad handshakes. Past a bound the extra is refused at once and counted; what
is within it keeps being served; threads do not multiply. Everything binds 127.50.0.0/16."""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any

import pytest

from ambient.hbone import Allow, HboneTarget, TcpTarget
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, wait_until
from tests.integration.test_hostile_peers import (
    CLIENT,
    SERVER,
    GoodTraffic,
    H2Peer,
    app_address,
    closed_by_peer,
    host_port,
    read_all,
    usage,
)

HELD = "127.50.2.99:80"  # an authority whose decision waits until the test releases it


@pytest.fixture
def echo():
    app = App("echo", ("127.50.2.10", 0))
    yield app
    app.close()


class HeldDecisions:
    """A decision callable that holds the decisions for :data:`HELD` until :meth:`release`."""

    def __init__(self) -> None:
        self.entered: queue.Queue[None] = queue.Queue()
        self.gate = threading.Event()

    def wait_running(self, n: int) -> None:
        for _ in range(n):
            self.entered.get(timeout=10)

    def release(self) -> None:
        self.gate.set()


# --- the decision queue ---------------------------------------------------------------------------


def test_streams_past_the_decision_queue_get_503_at_once_and_threads_stay_flat(
    dataplane_factory, server_cert, client_cert, echo
):
    """2 decision threads busy, 5 decisions waiting: of 20 streams, the 13 beyond are answered
    503 at once, counted and reported; no thread per waiting stream; once the decisions are
    released the 7 accepted ones are answered 200."""
    held = HeldDecisions()

    def decide(request: Any) -> Any:
        if request.authority == HELD:
            held.entered.put(None)
            held.gate.wait(20)
        return Allow(app_address(echo))

    server = dataplane_factory(2, decision_threads=2, max_pending_decisions=5)
    server.load_identity(server_cert)
    reports: list[tuple] = []
    listener = server.serve("127.50.2.1:0", SERVER, decide, report=lambda *r: reports.append(r))
    peer = H2Peer(listener.local_address, client_cert, source="127.50.2.66")
    try:
        before = usage()
        running = [peer.connect(HELD) for _ in range(2)]
        held.wait_running(2)  # both decision threads are busy now
        rest = [peer.connect(HELD) for _ in range(18)]
        streams = running + rest
        peer.until(lambda: sum(peer.answered(s) for s in streams) >= 13, what="13 refusals")
        refused = [s for s in streams if peer.answered(s)]
        assert len(refused) == 13
        assert {peer.statuses.get(s) for s in refused} == {503}
        assert server.stats()["decisions_rejected"] == 13
        assert usage().threads <= before.threads + 2
        wait_until(lambda: len(reports) == 13, what="13 early reports")
        assert all(r[0] is None and "decision queue is full" in r[6] for r in reports)
        held.release()
        waiting = [s for s in streams if s not in refused]
        peer.until(lambda: all(peer.answered(s) for s in waiting), what="the 7 held ones")
        assert {peer.statuses.get(s) for s in waiting} == {200}
        assert peer.echo(app_address(echo), b"and on") == b"and on"
    finally:
        held.release()
        peer.close()


@pytest.mark.parametrize("mode", ["socks5", "direct"])
def test_connections_past_the_decision_queue_are_refused_at_once_and_threads_stay_flat(
    dataplane_factory, echo, mode
):
    """A burst of 500 connections while both decision threads are busy and 20 decisions wait:
    the 478 beyond are refused at once — a SOCKS5 client with the RFC's general failure, a plain
    TCP one by closing — and the process gains no thread per connection (a burst of 500 SOCKS5
    connects once took a ztunnel from 15 to 225 threads)."""
    held = HeldDecisions()

    def route(source: str, destination: str) -> Any:
        held.entered.put(None)
        held.gate.wait(20)
        return TcpTarget(app_address(echo))

    server = dataplane_factory(2, decision_threads=2, max_pending_decisions=20)
    listener = server.forward("127.50.2.2:0", route, mode=mode)
    address = host_port(listener.local_address)
    request = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x32\x02\x0a\x00\x50"  # CONNECT 127.50.2.10:80

    def dial() -> socket.socket:
        sock = socket.create_connection(address, source_address=("127.50.2.66", 0))
        if mode == "socks5":
            sock.sendall(request)
        return sock

    def answered(sock: socket.socket) -> bool:
        if mode == "direct":
            return closed_by_peer(sock)
        try:  # the method reply, then a request reply (10 bytes)
            return len(sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)) == 12
        except BlockingIOError:
            return False

    before = usage()
    socks: list[socket.socket] = []
    try:
        socks += [dial() for _ in range(2)]
        held.wait_running(2)
        socks += [dial() for _ in range(498)]
        wait_until(lambda: sum(map(answered, socks)) >= 478, 20, "478 refusals")
        during = usage()
        refused = [s for s in socks if answered(s)]
        assert len(refused) == 478
        assert server.stats()["decisions_rejected"] == 478
        assert during.threads <= before.threads + 2
        general_failure = b"\x05\x00" + bytes([5, 1, 0, 1, 0, 0, 0, 0, 0, 0])
        for sock in refused[:20]:
            assert read_all(sock, 5) == (general_failure if mode == "socks5" else b"")
        held.release()
        for sock in [s for s in socks if s not in refused]:
            sock.settimeout(10)
            if mode == "socks5":
                assert read_all_n(sock, 12)[2:4] == b"\x05\x00"  # succeeded
            assert exchange(sock, b"let through") == b"let through"
    finally:
        held.release()
        for sock in socks:
            sock.close()


def read_all_n(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


# --- connection caps ------------------------------------------------------------------------------


def test_the_per_source_and_per_listener_caps_refuse_at_accept_and_give_places_back(
    dataplane_factory, server_cert, client_cert, echo
):
    server = dataplane_factory(2, max_connections=5, max_connections_per_source=3)
    server.load_identity(server_cert)
    reports: list[tuple] = []
    listener = server.serve(
        "127.50.2.3:0", SERVER, Allow(app_address(echo)), report=lambda *r: reports.append(r)
    )
    other = server.serve("127.50.2.4:0", SERVER, Allow(app_address(echo)))

    def join(source: str, to: Any = listener) -> H2Peer:
        return H2Peer(to.local_address, client_cert, source=source)

    def refused(source: str, why: str) -> None:
        over = server.stats()["connections_over_cap"]
        with pytest.raises((ssl.SSLError, OSError)):
            join(source).close()
        assert server.stats()["connections_over_cap"] == over + 1
        wait_until(lambda: any(why in (r[6] or "") for r in reports), what=f"a report: {why}")
        assert all(r[0] is None for r in reports)

    peers = [join("127.50.2.21") for _ in range(3)]
    try:
        refused("127.50.2.21", "127.50.2.21 already holds 3 connections to this listener")
        peers += [join("127.50.2.22") for _ in range(2)]  # another source is still accepted
        assert listener.connections == 5
        refused("127.50.2.23", "the listener already holds 5 connections (its cap)")
        with contextlib.closing(join("127.50.2.23", other)) as elsewhere:  # caps are per listener
            assert elsewhere.echo(app_address(echo), b"other listener") == b"other listener"
        for peer in peers:  # the admitted ones are served
            assert peer.echo(app_address(echo), b"admitted") == b"admitted"
        peers.pop(0).close()  # a place comes back when its connection ends
        wait_until(lambda: listener.connections == 4, what="the place to come back")
        peers.append(join("127.50.2.21"))
        assert peers[-1].echo(app_address(echo), b"readmitted") == b"readmitted"
    finally:
        for peer in peers:
            peer.close()
    wait_until(lambda: listener.connections == 0, what="every place to come back")


# --- connections without streams ------------------------------------------------------------------


def test_an_hbone_connection_that_opens_no_stream_is_closed_after_10_s_and_counted(
    dataplane_factory, server_cert, client_cert, echo
):
    """A client dials HBONE to open a stream at once; one that opened none by the first
    keepalive tick (10 s) gets GOAWAY and is closed, while a connection whose stream ended a
    moment ago (idle, but used) and one carrying a stream stay open."""
    server = dataplane_factory(2)
    server.load_identity(server_cert)
    listener = server.serve("127.50.2.5:0", SERVER, Allow(app_address(echo)))
    unused = H2Peer(listener.local_address, client_cert, source="127.50.2.31")
    used = H2Peer(listener.local_address, client_cert, source="127.50.2.32")
    busy = H2Peer(listener.local_address, client_cert, source="127.50.2.33")
    try:
        assert used.echo(app_address(echo), b"one stream") == b"one stream"
        live = busy.connect(app_address(echo))
        busy.until(lambda: busy.statuses.get(live) == 200, what="the busy stream's 200")

        def unused_closed() -> bool:
            for peer in (unused, used, busy):  # keep reading all three (PINGs are answered)
                peer.receive(0.05)
            return unused.closed is not None

        wait_until(unused_closed, 25, "the stream-less connection to be closed")
        assert unused.goaway is not None and unused.goaway.error_code == 0, unused.closed
        assert server.stats()["hbone_connections_idle_closed"] == 1
        for peer in (used, busy):
            assert peer.closed is None and peer.goaway is None
        ping_acks = used.ping_acks
        used.h2.ping(b"still on")
        used.flush()
        used.until(lambda: used.ping_acks > ping_acks, what="the PING answer")
        busy.send(live, b"still flowing", end=True)
        busy.until(lambda: busy.ended.get(live, False), what="the echo")
        assert busy.data[live] == b"still flowing"
        assert server.stats()["hbone_connections_idle_closed"] == 1
    finally:
        for peer in (unused, used, busy):
            peer.close()


# --- a flood of bad handshakes, seen from the outside ---------------------------------------------


def test_a_flood_of_bad_handshakes_keeps_a_good_client_served_and_the_log_small(
    tmp_path, dataplane_factory, echo
):
    """2,000 connections sending garbage to `ambient hbone serve`, from four threads: a good
    client completes exchanges meanwhile, the server's threads stay flat, and its log holds a
    burst of lines then a few per second, which say how many similar lines they stand for."""
    CertificateAuthority.create().save(tmp_path / "ca")
    client_cert = CertificateAuthority.load(tmp_path / "ca").issue(CLIENT)
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "ambient", "hbone", "serve", "--listen", "127.50.2.6:0",
         "--ca-dir", str(tmp_path / "ca"), "--identity", SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    log: list[str] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready "), ready + proc.stderr.read()
        address = ready.split()[1]
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        client = dataplane_factory(1)
        client.load_identity(client_cert)
        target = HboneTarget(address, app_address(echo), [SERVER], CLIENT, source_ip="127.50.2.7")

        def good_exchange() -> None:
            assert exchange(client.connect(target), b"good" * 1000) == b"good" * 1000

        good_exchange()
        before = usage(proc.pid)
        attempts = [0]

        def garbage() -> bool:
            with socket.create_connection(
                host_port(address), source_address=("127.50.2.66", 0)
            ) as raw:
                raw.sendall(b"\x16\x03\x01\x00\x05hello, not a ClientHello")
                read_all(raw, 10)
            attempts[0] += 1
            return any("similar lines suppressed" in line for line in log)

        def flood() -> None:
            for _ in range(500):
                garbage()

        threads = [threading.Thread(target=flood) for _ in range(4)]
        with GoodTraffic(good_exchange) as good:
            for t in threads:
                t.start()
            good.completes(3)
            assert usage(proc.pid).threads <= before.threads + 2
            for t in threads:
                t.join(60)
            good.completes(1)
        assert attempts[0] == 2000
        # Once the burst is spent a line comes only every 0.2 s, saying what it stands for.
        wait_until(garbage, 10, "a line saying how many similar lines were suppressed")
        failures = [line for line in log if "TLS handshake with" in line]
        assert len(failures) >= 20 and len(log) < attempts[0] / 10, len(log)
        wait_until(lambda: usage(proc.pid).fds <= before.fds, 15, "the server's descriptors to go")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
