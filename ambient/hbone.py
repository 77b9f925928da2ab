"""HBONE from Python: serve it, tunnel through it — the bytes stay in the compiled core.

HBONE is how ambient workloads talk across nodes: one HTTP/2 ``CONNECT`` stream per TCP
connection, inside mutual TLS 1.3 where both sides prove a SPIFFE identity. This module is the
Python face of :mod:`ambient._core`::

    from ambient.hbone import DataPlane, HboneTarget, Allow, Deny
    from ambient.identity import CertificateAuthority

    ca = CertificateAuthority.create("cluster.local")
    server_cert = ca.issue("spiffe://cluster.local/ns/demo/sa/server")
    client_cert = ca.issue("spiffe://cluster.local/ns/demo/sa/client")

    with DataPlane() as dp:
        dp.load_identity(server_cert)
        dp.load_identity(client_cert)

        def decide(request):            # once per CONNECT stream, never per byte
            if request.peer and request.peer.namespace == "demo":
                return Allow("127.0.0.1:8080")
            return Deny("only the demo namespace may connect")

        server = dp.serve(("127.0.0.1", 15008), server_cert.identity, decide)
        target = HboneTarget("127.0.0.1:15008", "127.0.0.1:8080",
                             [server_cert.identity], client_cert.identity)
        sock = dp.connect(target)      # a plain socket; its bytes travel through the tunnel

Decisions run on the core's decision threads (a few, with a bounded queue) while holding the
GIL, never on the threads that move bytes; a slow decision delays only the decisions queued behind
it.
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._core import (
    Allow,
    Core,
    Deny,
    HboneTarget,
    Listener,
    LogTemplate,
    Netns,
    Routes,
    TcpTarget,
)
from ._fast.hbone_request import InboundDispatcher, StreamRequest

if TYPE_CHECKING:
    from .identity import WorkloadCertificate

__all__ = [
    "Allow",
    "DataPlane",
    "Deny",
    "HboneTarget",
    "Listener",
    "Netns",
    "Routes",
    "StreamRequest",
    "TcpTarget",
    "TunnelError",
    "format_address",
]

Address = tuple[str, int] | str
Plan = HboneTarget | TcpTarget | Deny
Decision = Callable[[StreamRequest], Allow | Deny]
Route = Callable[[str, str], Plan | Routes]
Reporter = Callable[[Any, str, str, int, int, float, str | None], object]

# Cores still open at interpreter exit are closed first, so no runtime thread tries to take the
# GIL of an interpreter that is going away.
_open_cores: weakref.WeakSet[DataPlane] = weakref.WeakSet()


@atexit.register
def _close_open_cores() -> None:
    for dp in list(_open_cores):
        dp.close()


class TunnelError(ConnectionError):
    """A tunnel could not be established; the message names the peer and the reason (TLS
    failure, identity mismatch, the CONNECT status, an unreachable address...)."""


def format_address(address: Address) -> str:
    """``("::1", 80)`` → ``"[::1]:80"``; strings pass through."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DataPlane:
    """Owns one compiled data-plane runtime and everything on it.

    ``workers``: tokio worker threads (default: one per core; with 1, tokio's current-thread
    scheduler on a thread of its own, cheaper per request than a lone multi-thread worker).
    ``pool_max_streams``: concurrent streams per pooled HBONE connection (the peer's limit
    applies if lower).
    ``pool_idle_timeout``: seconds before an unused pooled connection is closed.
    ``mark``: SO_MARK on every socket (Istio uses 0x539 so its redirection skips the proxy).
    Bounds: ``decision_threads`` threads run Python decisions, at most
    ``max_pending_decisions`` wait (past that a connection is refused at once, saying so);
    every listener holds at most ``max_connections`` connections, at most
    ``max_connections_per_source`` from one source IP (0 lifts a cap); an HBONE connection
    carrying no stream for ``hbone_idle_timeout`` seconds is closed by the server.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        pool_max_streams: int = 100,
        pool_idle_timeout: float = 300.0,
        mark: int | None = None,
        decision_threads: int = 4,
        max_pending_decisions: int = 1024,
        max_connections: int = 10_000,
        max_connections_per_source: int = 1_000,
        hbone_idle_timeout: float = 600.0,
    ) -> None:
        self.core = Core(
            workers,
            pool_max_streams=pool_max_streams,
            pool_idle_timeout=pool_idle_timeout,
            mark=mark,
            decision_threads=decision_threads,
            max_pending_decisions=max_pending_decisions,
            max_connections=max_connections,
            max_connections_per_source=max_connections_per_source,
            hbone_idle_timeout=hbone_idle_timeout,
        )
        _open_cores.add(self)

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_identity(self, cert: WorkloadCertificate) -> str:
        """Make ``cert`` an identity this data plane can speak as (or rotate it: connections made
        afterwards use the new certificate, live ones are untouched). Returns the identity."""
        self.core.set_identity(cert.identity, cert.chain_pem, cert.key_pem, cert.roots_pem)
        return cert.identity

    def serve(
        self,
        address: Address,
        identity: str,
        decide: Decision | Allow | Deny,
        *,
        report: Reporter | LogTemplate | None = None,
        netns: Netns | None = None,
        remember: bool = False,
    ) -> Listener:
        """Serve HBONE on ``address`` as ``identity`` (inside ``netns`` when given: in-pod mode,
        the listener and the connections to the app live in the pod's network namespace).

        ``decide`` is called once per CONNECT stream with a :class:`StreamRequest` and returns
        ``Allow(upstream)`` or ``Deny(reason, status=401)``; or it is a fixed ``Allow``/``Deny``
        for every stream (no Python at all per stream). Malformed requests get 400 before any
        decision; an unreachable upstream gets 503; 200 is sent only once the upstream is connected.
        ``report(verdict, source, destination, sent, received, seconds, error)`` is told how each
        stream that got a verdict ended.

        ``remember``: ``decide``'s answer depends only on the peer's identity and IP, the
        authority, the ``Forwarded`` host and the snapshot; the core keeps it per such key (no
        Python for later streams) until :meth:`snapshot_changed`.
        """
        verdict: Any = decide if isinstance(decide, (Allow, Deny)) else InboundDispatcher(decide)
        return self.core.serve_hbone(
            format_address(address),
            identity,
            verdict,
            report=report,
            netns=netns,
            remember=remember,
        )

    def forward(
        self,
        address: Address,
        route: Plan | Route,
        *,
        mode: str = "direct",
        report: Reporter | LogTemplate | None = None,
        netns: Netns | None = None,
        remember: bool = False,
    ) -> Listener:
        """Accept plain TCP on ``address`` and carry each connection as ``route`` says: a fixed
        plan, or ``route(source, destination) -> plan`` asked once per connection. ``route`` may
        answer with :class:`Routes`: plans by weight, of which the core picks one per connection.

        ``mode``: how the destination is learned — ``"direct"`` (the listener's own address),
        ``"original_dst"`` (``SO_ORIGINAL_DST``, after in-pod redirection) or ``"socks5"`` (the
        client asks; ``destination`` may then be ``name:port``). ``report`` as for :meth:`serve`.
        ``remember``: ``route``'s answer depends only on the source IP, the destination and the
        snapshot; the core keeps it per (source IP, destination) until :meth:`snapshot_changed`.
        """
        return self.core.listen(
            format_address(address),
            route,
            mode=mode,
            report=report,
            netns=netns,
            remember=remember,
        )

    def snapshot_changed(self) -> None:
        """The snapshot decisions read has changed: the answers listeners remember are dropped
        (each asked again on its next connection). Call it after the swap."""
        self.core.snapshot_changed()

    def tunnel(
        self, sock: socket.socket, plan: Plan, on_ready: Callable[[str | None], object]
    ) -> None:
        """Hand ``sock`` (a connected TCP or Unix stream socket) to the core, which carries it as
        ``plan`` says. ``sock`` is detached: do not use it afterwards. ``on_ready(None)`` is called
        once the far side is established, ``on_ready(reason)`` if it could not be."""
        fd = sock.detach()
        self.core.tunnel_fd(fd, plan, on_ready)

    def connect(self, plan: Plan, timeout: float | None = 30.0) -> socket.socket:
        """A blocking socket whose bytes travel as ``plan`` says (one end of a socketpair; the
        core holds the other). Raises :class:`TunnelError` when the tunnel cannot be made."""
        ours, theirs = socket.socketpair()
        done = threading.Event()
        outcome: list[str | None] = []

        def on_ready(error: str | None) -> None:
            outcome.append(error)
            done.set()

        try:
            self.tunnel(theirs, plan, on_ready)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if not done.wait(timeout):
            ours.close()
            raise TunnelError(f"tunnel {plan!r} not established within {timeout} s")
        if outcome[0] is not None:
            ours.close()
            raise TunnelError(outcome[0])
        return ours

    async def open_connection(
        self, plan: Plan, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio streams whose bytes travel as ``plan`` says; ``kwargs`` go to
        :func:`asyncio.open_connection` (``limit``...). Raises :class:`TunnelError`."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ready: asyncio.Future[str | None] = loop.create_future()

        def on_ready(error: str | None) -> None:
            loop.call_soon_threadsafe(_resolve, ready, error)

        try:
            self.tunnel(theirs, plan, on_ready)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        error = await ready
        if error is not None:
            ours.close()
            raise TunnelError(error)
        return await asyncio.open_connection(sock=ours, **kwargs)

    def probe(
        self,
        target: HboneTarget,
        count: int = 1,
        *,
        concurrency: int = 1,
        payload: int = 0,
        fresh_connections: bool = False,
    ) -> dict[str, Any]:
        """Open ``count`` HBONE streams to ``target`` from inside the core (no Python per stream);
        see ``ambient hbone probe``."""
        return self.core.probe(
            target,
            count,
            concurrency=concurrency,
            payload=payload,
            fresh_connections=fresh_connections,
        )

    def stats(self) -> dict[str, int]:
        """Counters of the core, read without locks."""
        return self.core.stats()

    def drain(self, deadline: float = 0.0) -> bool:
        """Stop accepting everywhere, GOAWAY on HBONE, wait up to ``deadline`` seconds for live
        connections, close the rest. True when nothing had to be cut."""
        return self.core.drain(deadline)

    def close(self, deadline: float = 0.0) -> bool:
        """Drain, then stop the runtime. Idempotent."""
        _open_cores.discard(self)
        return self.core.close(deadline)


def _resolve(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)
