"""Network-namespace primitives: create and delete named namespaces, run commands and Python code
inside them.

Named namespaces are the ones ``ip netns`` manages: a bind mount of the namespace under
:data:`NETNS_DIR`, which keeps it alive without any process in it and lets people reach it with
``ip netns exec <name> ...``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

from .errors import TestbedError

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000  # <sched.h>: setns() should join a network namespace
# No testbed command should take more than a few seconds; a hung one is a failure, not a wait.
COMMAND_TIMEOUT = 30.0


def exists(name: str) -> bool:
    """Whether a named netns ``name`` exists."""
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    """Create the named netns ``name`` (an error if it exists)."""
    run(["ip", "netns", "add", name])


def delete(name: str) -> None:
    """Delete the named netns ``name``; a netns that does not exist is already deleted.

    The kernel frees the namespace, with its interfaces (and their veth peers elsewhere), routes
    and rules, once nothing uses it any more — a socket still open in it keeps it alive unnamed.
    """
    if not exists(name):
        return
    try:
        run(["ip", "netns", "delete", name])
    except TestbedError as e:
        # Someone else deleted it between the check and the command.
        if "No such file or directory" not in str(e) or exists(name):
            raise


def run(args: list[str], *, netns: str | None = None, input: str | None = None) -> str:
    """Run ``args`` (inside ``ip netns exec <netns>`` when given) and return its stdout.

    Raises :class:`TestbedError` naming the command, the netns and the command's stderr when it
    fails, cannot start or times out.
    """
    argv = ["ip", "netns", "exec", netns, *args] if netns is not None else list(args)
    where = f" in netns {netns}" if netns is not None else ""
    shown = " ".join(args)
    try:
        done = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError as e:
        raise TestbedError(f"`{shown}`{where}: {argv[0]} is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"`{shown}`{where}: no answer in {COMMAND_TIMEOUT:g} s") from e
    if done.returncode != 0:
        stderr = done.stderr.strip() or "(no error output)"
        raise TestbedError(f"`{shown}`{where} failed (exit {done.returncode}): {stderr}")
    return done.stdout


@cache
def _setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    setns: Callable[[int, int], int] = libc.setns
    setns.argtypes = [ctypes.c_int, ctypes.c_int]  # type: ignore[attr-defined]
    setns.restype = ctypes.c_int  # type: ignore[attr-defined]
    return setns


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` inside the named netns ``name`` and return its result (or raise its exception).

    ``setns(2)`` moves only the calling *thread* into the namespace, so ``fn`` runs on a fresh
    thread that enters it and then ends: the caller's thread, and every other thread of the
    process, stays where it was. Sockets ``fn`` creates belong to ``name`` for good (a socket's
    namespace is fixed when it is created) and work from any thread afterwards.
    """
    path = NETNS_DIR / name
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise TestbedError(f"netns {name} does not exist") from None
            try:
                if _setns()(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise TestbedError(f"setns into netns {name} failed: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as e:  # handed to the caller, whatever it is
            failure.append(e)

    thread = threading.Thread(target=enter_and_call, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def socket_in(
    name: str,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
) -> socket.socket:
    """A new socket in the named netns ``name``, usable from any thread."""
    return in_netns(name, lambda: socket.socket(family, type))
