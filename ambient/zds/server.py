"""The istio-cni side of ZDS: hand the node's pods, with their network namespaces, to ztunnel.

istio-cni is the source of truth for which pods on the node are in the ambient mesh; ztunnel is
told over this socket. In the real mesh the CNI plugin calls :meth:`ZdsServer.add_pod` when a pod
sandbox is created and :meth:`ZdsServer.del_pod` when it is torn down; here the testbed plays that
part. The server keeps a registry of pods so that a ztunnel that (re)connects -- after a restart,
an upgrade, a crash -- gets the whole node replayed as a snapshot before any further change.

One request is in flight at a time: each waits for ztunnel's ``Ack`` before the next is sent, so
an ``add_pod`` that returns means ztunnel has the pod's netns and is proxying for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from .messages import (
    VERSION_V1,
    AddWorkload,
    DelWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsHello,
)

log = logging.getLogger(__name__)

#: Largest message read from ztunnel in one ``recv``; hellos and acks are a few bytes.
MAX_MESSAGE_SIZE = 64 * 1024


class ZdsError(Exception):
    """A request to ztunnel failed: it acked with an error, did not ack in time, or went away."""


@dataclass(frozen=True)
class RegisteredPod:
    """A pod istio-cni has enrolled in the mesh, as replayed to every new ztunnel connection."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns_path: str


