"""Waypoint-aware routing through real ztunnel processes; the waypoint is a stand-in HBONE server
that records what arrives (the waypoint proxy itself is built later)."""

from __future__ import annotations

import contextlib
import socket
import textwrap
import threading

import pytest

from ambient import socks5
from ambient.hbone import Allow, DataPlane, HboneTarget, TunnelError
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-1
  namespace: app
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: wp}
status: {podIP: 127.26.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.26.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: app, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 127.26.1.9}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: app
  labels: {app: web, istio.io/use-waypoint: wp}
  annotations: {ambient.dev/app-address: 127.27.2.1}
spec:
  nodeName: n2
  serviceAccountName: web
  containers: [{name: c, ports: [{containerPort: 8080}]}]
status: {podIP: 127.26.2.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: strict
  namespace: app
  labels: {app: strict, istio.io/use-waypoint: wp}
  annotations: {ambient.dev/app-address: 127.27.2.2, ambient.dev/waypoint-only: "true"}
spec:
  nodeName: n2
  serviceAccountName: strict
  containers: [{name: c, ports: [{containerPort: 8080}]}]
status: {podIP: 127.26.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 127.26.100.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""

WAYPOINT_ID = "spiffe://cluster.local/ns/app/sa/wp"
CLIENT_ID = "spiffe://cluster.local/ns/app/sa/client"
STRICT_ID = "spiffe://cluster.local/ns/app/sa/strict"


class Env:
    def __init__(self, tmp) -> None:
        (tmp / "mesh.yaml").write_text(textwrap.dedent(MESH))
        self.ca = CertificateAuthority.create()
        self.ca.save(tmp / "ca")
        self.apps = [
            App("name:web", ("127.27.2.1", 8080)),
            App("name:strict", ("127.27.2.2", 8080)),
            App("name:waypoint", ("127.27.9.9", 7000)),
        ]
        # The stand-in waypoint: HBONE on its pod IP as the waypoint's identity; it records each
        # CONNECT and answers from its own app (a real waypoint would tunnel on to the pod).
        self.arrived: list[tuple[str | None, str]] = []
        self.lock = threading.Lock()
        self.waypoint = DataPlane(1)
        self.waypoint.load_identity(self.ca.issue(WAYPOINT_ID))
        self.waypoint.serve("127.26.3.1:15008", WAYPOINT_ID, self._record)
        self.nodes = [
            ZtunnelProcess(n, [tmp / "mesh.yaml"], tmp / "ca", tmp).wait_ready()
            for n in ("n1", "n2")
        ]

    def _record(self, request):
        with self.lock:
            self.arrived.append((request.peer_identity, request.authority))
        return Allow("127.27.9.9:7000")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.waypoint.close()
        for app in self.apps:
            app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("waypoints"))
    yield e
    e.close()


def answer(sock: socket.socket) -> str:
    return exchange(sock, b"hi").split(b"\n")[0].decode()


def test_service_traffic_goes_to_the_services_waypoint_with_authority_vip_port(env):
    sock = socks5.connect(("127.26.1.1", 15080), ("127.26.100.1", 80), source="127.26.1.1")
    assert answer(sock) == "waypoint"
    assert env.arrived[-1] == (CLIENT_ID, "127.26.100.1:80")


def test_pod_traffic_goes_to_the_pods_waypoint_with_authority_pod_ip_port(env):
    sock = socks5.connect(("127.26.1.1", 15080), ("127.26.2.1", 8080), source="127.26.1.1")
    assert answer(sock) == "waypoint"
    assert env.arrived[-1] == (CLIENT_ID, "127.26.2.1:8080")


def test_a_source_outside_the_mesh_bypasses_the_waypoint(env):
    # It knows nothing of waypoints: it reaches the pod directly, in plaintext (documented).
    before = len(env.arrived)
    env.nodes[1].new_entries()
    sock = socket.create_connection(
        ("127.26.2.1", 8080), timeout=5, source_address=("127.26.1.9", 0)
    )
    assert answer(sock) == "web"
    assert len(env.arrived) == before
    wait_until(
        lambda: any(
            e["direction"] == "inbound" and e["transport"] == "TCP"
            for e in env.nodes[1].new_entries()
        ),
        what="the plaintext arrival",
    )


@pytest.fixture
def as_identity(env):
    planes = []

    def make(identity: str) -> DataPlane:
        dp = DataPlane(1)
        dp.load_identity(env.ca.issue(identity))
        planes.append(dp)
        return dp

    yield make
    for dp in planes:
        dp.close()


def test_waypoint_only_pod_accepts_its_waypoint(env, as_identity):
    waypoint_hop = as_identity(WAYPOINT_ID)  # the waypoint's second tunnel, to the pod
    plan = HboneTarget("127.26.2.2:15008", "127.26.2.2:8080", [STRICT_ID], WAYPOINT_ID)
    assert answer(waypoint_hop.connect(plan)) == "strict"


def test_waypoint_only_pod_refuses_a_client_skipping_the_waypoint(env, as_identity):
    sneaky = as_identity(CLIENT_ID)
    plan = HboneTarget("127.26.2.2:15008", "127.26.2.2:8080", [STRICT_ID], CLIENT_ID)
    with pytest.raises(TunnelError, match="401"):
        sneaky.connect(plan)


def test_waypoint_only_pod_refuses_plaintext(env):
    sock = socket.create_connection(
        ("127.26.2.2", 8080), timeout=5, source_address=("127.26.1.9", 0)
    )
    with contextlib.suppress(ConnectionResetError):  # or reset, our bytes unread: refused
        assert exchange(sock, b"hi") == b""


def test_the_outbound_access_log_names_the_waypoint(env):
    env.nodes[0].new_entries()
    sock = socks5.connect(("127.26.1.1", 15080), ("127.26.100.1", 80), source="127.26.1.1")
    answer(sock)
    found: list[dict] = []
    wait_until(
        lambda: (
            found.extend(e for e in env.nodes[0].new_entries() if e.get("dst.waypoint"))
            or bool(found)
        ),
        what="an outbound entry through the waypoint",
    )
    assert found[0]["dst.waypoint"] == "app/wp" and found[0]["dst.addr"] == "127.26.3.1:15008"
