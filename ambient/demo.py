"""``ambient demo``: the data plane doing its job on an embedded default, with no root and no files.

Two workloads of namespace ``default`` (client ``c1``, server ``s1`` with an echo app), one of
namespace ``other`` (``c2``) and one from a foreign trust domain. Each flow goes through the
compiled core over HBONE (mutual TLS 1.3, HTTP/2 CONNECT) and prints what happened; the demo exits
0 only when every flow ended as the mesh's rules say it must.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _core
from .hbone import Allow, DataPlane, Deny, HboneTarget, StreamRequest, TunnelError
from .identity import CertificateAuthority

TRUST_DOMAIN = "cluster.local"
PAYLOAD = b"hello through the mesh\n" * 2048  # 47 KiB, several DATA frames each way


@dataclass
class Flow:
    name: str
    expected: str  # "ok" or the start of the refusal text
    outcome: str = ""
    detail: str = ""

    @property
    def as_expected(self) -> bool:
        return self.outcome == self.expected


class EchoApp:
    """The server workload's application: echoes bytes, half-closes when the client does."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _exchange(sock: socket.socket) -> int:
    with sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        received = 0
        while data := sock.recv(65536):
            received += len(data)
        return received


def run(out: Callable[[str], None] = print) -> int:
    started = time.monotonic()
    # The refusals below are the point of the demo; the core's warnings about them would only
    # repeat what the flow lines say (raise --log-level to see them anyway).
    core_log = logging.getLogger("_core")
    if core_log.getEffectiveLevel() >= logging.WARNING:
        core_log.setLevel(logging.ERROR)
    ca = CertificateAuthority.create(TRUST_DOMAIN)
    s1 = ca.issue(f"spiffe://{TRUST_DOMAIN}/ns/default/sa/s1")
    c1 = ca.issue(f"spiffe://{TRUST_DOMAIN}/ns/default/sa/c1")
    c2 = ca.issue(f"spiffe://{TRUST_DOMAIN}/ns/other/sa/c2")
    # Signed by our own CA, so its chain verifies: only the trust-domain check can stop it.
    intruder = ca.issue("spiffe://evil.example/ns/default/sa/c1")
    app = EchoApp()
    seen: list[str | None] = []

    def s1_policy(request: StreamRequest) -> Allow | Deny:
        seen.append(request.peer_identity)
        peer = request.peer
        if peer is not None and peer.namespace == "default":
            return Allow(app.address)
        return Deny("only namespace default may reach s1")

    flows = [
        Flow("default/c1 -> default/s1", "ok"),
        Flow("other/c2 -> default/s1", "refused: 401"),
        Flow("default/c1 -> s1, expecting another identity", "refused: server identity mismatch"),
        Flow("evil.example/c1 -> default/s1", "refused: TLS handshake"),
    ]
    with DataPlane(2) as dp:
        for cert in (s1, c1, c2, intruder):
            dp.load_identity(cert)
        server = dp.serve("127.0.0.1:0", s1.identity, s1_policy)
        hbone = server.local_address
        targets = [
            HboneTarget(hbone, app.address, [s1.identity], c1.identity),
            HboneTarget(hbone, app.address, [s1.identity], c2.identity),
            HboneTarget(
                hbone, app.address, [f"spiffe://{TRUST_DOMAIN}/ns/default/sa/s2"], c1.identity
            ),
            HboneTarget(hbone, app.address, [s1.identity], intruder.identity),
        ]
        for flow, target in zip(flows, targets, strict=True):
            before = len(seen)
            try:
                received = _exchange(dp.connect(target, timeout=10))
            except TunnelError as e:
                flow.outcome, flow.detail = _classify(str(e)), str(e)
            else:
                flow.outcome = "ok" if received == len(PAYLOAD) else "short"
                flow.detail = (
                    f"{len(PAYLOAD)} B sent, {received} B echoed; s1 saw peer {seen[before]}"
                )
        stats = dp.stats()
    app.close()

    out(f"ambient demo: HBONE on the compiled core ({_core.build_profile()} build)")
    for flow in flows:
        mark = "ok " if flow.as_expected else "BAD"
        out(f"  [{mark}] {flow.name}: {flow.outcome} — {flow.detail}")
    out(
        f"  core: {stats['tls_handshakes']} handshakes, {stats['tls_handshake_failures']} refused; "
        f"{stats['hbone_requests_received']} CONNECTs, {stats['hbone_requests_refused']} refused; "
        f"{time.monotonic() - started:.2f} s"
    )
    return 0 if all(f.as_expected for f in flows) else 1


def _classify(error: str) -> str:
    if "answered the CONNECT with 401" in error:
        return "refused: 401"
    if "server identity mismatch" in error:
        return "refused: server identity mismatch"
    if "TLS handshake" in error:
        return "refused: TLS handshake"
    return "refused: " + error