class _Connection:
    """One ztunnel connection and the acks read from it. The queue is per connection so that a
    disconnect notice (``None``) can never be mistaken for the answer on a later connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.acks: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # ack error, "" is ok
        self.closed = False  # guarded by ZdsServer._lock


class ZdsServer:
    """Listens on ``path`` (a SOCK_SEQPACKET unix socket) for one ztunnel at a time.

    ``ack_timeout`` bounds each wait for ztunnel: the hello after it connects and every ack. A
    request that times out drops the connection, because a late ack would otherwise be taken as
    the answer to the next request; ztunnel reconnects and gets a fresh, consistent snapshot.
    """

    def __init__(self, path: str | os.PathLike[str], *, ack_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.ack_timeout = ack_timeout
        self._lock = threading.Lock()  # guards the fields below; never held while waiting
        self._pods: dict[str, RegisteredPod] = {}
        self._conn: _Connection | None = None  # set once the snapshot was acked
        self._peer: socket.socket | None = None  # the accepted socket, from the hello on
        self._closing = False
        # Serializes whole request/ack exchanges: one request in flight, snapshot included.
        self._request_lock = threading.Lock()
        self._ready = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (replacing a stale one left by a previous run) and start accepting."""
        if self._listener is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_socket_file()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(os.fspath(self.path))
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="zds-server", daemon=True)
        self._thread.start()
        log.info("zds: listening on %s", self.path)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop the ztunnel connection and remove the socket file."""
        with self._lock:
            self._closing = True
            listener, self._listener = self._listener, None
            peer = self._peer
        if peer is not None:
            _shutdown(peer)
        if listener is not None:
            _shutdown(listener)  # wakes the blocked accept() (close() alone would not)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("zds: server thread did not stop within %s s", timeout)
            self._thread = None
        self._remove_socket_file()

    def __enter__(self) -> ZdsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def disconnect(self) -> None:
        """Drop the current ztunnel connection (if any) and go back to accepting, as istio-cni
        restarting would. Meant for tests of ztunnel's reconnect-and-resync."""
        with self._lock:
            peer = self._peer
        if peer is not None:
            _shutdown(peer)

    def _remove_socket_file(self) -> None:
        """Remove the socket file, but only a socket: a regular file there is someone else's."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A ztunnel is connected and has acked the whole snapshot."""
        return self._ready.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a ztunnel is connected and has acked the snapshot; false on timeout."""
        return self._ready.wait(timeout)

    @property
    def pods(self) -> dict[str, RegisteredPod]:
        """A copy of the registry: what the next snapshot will replay."""
        with self._lock:
            return dict(self._pods)

    # -- the CNI plugin's API ----------------------------------------------------------------

    def add_pod(
        self,
        uid: str,
        name: str,
        namespace: str,
        service_account: str,
        netns_path: str | os.PathLike[str],
    ) -> None:
        """Enroll the pod. With a ztunnel connected, returns once ztunnel acked it and raises
        :class:`ZdsError` if it did not; otherwise the pod goes out with the next snapshot. The
        pod stays registered even when ztunnel refuses it, so a later snapshot retries it."""
        pod = RegisteredPod(uid, name, namespace, service_account, os.fspath(netns_path))
        with self._request_lock:
            with self._lock:
                self._pods[uid] = pod
                conn = self._conn
            if conn is None:
                log.debug("zds: pod %s registered, sent with the next snapshot", uid)
                return
            error = self._send_add(conn, pod, self._open_netns(pod))
        if error:
            raise ZdsError(error)

    def del_pod(self, uid: str) -> None:
        """Remove the pod from the mesh. With a ztunnel connected, returns once ztunnel acked it
        and raises :class:`ZdsError` if it did not; otherwise only the registry changes (the
        next snapshot simply leaves the pod out, and ztunnel drops it then)."""
        with self._request_lock:
            with self._lock:
                self._pods.pop(uid, None)
                conn = self._conn
            if conn is None:
                return
            request = WorkloadRequest(**{"del": DelWorkload(uid=uid)})  # `del` is a keyword
            error = self._exchange(conn, request, f"del for pod {uid}")
        if error:
            raise ZdsError(error)

    # -- requests ----------------------------------------------------------------------------

    @staticmethod
    def _open_netns(pod: RegisteredPod) -> int:
        """A fresh fd on the pod's network namespace, for ztunnel to enter it."""
        try:
            return os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ZdsError(
                f"add for pod {pod.uid}: cannot open network namespace {pod.netns_path}: {e}"
            ) from e

    def _send_add(self, conn: _Connection, pod: RegisteredPod, netns_fd: int) -> str:
        """Send the pod's ``add`` with ``netns_fd`` (closed here: ztunnel has its own copy once
        it is sent); the ack's error ("" when ok)."""
        try:
            info = WorkloadInfo(
                name=pod.name, namespace=pod.namespace, service_account=pod.service_account
            )
            request = WorkloadRequest(add=AddWorkload(uid=pod.uid, workload_info=info))
            return self._exchange(conn, request, f"add for pod {pod.uid}", netns_fd)
        finally:
            os.close(netns_fd)

    def _exchange(self, conn: _Connection, request: Any, what: str, fd: int | None = None) -> str:
        """Send one request (with ``fd`` as SCM_RIGHTS if given) and wait for its ack. Returns
        the ack's error, "" when ok. Callers hold ``_request_lock``."""
        log.debug("zds: sending %s", what)
        data = request.SerializeToString()
        try:
            if fd is None:
                conn.sock.sendall(data)
            else:
                socket.send_fds(conn.sock, [data], [fd])
        except OSError as e:
            raise ZdsError(f"ztunnel disconnected before {what} was sent: {e}") from e
        try:
            error = conn.acks.get(timeout=self.ack_timeout)
        except queue.Empty:
            _shutdown(conn.sock)  # out of step now: make ztunnel reconnect and resync
            raise ZdsError(
                f"no ack from ztunnel for {what} within {self.ack_timeout} s; connection dropped"
            ) from None
        if error is None:
            raise ZdsError(f"ztunnel disconnected before acking {what}")
        if error:
            log.warning("zds: ztunnel refused %s: %s", what, error)
        return error

    # -- connection thread -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except OSError as e:
                with self._lock:
                    if self._closing:
                        return
                log.warning("zds: accept on %s failed: %s", self.path, e)
                continue
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._peer = sock
            try:
                self._serve(sock)
            finally:
                with self._lock:
                    self._peer = None
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        """Hello, snapshot, then keep reading acks until ztunnel goes away."""
        if not self._read_hello(sock):
            return
        conn = _Connection(sock)
        reader = threading.Thread(
            target=self._read_acks, args=(conn,), name="zds-server-acks", daemon=True
        )
        reader.start()
        try:
            with self._request_lock:
                self._send_snapshot(conn)
                with self._lock:
                    if not conn.closed:
                        self._conn = conn
                        self._ready.set()
                        log.info("zds: ztunnel has the snapshot of %d pod(s)", len(self._pods))
        except ZdsError as e:
            log.warning("zds: snapshot not delivered: %s", e)
            _shutdown(sock)
        reader.join()  # until ztunnel disconnects; then accept the next one

    def _read_hello(self, sock: socket.socket) -> bool:
        """Whether the first message is a ``ZdsHello`` for a version this side speaks. Anything
        else is refused (the caller closes the connection), with the reason logged."""
        sock.settimeout(self.ack_timeout)
        try:
            data = sock.recv(MAX_MESSAGE_SIZE)
        except TimeoutError:
            log.warning("zds: refused connection: no hello within %s s", self.ack_timeout)
            return False
        except OSError as e:
            log.warning("zds: refused connection: reading the hello failed: %s", e)
            return False
        sock.settimeout(None)
        if not data:
            log.warning("zds: refused connection: closed before saying hello")
            return False
        try:
            hello = ZdsHello.FromString(data)
        except DecodeError as e:
            log.warning("zds: refused connection: first message is not a ZdsHello: %s", e)
            return False
        if hello.version != VERSION_V1:
            log.warning(
                "zds: refused connection: hello for version %d, this side speaks %d",
                hello.version,
                VERSION_V1,
            )
            return False
        log.info("zds: ztunnel connected on %s", self.path)
        return True

    def _send_snapshot(self, conn: _Connection) -> None:
        """Replay every registered pod, then ``snapshot_sent``. A pod ztunnel refuses, or whose
        netns cannot be opened, is logged and skipped; losing the connection raises."""
        with self._lock:
            pods = list(self._pods.values())
        log.debug("zds: sending snapshot of %d pod(s)", len(pods))
        for pod in pods:
            try:
                netns_fd = self._open_netns(pod)
            except ZdsError as e:
                log.warning("zds: snapshot skips pod %s: %s", pod.uid, e)
                continue
            self._send_add(conn, pod, netns_fd)  # a refusal is logged by _exchange
        self._exchange(conn, WorkloadRequest(snapshot_sent=SnapshotSent()), "snapshot_sent")

    def _read_acks(self, conn: _Connection) -> None:
        """The connection's only reader: queues each ack for the waiting request, and on
        disconnect marks the connection gone and wakes whoever waits."""
        try:
            while True:
                data = conn.sock.recv(MAX_MESSAGE_SIZE)
                if not data:
                    break
                conn.acks.put(_ack_error(data))
        except OSError as e:
            log.debug("zds: reading from ztunnel failed: %s", e)
        finally:
            with self._lock:
                conn.closed = True
                if self._conn is conn:
                    self._conn = None
                    self._ready.clear()
            conn.acks.put(None)
            log.info("zds: ztunnel disconnected from %s", self.path)


def _ack_error(data: bytes) -> str:
    """The error an ack carries ("" when ok); a malformed response counts as an error."""
    try:
        response = WorkloadResponse.FromString(data)
    except DecodeError as e:
        return f"unparseable WorkloadResponse from ztunnel: {e}"
    if response.WhichOneof("payload") != "ack":
        return "WorkloadResponse from ztunnel without an ack"
    error: str = response.ack.error
    return error


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (any more)
        sock.shutdown(socket.SHUT_RDWR)
