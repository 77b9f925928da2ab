"""The testbed's network, built for real (root): pods reach each other across nodes with their
source IPs intact, the host's own network is untouched, and istio-cni's in-pod rules send a pod's
TCP to ztunnel's ports — and stop doing so once removed.

Plain Python sockets, created inside the namespaces, stand in for applications and ztunnel.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.testbed import TestbedError, netns, network, redirect
from ambient.testbed.topology import Route, Topology, plan

pytestmark = pytest.mark.netns

MESH = """
apiVersion: v1
kind: Namespace
metadata:
  name: nt
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: nt-a1, namespace: nt}
spec: {nodeName: nta}
status: {podIP: 10.71.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: nt-x1
  namespace: nt
  labels: {istio.io/dataplane-mode: none}
spec: {nodeName: nta}
status: {podIP: 10.71.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: nt-b1, namespace: nt}
spec: {nodeName: ntb}
status: {podIP: 10.71.2.1}
"""
A1, X1, B1 = "10.71.1.1", "10.71.1.9", "10.71.2.1"
# Not the default ambient-underlay: this module can run while someone's testbed is up.
UNDERLAY = "nt-underlay"
# Every netns the mesh above becomes; none may outlive this module.
NAMES = [UNDERLAY, "node-nta", "node-ntb", "nt-a1", "nt-b1", "nt-x1"]
TIMEOUT = 2.0  # per connect/accept: a broken rule fails fast instead of hanging
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>: the address a connection had before REDIRECT
APP_PORT = 8080


def host_network() -> dict[str, list[str]]:
    """What the host's root netns has: links (by name), addresses, routes, policy rules."""

    def ip(*args: str) -> list[str]:
        out = subprocess.run(
            ["ip", *args], capture_output=True, text=True, check=True, timeout=TIMEOUT
        ).stdout
        return sorted(out.splitlines())

    return {
        "links": [line.split(":")[1].strip() for line in ip("-o", "link")],
        # Name and address only: lifetimes and counters change on their own.
        "addresses": [" ".join(line.split()[1:4]) for line in ip("-o", "addr")],
        "routes": ip("route", "show", "table", "all"),
        "rules": ip("rule"),
    }


@pytest.fixture(scope="module", autouse=True)
def host_before() -> Iterator[dict[str, list[str]]]:
    """The host's network before this module built anything; afterwards, nothing may be left."""
    leftover = [n for n in NAMES if netns.exists(n)]
    assert not leftover, f"netns {leftover} left by an earlier run; `ip netns delete` them"
    before = host_network()
    yield before
    left = [n for n in NAMES if netns.exists(n)]
    assert not left, f"the testbed left netns {left}"
    assert host_network() == before


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(MESH))
    return path


@pytest.fixture
def topology(mesh_file: Path) -> Topology:
    topo = plan(load_mesh([mesh_file]), underlay_netns=UNDERLAY)
    assert network.netns_names(topo) == NAMES
    return topo


@pytest.fixture
def testbed(topology: Topology) -> Iterator[Topology]:
    network.build(topology)
    try:
        yield topology
    finally:
        failed = network.teardown(network.netns_names(topology))
        assert not failed, f"teardown failed: {failed}"


