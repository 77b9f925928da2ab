"""Graceful drain, everywhere at once: ``DataPlane.drain``/``close`` and an ``ambient ztunnel``
process told to stop (SIGTERM, SIGINT, admin ``POST /quitquitquit``).

A drain stops every listener at once, lets live connections run until the deadline, then cuts
what is left: each cut connection is closed on both sides, leaves the core's registry, is counted
in ``connections_cut``, is reported with the drain's reason and counted closed with response flag
"-" in the metrics. A drain whose connections all end in time returns True as soon as the last
one has, without waiting for the deadline. Every address bound here is in 127.40.0.0/15.
"""

from __future__ import annotations

import signal
import socket
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ambient import socks5
from ambient._core import Counters
from ambient.hbone import Allow, DataPlane, HboneTarget, Listener, TcpTarget
from ambient.identity import CertificateAuthority
from ambient.testing import App, wait_until
from ambient.ztunnel.process import ZtunnelProcess

SERVER = "spiffe://cluster.local/ns/default/sa/server"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
DRAIN_CUT = "cut: the drain deadline passed while the proxy was shutting down"
DEADLINE = 1.0
# Beyond the deadline, what a drain may take before the test calls it a hang.
MARGIN = 5.0


class Reports:
    """The ``report`` callback of a listener: the error of every connection it reports."""

    def __init__(self) -> None:
        self.errors: list[str | None] = []
        self._lock = threading.Lock()

    def __call__(self, subject, source, destination, sent, received, seconds, error) -> None:
        with self._lock:
            self.errors.append(error)


def address_of(app: App) -> str:
    host, port = app.sock.getsockname()[:2]
    return f"{host}:{port}"


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def held(sock: socket.socket) -> socket.socket:
    """``sock`` proven to carry bytes both ways, left open."""
    sock.settimeout(10)
    sock.sendall(b"held")
    assert read_exactly(sock, 4) == b"held"
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the far side closed ``sock`` (EOF or reset); False if it stays open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def refused(address: str) -> bool:
    try:
        socket.create_connection(split(address), timeout=2).close()
    except OSError:
        return True
    return False


def draining(plane: DataPlane, app: App) -> bool:
    """Whether ``plane`` has started draining: it then refuses new listeners."""
    try:
        plane.forward("127.40.0.5:0", TcpTarget(address_of(app))).close()
    except RuntimeError as e:
        assert "draining or stopped" in str(e)
        return True
    return False


@pytest.fixture
def app() -> Iterator[App]:
    echo = App("echo", ("127.40.0.1", 0))
    yield echo
    echo.close()


@pytest.fixture
def planes(dataplane_factory, server_cert, client_cert) -> tuple[DataPlane, DataPlane]:
    server = dataplane_factory(2)
    client = dataplane_factory(2)
    server.load_identity(server_cert)
    client.load_identity(client_cert)
    return server, client


class Setup:
    """Two listeners of one kind on the plane under test (or a tunnel made by ``connect``) in
    front of ``app``; :meth:`hold` opens a live connection through one of them."""

    def __init__(self, kind: str, server: DataPlane, client: DataPlane, app: App) -> None:
        self.kind = kind
        self.client = client
        self.app = app
        self.counters = Counters()
        self.reports = Reports()
        upstream = address_of(app)
        self.listeners: list[Listener]
        if kind == "forward":
            self.plane = server
            self.listeners = [
                server.forward(
                    "127.40.0.2:0", TcpTarget(upstream, counters=self.counters), report=self.reports
                )
                for _ in range(2)
            ]
        elif kind == "serve":
            self.plane = server
            self.listeners = [
                server.serve(
                    "127.40.0.3:0",
                    SERVER,
                    Allow(upstream, counters=self.counters),
                    report=self.reports,
                )
                for _ in range(2)
            ]
        else:  # "connect": the plane under test is the client holding the tunnel
            self.plane = client
            self.server_listener = server.serve("127.40.0.4:0", SERVER, Allow(upstream))
            self.listeners = []

    def hold(self, position: int) -> socket.socket:
        if self.kind == "forward":
            return held(socket.create_connection(split(self.listeners[position].local_address)))
        if self.kind == "serve":
            address = self.listeners[position].local_address
            plan = HboneTarget(address, address_of(self.app), [SERVER], CLIENT)
            return held(self.client.connect(plan))
        plan = HboneTarget(
            self.server_listener.local_address,
            address_of(self.app),
            [SERVER],
            CLIENT,
            counters=self.counters,
        )
        return held(self.client.connect(plan))


POSITIONS = {"first": [0], "last": [1], "both": [0, 1]}


# --- the API: DataPlane.drain / close ------------------------------------------------------------


