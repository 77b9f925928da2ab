"""ztunnel end to end on loopback: real ``ambient ztunnel`` processes (one per node), real TCP,
applications that know nothing of the mesh. Each test names the routing rule it shows."""

from __future__ import annotations

import socket
import textwrap
import time
from collections import Counter

import pytest

from ambient import socks5
from ambient.hbone import DataPlane, HboneTarget, TunnelError
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange
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
status: {podIP: 127.20.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: default, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 127.20.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: neighbour, namespace: default}
spec: {nodeName: n2, serviceAccountName: neighbour}
status: {podIP: 127.20.2.5}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: default
  labels: {app: web}
  annotations: {ambient.dev/app-address: 127.21.2.1}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.20.2.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: default
  labels: {app: web}
  annotations: {ambient.dev/app-address: 127.21.2.2}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.20.2.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-sick
  namespace: default
  labels: {app: web}
  annotations: {ambient.dev/app-address: 127.21.2.3}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 127.20.2.3, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default, labels: {app: legacy, istio.io/dataplane-mode: none}}
spec: {nodeName: n2}
status: {podIP: 127.20.2.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 127.20.100.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec: {clusterIP: 127.20.100.2, selector: {app: legacy}, ports: [{port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: default}
spec: {clusterIP: 127.20.100.3, selector: {app: nobody}, ports: [{port: 80}]}
"""

CLIENT_IP, OUTSIDER_IP, NEIGHBOUR_IP = "127.20.1.1", "127.20.1.9", "127.20.2.5"
WEB_VIP, LEGACY_VIP, EMPTY_VIP = "127.20.100.1", "127.20.100.2", "127.20.100.3"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


class Mesh:
    def __init__(self, tmp) -> None:
        self.dir = tmp
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(textwrap.dedent(MESH))
        self.ca = CertificateAuthority.create("cluster.local")
        self.ca.save(tmp / "ca")
        self.apps = {
            "web-1": App("name:web-1", ("127.21.2.1", 8080)),
            "web-2": App("name:web-2", ("127.21.2.2", 8080)),
            "web-sick": App("name:web-sick", ("127.21.2.3", 8080)),
            "legacy": App("name:legacy", ("127.20.2.9", 9090)),  # outside the mesh: its own IP
            "external": App("name:external", ("127.20.9.9", 7000)),  # not in the mesh file at all
        }
        self.nodes = {n: ZtunnelProcess(n, [self.mesh_file], tmp / "ca", tmp) for n in ("n1", "n2")}
        for node in self.nodes.values():
            node.wait_ready()

    def close(self) -> None:
        codes = [node.stop() for node in self.nodes.values()]
        for app in self.apps.values():
            app.close()
        assert codes == [0, 0]  # both drained and exited cleanly

    def entries(self, node: str, predicate, timeout: float = 5.0) -> list[dict]:
        """Access log lines of ``node`` matching ``predicate`` (waits until there is one)."""
        found: list[dict] = []
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline:
            found = [e for e in self.nodes[node].new_entries() if predicate(e)]
            if not found:
                time.sleep(0.02)
        return found


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = Mesh(tmp_path_factory.mktemp("ztunnel"))
    yield env
    env.close()


def via(pod_ip: str, host: str, port: int) -> socket.socket:
    """Connect as the pod at ``pod_ip``, through its ztunnel's SOCKS5 port."""
    return socks5.connect((pod_ip, 15080), (host, port), source=pod_ip)


def talk(sock: socket.socket, payload: bytes = b"ping") -> tuple[str, bytes]:
    """Send, half-close, read: returns (replica name, echoed bytes)."""
    answer = exchange(sock, payload)
    name, _, rest = answer.partition(b"\n")
    return name.decode(), rest


def test_a_service_vip_reaches_one_of_its_endpoints_and_spreads_over_all_healthy_ones(mesh):
    names = Counter(talk(via(CLIENT_IP, WEB_VIP, 80))[0] for _ in range(24))
    assert set(names) == {"web-1", "web-2"}, names  # web-sick (not Ready) is never chosen
    assert min(names.values()) >= 3


def test_a_pod_ip_reaches_that_pod(mesh):
    assert talk(via(CLIENT_IP, "127.20.2.2", 8080)) == ("web-2", b"ping")


def test_in_mesh_traffic_is_hbone_and_the_destination_sees_the_source_identity(mesh):
    mesh.nodes["n2"].new_entries()
    assert talk(via(CLIENT_IP, "127.20.2.1", 8080), b"x" * 100_000)[1] == b"x" * 100_000
    # Lines of the earlier tests' connections may still come: pick this one by its size.
    (entry,) = mesh.entries(
        "n2", lambda e: e["direction"] == "inbound" and e["bytes_recv"] == 100_000
    )
    assert entry["transport"] == "HBONE"
    assert entry["src.identity"] == CLIENT_ID and entry["src.workload"] == "client"
    # Istio's fields: dst.addr is the HBONE hop, dst.hbone_addr the target; bytes_sent on the
    # destination side is what went back to the client.
    assert entry["dst.workload"] == "web-1" and entry["dst.addr"] == "127.20.2.1:15008"
    assert entry["dst.hbone_addr"] == "127.20.2.1:8080"
    assert entry["bytes_sent"] == 100_006 and entry["bytes_recv"] == 100_000
    assert mesh.apps["web-1"].peers[-1][0] == CLIENT_IP  # the app sees the client's own IP


def test_a_service_hostname_resolves_to_its_vip(mesh):
    assert talk(via(CLIENT_IP, "web.default.svc.cluster.local", 80))[0] in {"web-1", "web-2"}


def test_out_of_mesh_source_arrives_in_plaintext_without_identity(mesh):
    mesh.nodes["n2"].new_entries()
    sock = socket.create_connection(("127.20.2.1", 8080), source_address=(OUTSIDER_IP, 0))
    assert talk(sock) == ("web-1", b"ping")
    (entry,) = mesh.entries(
        "n2",
        lambda e: e["direction"] == "inbound" and e["src.addr"].startswith(f"{OUTSIDER_IP}:"),
    )
    assert entry["transport"] == "TCP" and "src.identity" not in entry
    assert entry["src.workload"] == "outsider"


def test_in_mesh_to_out_of_mesh_leaves_as_plain_tcp(mesh):
    mesh.nodes["n1"].new_entries()
    assert talk(via(CLIENT_IP, LEGACY_VIP, 80)) == ("legacy", b"ping")
    (entry,) = mesh.entries(
        "n1", lambda e: e["direction"] == "outbound" and e.get("dst.workload") == "legacy"
    )
    assert entry["transport"] == "TCP"
    assert mesh.apps["legacy"].peers[-1][0] == CLIENT_IP


def test_unknown_destination_is_passed_through(mesh):
    mesh.nodes["n1"].new_entries()
    assert talk(via(CLIENT_IP, "127.20.9.9", 7000)) == ("external", b"ping")
    (entry,) = mesh.entries(
        "n1", lambda e: e["direction"] == "outbound" and e["dst.addr"] == "127.20.9.9:7000"
    )
    assert entry["transport"] == "TCP" and "dst.workload" not in entry


def test_local_traffic_goes_through_the_same_ztunnel_over_hbone(mesh):
    mesh.nodes["n2"].new_entries()
    name, _ = talk(via(NEIGHBOUR_IP, WEB_VIP, 80))
    entries = mesh.entries("n2", lambda e: e.get("src.workload") == "neighbour")
    deadline = time.monotonic() + 5
    while len(entries) < 2 and time.monotonic() < deadline:
        entries += mesh.entries("n2", lambda e: e.get("src.workload") == "neighbour", 0.5)
    assert {(e["direction"], e["transport"]) for e in entries} == {
        ("outbound", "HBONE"),
        ("inbound", "HBONE"),
    }
    inbound = next(e for e in entries if e["direction"] == "inbound")
    assert inbound["src.identity"] == "spiffe://cluster.local/ns/default/sa/neighbour"
    assert inbound["dst.workload"] == name
    # Both sides log the endpoint ztunnel picked as the CONNECT target, as Istio's do; the
    # VIP the client dialed is not what crossed the wire.
    outbound = next(e for e in entries if e["direction"] == "outbound")
    endpoint = {"web-1": "127.20.2.1:8080", "web-2": "127.20.2.2:8080"}[name]
    assert outbound["dst.hbone_addr"] == inbound["dst.hbone_addr"] == endpoint
    assert outbound["dst.addr"] == inbound["dst.addr"] == endpoint.replace("8080", "15008")


def test_a_service_without_ready_endpoints_is_refused(mesh):
    with pytest.raises(socks5.Socks5Error, match="not allowed"):
        via(CLIENT_IP, EMPTY_VIP, 80)
    assert talk(via(CLIENT_IP, WEB_VIP, 80))[1] == b"ping"  # and the proxy serves on


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15080])
def test_requests_to_the_proxys_own_ports_are_refused(mesh, port):
    with pytest.raises(socks5.Socks5Error):
        via(CLIENT_IP, CLIENT_IP, port)  # its own pod IP: refused before leaving
    with pytest.raises(socks5.Socks5Error):
        via(CLIENT_IP, "127.20.2.1", port)  # another pod's proxy port: refused by its ztunnel


@pytest.fixture
def hbone_client(mesh):
    """A data plane speaking as the client pod, with a certificate from the mesh's CA."""
    dp = DataPlane(1)
    cert = mesh.ca.issue(CLIENT_ID)
    dp.load_identity(cert)
    yield dp
    dp.close()


def test_hbone_authority_that_is_not_the_pod_gets_400(mesh, hbone_client):
    # hbone_ip_mismatch: dialing web-1's 15008 but naming web-2 as the target.
    plan = HboneTarget("127.20.2.1:15008", "127.20.2.2:8080", [WEB_ID], CLIENT_ID)
    with pytest.raises(TunnelError, match="400"):
        hbone_client.connect(plan)
    good = HboneTarget("127.20.2.1:15008", "127.20.2.1:8080", [WEB_ID], CLIENT_ID)
    assert talk(hbone_client.connect(good))[0] == "web-1"


def test_a_peer_from_another_trust_domain_is_refused(mesh, hbone_client):
    foreign = mesh.ca.issue("spiffe://other.domain/ns/default/sa/client")
    hbone_client.load_identity(foreign)
    plan = HboneTarget("127.20.2.1:15008", "127.20.2.1:8080", [WEB_ID], foreign.identity)
    with pytest.raises(TunnelError, match="refused our certificate"):
        hbone_client.connect(plan)


def test_a_server_with_another_identity_is_refused_by_the_client(mesh, hbone_client):
    plan = HboneTarget(
        "127.20.2.1:15008",
        "127.20.2.1:8080",
        ["spiffe://cluster.local/ns/default/sa/not-web"],
        CLIENT_ID,
    )
    with pytest.raises(TunnelError, match="server identity mismatch"):
        hbone_client.connect(plan)


def test_admin_reports_ready_and_dumps_config_without_keys(mesh):
    import urllib.request

    admin = mesh.nodes["n2"].admin
    readiness = mesh.nodes["n2"].readiness
    with urllib.request.urlopen(f"http://{readiness}/healthz/ready", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=5) as r:
        body = r.read()
    assert b"PRIVATE KEY" not in body
    import orjson

    dump = orjson.loads(body)
    assert dump["node"] == "n2"
    assert sorted(dump["servedPods"]) == [
        "default/neighbour",
        "default/web-1",
        "default/web-2",
        "default/web-sick",
    ]
    assert {w["name"] for w in dump["workloads"]} >= {"client", "web-1", "legacy"}
    assert {c["identity"] for c in dump["certificates"]} == {
        WEB_ID,
        "spiffe://cluster.local/ns/default/sa/neighbour",
    }


def test_several_ztunnels_share_one_host_without_port_clashes(mesh):
    assert mesh.nodes["n1"].admin != mesh.nodes["n2"].admin
    assert all(node.process.poll() is None for node in mesh.nodes.values())
