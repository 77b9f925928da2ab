"""The seed's second figure on network namespaces, transparent: curl in an in-mesh pod asks a
Service bound to a waypoint; istio-cni's rules capture it into its node's ztunnel, which tunnels
it to the waypoint pod (its own namespace, its own ``ambient waypoint``), which routes it by the
seed's HTTPRoute and tunnels it on to the chosen pod's ztunnel. A pod outside the mesh asking the
pod IP bypasses the waypoint. Nothing in the pods knows of the mesh."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest

from ambient.testbed import netns
from ambient.testbed.pods import metrics
from ambient.testbed.testbed import Testbed, running
from ambient.testing import HttpEcho

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: w1, serviceAccountName: waypoint}
status: {podIP: 10.41.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: c1, namespace: default}
spec: {nodeName: w1, serviceAccountName: c1}
status: {podIP: 10.41.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: default, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: w1}
status: {podIP: 10.41.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v1, namespace: default, labels: {app: echo, version: v1}}
spec:
  nodeName: w2
  serviceAccountName: echo
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.41.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v1-b, namespace: default, labels: {app: echo, version: v1}}
spec:
  nodeName: w1
  serviceAccountName: echo
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.41.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, namespace: default, labels: {app: echo, version: v2}}
spec:
  nodeName: w2
  serviceAccountName: echo
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.41.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.97.0.10
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: default}
spec:
  clusterIP: 10.97.0.11
  selector: {app: echo, version: v1}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
"""

WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"
C1_ID = "spiffe://cluster.local/ns/default/sa/c1"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    workdir = tmp_path_factory.mktemp("testbed-waypoint")
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(MESH)
    with running([mesh_file], workdir) as testbed:
        yield testbed
    for name in ("c1", "waypoint-1", "node-w1", "ambient-underlay"):
        assert not netns.exists(name), f"netns {name} left behind"


@pytest.fixture(scope="module")
def pods(bed: Testbed) -> Iterator[None]:
    servers = [
        netns.in_netns(pod, lambda pod=pod: HttpEcho(pod, ("0.0.0.0", 8080)))
        for pod in ("echo-v1", "echo-v1-b", "echo-v2")
    ]
    yield
    for server in servers:
        server.close()


def curl(pod: str, url: str, *headers: str) -> dict:
    argv = ["ip", "netns", "exec", pod, "curl", "-sS", "-m", "10", "--fail", url]
    for header in headers:
        argv += ["-H", header]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def test_a_request_to_the_service_goes_through_the_waypoint_to_echo_v1(bed, pods):
    bed.waypoint("waypoint-1").forget_entries()
    answered = Counter(curl("c1", "http://10.97.0.10/seed")["pod"] for _ in range(16))
    # The seed's route: every request to echo-v1's pods, on both nodes.
    assert set(answered) == {"echo-v1", "echo-v1-b"}
    entries = bed.waypoint("waypoint-1").claim_entries(lambda e: e.get("path") == "/seed")
    assert len(entries) == 16
    assert {e["downstream_peer_uri_san"] for e in entries} == {C1_ID}
    assert {e["route_name"] for e in entries} == {"default/echo#0"}
    assert {e["downstream_remote_address"].split(":")[0] for e in entries} == {"10.41.1.1"}


def test_the_destination_ztunnel_saw_the_waypoint(bed, pods):
    # Until echo-v1, on w2, has answered (its replica on w1 may take the first requests).
    assert any(curl("c1", "http://10.97.0.10/whoami")["pod"] == "echo-v1" for _ in range(20))
    text = metrics(bed, "w2")
    opened = [
        line
        for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and 'destination_version="v1"' in line  # echo-v1 is w2's only v1 pod
    ]
    assert opened and all(f'source_principal="{WAYPOINT_ID}"' in line for line in opened)


def test_a_pod_outside_the_mesh_asking_the_pod_ip_bypasses_the_waypoint(bed, pods):
    bed.waypoint("waypoint-1").forget_entries()
    seen = curl("outside", "http://10.41.2.1:8080/bypass")
    assert seen["pod"] == "echo-v1"
    assert "x-request-id" not in seen["headers"]  # no waypoint read it
    assert (
        bed.waypoint("waypoint-1").claim_entries(lambda e: e.get("path") == "/bypass", timeout=1.0)
        == []
    )