@pytest.fixture
def sockets(testbed: Topology) -> Iterator[ExitStack]:
    """Closes every socket a test opens before the testbed goes (an open socket keeps its netns
    alive, unnamed, after `ip netns delete`)."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def listen(sockets: ExitStack) -> Callable[[str, int], socket.socket]:
    def make(ns: str, port: int) -> socket.socket:
        sock = sockets.enter_context(netns.socket_in(ns))
        sock.bind(("0.0.0.0", port))
        sock.listen(8)
        sock.settimeout(TIMEOUT)
        return sock

    return make


@pytest.fixture
def connect(sockets: ExitStack) -> Callable[[str, str, int], socket.socket]:
    def make(ns: str, ip: str, port: int) -> socket.socket:
        sock = sockets.enter_context(netns.socket_in(ns))
        sock.settimeout(TIMEOUT)
        sock.connect((ip, port))
        return sock

    return make


def accept(listener: socket.socket, stack: ExitStack) -> tuple[socket.socket, tuple[str, int]]:
    conn, peer = listener.accept()  # the listener's timeout bounds the wait
    stack.enter_context(conn)
    conn.settimeout(TIMEOUT)
    return conn, peer


def nothing_pending(listener: socket.socket) -> bool:
    """Whether no connection waits on ``listener`` (a connect that completed elsewhere is already
    decided, so there is nothing to wait for)."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(TIMEOUT)
    conn.close()
    return False


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """Where ``conn`` was going before a REDIRECT rule sent it here (a ``sockaddr_in``)."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (port,) = struct.unpack("!H", raw[2:4])
    return socket.inet_ntoa(raw[4:8]), port


def echo_once(client: socket.socket, server: socket.socket) -> None:
    client.sendall(b"ping")
    assert server.recv(16) == b"ping"
    server.sendall(b"pong")
    assert client.recv(16) == b"pong"


# --- the network ------------------------------------------------------------------------------


def test_cross_node_keeps_the_client_ip(
    testbed: Topology,
    listen: Callable[..., socket.socket],
    connect: Callable[..., socket.socket],
    sockets: ExitStack,
) -> None:
    server = listen("nt-b1", APP_PORT)
    client = connect("nt-x1", B1, APP_PORT)
    conn, peer = accept(server, sockets)
    assert peer[0] == X1  # routed, never NATed: the server sees the pod, not its node
    assert client.getsockname()[0] == X1
    echo_once(client, conn)


def test_same_node_pod_to_pod(
    testbed: Topology,
    listen: Callable[..., socket.socket],
    connect: Callable[..., socket.socket],
    sockets: ExitStack,
) -> None:
    server = listen("nt-a1", APP_PORT)
    client = connect("nt-x1", A1, APP_PORT)
    conn, peer = accept(server, sockets)
    assert peer[0] == X1
    echo_once(client, conn)


def test_host_root_netns_gains_nothing(
    testbed: Topology, host_before: dict[str, list[str]]
) -> None:
    assert host_network() == host_before


def test_layout(testbed: Topology) -> None:
    underlay = netns.run(["ip", "-n", UNDERLAY, "-o", "link", "show", "master", "br0"])
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in underlay.splitlines()) == [
        "n0",
        "n1",
    ]
    assert "10.255.0.2/24" in netns.run(["ip", "-n", "node-ntb", "-o", "addr", "show", "eth0"])
    routes = netns.run(["ip", "-n", "node-nta", "route"])
    assert f"{B1} via 10.255.0.2 dev eth0" in routes
    assert f"{A1} dev p0" in routes
    pod = netns.run(["ip", "-n", "nt-b1", "route"])
    assert "default via 169.254.1.1 dev eth0" in pod
    assert netns.run(["sysctl", "-n", "net.ipv4.conf.p1.proxy_arp"], netns="node-ntb") == "1\n"


def test_build_refuses_to_build_over_an_existing_netns(testbed: Topology) -> None:
    with pytest.raises(TestbedError, match=r"already exist .*run `ambient testbed down`"):
        network.build(testbed)
    assert all(netns.exists(n) for n in NAMES)  # and leaves the running one alone


def test_a_failed_build_leaves_nothing(topology: Topology) -> None:
    node = topology.nodes[1]
    broken = dataclasses.replace(
        topology,
        nodes=(
            topology.nodes[0],
            dataclasses.replace(node, routes=(*node.routes, Route(node.routes[0].dest, "nope0"))),
        ),
    )
    try:
        with pytest.raises(TestbedError, match=r'(?s)Cannot find device "nope0".*dev nope0'):
            network.build(broken)
        assert [n for n in NAMES if netns.exists(n)] == []
    finally:
        network.teardown(NAMES)


def test_in_netns_returns_results_and_raises_errors(testbed: Topology) -> None:
    assert "10.71.2.1/32" in netns.in_netns(
        "nt-b1",
        lambda: (
            subprocess.run(
                ["ip", "-o", "addr"], capture_output=True, text=True, timeout=TIMEOUT, check=True
            ).stdout
        ),
    )

    def fail() -> None:
        raise ZeroDivisionError("inside")

    with pytest.raises(ZeroDivisionError, match="inside"):
        netns.in_netns("nt-b1", fail)
    with pytest.raises(TestbedError, match="netns nt-nothing does not exist"):
        netns.in_netns("nt-nothing", fail)
    # Nodes have no default route: nothing leaves the testbed.
    with pytest.raises(
        TestbedError, match=r"`ip route get 1.2.3.4` in netns node-nta failed .*unreachable"
    ):
        netns.run(["ip", "route", "get", "1.2.3.4"], netns="node-nta")


# --- istio-cni's redirection ------------------------------------------------------------------


def test_outbound_goes_to_15001_with_the_original_destination(
    testbed: Topology,
    listen: Callable[..., socket.socket],
    connect: Callable[..., socket.socket],
    sockets: ExitStack,
) -> None:
    redirect.install("nt-a1")
    app = listen("nt-b1", APP_PORT)
    ztunnel = listen("nt-a1", redirect.OUTBOUND_PORT)

    client = connect("nt-a1", B1, APP_PORT)
    conn, peer = accept(ztunnel, sockets)
    assert peer[0] == A1
    assert original_dst(conn) == (B1, APP_PORT)
    echo_once(client, conn)
    assert nothing_pending(app)


def test_inbound_plaintext_goes_to_15006_and_hbone_to_15008(
    testbed: Topology,
    listen: Callable[..., socket.socket],
    connect: Callable[..., socket.socket],
    sockets: ExitStack,
) -> None:
    redirect.install("nt-b1")
    plaintext = listen("nt-b1", redirect.INBOUND_PLAINTEXT_PORT)
    hbone = listen("nt-b1", redirect.HBONE_PORT)

    connect("nt-x1", B1, APP_PORT)  # nothing listens on 8080: only the redirect can answer
    conn, peer = accept(plaintext, sockets)
    assert peer[0] == X1
    assert original_dst(conn) == (B1, APP_PORT)

    client = connect("nt-x1", B1, redirect.HBONE_PORT)
    conn, peer = accept(hbone, sockets)
    assert peer[0] == X1
    echo_once(client, conn)
    assert nothing_pending(plaintext)


def test_installed_only_where_installed(testbed: Topology) -> None:
    for pod in testbed.pods:
        if pod.in_mesh:
            redirect.install(pod.netns)
    assert {p.name: redirect.installed(p.netns) for p in testbed.pods} == {
        "nt-a1": True,
        "nt-b1": True,
        "nt-x1": False,
    }
    redirect.install("nt-a1")  # again: nothing changes
    assert netns.run(["iptables-save"], netns="nt-a1").count("-j ISTIO_OUTPUT") == 2
    assert "ISTIO" not in netns.run(["iptables-save"], netns="nt-x1")


def test_remove_brings_back_direct_connectivity(
    testbed: Topology,
    listen: Callable[..., socket.socket],
    connect: Callable[..., socket.socket],
    sockets: ExitStack,
) -> None:
    for pod in ("nt-a1", "nt-b1"):
        redirect.install(pod)
        redirect.remove(pod)
        assert not redirect.installed(pod)
        saved = netns.run(["iptables-save"], netns=pod)
        assert "ISTIO" not in saved
        assert "32764" not in netns.run(["ip", "-n", pod, "rule"])
        assert "table 100" not in netns.run(["ip", "-n", pod, "route", "show", "table", "all"])
    redirect.remove("nt-a1")  # removing what is not there is fine

    outbound = listen("nt-a1", redirect.OUTBOUND_PORT)
    inbound = listen("nt-b1", redirect.INBOUND_PLAINTEXT_PORT)
    app = listen("nt-b1", APP_PORT)
    client = connect("nt-a1", B1, APP_PORT)
    conn, peer = accept(app, sockets)
    assert peer[0] == A1
    echo_once(client, conn)
    assert nothing_pending(outbound)
    assert nothing_pending(inbound)
