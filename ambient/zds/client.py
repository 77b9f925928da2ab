"""The ztunnel side of ZDS: connect to istio-cni's socket and take the pods it hands over.

istio-cni owns the pods' lifecycle; ztunnel learns about them only through this connection. On
every (re)connection ztunnel says hello, istio-cni replays every pod it knows (``add``, each with
the pod's network-namespace fd) and ends the replay with ``snapshot_sent``: anything ztunnel still
runs that was not in the replay is stale and is dropped then. Afterwards ``add``/``del`` arrive as
pods come and go. Every request gets exactly one ``Ack``, and istio-cni sends the next request
only after the previous ack, so this side is a plain read-handle-ack loop. The messages are
decoded and encoded by the core (``_core.zds_request``, ``zds_hello``, ``zds_ack``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import _core
from .protocol import PAYLOAD_ADD, PAYLOAD_DEL, PAYLOAD_KEEP, PAYLOAD_SNAPSHOT_SENT, VERSION_V1

log = logging.getLogger(__name__)

#: Largest request read in one ``recvmsg``; ZDS messages are a few hundred bytes.
MAX_MESSAGE_SIZE = 64 * 1024
#: Most fds accepted with one request (an ``add`` carries exactly one; the rest is slack so that a
#: misbehaving peer's extra fds are received, and closed, rather than silently truncated).
MAX_FDS = 4
#: The requests that name one pod (by ``uid``).
_PER_POD = frozenset({PAYLOAD_ADD, PAYLOAD_KEEP, PAYLOAD_DEL})


class PodHandler(Protocol):
    """What ztunnel does with the pods istio-cni hands over. Each method returns ``None`` on
    success or an error message, which goes back to istio-cni in the ``Ack``. An exception counts
    as an error too (its text is acked), it does not end the connection."""

    def add_pod(
        self, uid: str, name: str, namespace: str, service_account: str, netns_fd: int
    ) -> str | None:
        """Start proxying for the pod. The handler owns ``netns_fd`` from here on (it must close
        it, or keep it for as long as it runs the pod's listeners) unless it raises."""
        ...

    def keep_pod(self, uid: str) -> str | None:
        """The pod, already running, is still wanted (a snapshot entry without a new netns)."""
        ...

    def del_pod(self, uid: str) -> str | None:
        """Stop proxying for the pod and release its network namespace."""
        ...

    def snapshot_sent(self, kept: set[str]) -> str | None:
        """The replay is complete: ``kept`` holds the uids added or kept on this connection; any
        other pod the handler still runs is gone and should be dropped."""
        ...


class ZdsClient:
    """Keeps a ZDS connection to istio-cni at ``path`` open from a daemon thread, reconnecting
    with exponential backoff (``reconnect_delay`` doubling up to ``max_reconnect_delay``).

    :attr:`connected` is set while a connection is up (after the hello went out);
    :attr:`snapshot_done` is set once the first snapshot has been handled successfully, i.e. once
    ztunnel knows every pod on the node -- the point at which it may report ready.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: PodHandler,
        *,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.connected = threading.Event()
        self.snapshot_done = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _sock, which stop() shuts down from its thread
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the connection thread (idempotent while it runs)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="zds-client", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the connection and the thread. Shutting the socket down is what wakes a blocked
        ``recvmsg``; closing it alone would not."""
        self._stopping.set()
        with self._lock:
            if self._sock is not None:
                _shutdown(self._sock)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("zds: client thread did not stop within %s s", timeout)
            self._thread = None

    def __enter__(self) -> ZdsClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connection thread -------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.reconnect_delay
        while not self._stopping.is_set():
            sock = self._connect()
            if sock is not None:
                try:
                    if self._serve(sock):
                        delay = self.reconnect_delay  # a working session resets the backoff
                except OSError as e:
                    if not self._stopping.is_set():
                        log.warning("zds: connection to %s failed: %s", self.path, e)
                except Exception:
                    # A bug must not end the thread: ztunnel would silently stop getting pods.
                    log.exception("zds: connection to %s broke; reconnecting", self.path)
                finally:
                    self.connected.clear()
                    with self._lock:
                        self._sock = None
                    sock.close()
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.max_reconnect_delay)

    def _connect(self) -> socket.socket | None:
        """Connect and say hello; ``None`` (logged at debug: istio-cni may simply not be up yet)
        when that fails."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(os.fspath(self.path))
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return None
                self._sock = sock
            sock.sendall(_core.zds_hello(VERSION_V1))
        except OSError as e:
            log.debug("zds: cannot connect to %s: %s", self.path, e)
            with self._lock:
                self._sock = None
            sock.close()
            return None
        log.info("zds: connected to %s", self.path)
        self.connected.set()
        return sock

    def _serve(self, sock: socket.socket) -> bool:
        """Read, handle and ack requests until istio-cni closes the connection. Returns whether
        at least one request was handled (the session worked, so the backoff may reset)."""
        kept: set[str] = set()  # uids added or kept on this connection, for snapshot_sent
        handled = False
        while True:
            data, fds, flags, _ = socket.recv_fds(
                sock, MAX_MESSAGE_SIZE, MAX_FDS, socket.MSG_CMSG_CLOEXEC
            )
            if not data and not fds:
                # End of stream. (A zero-length datagram reads the same, but no ZDS request
                # serializes to zero bytes except one without a payload, which is invalid anyway.)
                if not self._stopping.is_set():
                    log.info("zds: %s closed the connection", self.path)
                return handled
            error = self._handle(data, list(fds), flags, kept)
            if error:
                log.warning("zds: %s", error)
            sock.sendall(_core.zds_ack(error or ""))
            handled = True

    def _handle(self, data: bytes, fds: list[int], flags: int, kept: set[str]) -> str | None:
        """One request: the error to ack, or ``None``. Every fd in ``fds`` is either handed to
        the handler or closed here."""
        try:
            if flags & socket.MSG_TRUNC:
                return f"request larger than {MAX_MESSAGE_SIZE} bytes, truncated"
            try:
                kind, uid, name, namespace, service_account = _core.zds_request(data)
            except ValueError as e:
                return f"unparseable WorkloadRequest ({len(data)} bytes): {e}"
            log.debug("zds: request %s %s with %d fd(s)", kind or "(none)", uid, len(fds))
            if kind == PAYLOAD_ADD:
                if flags & socket.MSG_CTRUNC:
                    return (
                        f"add for pod {uid}: expected one network-namespace file descriptor, "
                        f"got more than {MAX_FDS}"
                    )
                if len(fds) != 1:
                    return (
                        f"add for pod {uid}: expected one network-namespace file descriptor, "
                        f"got {len(fds)}"
                    )
                netns_fd = fds.pop()  # the handler owns it from here, unless it raises
                return self._add(uid, (name, namespace, service_account), netns_fd, kept)
            if fds:
                log.warning("zds: %d unexpected fd(s) with a %s request, closed", len(fds), kind)
            if kind == PAYLOAD_KEEP:
                error = self._call(f"keep for pod {uid}", self.handler.keep_pod, uid)
                if error is None:
                    kept.add(uid)
                return error
            if kind == PAYLOAD_DEL:
                kept.discard(uid)
                return self._call(f"del for pod {uid}", self.handler.del_pod, uid)
            if kind == PAYLOAD_SNAPSHOT_SENT:
                error = self._call("snapshot_sent", self.handler.snapshot_sent, set(kept))
                if error is None:
                    self.snapshot_done.set()
                return error
            return "WorkloadRequest without a payload (or with one this ztunnel does not know)"
        finally:
            for fd in fds:
                os.close(fd)

    def _add(
        self, uid: str, info: tuple[str, str, str], netns_fd: int, kept: set[str]
    ) -> str | None:
        """``info``: the pod's name, namespace and service account."""
        try:
            error = self.handler.add_pod(uid, *info, netns_fd)
        except Exception as e:
            # The handler failed, so the fd is still ours. A handler that closed it and then
            # raised breaks that contract; tolerate it (EBADF) rather than lose the connection.
            try:
                os.close(netns_fd)
            except OSError as close_error:
                log.warning("zds: add_pod for %s raised after closing its fd: %s", uid, close_error)
            log.debug("zds: add_pod for %s raised", uid, exc_info=True)
            return f"add for pod {uid}: {_describe(e)}"
        if error is None:
            kept.add(uid)
        return error

    @staticmethod
    def _call(what: str, method: Callable[..., str | None], *args: Any) -> str | None:
        """Run a handler method, turning an exception into the error to ack."""
        try:
            error = method(*args)
        except Exception as e:
            log.debug("zds: %s raised", what, exc_info=True)
            return f"{what}: {_describe(e)}"
        return error


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already disconnected
        sock.shutdown(socket.SHUT_RDWR)
