"""The testbed's plan: which namespaces, links, addresses and routes a mesh becomes. Pure — it
only reads the mesh — so every rule of the layout is unit-testable without root.

The layout is a routed one, as most CNIs build it: each node is a netns with ``eth0`` on a shared
underlay bridge; each pod is a netns whose ``eth0`` holds its pod IP as a /32 and whose default
route goes to a link-local gateway the node answers for (proxy ARP on the node's end of the veth).
Nodes route pod IPs — their own pods' to the veths, other nodes' pods' to those nodes — so no
address is ever translated and a server sees its client's real pod IP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..mesh import Mesh, Workload
from .errors import TestbedError

UNDERLAY_NETNS = "ambient-underlay"
DEFAULT_UNDERLAY = "10.255.0.0/24"
UNDERLAY_BRIDGE = "br0"
# The pods' default gateway, answered by the node's proxy ARP. Calico's choice; any link-local
# address works except 169.254.7.127, the kubelet-probe source the redirection rules exempt.
POD_GATEWAY = ipaddress.IPv4Address("169.254.1.1")
POD_INTERFACE = "eth0"
NODE_INTERFACE = "eth0"

# What `ip netns` accepts is any file name; the testbed also wants one people can type after
# `ip netns exec` without quoting, and one that cannot be mistaken for an option.
_NETNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_MAX = 255  # a netns is a file in /var/run/netns
# Pod IPs no routed network can carry, or that the layout itself uses.
_SPECIAL_RANGES = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "not a host address"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address (the kernel drops it on the wire)"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local (the pods' gateway and the probe range)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "a reserved or broadcast address"),
)


@dataclass(frozen=True, slots=True)
class PodNet:
    """One pod's netns and the veth that joins it to its node."""

    name: str
    namespace: str  # the Kubernetes namespace
    uid: str
    node: str
    ip: ipaddress.IPv4Address
    in_mesh: bool
    netns: str  # the pod's name: `ip netns exec <pod> curl ...`
    node_veth: str  # the veth's end in the node netns, ``p<index>``
    pod_veth: str = POD_INTERFACE  # its end in the pod netns


@dataclass(frozen=True, slots=True)
class Route:
    """A route a node netns gets: to a pod IP, either on a local veth or via another node."""

    dest: ipaddress.IPv4Network
    dev: str
    via: ipaddress.IPv4Address | None = None

    def ip_args(self) -> list[str]:
        """The route as ``ip route add`` arguments."""
        via = ["via", str(self.via)] if self.via is not None else []
        return [str(self.dest), *via, "dev", self.dev]


@dataclass(frozen=True, slots=True)
class NodeNet:
    """One node's netns: its underlay address, its pods and the routes to every pod."""

    name: str
    netns: str  # ``node-<name>``
    underlay_ip: ipaddress.IPv4Address  # on the node's eth0, with the underlay's prefix length
    underlay_veth: str  # the veth's end on the underlay bridge, ``n<index>``
    pods: tuple[PodNet, ...]
    routes: tuple[Route, ...]
    interface: str = NODE_INTERFACE


