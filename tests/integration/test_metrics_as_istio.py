"""ztunnel's connection metrics counted as Istio's ztunnel counts them, by two real ztunnel
processes: every counter (opened, closed, failed with their response_flags, bytes) for a
connection allowed, denied by policy at the destination, refused by the destination's app, cut
when its pod's listeners drain, closed by a policy change, and failed at the source's HBONE
dial; refusals before any connection exists are logged, not counted; the access-log lines of
early failures say why, and the matching ambient_core_* counter moves.

Each case uses its own pair of workloads, so its label sets are its own and counts are exact.
Loopback addresses: pods of node n1 on 127.50.10.x, of n2 on 127.51.10.x (apps on 127.51.20.x),
pods of n3 (no ztunnel: impostors stand there) on 127.51.30.x.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ambient import socks5
from ambient._core import Counters
from ambient.hbone import Allow, HboneTarget, TcpTarget
from ambient.identity import CertificateAuthority
from ambient.peers.h2_hbone.common import _tls_context
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess
from tests.integration.test_hostile_peers import H2Peer, app_address, read_all
from tests.integration.test_ztunnel_operations import absent, find, scrape

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend, version: v1}}
spec: {nodeName: n1, serviceAccountName: frontend}
status: {podIP: 127.50.10.1}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: shop}
spec: {nodeName: n1, serviceAccountName: intruder}
status: {podIP: 127.50.10.2}
---
apiVersion: v1
kind: Pod
metadata: {name: auditor, namespace: shop}
spec: {nodeName: n1, serviceAccountName: auditor}
status: {podIP: 127.50.10.3}
---
apiVersion: v1
kind: Pod
metadata: {name: shopper, namespace: shop}
spec: {nodeName: n1, serviceAccountName: shopper}
status: {podIP: 127.50.10.4}
---
apiVersion: v1
kind: Pod
metadata: {name: courier, namespace: shop}
spec: {nodeName: n1, serviceAccountName: courier}
status: {podIP: 127.50.10.5}
---
apiVersion: v1
kind: Pod
metadata: {name: hasty, namespace: shop}
spec: {nodeName: n1, serviceAccountName: hasty}
status: {podIP: 127.50.10.6}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  labels: {app: cart, version: v3}
  annotations: {ambient.dev/app-address: 127.51.20.1}
spec:
  nodeName: n2
  serviceAccountName: cart
  containers: [{name: app, ports: [{containerPort: 8080}, {containerPort: 9090}]}]
status: {podIP: 127.51.10.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: ledger
  namespace: shop
  annotations: {ambient.dev/app-address: 127.51.20.2}
spec:
  nodeName: n2
  serviceAccountName: ledger
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.51.10.2}
---
apiVersion: v1
kind: Pod
metadata: {name: vault, namespace: shop}
spec: {nodeName: n3, serviceAccountName: vault}
status: {podIP: 127.51.30.1}
---
apiVersion: v1
kind: Pod
metadata: {name: safe, namespace: shop}
spec: {nodeName: n3, serviceAccountName: safe}
status: {podIP: 127.51.30.2}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 127.50.100.1, selector: {app: nobody}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-intruder, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/intruder]}}]}]
"""
NO_AUDITOR = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-auditor, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/auditor]}}]}]
"""
POD_IP = {
    "frontend": "127.50.10.1",
    "intruder": "127.50.10.2",
    "auditor": "127.50.10.3",
    "shopper": "127.50.10.4",
    "courier": "127.50.10.5",
    "hasty": "127.50.10.6",
    "cart": "127.51.10.1",
    "ledger": "127.51.10.2",
    "vault": "127.51.30.1",
    "safe": "127.51.30.2",
}
STRANGER = "127.50.9.9"  # not a pod: where the early failures come from


def spiffe(account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/shop/sa/{account}"


class Mesh:
    def __init__(self, tmp) -> None:
        self.file = tmp / "mesh.yaml"
        self.file.write_text(textwrap.dedent(MESH))
        CertificateAuthority.create().save(tmp / "ca")
        self.ca = CertificateAuthority.load(tmp / "ca")
        self.apps = [App("count", ("127.51.20.1", 8080)), App("echo", ("127.51.20.2", 8080))]
        self.n1, self.n2 = (
            ZtunnelProcess(
                n, [self.file], tmp / "ca", tmp, "--drain-deadline", "1", "--watch-interval", "3600"
            )
            for n in ("n1", "n2")
        )
        for node in (self.n1, self.n2):
            node.wait_ready()

    def reload(self, extra: str = "", *, replace: tuple[str, str] | None = None) -> None:
        """Rewrite the mesh file (the base one, edited), SIGHUP both ztunnels, wait until both
        applied it."""
        text = textwrap.dedent(MESH)
        if replace is not None:
            assert replace[0] in text
            text = text.replace(*replace)
        before = [reloads(node) for node in (self.n1, self.n2)]
        self.file.write_text(text + textwrap.dedent(extra))
        for node in (self.n1, self.n2):
            node.signal(signal.SIGHUP)
        for node, n in zip((self.n1, self.n2), before, strict=True):
            wait_until(lambda node=node, n=n: reloads(node) > n, what=f"{node.node} to reload")

    def close(self) -> None:
        for node in (self.n1, self.n2):
            node.stop()
        for app in self.apps:
            app.close()


def reloads(node: ZtunnelProcess) -> int:
    with urllib.request.urlopen(f"http://{node.admin}/config_dump", timeout=5) as r:
        return int(orjson.loads(r.read())["reload"]["reloads"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("istio-metrics"))
    yield m
    m.close()


def counted(node: ZtunnelProcess, reporter: str, source: str, destination: str) -> dict:
    """The non-zero TCP series of one label set: {"opened"/"closed"/"failed"/"received"/"sent":
    {response_flags: value}}."""
    names = {
        "istio_tcp_connections_opened_total": "opened",
        "istio_tcp_connections_closed_total": "closed",
        "istio_tcp_connections_failed_total": "failed",
        "istio_tcp_received_bytes_total": "received",
        "istio_tcp_sent_bytes_total": "sent",
    }
    out: dict[str, dict[str, float]] = {}
    for (name, labels), value in scrape(node.metrics).items():
        got = dict(labels)
        if (
            name in names
            and value
            and got["reporter"] == reporter
            and got["source_workload"] == source
            and got["destination_workload"] == destination
        ):
            out.setdefault(names[name], {})[got["response_flags"]] = value
    return out


def closed_total(node: ZtunnelProcess, reporter: str, source: str, destination: str) -> float:
    return sum(counted(node, reporter, source, destination).get("closed", {}).values())


def core(node: ZtunnelProcess) -> dict[str, float]:
    """The ambient_core_* counters of a ztunnel, without the _total suffix."""
    with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        sample.name.removesuffix("_total"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ambient_core_")
    }


def istio_connections(node: ZtunnelProcess) -> float:
    """Every istio_tcp_connections_* sample added up: moves with any counted connection."""
    return sum(v for (n, _), v in scrape(node.metrics).items() if "connections" in n)


def via(pod: str, destination: str, port: int) -> socket.socket:
    """A connection from ``pod`` through its ztunnel's SOCKS5 port."""
    return socks5.connect(
        (POD_IP[pod], 15080), (POD_IP.get(destination, destination), port), source=POD_IP[pod]
    )