@pytest.mark.parametrize("method", ["drain", "close"])
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind", ["forward", "serve"])
def test_a_drain_cuts_connections_left_at_the_deadline_on_any_listener(
    planes, app, kind, position, method
):
    """Whichever of two listeners holds the live connection (the first one used to hang the
    drain forever), plain or HBONE: the drain returns False after the deadline, and every
    connection is cut, leaves the registry, is counted and reported as cut by the drain."""
    setup = Setup(kind, *planes, app)
    socks = [setup.hold(i) for i in POSITIONS[position]]
    n = len(socks)
    assert setup.plane.stats()["live_connections"] == n

    started = time.monotonic()
    finished = getattr(setup.plane, method)(DEADLINE)
    elapsed = time.monotonic() - started

    assert finished is False  # it had to cut
    assert elapsed < DEADLINE + MARGIN
    assert all(closed_by_peer(s) for s in socks), "a client's connection outlived the drain"
    wait_until(lambda: app.connections_ended == n, what="the app to see every connection closed")
    wait_until(lambda: len(setup.reports.errors) >= n, what="every connection to be reported")
    stats = setup.plane.stats()
    counted = setup.counters.snapshot()
    assert {
        "live_connections": stats["live_connections"],
        "active_tunnels": stats["active_tunnels"],
        "connections_cut": stats["connections_cut"],
        "errors": setup.reports.errors,
        "closed": counted["closed"],
        "failed": counted["failed"],
    } == {
        "live_connections": 0,
        "active_tunnels": 0,
        "connections_cut": n,
        "errors": [DRAIN_CUT] * n,
        "closed": {"-": n},
        "failed": {},
    }
    for s in socks:
        s.close()


@pytest.mark.parametrize("method", ["drain", "close"])
def test_a_drain_cuts_a_tunnel_made_by_connect(planes, app, method):
    """A tunnel handed to the core by ``DataPlane.connect`` (no listener of its own): the drain
    cuts it at the deadline like any connection, and counts it."""
    setup = Setup("connect", *planes, app)
    sock = setup.hold(0)

    started = time.monotonic()
    finished = getattr(setup.plane, method)(DEADLINE)
    elapsed = time.monotonic() - started

    assert finished is False
    assert elapsed < DEADLINE + MARGIN
    assert closed_by_peer(sock), "the tunnel outlived the drain"
    wait_until(lambda: app.connections_ended == 1, what="the app to see the tunnel closed")
    stats = setup.plane.stats()
    counted = setup.counters.snapshot()
    assert {
        "live_connections": stats["live_connections"],
        "active_tunnels": stats["active_tunnels"],
        "connections_cut": stats["connections_cut"],
        "closed": counted["closed"],
        "failed": counted["failed"],
    } == {
        "live_connections": 0,
        "active_tunnels": 0,
        "connections_cut": 1,
        "closed": {"-": 1},
        "failed": {},
    }
    sock.close()


@pytest.mark.parametrize("kind", ["forward", "serve", "connect"])
def test_a_drain_whose_connections_end_in_time_returns_true_at_once(planes, app, kind):
    """The live connection keeps flowing while the drain waits (new connections are refused);
    when it ends, the drain returns True at once rather than at its (long) deadline, having cut
    nothing."""
    setup = Setup(kind, *planes, app)
    sock = setup.hold(0)
    long_deadline = 60.0
    result: list[bool] = []
    drain = threading.Thread(target=lambda: result.append(setup.plane.drain(long_deadline)))
    drain.start()
    try:
        wait_until(lambda: draining(setup.plane, app), what="the drain to start")
        for listener in setup.listeners:
            address = listener.local_address
            wait_until(lambda a=address: refused(a), what="the listeners to stop accepting")
        sock.sendall(b"during the drain")
        assert read_exactly(sock, 16) == b"during the drain"  # not cut: the deadline is far
        assert drain.is_alive()  # it waits for the live connection
        sock.shutdown(socket.SHUT_WR)  # the echo app ends its side too
        assert closed_by_peer(sock)
        ended = time.monotonic()
        drain.join(long_deadline / 2)
        assert not drain.is_alive(), "the drain waited on after its last connection ended"
        assert time.monotonic() - ended < long_deadline / 2
    finally:
        sock.close()
        drain.join(long_deadline + MARGIN)
    assert result == [True]
    assert setup.plane.stats()["connections_cut"] == 0
    assert setup.plane.stats()["live_connections"] == 0
    if kind != "connect":  # a tunnel made by connect has no report callback
        wait_until(lambda: setup.reports.errors != [], what="the connection's report")
        # Ended well (a probe that raced the listener's close may have been carried too).
        assert set(setup.reports.errors) == {None}


@pytest.mark.parametrize("method", ["drain", "close"])
def test_a_drain_with_nothing_live_returns_true_at_once(planes, app, method):
    server, _ = planes
    for _ in range(2):
        server.forward("127.40.0.2:0", TcpTarget(address_of(app)))
        server.serve("127.40.0.3:0", SERVER, Allow(address_of(app)))
    started = time.monotonic()
    assert getattr(server, method)(60.0) is True
    assert time.monotonic() - started < 30.0