@dataclass(frozen=True, slots=True)
class Topology:
    """The whole testbed: the underlay, the nodes in name order, the pods in name order."""

    nodes: tuple[NodeNet, ...]
    pods: tuple[PodNet, ...]
    underlay: ipaddress.IPv4Network
    underlay_netns: str = UNDERLAY_NETNS
    bridge: str = UNDERLAY_BRIDGE
    pod_gateway: ipaddress.IPv4Address = POD_GATEWAY

    def pod(self, name: str) -> PodNet:
        """The pod named ``name`` (its netns name); KeyError if the testbed has none."""
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def node(self, name: str) -> NodeNet:
        """The node named ``name``; KeyError if the testbed has none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def plan(
    mesh: Mesh, *, underlay: str = DEFAULT_UNDERLAY, underlay_netns: str = UNDERLAY_NETNS
) -> Topology:
    """The testbed for ``mesh``: a netns per node, one per workload that has a node (waypoints
    included), and the addresses and routes that connect them.

    ``underlay_netns`` names the netns of the bridge between the nodes; another name lets a
    second testbed (whose node and pod names differ) run beside the default one.

    Raises :class:`TestbedError` naming the pod and what is expected when the mesh cannot be laid
    out: a pod without a node or an IPv4 pod IP, names that cannot be (unique) netns names, pod
    IPs that collide with each other, the underlay or the special ranges.
    """
    try:
        underlay_net = ipaddress.IPv4Network(underlay)
    except ValueError as e:
        raise TestbedError(f"underlay {underlay!r}: expected an IPv4 CIDR block ({e})") from None

    _check_netns_name(underlay_netns, "the underlay")
    checked = [(w, _pod_ip(w, underlay_net)) for w in mesh.workloads]
    node_names = sorted({w.node for w, _ in checked})
    for node_name in node_names:
        _check_netns_name(f"node-{node_name}", f"node {node_name!r}")
    _check_unique(checked, node_names, underlay_netns)
    hosts = underlay_net.hosts()
    node_ips: dict[str, ipaddress.IPv4Address] = {}
    for node_name in node_names:
        host = next(hosts, None)
        if host is None:
            raise TestbedError(
                f"underlay {underlay_net} has room for {len(node_ips)} nodes, the mesh has "
                f"{len(node_names)}; give a larger underlay"
            )
        node_ips[node_name] = host

    pods = tuple(
        PodNet(
            name=w.name,
            namespace=w.namespace,
            uid=w.uid,
            node=w.node,
            ip=ip,
            in_mesh=w.in_mesh,
            netns=w.name,
            node_veth=f"p{index}",
        )
        for index, (w, ip) in enumerate(sorted(checked, key=lambda c: c[0].name))
    )
    nodes = tuple(
        NodeNet(
            name=node_name,
            netns=f"node-{node_name}",
            underlay_ip=node_ips[node_name],
            underlay_veth=f"n{index}",
            pods=tuple(p for p in pods if p.node == node_name),
            routes=tuple(
                Route(ipaddress.IPv4Network(p.ip), dev=p.node_veth)
                if p.node == node_name
                else Route(ipaddress.IPv4Network(p.ip), dev=NODE_INTERFACE, via=node_ips[p.node])
                for p in pods
            ),
        )
        for index, node_name in enumerate(node_names)
    )
    return Topology(nodes=nodes, pods=pods, underlay=underlay_net, underlay_netns=underlay_netns)


def _pod_ip(w: Workload, underlay: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The one IPv4 address of pod ``w``, checked against the layout's rules."""
    who = f"pod {w.key}"
    if not w.node:
        raise TestbedError(f"{who} has no spec.nodeName; the testbed needs every pod on a node")
    _check_netns_name(w.name, who)
    if any(ip.version == 6 for ip in w.ips):
        v6 = next(ip for ip in w.ips if ip.version == 6)
        raise TestbedError(f"{who} has the IPv6 podIP {v6}; the testbed supports IPv4 pods only")
    if len(w.ips) != 1:
        got = ", ".join(map(str, w.ips)) or "none"
        raise TestbedError(f"{who}: expected exactly one IPv4 status.podIP, got {got}")
    ip = w.ips[0]
    assert isinstance(ip, ipaddress.IPv4Address)  # IPv6 refused above
    if ip in underlay:
        raise TestbedError(
            f"{who} has podIP {ip}, inside the underlay {underlay} between the nodes; "
            "expected a pod IP outside it"
        )
    for network, what in _SPECIAL_RANGES:
        if ip in network:
            raise TestbedError(
                f"{who} has podIP {ip}, {what}; expected a routable unicast IPv4 pod IP"
            )
    return ip


def _check_netns_name(name: str, who: str) -> None:
    if len(name) > _NAME_MAX or not _NETNS_NAME.fullmatch(name):
        raise TestbedError(
            f"{who}: {name!r} is not a valid netns name; expected letters, digits, '.', '_' or "
            f"'-', starting with a letter or digit, at most {_NAME_MAX} characters"
        )


def _check_unique(
    checked: list[tuple[Workload, ipaddress.IPv4Address]],
    node_names: list[str],
    underlay_netns: str,
) -> None:
    reserved = {underlay_netns: "underlay netns"} | {
        f"node-{n}": f"netns of node {n!r}" for n in node_names
    }
    by_name: dict[str, Workload] = {}
    by_ip: dict[ipaddress.IPv4Address, Workload] = {}
    for w, ip in checked:
        other = by_name.setdefault(w.name, w)
        if other is not w:
            raise TestbedError(
                f"pods {other.key} and {w.key} are both named {w.name!r}; the testbed names a "
                "pod's netns after the pod, so pod names must be unique across namespaces"
            )
        if w.name in reserved:
            raise TestbedError(
                f"pod {w.key}: its netns would be named {w.name!r}, like the testbed's "
                f"{reserved[w.name]}; netns names must be unique, so expected another pod name"
            )
        other = by_ip.setdefault(ip, w)
        if other is not w:
            raise TestbedError(
                f"pods {other.key} and {w.key} both have podIP {ip}; expected unique pod IPs"
            )