def one_line(node: ZtunnelProcess, match: Callable[[dict], bool], what: str) -> dict:
    found = node.claim_entries(match, timeout=10)
    assert len(found) == 1, f"{what}: {found}"
    return found[0]


# --- connections, as Istio counts them ------------------------------------------------------------


def test_an_allowed_connection_is_opened_and_closed_without_a_flag_and_never_failed(mesh):
    with via("frontend", "cart", 8080) as sock:
        assert exchange(sock, b"f" * 1000) == b"1000"  # the count app answers the byte count
    wait_until(
        lambda: (
            closed_total(mesh.n1, "source", "frontend", "cart") == 1
            and closed_total(mesh.n2, "destination", "frontend", "cart") == 1
        ),
        what="both reporters to count the connection closed",
    )
    expected = {"opened": {"-": 1}, "closed": {"-": 1}, "received": {"-": 1000}, "sent": {"-": 4}}
    assert counted(mesh.n1, "source", "frontend", "cart") == expected
    assert counted(mesh.n2, "destination", "frontend", "cart") == expected
    for node, reporter in ((mesh.n1, "source"), (mesh.n2, "destination")):
        samples = scrape(node.metrics)
        labels = {"reporter": reporter, "source_workload": "frontend"}
        assert absent(samples, "istio_tcp_connections_failed_total", **labels)
        assert (
            find(
                samples,
                "istio_tcp_connections_opened_total",
                **labels,
                source_principal=spiffe("frontend"),
                destination_principal=spiffe("cart"),
                connection_security_policy="mutual_tls",
                response_flags="-",
            )
            == 1
        )


