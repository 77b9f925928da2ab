"""The waypoint's own certificate is renewed before it expires: with a 3-second lifetime, new
HBONE connections to the waypoint and from it keep working well past the first certificate's
end, and the admin endpoint shows a newer one."""

from __future__ import annotations

import http.client
import json
import textwrap
import time
import urllib.request

import pytest

from ambient import socks5
from ambient.identity import CertificateAuthority
from ambient.testing import HttpEcho, wait_until
from ambient.waypoint.process import WaypointProcess
from ambient.ztunnel.process import ZtunnelProcess

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: n3, serviceAccountName: waypoint}
status: {podIP: 127.64.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.64.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: default
  labels: {app: echo}
  annotations: {ambient.dev/app-address: 127.65.2.1}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.64.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 127.64.100.1
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
TTL = 3.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("waypoint-certs")
    (tmp / "mesh.yaml").write_text(textwrap.dedent(MESH))
    CertificateAuthority.create().save(tmp / "ca")
    app = HttpEcho("echo-1", ("127.65.2.1", 8080))
    mesh = [tmp / "mesh.yaml"]
    nodes = [ZtunnelProcess(n, mesh, tmp / "ca", tmp).wait_ready() for n in ("n1", "n2")]
    waypoint = WaypointProcess(
        "default/waypoint", mesh, tmp / "ca", tmp, "--certificate-ttl", str(TTL)
    ).wait_ready()
    yield tmp, nodes, waypoint
    for proc in [*nodes, waypoint]:
        proc.stop()
    app.close()


def certificate(waypoint: WaypointProcess) -> dict[str, str]:
    with urllib.request.urlopen(f"http://{waypoint.admin}/config_dump", timeout=5) as r:
        (cert,) = json.loads(r.read())["certificates"]
    return cert


def get(path: str) -> int:
    conn = http.client.HTTPConnection("127.64.100.1", 80, timeout=10)
    conn.sock = socks5.connect(("127.64.1.1", 15080), ("127.64.100.1", 80), source="127.64.1.1")
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_the_waypoint_renews_its_certificate_and_keeps_serving(env):
    tmp, nodes, waypoint = env
    first = certificate(waypoint)
    assert first["identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert get("/before") == 200
    wait_until(lambda: certificate(waypoint)["notAfter"] != first["notAfter"], timeout=10)
    # Past the first certificate's end: fresh connections only work with a renewed one. The
    # ztunnels are restarted so that the client's ztunnel dials the waypoint anew.
    time.sleep(TTL)
    for i, node in enumerate(nodes):
        node.stop()
        nodes[i] = ZtunnelProcess(node.node, [tmp / "mesh.yaml"], tmp / "ca", tmp).wait_ready()
    assert get("/after") == 200