# --- an ambient ztunnel process ------------------------------------------------------------------

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: drain, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: drain, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.40.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: drain
  labels: {app: server}
  annotations: {ambient.dev/app-address: 127.41.2.1}
spec:
  nodeName: n2
  serviceAccountName: server
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.40.2.1}
"""
CLIENT_POD, SERVER_POD, APP_IP, APP_PORT = "127.40.1.1", "127.40.2.1", "127.41.2.1", 8080
PROCESS_DEADLINE = 2.0


def get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def readiness(node: ZtunnelProcess) -> tuple[int, bytes]:
    try:
        return get(node.readiness, "/healthz/ready")
    except OSError:  # gone already
        return 0, b""


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(MESH))
    CertificateAuthority.create().save(tmp_path / "ca")
    return tmp_path


@pytest.fixture
def start(mesh_dir: Path) -> Iterator[Callable[..., ZtunnelProcess]]:
    started: list[ZtunnelProcess] = []

    def make(node: str, deadline: float = PROCESS_DEADLINE) -> ZtunnelProcess:
        proc = ZtunnelProcess(
            node,
            [mesh_dir / "mesh.yaml"],
            mesh_dir / "ca",
            mesh_dir,
            "--drain-deadline",
            str(deadline),
        )
        started.append(proc)
        return proc.wait_ready()

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def server_app() -> Iterator[App]:
    echo = App("echo", (APP_IP, APP_PORT))
    yield echo
    echo.close()


def through_the_mesh() -> socket.socket:
    """client (n1) -> SOCKS5 -> HBONE -> server (n2) -> the app, held open."""
    return held(socks5.connect((CLIENT_POD, 15080), (SERVER_POD, APP_PORT), source=CLIENT_POD))


def stop(node: ZtunnelProcess, how: str) -> None:
    if how == "quitquitquit":
        status, body = get(node.admin, "/quitquitquit", "POST")
        assert (status, body) == (200, b"draining\n")
    else:
        node.signal(signal.Signals[how])


def is_cut_line(side: str) -> Callable[[dict], bool]:
    if side == "source":
        return lambda e: e.get("direction") == "outbound" and e.get("src.workload") == "client"
    return lambda e: e.get("direction") == "inbound" and e.get("dst.workload") == "server"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "quitquitquit"])
@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_stopped_ztunnel_drains_cuts_what_is_left_at_the_deadline_and_exits_0(
    start, server_app, side, how
):
    """Told to stop while a connection goes through it (as the client's node or as the server's):
    readiness says 503 ``draining`` while the connection holds the drain, the process exits 0
    within the deadline plus a margin, both ends of the connection are closed, and the access log
    has the connection's line saying it was cut."""
    nodes = {"source": start("n1"), "destination": start("n2")}
    node = nodes[side]
    sock = through_the_mesh()
    node.forget_entries()

    stop(node, how)
    stopped = time.monotonic()
    wait_until(
        lambda: readiness(node) == (503, b"draining\n"),
        timeout=PROCESS_DEADLINE + MARGIN,
        what="readiness to answer 503 draining",
    )
    assert node.process.wait(PROCESS_DEADLINE + MARGIN) == 0
    assert time.monotonic() - stopped < PROCESS_DEADLINE + MARGIN
    assert closed_by_peer(sock), "the client's connection outlived the drained ztunnel"
    sock.close()
    wait_until(lambda: server_app.connections_ended == 1, what="the app to see the close")
    (line,) = node.claim_entries(is_cut_line(side), timeout=2)
    assert line.get("error", "").startswith("cut:"), line
    assert line["error"] == DRAIN_CUT, line


def test_a_stopped_ztunnel_whose_connection_ends_in_time_exits_at_once(start, server_app):
    """With a long deadline, the drain ends when the live connection does: the process exits 0
    soon after, well before the deadline, and the connection was not cut."""
    long_deadline = 60.0
    node = start("n1", deadline=long_deadline)
    start("n2")
    sock = through_the_mesh()
    node.forget_entries()
    node.signal(signal.SIGTERM)
    wait_until(
        lambda: readiness(node) == (503, b"draining\n"), what="readiness to answer 503 draining"
    )
    sock.sendall(b"still")  # the drain lets it run
    assert read_exactly(sock, 5) == b"still"
    assert node.process.poll() is None  # held by the live connection
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_peer(sock)
    sock.close()
    ended = time.monotonic()
    assert node.process.wait(long_deadline / 2) == 0
    assert time.monotonic() - ended < long_deadline / 2
    (line,) = node.claim_entries(is_cut_line("source"), timeout=2)
    assert "error" not in line, line
    assert line["bytes_sent"] == len(b"held") + len(b"still"), line


def test_an_idle_ztunnel_exits_at_once_on_sigterm(start):
    node = start("n1", deadline=60.0)
    stopped = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.process.wait(30) == 0
    assert time.monotonic() - stopped < 30
