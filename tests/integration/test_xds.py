"""Delta xDS between ambient's control plane and ambient's ztunnel, over real gRPC and TLS on
loopback: every message flow in process (initial snapshot, delta add, update, removal, NACK with
the last good state kept, reconnect and resubscribe with the versions held), then processes:
``ambient control-plane --config`` serving two ``ambient ztunnel --xds-address`` with no mesh
file of their own, traffic between them, and a policy pushed while it runs."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from ambient import socks5
from ambient.config import load_mesh
from ambient.identity import CertificateAuthority
from ambient.identity.istio_ca import IstioCaServer
from ambient.mesh import Mesh
from ambient.testbed.control_plane import ControlPlaneProcess
from ambient.testing import App, exchange, wait_until
from ambient.xds import messages as m
from ambient.xds.client import XdsClient
from ambient.xds.server import XdsServer
from ambient.xds.translate import resources
from ambient.ztunnel.process import ZtunnelProcess

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.73.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.73.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 127.73.100.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

EXTRA_POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.73.2.2}
"""

DENY_CLIENT = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
"""


def mesh_of(tmp_path: Path, text: str) -> Mesh:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(text))
    return load_mesh([path])


class Applied:
    """What the client applied, in order."""

    def __init__(self) -> None:
        self.meshes: list[Mesh] = []
        self.lock = threading.Lock()

    def __call__(self, mesh: Mesh) -> None:
        with self.lock:
            self.meshes.append(mesh)

    @property
    def last(self) -> Mesh:
        return self.meshes[-1]

    def pods(self) -> set[str]:
        return {w.name for w in self.last.workloads}


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


def serve(ca: CertificateAuthority, xds: XdsServer, address: str = "127.0.0.1:0") -> IstioCaServer:
    return IstioCaServer(ca, address, handlers=(xds.handler(),)).start()


def connect(server: IstioCaServer, applied: Applied) -> XdsClient:
    return XdsClient(server.address, server.ca.roots_pem, applied, node="n1").start()


def test_every_delta_flow(tmp_path: Path, ca: CertificateAuthority) -> None:
    mesh = mesh_of(tmp_path, MESH)
    xds = XdsServer(mesh)
    server = serve(ca, xds)
    applied = Applied()
    client = connect(server, applied)
    try:
        # Initial snapshot: both types answered, then applied; every resource sent.
        wait_until(client.first_snapshot.is_set, timeout=10, what="the first snapshot")
        assert applied.pods() == {"client", "web"}
        (web,) = applied.last.services
        assert web.hostname == "web.default.svc.cluster.local" and len(web.endpoints) == 1
        wait_until(lambda: xds.acks >= 2, timeout=5, what="the ACKs")
        # Delta add: only the new pod (and the Service it now backs) travel.
        xds.update(mesh_of(tmp_path, MESH + EXTRA_POD))
        wait_until(lambda: "web-2" in applied.pods(), timeout=5, what="the added pod")
        assert xds.sent[-1] == (m.ADDRESS_TYPE, 1, 0), xds.sent
        # Update: a policy, and the two pods it selects now naming it; the policy first, so a
        # client never holds a workload naming a policy it does not know.
        xds.update(mesh_of(tmp_path, MESH + EXTRA_POD + DENY_CLIENT))
        wait_until(lambda: applied.last.policies, timeout=5, what="the policy")
        assert applied.last.policies[0].key == "default/no-client"
        wait_until(lambda: len(xds.sent) >= 4, timeout=5)
        assert xds.sent[-2:] == [(m.AUTHORIZATION_TYPE, 1, 0), (m.ADDRESS_TYPE, 2, 0)], xds.sent
        # Removal: the pod goes as a removed name.
        xds.update(mesh_of(tmp_path, MESH + DENY_CLIENT))
        wait_until(lambda: "web-2" not in applied.pods(), timeout=5, what="the removal")
        assert (m.ADDRESS_TYPE, 0, 1) in xds.sent[-2:], xds.sent
        # A policy removed: the workload stops naming it first, then it goes.
        xds.update(mesh_of(tmp_path, MESH))
        wait_until(lambda: not applied.last.policies, timeout=5, what="the policy's removal")
        assert xds.sent[-2:] == [(m.ADDRESS_TYPE, 1, 0), (m.AUTHORIZATION_TYPE, 0, 1)], xds.sent
        assert not xds.nacks and client.nacks == 0
    finally:
        client.stop()
        server.stop()


def test_a_refused_update_is_nacked_with_its_reason_and_the_last_good_state_kept(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    mesh = mesh_of(tmp_path, MESH)
    xds = XdsServer(mesh)
    server = serve(ca, xds)
    applied = Applied()
    client = connect(server, applied)
    try:
        wait_until(client.first_snapshot.is_set, timeout=10)
        addresses, authorizations = resources(mesh)
        bad = m.Address(workload=m.Workload(uid="bad", name="bad", addresses=[b"\x01\x02\x03"]))
        xds.publish({**addresses, "bad": bad}, authorizations)
        wait_until(lambda: xds.nacks, timeout=5, what="the NACK")
        assert "workload bad: addresses: 3 bytes" in xds.nacks[0]
        assert client.nacks == 1 and applied.pods() == {"client", "web"}
        # The next good snapshot is taken whole.
        xds.update(mesh_of(tmp_path, MESH + EXTRA_POD))
        wait_until(lambda: "web-2" in applied.pods(), timeout=5, what="the good update")
        assert "bad" not in applied.pods()
    finally:
        client.stop()
        server.stop()


def test_reconnect_resubscribes_with_what_it_holds(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    mesh = mesh_of(tmp_path, MESH)
    first = XdsServer(mesh)
    server = serve(ca, first)
    address = server.address
    applied = Applied()
    client = connect(server, applied)
    try:
        wait_until(client.first_snapshot.is_set, timeout=10)
        server.stop()
        wait_until(lambda: client.error is not None, timeout=10, what="the stream to fail")
        assert client.pending() == [], "a snapshot is held: still ready"
        # Back with one pod more: the client says what it has, and gets only the difference.
        second = XdsServer(mesh_of(tmp_path, MESH + EXTRA_POD))
        server = serve(ca, second, address)
        wait_until(lambda: "web-2" in applied.pods(), timeout=20, what="the resubscription")
        assert (m.ADDRESS_TYPE, 1, 0) in second.sent and (m.AUTHORIZATION_TYPE, 0, 0) in second.sent
        assert client.status()["connected"]
    finally:
        client.stop()
        server.stop()


def test_a_client_without_a_server_is_not_ready_and_says_why(ca: CertificateAuthority) -> None:
    applied = Applied()
    client = XdsClient("127.0.0.1:1", ca.roots_pem, applied, node="n1").start()
    try:
        wait_until(lambda: client.error is not None, timeout=10)
        (said,) = client.pending()
        assert said.startswith("xDS: waiting for the first snapshot from 127.0.0.1:1: UNAVAILABLE")
    finally:
        client.stop()


# --- processes --------------------------------------------------------------------------------


def test_ztunnels_fed_by_the_control_plane_carry_traffic_and_take_a_pushed_policy(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.create("cluster.local")
    ca.save(tmp_path / "ca")
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(MESH))
    control_plane = ControlPlaneProcess(
        [tmp_path / "mesh.yaml"], tmp_path / "ca", "127.0.0.1:0"
    ).wait_ready()
    # xDS has no loopback-mode app address: the app listens on the pod's own IP.
    app = App("name:web", ("127.73.2.1", 8080))
    nodes: list[ZtunnelProcess] = []
    try:
        for node in ("n1", "n2"):
            nodes.append(
                ZtunnelProcess(
                    node,
                    [],  # no mesh file: the mesh comes over xDS
                    tmp_path / "no-such-ca",
                    tmp_path,
                    "--xds-address", control_plane.address,
                    "--ca-address", control_plane.address,
                    "--ca-root-cert", str(tmp_path / "ca" / "root-cert.pem"),
                ).wait_ready()
            )  # fmt: skip

        def ask() -> bytes:
            sock = socks5.connect(("127.73.1.1", 15080), ("127.73.100.1", 80), source="127.73.1.1")
            return exchange(sock, b"hello")

        assert ask().endswith(b"hello")
        # A DENY policy pushed while traffic runs: new connections are refused.
        results: list[Any] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    results.append(ask())
                except OSError as e:
                    results.append(e)

        runner = threading.Thread(target=traffic)
        runner.start()
        try:
            wait_until(lambda: len(results) > 5, timeout=10)
            with open(tmp_path / "mesh.yaml", "a") as f:
                f.write(textwrap.dedent(DENY_CLIENT))
            wait_until(
                lambda: any(isinstance(r, OSError) for r in results[-3:]),
                timeout=15,
                what="the pushed policy to refuse the client",
            )
        finally:
            stop.set()
            runner.join()
        with pytest.raises(OSError):
            ask()
    finally:
        for n in nodes:
            n.stop()
        app.close()
        said = control_plane.stop()
    assert "NACKs 0" in said, said
