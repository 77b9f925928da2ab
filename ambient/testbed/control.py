"""The testbed's control socket: what ``ambient testbed pod add|del`` and ``ambient testbed
capture on|off`` ask of the process that owns a running testbed (it holds the CNI side of ZDS, so
only it can hand pods to the ztunnels or take them back).

One JSON request per connection on a Unix stream socket in the workdir, one JSON answer:
``{"action": "del", "pod": "c2"}`` → ``{"ok": true}`` or ``{"ok": false, "error": "..."}``.
The socket is the owner's only: mode 0600 in a root-owned directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import orjson

from ..zds import ZdsError
from .errors import TestbedError
from .testbed import Testbed

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
# A request is a handful of bytes; anything larger is not one of ours.
MAX_REQUEST = 4096
TIMEOUT = 30.0


def _actions(bed: Testbed) -> dict[str, Callable[[str], None]]:
    return {
        "add": bed.add_pod,
        "del": bed.remove_pod,
        "capture-on": lambda pod: bed.set_capture(pod, True),
        "capture-off": lambda pod: bed.set_capture(pod, False),
    }


class ControlServer:
    """Serves the control socket of ``bed`` on a daemon thread until :meth:`close`."""

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.path = bed.workdir / CONTROL_SOCKET
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="testbed-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    answer = self._answer(conn.recv(MAX_REQUEST))
                    conn.sendall(orjson.dumps(answer))
                except OSError as e:
                    log.warning("control socket: %s", e)

    def _answer(self, data: bytes) -> dict[str, object]:
        try:
            request = orjson.loads(data)
            action, pod = request["action"], request["pod"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return {"ok": False, "error": 'expected {"action": ..., "pod": ...}'}
        handler = _actions(self.bed).get(action) if isinstance(pod, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown action {action!r} (or pod not a name)"}
        try:
            handler(pod)
        except (TestbedError, ZdsError) as e:
            return {"ok": False, "error": str(e)}
        log.info("control: %s %s", action, pod)
        return {"ok": True}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(workdir: Path, action: str, pod: str) -> None:
    """Ask the owner of the testbed in ``workdir``; raises TestbedError with its answer."""
    path = workdir / CONTROL_SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(orjson.dumps({"action": action, "pod": pod}))
            sock.shutdown(socket.SHUT_WR)
            answer = orjson.loads(sock.recv(MAX_REQUEST))
    except (OSError, orjson.JSONDecodeError) as e:
        raise TestbedError(f"no running testbed answers on {path}: {e}") from None
    if not answer.get("ok"):
        raise TestbedError(str(answer.get("error")))
