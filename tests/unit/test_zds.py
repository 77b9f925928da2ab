"""ZDS, istio-cni handing pods to ztunnel: the wire bytes, and ZdsServer (istio-cni) against
ZdsClient (ztunnel) over real SOCK_SEQPACKET sockets in one process. Pods' network namespaces
are all this process's own (/proc/self/ns/net is readable without root), which is enough to see
that the fd crossing the socket is the namespace the CNI side opened."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.testing import wait_until
from ambient.zds import (
    VERSION_V1,
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsClient,
    ZdsError,
    ZdsHello,
    ZdsServer,
)

NETNS = "/proc/self/ns/net"
TIMEOUT = 2.0


def netns_identity() -> tuple[int, int]:
    st = os.stat(NETNS)
    return st.st_dev, st.st_ino


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class RecordingHandler:
    """ztunnel's pod handling, reduced to a log of what istio-cni asked for. ``errors`` makes
    ``add_pod`` refuse a uid; ``raises`` makes it raise instead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[Any, ...]] = []
        self.errors: dict[str, str] = {}
        self.raises: dict[str, Exception] = {}

    def _record(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.events)

    def count(self, kind: str) -> int:
        return sum(1 for event in self.snapshot() if event[0] == kind)

    def add_pod(
        self, uid: str, name: str, namespace: str, service_account: str, netns_fd: int
    ) -> str | None:
        if uid in self.raises:
            raise self.raises[uid]
        st = os.fstat(netns_fd)
        os.close(netns_fd)
        same_netns = (st.st_dev, st.st_ino) == netns_identity()
        self._record("add", uid, name, namespace, service_account, same_netns)
        return self.errors.get(uid)

    def keep_pod(self, uid: str) -> str | None:
        self._record("keep", uid)
        return None

    def del_pod(self, uid: str) -> str | None:
        self._record("del", uid)
        return None

    def snapshot_sent(self, kept: set[str]) -> str | None:
        self._record("snapshot_sent", frozenset(kept))
        return None


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "cni" / "zds.sock"  # the parent directory does not exist yet


@pytest.fixture
def server(sock_path: Path) -> Iterator[ZdsServer]:
    srv = ZdsServer(sock_path, ack_timeout=TIMEOUT)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def client(sock_path: Path, handler: RecordingHandler) -> Iterator[ZdsClient]:
    """A ztunnel, not yet started (so tests can register pods before it connects)."""
    ztunnel = ZdsClient(sock_path, handler, reconnect_delay=0.02)
    yield ztunnel
    ztunnel.stop()


def add_event(uid: str, name: str, namespace: str = "default", sa: str = "default") -> tuple:
    return ("add", uid, name, namespace, sa, True)


# -- wire --------------------------------------------------------------------------------------


def test_wire_bytes_match_istio() -> None:
    # ZdsHello.version is field 1, varint (wire type 0): tag 0x08, then V1 = 1.
    assert ZdsHello(version=VERSION_V1).SerializeToString() == b"\x08\x01"
    # WorkloadRequest.del is field 2, length-delimited (wire type 2): tag (2 << 3) | 2 = 0x12,
    # length 3, then DelWorkload whose uid is *also* field 2: 0x12, length 1, "x".
    request = WorkloadRequest(**{"del": DelWorkload(uid="x")})
    assert request.SerializeToString() == b"\x12\x03\x12\x01x"
    # keep is field 5 (tag 0x2a) around KeepWorkload.uid, field 1 (tag 0x0a).
    keep = WorkloadRequest(keep=KeepWorkload(uid="x"))
    assert keep.SerializeToString() == b"\x2a\x03\x0a\x01x"
    # snapshot_sent is field 3 (tag 0x1a) with an empty message.
    assert WorkloadRequest(snapshot_sent=SnapshotSent()).SerializeToString() == b"\x1a\x00"
    # An ok ack is an empty Ack in WorkloadResponse field 1.
    assert WorkloadResponse(ack=Ack()).SerializeToString() == b"\x0a\x00"
    add = WorkloadRequest(
        add=AddWorkload(uid="u", workload_info=WorkloadInfo(name="n", namespace="ns"))
    )
    assert add.SerializeToString() == b"\x0a\x0c\x0a\x01u\x12\x07\x0a\x01n\x12\x02ns"
    assert WorkloadRequest.DESCRIPTOR.full_name == "istio.workload.zds.WorkloadRequest"
    assert ZdsHello.DESCRIPTOR.file.package == "istio.workload.zds"


