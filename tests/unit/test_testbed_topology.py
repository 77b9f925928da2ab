"""The testbed's plan (no root needed): a mesh file becomes namespaces, veths, addresses and
routes laid out by fixed rules, and a mesh the layout cannot hold is refused with the pod and the
expectation named."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.mesh import Mesh, Protocol, Workload
from ambient.testbed import TestbedError
from ambient.testbed.topology import Route, plan

TWO_NODES = """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: w2}
status: {podIP: 10.8.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: w1}
status: {podIP: 10.8.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: legacy
  namespace: shop
  labels: {istio.io/dataplane-mode: none}
spec: {nodeName: w1}
status: {podIP: 10.8.1.9}
"""


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def workload(
    name: str,
    *ips: str,
    node: str = "w1",
    namespace: str = "shop",
    network: str = "",
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}/{network}",
        name=name,
        namespace=namespace,
        ips=tuple(ipaddress.ip_address(i) for i in ips),
        node=node,
        network=network,
        protocol=Protocol.HBONE,
    )


@pytest.fixture
def two_nodes(tmp_path: Path) -> Mesh:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(TWO_NODES))
    return load_mesh([path])


def test_two_nodes_names_and_addresses(two_nodes: Mesh) -> None:
    topo = plan(two_nodes)

    assert topo.underlay_netns == "ambient-underlay"
    assert topo.underlay == net("10.255.0.0/24")
    assert [(n.name, n.netns, n.underlay_ip, n.underlay_veth) for n in topo.nodes] == [
        ("w1", "node-w1", ip("10.255.0.1"), "n0"),
        ("w2", "node-w2", ip("10.255.0.2"), "n1"),
    ]
    # Pods in name order, each netns named exactly after the pod, short veth names.
    assert [
        (p.name, p.namespace, p.node, p.ip, p.in_mesh, p.netns, p.node_veth, p.pod_veth)
        for p in topo.pods
    ] == [
        ("client", "shop", "w1", ip("10.8.1.1"), True, "client", "p0", "eth0"),
        ("legacy", "shop", "w1", ip("10.8.1.9"), False, "legacy", "p1", "eth0"),
        ("web", "shop", "w2", ip("10.8.2.1"), True, "web", "p2", "eth0"),
    ]
    assert topo.pod("web").uid == "Kubernetes//Pod/shop/web"
    assert [p.name for p in topo.node("w1").pods] == ["client", "legacy"]
    assert [p.name for p in topo.node("w2").pods] == ["web"]
    assert all(len(p.node_veth) <= 15 for p in topo.pods)


def test_two_nodes_routes(two_nodes: Mesh) -> None:
    topo = plan(two_nodes)

    # Each node: its own pods on their veths, the others' via the node that has them.
    assert topo.node("w1").routes == (
        Route(net("10.8.1.1/32"), dev="p0"),
        Route(net("10.8.1.9/32"), dev="p1"),
        Route(net("10.8.2.1/32"), dev="eth0", via=ip("10.255.0.2")),
    )
    assert topo.node("w2").routes == (
        Route(net("10.8.1.1/32"), dev="eth0", via=ip("10.255.0.1")),
        Route(net("10.8.1.9/32"), dev="eth0", via=ip("10.255.0.1")),
        Route(net("10.8.2.1/32"), dev="p2"),
    )
    assert topo.node("w2").routes[0].ip_args() == [
        "10.8.1.1/32",
        "via",
        "10.255.0.1",
        "dev",
        "eth0",
    ]
    assert topo.node("w2").routes[2].ip_args() == ["10.8.2.1/32", "dev", "p2"]


def test_underlay_is_chosen_by_the_caller(two_nodes: Mesh) -> None:
    topo = plan(two_nodes, underlay="192.168.50.0/28", underlay_netns="lab-underlay")
    assert topo.underlay == net("192.168.50.0/28")
    assert [str(n.underlay_ip) for n in topo.nodes] == ["192.168.50.1", "192.168.50.2"]
    assert topo.underlay_netns == "lab-underlay"
    with pytest.raises(TestbedError, match=r"^pod shop/client: its netns would be named 'client'"):
        plan(two_nodes, underlay_netns="client")
    with pytest.raises(TestbedError, match=r"^the underlay: 'a b' is not a valid netns name"):
        plan(two_nodes, underlay_netns="a b")


def test_every_workload_with_a_node_gets_a_netns() -> None:
    # A waypoint's pod is a pod like any other here.
    waypoint = workload("waypoint-7d9f", "10.8.3.1", node="w3", namespace="infra")
    topo = plan(Mesh(workloads=(workload("a", "10.8.1.1"), waypoint)))
    assert [p.netns for p in topo.pods] == ["a", "waypoint-7d9f"]
    assert [n.netns for n in topo.nodes] == ["node-w1", "node-w3"]


def test_the_layout_follows_names_not_the_order_of_the_file(tmp_path: Path) -> None:
    # The same pods written in reverse order get the same netns, veths and addresses: nodes and
    # pods are laid out in name order, whatever order the file lists them in.
    path = tmp_path / "reversed.yaml"
    path.write_text("\n---\n".join(reversed(textwrap.dedent(TWO_NODES).split("\n---\n"))))
    topo = plan(load_mesh([path]))
    assert [(n.name, n.underlay_ip, n.underlay_veth) for n in topo.nodes] == [
        ("w1", ip("10.255.0.1"), "n0"),
        ("w2", ip("10.255.0.2"), "n1"),
    ]
    assert [(p.name, p.node, p.node_veth) for p in topo.pods] == [
        ("client", "w1", "p0"),
        ("legacy", "w1", "p1"),
        ("web", "w2", "p2"),
    ]


@pytest.mark.parametrize(
    ("workloads", "message"),
    [
        (
            [workload("a", "10.8.1.1", node="")],
            r"^pod shop/a has no spec.nodeName; the testbed needs every pod on a node$",
        ),
        (
            [workload("a")],
            r"^pod shop/a: expected exactly one IPv4 status.podIP, got none$",
        ),
        (
            [workload("a", "fd00::1")],
            r"^pod shop/a has the IPv6 podIP fd00::1; the testbed supports IPv4 pods only$",
        ),
        (
            [workload("a", "10.8.1.1", "fd00::1")],
            r"IPv6 podIP fd00::1; the testbed supports IPv4 pods only",
        ),
        (
            [workload("a", "10.8.1.1"), workload("a", "10.8.1.2", namespace="other")],
            r"^pods shop/a and other/a are both named 'a'; .*pod names must be unique across "
            r"namespaces$",
        ),
        (
            [workload("bad/name", "10.8.1.1")],
            r"^pod shop/bad/name: 'bad/name' is not a valid netns name; expected letters",
        ),
        (
            [workload("..", "10.8.1.1")],
            r"^pod shop/..: '..' is not a valid netns name",
        ),
        (
            [workload("x" * 256, "10.8.1.1")],
            r"is not a valid netns name; .* at most 255 characters$",
        ),
        (
            [workload("a", "10.255.0.7")],
            r"^pod shop/a has podIP 10.255.0.7, inside the underlay 10.255.0.0/24 between the "
            r"nodes; expected a pod IP outside it$",
        ),
        (
            [workload("a", "10.8.1.1"), workload("b", "10.8.1.1", network="net2")],
            r"^pods shop/a and shop/b both have podIP 10.8.1.1; expected unique pod IPs$",
        ),
        (
            [workload("a", "127.10.1.1")],
            r"^pod shop/a has podIP 127.10.1.1, a loopback address .*; expected a routable",
        ),
        (
            [workload("a", "169.254.1.1")],
            r"^pod shop/a has podIP 169.254.1.1, link-local .*; expected a routable",
        ),
        (
            [workload("node-w1", "10.8.1.1")],
            r"^pod shop/node-w1: its netns would be named 'node-w1', like the testbed's netns of "
            r"node 'w1'; netns names must be unique",
        ),
        (
            [workload("ambient-underlay", "10.8.1.1")],
            r"like the testbed's underlay netns",
        ),
        (
            [workload("a", "10.8.1.1", node="w/1")],
            r"^node 'w/1': 'node-w/1' is not a valid netns name",
        ),
    ],
    ids=[
        "no-node",
        "no-ipv4",
        "ipv6",
        "dual-stack",
        "same-name-two-namespaces",
        "slash-in-name",
        "dot-dot",
        "too-long",
        "ip-in-underlay",
        "duplicate-ip",
        "loopback-ip",
        "link-local-ip",
        "name-of-a-node-netns",
        "name-of-the-underlay",
        "bad-node-name",
    ],
)
def test_refused(workloads: list[Workload], message: str) -> None:
    with pytest.raises(TestbedError, match=message):
        plan(Mesh(workloads=tuple(workloads)))


def test_pod_names_that_merely_look_like_node_netns_are_fine() -> None:
    # A DaemonSet pod such as node-exporter-x on node "w1" clashes with nothing.
    topo = plan(Mesh(workloads=(workload("node-exporter-x", "10.8.1.1"),)))
    assert [p.netns for p in topo.pods] == ["node-exporter-x"]


def test_underlay_refused_when_not_ipv4_or_too_small() -> None:
    mesh = Mesh(workloads=(workload("a", "10.8.1.1"), workload("b", "10.8.2.1", node="w2")))
    with pytest.raises(TestbedError, match=r"^underlay 'fd00::/64': expected an IPv4 CIDR"):
        plan(mesh, underlay="fd00::/64")
    with pytest.raises(TestbedError, match=r"^underlay 10.9.0.0/30 has room for 2 nodes"):
        plan(
            Mesh(workloads=(*mesh.workloads, workload("c", "10.8.3.1", node="w3"))),
            underlay="10.9.0.0/30",
        )
