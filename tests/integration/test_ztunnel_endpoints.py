"""ztunnel's operational endpoints (admin, metrics, readiness) of a real ``ambient ztunnel``
against hostile clients: idle and slow sockets cost no thread and are closed, admin answers only
local tools, readiness says 503 ``draining`` from the moment a drain starts."""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import selectors
import signal
import socket
import time

import pytest

from ambient import socks5
from ambient.testing import wait_until
from ambient.ztunnel import admin
from ambient.ztunnel.process import ZtunnelProcess
from tests.integration.test_ztunnel_operations import get
from tests.integration.test_ztunnel_operations import mesh as mesh  # the two nodes' fixture

IDLE = 500  # idle sockets held open to each of admin and metrics


def threads(process: ZtunnelProcess) -> int:
    return len(os.listdir(f"/proc/{process.process.pid}/task"))


def connect(address: str, source: str | None = None) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection(
        (host.strip("[]"), int(port)), timeout=5, source_address=(source, 0) if source else None
    )


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closed ``sock`` (end of stream or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def post(
    address: str, path: str, headers: dict[str, str] | None = None, source: str | None = None
) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(
        host, int(port), timeout=5, source_address=(source, 0) if source else None
    )
    try:
        conn.request("POST", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def open_idle(address: str, n: int) -> list[tuple[socket.socket, float]]:
    """``n`` connections to ``address`` with the time each was established; none sends anything.
    Opened a hundred at a time, in parallel (one by one takes seconds), within the endpoint's
    accept backlog (beyond it the kernel drops them)."""
    host, port = address.rsplit(":", 1)
    opened: list[tuple[socket.socket, float]] = []
    with selectors.DefaultSelector() as selector:
        for batch in range(0, n, 100):
            for _ in range(min(100, n - batch)):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((host, int(port)))
                selector.register(s, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 10
            while selector.get_map():
                assert time.monotonic() < deadline, "connections not established"
                for key, _ in selector.select(1):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    selector.unregister(s)
                    s.setblocking(True)
                    opened.append((s, time.monotonic()))
    return opened


def readable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets with something to read (or an end) within ``timeout``; poll(2), not select(2),
    which cannot take descriptors past 1024 (a long test session has them)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


def wait_closed_by_server(idle: list[tuple[socket.socket, float]], timeout: float) -> list[float]:
    """Seconds from each connection's start to the server closing it (end of stream or reset);
    fails if some stay open past ``timeout``."""
    lifetimes = {}
    deadline = time.monotonic() + timeout
    opened = dict(idle)
    while len(lifetimes) < len(idle):
        left = [s for s in opened if s not in lifetimes]
        assert time.monotonic() < deadline, f"{len(left)} idle connections still open"
        for s in readable(left, 0.5):
            assert closed_by_server(s, 1)
            lifetimes[s] = time.monotonic() - opened[s]
    return list(lifetimes.values())


def test_idle_sockets_hold_no_thread_and_are_closed_after_the_request_timeout(mesh):
    n1, _ = mesh
    for address, path in ((n1.admin, "/config_dump"), (n1.metrics, "/metrics")):
        assert get(address, path)[0] == 200  # the endpoints' worker pools have started
    before = threads(n1)
    idle = open_idle(n1.admin, IDLE) + open_idle(n1.metrics, IDLE)
    try:
        held = [s for s, _ in idle if not readable([s], 0)]
        assert len(held) >= IDLE  # the first may have timed out already, not most
        # The pools may still grow to their size; the sockets add nothing.
        assert threads(n1) <= before + 2 * admin.WORKERS
        for address, path in ((n1.admin, "/config_dump"), (n1.metrics, "/metrics")):
            started = time.monotonic()
            assert get(address, path)[0] == 200  # a well-behaved client is still served
            assert time.monotonic() - started < 3
        assert threads(n1) <= before + 2 * admin.WORKERS
        # Each is closed by the server once the request timeout has passed, not before.
        lifetimes = wait_closed_by_server(idle, admin.REQUEST_TIMEOUT + 10)
        assert min(lifetimes) >= admin.REQUEST_TIMEOUT - 0.5
    finally:
        for s, _ in idle:
            s.close()
    assert n1.process.poll() is None


def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_request_timeout(mesh):
    n1, _ = mesh
    raw = b"GET /config_dump HTTP/1.1\r\nHost: localhost\r\nUser-Agent: a-byte-at-a-time\r\n\r\n"
    started = time.monotonic()
    sent = 0
    with connect(n1.admin) as sock:
        while sent < len(raw):
            try:
                sock.sendall(raw[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            # Paces the client (a byte each 0.25 s: the request would take ~20 s) and sees the
            # server close it.
            if readable([sock], 0.25):
                assert closed_by_server(sock, 1)
                break
    assert sent < len(raw)
    assert time.monotonic() - started < admin.REQUEST_TIMEOUT + 3
    assert get(n1.admin, "/config_dump")[0] == 200


@pytest.mark.parametrize(
    ("headers", "source", "why"),
    [
        ({"Origin": "http://evil.example"}, None, b"Origin header"),
        ({"Host": "evil.example"}, None, b"Host 'evil.example' is not localhost"),
        ({}, "127.0.0.2", b"not 127.0.0.2"),
    ],
    ids=["origin", "host", "other-loopback-address"],
)
def test_quitquitquit_from_a_browser_page_rebinding_or_a_pod_address_is_refused(
    mesh, headers, source, why
):
    n1, _ = mesh
    status, body = post(n1.admin, "/quitquitquit", headers, source)
    assert status == 403 and why in body, body
    assert get(n1.readiness, "/healthz/ready") == (200, b"ready\n")  # not draining
    assert n1.process.poll() is None


def test_a_plain_local_quitquitquit_drains_and_exits_0(mesh):
    n1, _ = mesh
    assert post(n1.admin, "/quitquitquit") == (200, b"draining\n")
    assert n1.process.wait(15) == 0


def test_metrics_and_readiness_answer_any_source(mesh):
    n1, _ = mesh
    for address, path in ((n1.metrics, "/metrics"), (n1.readiness, "/healthz/ready")):
        with connect(address, source="127.0.0.2") as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 10.1.2.3\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


def test_readiness_answers_503_draining_while_a_drain_holds_the_process(mesh):
    n1, _ = mesh  # started with --drain-deadline 3
    assert get(n1.readiness, "/healthz/ready") == (200, b"ready\n")
    # A live connection through n1 keeps it draining for up to the deadline.
    live = socks5.connect(("127.28.1.1", 15080), ("127.28.2.1", 8080), source="127.28.1.1")
    with live:
        live.sendall(b"still here")
        n1.signal(signal.SIGTERM)
        seen: list[tuple[int, bytes]] = []

        def draining() -> bool:
            with contextlib.suppress(OSError):
                seen.append(get(n1.readiness, "/healthz/ready"))
            return bool(seen) and seen[-1] == (503, b"draining\n")

        wait_until(draining, timeout=5, what="readiness to answer 503 draining")
        assert n1.process.poll() is None  # seen during the drain, before the process ended
    assert n1.process.wait(15) == 0