# -- ZdsServer against ZdsClient ---------------------------------------------------------------


def test_snapshot_then_snapshot_sent_with_kept_set(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    # Registered while no ztunnel is connected: they go out with the snapshot.
    server.add_pod("uid-a", "productpage-1", "bookinfo", "bookinfo-productpage", NETNS)
    server.add_pod("uid-b", "reviews-1", "bookinfo", "bookinfo-reviews", NETNS)
    assert not server.connected
    assert handler.snapshot() == []

    client.start()
    assert server.wait_connected(TIMEOUT)
    assert client.snapshot_done.wait(TIMEOUT)
    assert client.connected.is_set()
    assert handler.snapshot() == [
        add_event("uid-a", "productpage-1", "bookinfo", "bookinfo-productpage"),
        add_event("uid-b", "reviews-1", "bookinfo", "bookinfo-reviews"),
        ("snapshot_sent", frozenset({"uid-a", "uid-b"})),
    ]


def test_runtime_add_and_del_are_acked(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    client.start()
    assert server.wait_connected(TIMEOUT)
    # add_pod returns only after the ack, and ztunnel acks after handling: no waiting needed.
    server.add_pod("uid-c", "ratings-1", "bookinfo", "bookinfo-ratings", NETNS)
    assert handler.snapshot()[-1] == add_event("uid-c", "ratings-1", "bookinfo", "bookinfo-ratings")
    server.del_pod("uid-c")
    assert handler.snapshot() == [
        ("snapshot_sent", frozenset()),
        add_event("uid-c", "ratings-1", "bookinfo", "bookinfo-ratings"),
        ("del", "uid-c"),
    ]
    assert server.pods == {}


def test_handler_error_comes_back_as_zds_error(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    handler.errors["uid-bad"] = "pod uid-bad: no IP in the workload store yet"
    client.start()
    assert server.wait_connected(TIMEOUT)
    with pytest.raises(ZdsError, match="^pod uid-bad: no IP in the workload store yet$"):
        server.add_pod("uid-bad", "bad-1", "default", "default", NETNS)
    # The refusal does not cost the connection; the pod stays registered for the next snapshot.
    assert server.connected
    assert "uid-bad" in server.pods
    server.add_pod("uid-ok", "ok-1", "default", "default", NETNS)
    assert handler.snapshot()[-1] == add_event("uid-ok", "ok-1")


def test_handler_exception_is_acked_and_netns_fd_closed(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    handler.raises["uid-boom"] = RuntimeError("cannot enter netns")
    client.start()
    assert server.wait_connected(TIMEOUT)
    before = open_fds()
    with pytest.raises(ZdsError, match="^add for pod uid-boom: cannot enter netns$"):
        server.add_pod("uid-boom", "boom-1", "default", "default", NETNS)
    assert open_fds() == before  # the client closed the fd the handler never took
    assert server.connected


def test_reconnect_gets_a_fresh_snapshot(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    server.add_pod("uid-a", "a-1", "default", "default", NETNS)
    client.start()
    assert client.snapshot_done.wait(TIMEOUT)
    server.del_pod("uid-a")
    server.add_pod("uid-b", "b-1", "default", "default", NETNS)
    first = len(handler.snapshot())

    server.disconnect()  # istio-cni restarting
    wait_until(lambda: handler.count("snapshot_sent") == 2, TIMEOUT, "a second snapshot")
    assert server.wait_connected(TIMEOUT)
    assert client.connected.is_set()
    # The kept set is per connection: only what this snapshot re-sent.
    assert handler.snapshot()[first:] == [
        add_event("uid-b", "b-1"),
        ("snapshot_sent", frozenset({"uid-b"})),
    ]
    server.add_pod("uid-c", "c-1", "default", "default", NETNS)  # the new connection works
    assert handler.snapshot()[-1] == add_event("uid-c", "c-1")


def test_client_stops_promptly_connected_or_not(
    sock_path: Path, server: ZdsServer, handler: RecordingHandler
) -> None:
    connected = ZdsClient(sock_path, handler, reconnect_delay=0.02)
    connected.start()
    assert server.wait_connected(TIMEOUT)
    # Nothing listens here: this one is backing off between attempts.
    retrying = ZdsClient(sock_path.parent / "nobody.sock", handler, reconnect_delay=0.02)
    retrying.start()
    started = time.monotonic()
    connected.stop()
    retrying.stop()
    assert time.monotonic() - started < 1.0
    assert not connected.connected.is_set()
    wait_until(lambda: not server.connected, TIMEOUT, "the server to see ztunnel leave")


def test_server_close_removes_the_socket(sock_path: Path, client: ZdsClient) -> None:
    sock_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(os.fspath(sock_path))  # left behind by a previous istio-cni
    stale.close()
    srv = ZdsServer(sock_path, ack_timeout=TIMEOUT)
    srv.start()
    client.start()
    assert srv.wait_connected(TIMEOUT)
    srv.close()
    assert not sock_path.exists()
    wait_until(lambda: not client.connected.is_set(), TIMEOUT, "ztunnel to see istio-cni go")


# -- ZdsServer against a hand-driven ztunnel ---------------------------------------------------


def raw_ztunnel(path: Path, hello: bytes = b"\x08\x01") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    sock.connect(os.fspath(path))
    sock.sendall(hello)
    return sock


def recv_request(sock: socket.socket) -> tuple[Any, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
    return WorkloadRequest.FromString(data), list(fds)


def send_ack(sock: socket.socket, error: str = "") -> None:
    sock.sendall(WorkloadResponse(ack=Ack(error=error)).SerializeToString())


@pytest.mark.parametrize(
    ("hello", "reason"),
    [(b"not a hello", "not a ZdsHello"), (b"\x08\x02", "hello for version 2")],
    ids=["garbage", "unknown-version"],
)
def test_bad_hello_is_refused_and_server_keeps_serving(
    server: ZdsServer,
    client: ZdsClient,
    caplog: pytest.LogCaptureFixture,
    hello: bytes,
    reason: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ambient.zds.server"):
        with raw_ztunnel(server.path, hello) as impostor:
            assert impostor.recv(65536) == b""  # closed without a snapshot
        wait_until(lambda: reason in caplog.text, TIMEOUT, "the refusal to be logged")
    assert "refused connection" in caplog.text
    assert not server.connected
    client.start()
    assert server.wait_connected(TIMEOUT)


def test_disconnect_mid_request_raises_and_server_accepts_again(
    server: ZdsServer, client: ZdsClient, handler: RecordingHandler
) -> None:
    with raw_ztunnel(server.path) as ztunnel:
        request, _ = recv_request(ztunnel)
        assert request.WhichOneof("payload") == "snapshot_sent"
        send_ack(ztunnel)
        assert server.wait_connected(TIMEOUT)

        failure: list[BaseException] = []

        def add() -> None:
            try:
                server.add_pod("uid-a", "a-1", "default", "default", NETNS)
            except ZdsError as e:
                failure.append(e)

        cni = threading.Thread(target=add)
        cni.start()
        request, fds = recv_request(ztunnel)
        assert request.add.uid == "uid-a"
        for fd in fds:
            os.close(fd)
    cni.join(TIMEOUT)  # ztunnel went away with the add unacked
    assert [str(e) for e in failure] == ["ztunnel disconnected before acking add for pod uid-a"]
    assert not server.connected

    client.start()  # the pod is still registered: the next ztunnel gets it
    assert client.snapshot_done.wait(TIMEOUT)
    kept = frozenset({"uid-a"})
    assert handler.snapshot() == [add_event("uid-a", "a-1"), ("snapshot_sent", kept)]


def test_missing_ack_times_out_and_drops_the_connection(sock_path: Path) -> None:
    with ZdsServer(sock_path, ack_timeout=0.2) as srv, raw_ztunnel(sock_path) as ztunnel:
        recv_request(ztunnel)
        send_ack(ztunnel)
        assert srv.wait_connected(TIMEOUT)
        with pytest.raises(ZdsError, match="no ack from ztunnel for del for pod uid-a"):
            srv.del_pod("uid-a")
        request, _ = recv_request(ztunnel)  # it was sent, just never acked
        assert getattr(request, "del").uid == "uid-a"
        assert ztunnel.recv(65536) == b""  # dropped, so that a late ack cannot confuse anyone
        wait_until(lambda: not srv.connected, TIMEOUT, "the server to forget the connection")


# -- ZdsClient against a hand-driven istio-cni -------------------------------------------------


@pytest.fixture
def raw_cni(sock_path: Path, client: ZdsClient) -> Iterator[socket.socket]:
    """The accepted connection of a bare istio-cni socket that ``client`` connected to, after its
    hello was checked."""
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(os.fspath(sock_path))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        client.start()
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        assert conn.recv(65536) == b"\x08\x01"  # ZdsHello V1
        yield conn


def request_ack(cni: socket.socket, request: bytes | Any, fds: tuple[int, ...] = ()) -> str:
    """Send a request, return the ack's error ("" when ok)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    socket.send_fds(cni, [data], list(fds))
    response = WorkloadResponse.FromString(cni.recv(65536))
    assert response.WhichOneof("payload") == "ack"
    error: str = response.ack.error
    return error


def test_client_acks_garbage_with_an_error_and_stays_connected(
    raw_cni: socket.socket, client: ZdsClient, handler: RecordingHandler
) -> None:
    error = request_ack(raw_cni, b"\xff\xff\xff")
    assert error.startswith("unparseable WorkloadRequest (3 bytes)")
    # Field 4 of WorkloadRequest is unused: parses, but carries no payload.
    assert "without a payload" in request_ack(raw_cni, b"\x22\x00")
    # Still the same connection, still serving.
    assert request_ack(raw_cni, WorkloadRequest(keep=KeepWorkload(uid="uid-k"))) == ""
    assert request_ack(raw_cni, WorkloadRequest(snapshot_sent=SnapshotSent())) == ""
    assert client.snapshot_done.is_set()
    assert handler.snapshot() == [("keep", "uid-k"), ("snapshot_sent", frozenset({"uid-k"}))]


def test_client_refuses_add_without_exactly_one_fd(
    raw_cni: socket.socket, handler: RecordingHandler
) -> None:
    add = WorkloadRequest(add=AddWorkload(uid="uid-p", workload_info=WorkloadInfo(name="p-1")))
    expected = "add for pod uid-p: expected one network-namespace file descriptor, got {}"
    assert request_ack(raw_cni, add) == expected.format(0)

    before = open_fds()
    fds = (os.open(NETNS, os.O_RDONLY), os.open(NETNS, os.O_RDONLY))
    try:
        assert request_ack(raw_cni, add, fds) == expected.format(2)
    finally:
        for fd in fds:
            os.close(fd)
    assert open_fds() == before  # the client closed both copies it received
    assert handler.snapshot() == []

    # With exactly one, the same add goes through.
    fd = os.open(NETNS, os.O_RDONLY)
    try:
        assert request_ack(raw_cni, add, (fd,)) == ""
    finally:
        os.close(fd)
    assert handler.snapshot() == [add_event("uid-p", "p-1", namespace="", sa="")]
