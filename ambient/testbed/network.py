"""Build and tear down a :class:`~ambient.testbed.topology.Topology` as network namespaces.

Everything is created inside namespaces the testbed owns: veths are created directly in their
target namespaces (``ip -n <ns> link add ... peer ... netns <other>``), never in the host's root
netns, which gains no device, address, route or rule. Deleting a namespace takes its interfaces
(and their veth peers), addresses, routes and rules with it, so teardown is just that.

Commands are batched per namespace (``ip -n <ns> -batch -``): a process start costs more than the
netlink work it does, and a build of a few nodes and pods stays well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from . import netns
from .errors import TestbedError
from .topology import Topology

# Sysctls every testbed netns gets before its interfaces exist, so that each new interface
# inherits the `default` values.
_COMMON_SYSCTLS: tuple[str, ...] = (
    # Strict or loose reverse-path filtering would drop what proxies send from non-local source
    # addresses (transparent sockets) and asymmetric paths a test may set up; the testbed routes
    # explicitly, so the filter only gets in the way.
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
)
# IPv4 only: no IPv6 neighbour discovery or MLD chatter on the underlay, whose captures tests
# read. (A kernel booted without IPv6 has no such keys, and nothing to silence.)
if Path("/proc/sys/net/ipv6").exists():
    _COMMON_SYSCTLS += ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


def netns_names(topology: Topology) -> list[str]:
    """Every netns ``topology`` uses: the underlay, then the nodes, then the pods."""
    return [
        topology.underlay_netns,
        *(n.netns for n in topology.nodes),
        *(p.netns for p in topology.pods),
    ]


def build(topology: Topology) -> None:
    """Create ``topology``'s namespaces, links, addresses, routes and sysctls.

    Refuses (:class:`TestbedError`) if any of its namespaces already exists, and on a failure
    half-way deletes what it created before raising, so it leaves all or nothing.
    """
    names = netns_names(topology)
    existing = [n for n in names if netns.exists(n)]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise TestbedError(
            f"netns {', '.join(existing)} already {verb} (left by an earlier testbed? "
            "run `ambient testbed down`)"
        )
    try:
        _batch(None, [f"netns add {n}" for n in names])
        _sysctl(topology.underlay_netns, _COMMON_SYSCTLS)
        for node in topology.nodes:
            # A node routes between its pods and the other nodes.
            _sysctl(node.netns, (*_COMMON_SYSCTLS, "net.ipv4.ip_forward=1"))
        for pod in topology.pods:
            _sysctl(pod.netns, _COMMON_SYSCTLS)
        _build_underlay(topology)
        _build_nodes(topology)
        _build_pods(topology)
    except BaseException as e:
        failed = teardown(names)
        if failed and isinstance(e, TestbedError):
            raise TestbedError(f"{e}; cleaning up also failed: {'; '.join(failed)}") from e
        raise


def teardown(names: Iterable[str]) -> list[str]:
    """Delete the namespaces ``names`` (those that exist); return ``"<name>: <why>"`` for each one
    that could not be deleted. The rest are deleted even when one fails."""
    failed: list[str] = []
    for name in names:
        try:
            netns.delete(name)
        except TestbedError as e:
            failed.append(f"{name}: {e}")
    return failed


def _build_underlay(topology: Topology) -> None:
    """The bridge between the nodes: it carries everything that goes node to node, and is where
    a capture sees what is on the wire."""
    lines = [
        "link set lo up",
        # No multicast snooping: it has the bridge announce itself (IGMP reports for the
        # router-discovery group), the only traffic on the link nobody asked for.
        f"link add {topology.bridge} type bridge mcast_snooping 0",
        f"link set {topology.bridge} up",
    ]
    for node in topology.nodes:
        lines += [
            f"link add {node.underlay_veth} type veth peer name {node.interface} "
            f"netns {node.netns}",
            f"link set {node.underlay_veth} master {topology.bridge}",
            f"link set {node.underlay_veth} up",
        ]
    _batch(topology.underlay_netns, lines)


def _build_nodes(topology: Topology) -> None:
    for node in topology.nodes:
        lines = [
            "link set lo up",
            f"addr add {node.underlay_ip}/{topology.underlay.prefixlen} dev {node.interface}",
            f"link set {node.interface} up",
            # Proxy ARP answers for an address only if the node routes it out of *another*
            # interface; with no default route, this one is what makes the node answer the
            # pods' ARP for their gateway. Nothing is ever sent to it.
            f"route add {topology.pod_gateway}/32 dev lo",
        ]
        for pod in node.pods:
            lines += [
                f"link add {pod.node_veth} type veth peer name {pod.pod_veth} netns {pod.netns}",
                f"link set {pod.node_veth} up",
            ]
        lines += [f"route add {' '.join(route.ip_args())}" for route in node.routes]
        _batch(node.netns, lines)
        # The node's end of each pod's veth answers the pod's ARP for its gateway — at once:
        # by default proxy ARP delays its answer to a broadcast request by up to 0.8 s at random
        # (proxy_delay), which a pod's first connection would wait out.
        _sysctl(
            node.netns,
            [
                setting
                for p in node.pods
                for setting in (
                    f"net.ipv4.conf.{p.node_veth}.proxy_arp=1",
                    f"net.ipv4.neigh.{p.node_veth}.proxy_delay=0",
                )
            ],
        )


def _build_pods(topology: Topology) -> None:
    gateway = topology.pod_gateway
    for pod in topology.pods:
        _batch(
            pod.netns,
            [
                "link set lo up",
                f"addr add {pod.ip}/32 dev {pod.pod_veth}",
                f"link set {pod.pod_veth} up",
                f"route add {gateway} dev {pod.pod_veth} scope link",
                f"route add default via {gateway} dev {pod.pod_veth}",
            ],
        )
        _sysctl(pod.netns, [f"net.ipv4.conf.{pod.pod_veth}.rp_filter=0"])


def _batch(ns: str | None, lines: list[str]) -> None:
    """Run ``ip`` commands ``lines`` in one process, inside netns ``ns`` (``ip -n``) if given."""
    where = ["-n", ns] if ns is not None else []
    try:
        netns.run(["ip", *where, "-batch", "-"], input="\n".join(lines) + "\n")
    except TestbedError as e:
        # ip names the failing line by number ("Command failed -:3"); say which command it was.
        found = re.search(r"Command failed -:(\d+)", str(e))
        if found and 0 < int(found[1]) <= len(lines):
            raise TestbedError(f"{e} [the command: ip {lines[int(found[1]) - 1]}]") from e
        raise


def _sysctl(ns: str, settings: Iterable[str]) -> None:
    settings = list(settings)
    if settings:
        netns.run(["sysctl", "-q", "-w", *settings], netns=ns)
