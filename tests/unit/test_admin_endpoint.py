"""ztunnel's operational HTTP endpoints (admin.Endpoint) against hostile clients, in-process with
short timeouts: idle and slow sockets cost no thread and are closed, overload is answered 503,
oversized requests are refused, admin answers only local tools, readiness says 503 draining."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus

import pytest

from ambient.testing import wait_until
from ambient.ztunnel import admin
from ambient.ztunnel.admin import Endpoint, Limits

TIMEOUT = 1.0  # the endpoints' request timeout in these tests


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def endpoints() -> Iterator[Callable[..., Endpoint]]:
    started: list[Endpoint] = []

    def make(
        routes: dict[tuple[str, str], admin.Route] | None = None,
        *,
        address: str = "127.0.0.1",
        localhost_only: bool = False,
        **limits: float,
    ) -> Endpoint:
        ok: dict[tuple[str, str], admin.Route] = {
            ("GET", "/ok"): lambda _: (HTTPStatus.OK, b"ok\n", "text/plain"),
            ("POST", "/ok"): lambda _: (HTTPStatus.OK, b"posted\n", "text/plain"),
        }
        endpoint = Endpoint(
            (address, 0),
            routes or ok,
            localhost_only=localhost_only,
            limits=Limits(**{"request_timeout": TIMEOUT, **limits}),  # type: ignore[arg-type]
        ).start()
        started.append(endpoint)
        return endpoint

    yield make
    for endpoint in started:
        endpoint.stop()


def connect(endpoint: Endpoint, source: str | None = None) -> socket.socket:
    host, port = endpoint.address.rsplit(":", 1)
    return socket.create_connection(
        (host.strip("[]"), int(port)), timeout=5, source_address=(source, 0) if source else None
    )


def read_answer(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return int(head.split()[1]), head, body


def request(endpoint: Endpoint, raw: bytes, source: str | None = None) -> tuple[int, bytes, bytes]:
    with connect(endpoint, source) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closed ``sock`` (end of stream or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_sockets_hold_no_thread_and_are_closed_after_the_request_timeout(endpoints):
    endpoint = endpoints()
    assert request(endpoint, b"GET /ok HTTP/1.0\r\n\r\n")[0] == 200  # the pool has started
    before = threads()
    idle = [connect(endpoint) for _ in range(500)]
    try:
        assert threads() <= before + admin.WORKERS
        started = time.monotonic()
        status, _, body = request(
            endpoint, b"GET /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert (status, body) == (200, b"ok\n")
        assert time.monotonic() - started < TIMEOUT  # answered while the idle ones are held
        assert threads() <= before + admin.WORKERS
        assert all(closed_by_server(s, TIMEOUT + 5) for s in idle)
    finally:
        for s in idle:
            s.close()


def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_request_timeout(endpoints):
    endpoint = endpoints()
    raw = b"GET /ok HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow\r\n\r\n"
    sock = connect(endpoint)
    started = time.monotonic()
    sent = 0
    with sock:
        while sent < len(raw):
            try:
                sock.sendall(raw[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            # Paces the client (a byte each 0.1 s, the whole request would take ~6 s) and sees
            # the server close it.
            if select.select([sock], [], [], 0.1)[0]:
                assert closed_by_server(sock, 1)
                break
        assert sent < len(raw)
    assert time.monotonic() - started < TIMEOUT + 2


def test_an_idle_keep_alive_connection_pins_no_worker_and_is_closed(endpoints):
    endpoint = endpoints(workers=1)
    keep = connect(endpoint)
    with keep:
        keep.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, head, _ = read_answer(keep)
        assert status == 200 and b"Connection: close" not in head
        # The only worker is free for others while the keep-alive connection waits.
        assert request(endpoint, b"GET /ok HTTP/1.0\r\n\r\n")[0] == 200
        keep.sendall(b"POST /ok HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi")
        assert read_answer(keep)[0:3:2] == (200, b"posted\n")
        assert closed_by_server(keep, TIMEOUT + 5)


def test_requests_beyond_the_busy_workers_and_queue_are_answered_503(endpoints):
    release = threading.Event()
    entered = threading.Event()

    def slow(_: dict[str, list[str]]) -> admin.Response:
        entered.set()
        release.wait(10)
        return HTTPStatus.OK, b"slow\n", "text/plain"

    endpoint = endpoints({("GET", "/slow"): slow}, workers=1, max_queued=0)
    first = connect(endpoint)
    with first:
        first.sendall(b"GET /slow HTTP/1.0\r\n\r\n")
        assert entered.wait(5)
        status, _, body = request(endpoint, b"GET /slow HTTP/1.0\r\n\r\n")
        assert (status, body) == (503, b"busy, try again\n")
        release.set()
        assert read_answer(first)[0] == 200


def test_connections_beyond_the_cap_are_answered_503_and_closed(endpoints):
    endpoint = endpoints(max_connections=3)
    held = [connect(endpoint) for _ in range(3)]
    try:
        # The three are accepted (and counted) before the fourth.
        for s in held:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_answer(s)[0] == 200
        with connect(endpoint) as extra:
            status, _, body = read_answer(extra)
            assert (status, body) == (503, b"too many connections\n")
            assert closed_by_server(extra, 5)
    finally:
        for s in held:
            s.close()

    def served() -> bool:
        try:  # until the server has seen the held ones close, it may still answer 503
            return request(endpoint, b"GET /ok HTTP/1.0\r\n\r\n")[0] == 200
        except OSError:
            return False

    wait_until(served, what="a connection once the held ones are gone")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * admin.MAX_LINE + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /ok HTTP/1.1\r\nX-Long: " + b"a" * admin.MAX_LINE + b"\r\n\r\n", 431),
        (b"GET /ok HTTP/1.1\r\n" + b"X-Many: a\r\n" * (admin.MAX_HEADERS + 1) + b"\r\n", 431),
        (
            b"GET /ok HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"a" * 4000 + b"\r\n" * 1 + b"\r\n",
            200,
        ),
        (b"GET /ok HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 4000 + b"\r\n") * 9 + b"\r\n", 431),
        (b"POST /ok HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", 413),
        (b"POST /ok HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"GET /ok HTTP/1.1 extra\r\n\r\n", 400),
        (b"DELETE /ok HTTP/1.1\r\nHost: a\r\n\r\n", 501),
        (b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n", 404),
        # HTTP/1.1 requires a Host (RFC 9112 3.2), and one only.
        (b"GET /ok HTTP/1.1\r\n\r\n", 400),
        (b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /ok HTTP/1.0\r\n\r\n", 200),
    ],
)
def test_oversized_and_malformed_requests_are_refused(endpoints, raw, status):
    assert request(endpoints(), raw)[0] == status


def test_a_failing_route_answers_500(endpoints):
    def broken(_: dict[str, list[str]]) -> admin.Response:
        raise RuntimeError("boom")

    endpoint = endpoints({("GET", "/broken"): broken})
    assert request(endpoint, b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\n")[0:3:2] == (
        500,
        b"internal error\n",
    )


ADMIN_ROUTES = [b"GET /config_dump", b"POST /quitquitquit", b"POST /logging?level=info"]


@pytest.fixture
def admin_endpoint(endpoints) -> tuple[Endpoint, threading.Event]:
    quit = threading.Event()
    return endpoints(admin.admin(lambda: {"dump": True}, quit.set), localhost_only=True), quit


@pytest.mark.parametrize("route", ADMIN_ROUTES)
@pytest.mark.parametrize(
    ("headers", "source", "why"),
    [
        (b"Host: localhost\r\nOrigin: http://evil.example\r\n", None, b"Origin header"),
        (b"Host: localhost\r\nOrigin: null\r\n", None, b"Origin header"),
        (b"Host: evil.example\r\n", None, b"Host 'evil.example' is not localhost"),
        (b"Host: localhost.evil.example:15000\r\n", None, b"is not localhost"),
        (b"Host: 127.0.0.2:15000\r\n", None, b"is not localhost"),
        (b"Host: \r\n", None, b"is not localhost"),
        (b"Host: localhost\r\n", "127.0.0.2", b"not 127.0.0.2"),
        (b"Host: localhost\r\n", "127.1.2.3", b"not 127.1.2.3"),
    ],
)
def test_admin_refuses_browsers_rebinding_and_other_loopback_addresses(
    admin_endpoint, route, headers, source, why
):
    endpoint, quit = admin_endpoint
    raw = route + b" HTTP/1.1\r\n" + headers + b"Connection: close\r\n\r\n"
    status, _, body = request(endpoint, raw, source)
    assert status == 403 and body.startswith(b"refused: ") and why in body, body
    assert not quit.is_set()


def test_admin_refuses_an_absolute_target_naming_another_host(admin_endpoint):
    endpoint, quit = admin_endpoint
    raw = b"POST http://evil.example/quitquitquit HTTP/1.1\r\nHost: localhost\r\n\r\n"
    status, _, body = request(endpoint, raw)
    assert status == 403 and b"evil.example" in body
    assert not quit.is_set()


@pytest.mark.parametrize(
    "host",
    [None, b"localhost", b"LocalHost:15000", b"127.0.0.1", b"127.0.0.1:15000", b"[::1]:15000"],
)
def test_admin_answers_local_tools(admin_endpoint, host):
    endpoint, quit = admin_endpoint
    # Without a Host: an HTTP/1.0 tool (HTTP/1.1 requires one).
    version, headers = (b"HTTP/1.1", b"Host: " + host + b"\r\n") if host else (b"HTTP/1.0", b"")
    status, _, body = request(
        endpoint, b"GET /config_dump " + version + b"\r\n" + headers + b"\r\n"
    )
    assert status == 200 and b'"dump": true' in body
    status, _, body = request(
        endpoint, b"POST /quitquitquit " + version + b"\r\n" + headers + b"\r\n"
    )
    assert (status, body) == (200, b"draining\n")
    assert quit.wait(5)


def test_admin_on_ipv6_localhost(endpoints):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        endpoint = endpoints(admin.admin(dict, lambda: None), address="::1", localhost_only=True)
    except OSError as e:
        pytest.skip(f"no ::1 here: {e}")
    status, _, _ = request(endpoint, b"GET /config_dump HTTP/1.1\r\nHost: [::1]\r\n\r\n")
    assert status == 200


def test_admin_is_not_bound_on_other_addresses():
    with pytest.raises(ValueError, match="answers only on localhost"):
        Endpoint(("127.0.0.2", 0), admin.admin(dict, lambda: None), localhost_only=True)


def test_metrics_and_readiness_answer_any_source(endpoints):
    endpoint = endpoints(admin.readiness(list, lambda: False))
    raw = b"GET /healthz/ready HTTP/1.1\r\nHost: 10.0.0.1:15021\r\nOrigin: http://x\r\n\r\n"
    assert request(endpoint, raw, "127.0.0.2")[0:3:2] == (200, b"ready\n")


def test_readiness_reports_pending_then_ready_then_draining(endpoints):
    pending = ["config"]
    draining = threading.Event()
    endpoint = endpoints(admin.readiness(lambda: list(pending), draining.is_set))
    raw = b"GET /healthz/ready HTTP/1.0\r\n\r\n"
    assert request(endpoint, raw)[0:3:2] == (500, b"not ready: config\n")
    pending.clear()
    assert request(endpoint, raw)[0:3:2] == (200, b"ready\n")
    draining.set()
    assert request(endpoint, raw)[0:3:2] == (503, b"draining\n")
    pending.append("config")  # draining wins over anything pending
    assert request(endpoint, raw)[0:3:2] == (503, b"draining\n")


def test_stop_closes_the_listener_and_open_connections(endpoints):
    endpoint = endpoints()
    held = connect(endpoint)
    endpoint.stop()
    with held:
        assert closed_by_server(held, 5)
    with pytest.raises(ConnectionRefusedError):
        connect(endpoint)
