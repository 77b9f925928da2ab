"""Waypoint-aware routing and waypoint binding, table-driven: each case names the rule it shows."""

from __future__ import annotations

import ipaddress
import random
import textwrap

import pytest

from ambient import routing
from ambient.config import load_mesh
from ambient.routing import Transport

ip = ipaddress.ip_address

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bound, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ns-wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: svc-wp, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pod-wp, namespace: app, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ns-wp, namespace: bound, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: empty-wp, namespace: app, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: app}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
"""

PODS = [
    # name, namespace, ip, labels
    ("client", "app", "10.0.1.1", "{}"),
    (
        "svc-wp-1",
        "app",
        "10.0.9.1",
        "{gateway.networking.k8s.io/gateway-name: svc-wp, istio.io/dataplane-mode: none}",
    ),
    (
        "pod-wp-1",
        "app",
        "10.0.9.2",
        "{gateway.networking.k8s.io/gateway-name: pod-wp, istio.io/dataplane-mode: none}",
    ),
    (
        "ns-wp-1",
        "bound",
        "10.0.9.3",
        "{gateway.networking.k8s.io/gateway-name: ns-wp, istio.io/dataplane-mode: none}",
    ),
    ("plain", "app", "10.0.2.1", "{app: plain}"),
    ("watched", "app", "10.0.2.2", "{app: watched, istio.io/use-waypoint: pod-wp}"),
    ("wrong-kind", "app", "10.0.2.3", "{istio.io/use-waypoint: svc-wp}"),
    ("in-bound-ns", "bound", "10.0.3.1", "{app: b}"),
    ("opted-out", "bound", "10.0.3.2", "{istio.io/use-waypoint: none}"),
    (
        "cross-ns",
        "app",
        "10.0.2.4",
        "{istio.io/use-waypoint: ns-wp, istio.io/use-waypoint-namespace: bound}",
    ),
    ("lonely", "app", "10.0.2.5", "{app: lonely, istio.io/use-waypoint: empty-wp}"),
]

SERVICES = [
    # name, namespace, vip, selector, labels
    ("plain-svc", "app", "10.96.0.1", "{app: plain}", "{istio.io/use-waypoint: svc-wp}"),
    ("watched-svc", "app", "10.96.0.2", "{app: watched}", "{}"),
    ("both-svc", "app", "10.96.0.3", "{app: watched}", "{istio.io/use-waypoint: svc-wp}"),
    ("ns-svc", "bound", "10.96.0.4", "{app: b}", "{}"),
    ("bad-svc", "app", "10.96.0.5", "{app: plain}", "{istio.io/use-waypoint: pod-wp}"),
]


def document() -> str:
    text = textwrap.dedent(MESH)
    for name, ns, pod_ip, labels in PODS:
        text += (
            f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, "
            f"labels: {labels}}}\nspec: {{nodeName: n1, serviceAccountName: {name}}}\n"
            f"status: {{podIP: {pod_ip}}}\n"
        )
    for name, ns, vip, selector, labels in SERVICES:
        text += (
            f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns},"
            f" labels: {labels}}}\nspec: {{clusterIP: {vip}, selector: {selector}, "
            f"ports: [{{port: 80, targetPort: 8080}}]}}\n"
        )
    return text


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    path = tmp_path_factory.mktemp("wp") / "mesh.yaml"
    path.write_text(document())
    return load_mesh([path])


def route(mesh, source: str, dst: str, port: int):
    src = next(w for w in mesh.workloads if w.name == source)
    return routing.outbound(mesh, src, ip(dst), port, rng=random.Random(1))


WP = {"svc-wp": "10.0.9.1:15008", "pod-wp": "10.0.9.2:15008", "ns-wp": "10.0.9.3:15008"}

CASES = [
    # rule, source, destination, port, expected dial, authority, waypoint key
    (
        "a Service with a waypoint: HBONE to the waypoint, authority VIP:port",
        "client",
        "10.96.0.1",
        80,
        WP["svc-wp"],
        "10.96.0.1:80",
        "app/svc-wp",
    ),
    (
        "a pod IP whose pod has a waypoint: HBONE to it, authority podIP:port",
        "client",
        "10.0.2.2",
        8080,
        WP["pod-wp"],
        "10.0.2.2:8080",
        "app/pod-wp",
    ),
    (
        "Service traffic skips the pod's own waypoint",
        "client",
        "10.96.0.2",
        80,
        "10.0.2.2:15008",
        "10.0.2.2:8080",
        None,
    ),
    (
        "a Service's waypoint wins over its pod's",
        "client",
        "10.96.0.3",
        80,
        WP["svc-wp"],
        "10.96.0.3:80",
        "app/svc-wp",
    ),
    (
        "traffic from the waypoint itself is not sent back to it",
        "svc-wp-1",
        "10.96.0.1",
        80,
        "10.0.2.1:15008",
        "10.0.2.1:8080",
        None,
    ),
    (
        "traffic from a pod's waypoint goes on to the pod",
        "pod-wp-1",
        "10.0.2.2",
        8080,
        "10.0.2.2:15008",
        "10.0.2.2:8080",
        None,
    ),
    (
        "a namespace label binds its pods",
        "client",
        "10.0.3.1",
        8080,
        WP["ns-wp"],
        "10.0.3.1:8080",
        "bound/ns-wp",
    ),
    (
        "a namespace label binds its Services",
        "client",
        "10.96.0.4",
        80,
        WP["ns-wp"],
        "10.96.0.4:80",
        "bound/ns-wp",
    ),
    (
        "a pod's `none` opts out of its namespace's waypoint",
        "client",
        "10.0.3.2",
        8080,
        "10.0.3.2:15008",
        "10.0.3.2:8080",
        None,
    ),
    (
        "use-waypoint-namespace reaches a waypoint in another namespace",
        "client",
        "10.0.2.4",
        8080,
        WP["ns-wp"],
        "10.0.2.4:8080",
        "bound/ns-wp",
    ),
    (
        "a pod bound to a service-only waypoint is not bound",
        "client",
        "10.0.2.3",
        8080,
        "10.0.2.3:15008",
        "10.0.2.3:8080",
        None,
    ),
    (
        "a Service bound to a workload-only waypoint is not bound",
        "client",
        "10.96.0.5",
        80,
        "10.0.2.1:15008",
        "10.0.2.1:8080",
        None,
    ),
    (
        "a pod without a waypoint label goes direct",
        "client",
        "10.0.2.1",
        8080,
        "10.0.2.1:15008",
        "10.0.2.1:8080",
        None,
    ),
]


@pytest.mark.parametrize(
    ("rule", "src", "dst", "port", "dial", "authority", "waypoint"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_waypoint_rule(mesh, rule, src, dst, port, dial, authority, waypoint):
    decision = route(mesh, src, dst, port)
    assert decision.transport is Transport.HBONE, decision.reason
    assert (decision.dial, decision.authority) == (dial, authority)
    assert (decision.waypoint.key if decision.waypoint else None) == waypoint


def test_the_waypoints_identity_is_expected(mesh):
    decision = route(mesh, "client", "10.96.0.1", 80)
    assert decision.identities == ("spiffe://cluster.local/ns/app/sa/svc-wp-1",)


def test_a_waypoint_without_instances_refuses(mesh):
    decision = route(mesh, "client", "10.0.2.5", 8080)
    assert decision.transport is Transport.DENY
    assert "waypoint app/empty-wp has no ready instance" in decision.reason


def test_bad_bindings_are_warned_about(mesh):
    text = "\n".join(mesh.warnings)
    assert "uses waypoint app/svc-wp, which takes service traffic, not workload" in text
    assert "uses waypoint app/pod-wp, which takes workload traffic, not service" in text
    assert "waypoint app/empty-wp has no pods" in text


def test_only_istio_waypoint_gateways_are_waypoints(mesh):
    assert {w.key for w in mesh.waypoints} == {
        "app/svc-wp",
        "app/pod-wp",
        "bound/ns-wp",
        "app/empty-wp",
    }


def test_waypoint_identities_of_a_pod_cover_its_services_waypoints(mesh):
    watched = next(w for w in mesh.workloads if w.name == "watched")
    assert routing.waypoint_identities(mesh, watched) == {
        "spiffe://cluster.local/ns/app/sa/pod-wp-1",
        "spiffe://cluster.local/ns/app/sa/svc-wp-1",
    }


def test_an_unknown_waypoint_for_value_is_refused(tmp_path):
    from ambient.config import ConfigError

    path = tmp_path / "mesh.yaml"
    path.write_text(
        document().replace("istio.io/waypoint-for: workload", "istio.io/waypoint-for: everything")
    )
    with pytest.raises(ConfigError, match=r"Gateway app/pod-wp.*waypoint-for.*everything"):
        load_mesh([path])


def test_local_config_waypoint_by_address(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text(
        textwrap.dedent("""
        workloads:
        - {uid: c, name: c, namespace: ns, workloadIps: [10.1.0.1], protocol: HBONE}
        - {uid: wp, name: wp, namespace: ns, serviceAccount: wp, workloadIps: [10.1.0.9]}
        - uid: s
          name: s
          namespace: ns
          workloadIps: [10.1.0.2]
          protocol: HBONE
          waypoint: {destination: /10.1.0.9, hboneMtlsPort: 15008}
    """)
    )
    mesh = load_mesh([path])
    client = mesh.workload_by_uid("c")
    decision = routing.outbound(mesh, client, ip("10.1.0.2"), 80, rng=random.Random(0))
    assert (decision.dial, decision.authority) == ("10.1.0.9:15008", "10.1.0.2:80")
    assert decision.identities == ("spiffe://cluster.local/ns/ns/sa/wp",)