def test_a_connection_denied_at_the_destination_is_closed_and_failed_with_deny_there(mesh):
    """Istio's ztunnel at the destination: opened with "-", closed and failed with DENY (an
    alert on failed{DENY} fires). The source, answered 401, counts a CONNECT failure."""
    mesh.n2.forget_entries()
    with pytest.raises(socks5.Socks5Error, match="not allowed"):
        via("intruder", "cart", 8080)
    wait_until(
        lambda: (
            closed_total(mesh.n1, "source", "intruder", "cart") == 1
            and closed_total(mesh.n2, "destination", "intruder", "cart") == 1
        ),
        what="both reporters to count the denial",
    )
    assert counted(mesh.n2, "destination", "intruder", "cart") == {
        "opened": {"-": 1},
        "closed": {"DENY": 1},
        "failed": {"DENY": 1},
    }
    assert counted(mesh.n1, "source", "intruder", "cart") == {
        "opened": {"-": 1},
        "closed": {"CONNECT": 1},
        "failed": {"CONNECT": 1},
    }
    line = one_line(mesh.n2, lambda e: e.get("src.workload") == "intruder", "the denial's line")
    assert line["policy"] == "shop/no-intruder" and line["error"].startswith("denied")


def test_an_upstream_refused_at_the_destination_is_a_connect_failure_on_both_sides(mesh):
    """Nothing listens on the app's port 9090: the destination answers 503 and counts
    closed/failed CONNECT; so does the source."""
    mesh.n2.forget_entries()
    with pytest.raises(socks5.Socks5Error):
        via("shopper", "cart", 9090)
    wait_until(
        lambda: (
            closed_total(mesh.n1, "source", "shopper", "cart") == 1
            and closed_total(mesh.n2, "destination", "shopper", "cart") == 1
        ),
        what="both reporters to count the failure",
    )
    expected = {"opened": {"-": 1}, "closed": {"CONNECT": 1}, "failed": {"CONNECT": 1}}
    assert counted(mesh.n2, "destination", "shopper", "cart") == expected
    assert counted(mesh.n1, "source", "shopper", "cart") == expected
    line = one_line(mesh.n2, lambda e: e.get("src.workload") == "shopper", "the failure's line")
    assert "127.51.20.1:9090 unreachable" in line["error"]


def test_a_connection_cut_when_its_pods_listeners_drain_is_closed_without_a_flag_and_not_failed(
    mesh,
):
    """ledger moves to another node: n2 drains its listeners (deadline 0) and cuts the live
    connection. As a drain cut it is closed with "-", not failed, and its line says why."""
    live = via("courier", "ledger", 8080)
    try:
        assert exchange_some(live, b"before the move") == b"before the move"
        mesh.n2.forget_entries()
        ledger_on = "  nodeName: {}\n  serviceAccountName: ledger"
        mesh.reload(replace=(ledger_on.format("n2"), ledger_on.format("n3")))
        live.settimeout(10)
        assert read_all(live) == b""  # cut
        wait_until(
            lambda: closed_total(mesh.n2, "destination", "courier", "ledger") == 1,
            what="the destination to count it closed",
        )
        assert counted(mesh.n2, "destination", "courier", "ledger") == {
            "opened": {"-": 1},
            "closed": {"-": 1},
            "received": {"-": 15},
            "sent": {"-": 15},
        }
        line = one_line(mesh.n2, lambda e: e.get("src.workload") == "courier", "the cut's line")
        assert line["error"] == "cut: pod shop/ledger is no longer served by ztunnel n2"
    finally:
        live.close()
        mesh.reload()


def exchange_some(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` to an echo and read it back, leaving the connection open."""
    sock.sendall(payload)
    sock.settimeout(10)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        assert chunk, "closed early"
        got += chunk
    return got


def test_a_live_connection_a_policy_change_no_longer_allows_is_closed_and_failed_with_deny(mesh):
    live = via("auditor", "cart", 8080)
    try:
        live.sendall(b"x" * 100)
        wait_until(
            lambda: (
                counted(mesh.n2, "destination", "auditor", "cart").get("received") == {"-": 100}
            ),
            what="the bytes to be counted",
        )
        mesh.n2.forget_entries()
        mesh.reload(NO_AUDITOR)
        live.settimeout(10)
        assert read_all(live) == b""  # closed by ztunnel
        wait_until(
            lambda: closed_total(mesh.n2, "destination", "auditor", "cart") == 1,
            what="the destination to count it closed",
        )
        assert counted(mesh.n2, "destination", "auditor", "cart") == {
            "opened": {"-": 1},
            "closed": {"DENY": 1},
            "failed": {"DENY": 1},
            "received": {"-": 100},
        }
        line = one_line(mesh.n2, lambda e: e.get("src.workload") == "auditor", "the close's line")
        assert line["error"].startswith("closed: no longer allowed")
        assert "shop/no-auditor" in line["error"]
        assert core(mesh.n2)["ambient_core_connections_closed_by_policy"] >= 1
    finally:
        live.close()
        mesh.reload()


# --- the source's HBONE dial failing --------------------------------------------------------------


@contextlib.contextmanager
def impostor(mesh: Mesh, pod: str, identity: str, then: bytes = b"") -> Iterator[None]:
    """A TLS server on ``pod``'s HBONE address (node n3 has no ztunnel) holding a certificate of
    the mesh's CA for ``identity``; after the handshake it writes ``then`` and closes."""
    ctx = _tls_context(mesh.ca.issue(identity), server_side=True)
    listener = socket.create_server((POD_IP[pod], 15008))

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), raw:
                tls = ctx.wrap_socket(raw, server_side=True)
                tls.sendall(then)
                tls.recv(1024)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def test_an_hbone_dial_whose_tls_handshake_fails_is_closed_and_failed_with_tls_failure(mesh):
    mesh.n1.forget_entries()
    with impostor(mesh, "vault", spiffe("impostor")), pytest.raises(socks5.Socks5Error):
        via("frontend", "vault", 80)
    wait_until(
        lambda: closed_total(mesh.n1, "source", "frontend", "vault") == 1,
        what="the source to count the failure",
    )
    assert counted(mesh.n1, "source", "frontend", "vault") == {
        "opened": {"-": 1},
        "closed": {"TLS_FAILURE": 1},
        "failed": {"TLS_FAILURE": 1},
    }
    line = one_line(mesh.n1, lambda e: e.get("dst.workload") == "vault", "the failure's line")
    assert "server identity mismatch" in line["error"] and spiffe("impostor") in line["error"]


def test_an_hbone_dial_whose_http2_handshake_fails_is_closed_and_failed_with_h2_failure(mesh):
    """The peer completes TLS as the right identity, then sends HTTP/1.1 instead of its
    HTTP/2 preface (a SETTINGS frame): the HTTP/2 handshake failed."""
    mesh.n1.forget_entries()
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    with impostor(mesh, "safe", spiffe("safe"), answer), pytest.raises(socks5.Socks5Error):
        via("frontend", "safe", 80)
    wait_until(
        lambda: closed_total(mesh.n1, "source", "frontend", "safe") == 1,
        what="the source to count the failure",
    )
    assert counted(mesh.n1, "source", "frontend", "safe") == {
        "opened": {"-": 1},
        "closed": {"H2_HANDSHAKE_FAILURE": 1},
        "failed": {"H2_HANDSHAKE_FAILURE": 1},
    }


# --- refusals before any connection: logged, not counted ------------------------------------------


def test_refusals_before_a_connection_exists_are_logged_but_not_counted(mesh):
    """Istio's "early deny": a Service with no endpoint (at the source) and a malformed CONNECT
    authority (at the destination) have an access-log line and no istio_tcp series."""
    mesh.n1.forget_entries()
    mesh.n2.forget_entries()
    counted_before = (istio_connections(mesh.n1), istio_connections(mesh.n2))
    refused_before = core(mesh.n2)["ambient_core_hbone_requests_refused"]
    with pytest.raises(socks5.Socks5Error, match="not allowed"):
        via("frontend", "127.50.100.1", 80)
    line = one_line(mesh.n1, lambda e: e.get("dst.addr") == "127.50.100.1:80", "no endpoint")
    assert line["error"]
    peer = H2Peer(f"{POD_IP['cart']}:15008", mesh.ca.issue(spiffe("frontend")), source=STRANGER)
    with contextlib.closing(peer):
        stream = peer.connect("cart.shop.svc.cluster.local:8080")
        peer.until(lambda: peer.answered(stream), what="the answer")
        assert peer.statuses[stream] == 400
    line = one_line(mesh.n2, lambda e: e.get("src.addr", "").startswith(STRANGER), "the 400")
    assert line["error"].startswith("refused with 400")
    assert line["direction"] == "inbound" and line["dst.workload"] == "cart"
    assert core(mesh.n2)["ambient_core_hbone_requests_refused"] == refused_before + 1
    assert (istio_connections(mesh.n1), istio_connections(mesh.n2)) == counted_before


# --- early failures: an access-log line with the reason, an ambient_core_* counter ---------------


def early_failure(
    node: ZtunnelProcess, counter: str, act: Callable[[], object], source: str = STRANGER
) -> dict:
    """Do ``act``; return the one access-log line it caused, from ``source``, once ``counter``
    moved by one."""
    node.forget_entries()
    before = core(node)[counter]
    act()
    wait_until(lambda: core(node)[counter] == before + 1, what=f"{counter} to move")
    return one_line(node, lambda e: e.get("src.addr", "").startswith(source + ":"), counter)


def test_garbage_on_15008_has_an_early_line_naming_the_peer_and_why(mesh):
    def garbage() -> None:
        with socket.create_connection((POD_IP["cart"], 15008), source_address=(STRANGER, 0)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n")
            read_all(raw)

    line = early_failure(mesh.n2, "ambient_core_tls_handshake_failures", garbage)
    assert line["direction"] == "inbound" and line["transport"] == "HBONE"
    assert line["dst.addr"] == f"{POD_IP['cart']}:15008"
    assert (line["dst.workload"], line["dst.namespace"]) == ("cart", "shop")
    assert "duration_ms" in line
    assert line["error"].startswith(f"TLS handshake with {line['src.addr']} failed")
    assert "does not speak TLS" in line["error"]


def test_a_client_certificate_of_another_trust_domain_has_an_early_line_saying_so(mesh):
    foreign = mesh.ca.issue(spiffe("frontend", "other.domain"))

    def handshake() -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            peer = H2Peer(f"{POD_IP['cart']}:15008", foreign, source=STRANGER)
            with contextlib.closing(peer):
                peer.until_closed(timeout=5)  # TLS 1.3: the refusal comes with the first read

    line = early_failure(mesh.n2, "ambient_core_tls_handshake_failures", handshake)
    assert 'no SPIFFE identity in trust domain "cluster.local"' in line["error"]
    assert spiffe("frontend", "other.domain") in line["error"]


def test_an_http2_handshake_failure_has_an_early_line_saying_so(mesh):
    def bad_preface() -> None:
        peer = H2Peer(
            f"{POD_IP['cart']}:15008",
            mesh.ca.issue(spiffe("frontend")),
            source=STRANGER,
            preface=False,
        )
        with contextlib.closing(peer):
            peer.send_raw(b"PRI * HTTP/1.1\r\n\r\nXX\r\n\r\n")
            peer.until_closed(timeout=5)

    line = early_failure(mesh.n2, "ambient_core_h2_handshake_failures", bad_preface)
    assert line["error"].startswith(f"HTTP/2 handshake with {line['src.addr']} failed")
    assert (line["direction"], line["dst.workload"]) == ("inbound", "cart")


def test_a_refused_socks5_client_has_an_early_line_with_the_reason(mesh):
    def bind_request() -> None:
        with socket.create_connection(
            (POD_IP["frontend"], 15080), source_address=(POD_IP["frontend"], 0)
        ) as raw:
            raw.sendall(b"\x05\x01\x00\x05\x02\x00\x01" + socket.inet_aton(POD_IP["cart"]))
            raw.sendall(struct.pack("!H", 8080))
            raw.shutdown(socket.SHUT_WR)
            assert read_all(raw)[2:4] == b"\x05\x07"  # command not supported

    line = early_failure(
        mesh.n1, "ambient_core_socks5_refused", bind_request, source=POD_IP["frontend"]
    )
    assert line["direction"] == "outbound" and line["transport"] == "TCP"
    assert (line["src.workload"], line["src.namespace"]) == ("frontend", "shop")
    assert line["error"] == "SOCKS5 client refused: SOCKS5: command 2 (only CONNECT)"


def test_a_socks5_client_gone_before_its_reply_is_counted_and_logged(mesh):
    def gone() -> None:
        raw = socket.create_connection(
            (POD_IP["hasty"], 15080), source_address=(POD_IP["hasty"], 0)
        )
        raw.settimeout(5)
        raw.sendall(b"\x05\x01\x00")
        assert raw.recv(2) == b"\x05\x00"
        raw.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(POD_IP["cart"]) + b"\x1f\x90")
        # Reset, not FIN: the reply the proxy writes once the tunnel is up then fails.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    line = early_failure(mesh.n1, "ambient_core_socks5_refused", gone, source=POD_IP["hasty"])
    assert line["src.workload"] == "hasty"
    assert line["error"].startswith("the SOCKS5 client went away before its reply")


# --- the same rules at the API level --------------------------------------------------------------


def test_a_decision_that_raises_is_reported_early_with_the_exception(
    dataplane_factory, server_cert, client_cert
):
    """Hard to provoke in ztunnel; at the API: 500, a report with no subject whose error holds
    the exception, and decision_errors counted."""
    server = dataplane_factory(1)
    server.load_identity(server_cert)
    client = dataplane_factory(1)
    client.load_identity(client_cert)
    reports: list[tuple] = []

    def decide(request: Any) -> Any:
        raise RuntimeError("policy bug in the decision")

    listener = server.serve(
        "127.50.11.1:0", server_cert.identity, decide, report=lambda *r: reports.append(r)
    )
    target = HboneTarget(
        listener.local_address, "127.50.11.10:80", [server_cert.identity], client_cert.identity
    )
    with pytest.raises(Exception, match="500"):
        client.connect(target)
    wait_until(lambda: reports, what="the report")
    (report,) = reports
    assert report[0] is None
    assert "RuntimeError" in report[6] and "policy bug in the decision" in report[6]
    assert server.stats()["decision_errors"] == 1


@pytest.mark.parametrize("transport", ["HBONE", "TCP"])
def test_a_connection_cut_at_the_drain_deadline_is_closed_without_a_flag_and_not_failed(
    dataplane_factory, server_cert, client_cert, transport
):
    """A drain whose deadline passes cuts the live connection: closed with "-", no failed
    series, reported with the drain's reason, counted in connections_cut."""
    echo = App("echo", ("127.50.11.20", 0))
    try:
        server = dataplane_factory(1)
        server.load_identity(server_cert)
        counters = Counters()
        reports: list[tuple] = []

        def report(*r: object) -> None:
            reports.append(r)

        if transport == "HBONE":
            listener = server.serve(
                "127.50.11.2:0",
                server_cert.identity,
                Allow(app_address(echo), counters=counters),
                report=report,
            )
            client = dataplane_factory(1)
            client.load_identity(client_cert)
            sock = client.connect(
                HboneTarget(
                    listener.local_address,
                    app_address(echo),
                    [server_cert.identity],
                    client_cert.identity,
                )
            )
        else:
            listener = server.forward(
                "127.50.11.3:0", TcpTarget(app_address(echo), counters=counters), report=report
            )
            host, port = listener.local_address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)))
        with sock:
            assert exchange_some(sock, b"live") == b"live"
            started = time.monotonic()
            assert server.drain(0.3) is False  # something had to be cut
            assert time.monotonic() - started < 10
            wait_until(lambda: reports, what="the cut connection's report")
        snapshot = counters.snapshot()
        assert (snapshot["opened"], snapshot["closed"], snapshot["failed"]) == (1, {"-": 1}, {})
        assert reports[0][6].startswith("cut: the drain deadline passed")
        assert server.stats()["connections_cut"] == 1
    finally:
        echo.close()
