"""The seed's data path on network namespaces, transparent: in-mesh pods' traffic is captured by
istio-cni's rules into their node's ztunnel, which carries it from the source pod's namespace to the
destination pod's, through HBONE. Programs inside the pods are plain sockets.

Topology (ambient/examples/testbed-mesh.yaml): W1 holds C1, C2, S2 and `outside` (not in the mesh);
W2 holds C3, S1 and `legacy` (not in the mesh). Service `echo` (10.96.0.10:80) has S1 and S2.
Each test names the seed sentence or the Istio ztunnel scenario (tests/namespaced.rs) it checks.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ambient import examples
from ambient.hbone import DataPlane, HboneTarget, Netns
from ambient.identity import CertificateAuthority
from ambient.testbed import netns, redirect
from ambient.testbed.pods import (
    APP_PORT,
    ask,
    inbound_entries,
    metrics,
    outbound_entries,
    refused,
    serve_app,
)
from ambient.testbed.testbed import Testbed, running
from ambient.testing import App, wait_until
from ambient.zds import ZdsError

C1, C2, C3, S1, S2 = "10.40.1.1", "10.40.1.2", "10.40.2.3", "10.40.2.1", "10.40.1.5"
OUTSIDE, LEGACY = "10.40.1.9", "10.40.2.9"
ECHO_VIP = "10.96.0.10"


def spiffe(account: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{account}"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    workdir = tmp_path_factory.mktemp("testbed")
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(examples.read("testbed-mesh.yaml"))
    with running([mesh_file], workdir) as testbed:
        yield testbed
    for name in ("c1", "s1", "node-w1", "ambient-underlay"):
        assert not netns.exists(name), f"netns {name} left behind"


@pytest.fixture(scope="module")
def apps(bed: Testbed) -> Iterator[dict[str, App]]:
    """Servers that answer with their pod's name, then echo."""
    servers = {pod: serve_app(pod, f"name:{pod}") for pod in ("s1", "s2", "legacy")}
    yield servers
    for app in servers.values():
        app.close()


@pytest.fixture(autouse=True)
def fresh_logs(bed: Testbed) -> None:
    """Each test reads only the access-log lines of its own connections."""
    for node in bed.nodes:
        bed.proxy(node).forget_entries()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def wait_for_loop_refusal(bed: Testbed, pod: str, what: str) -> None:
    """Wait until a ztunnel logged refusing a connection of ``pod`` as aimed at its own ports
    (the side that refuses depends on the case; the line is written when the connection ends)."""
    node = bed.workload(pod).node
    reasons: list[str] = []

    def logged() -> bool:
        found = (
            inbound_entries(bed.proxy("w2"), "s1", timeout=0.1)
            + outbound_entries(bed.proxy(node), pod, timeout=0.1)
            + inbound_entries(bed.proxy(node), pod, timeout=0.1)
        )
        reasons.extend(e.get("error", "") for e in found)
        return any("proxy's own" in r for r in reasons)

    wait_until(logged, timeout=10, what=f"{what} refused as a loop")


def peer_ips(app: App) -> list[str]:
    return [peer[0] for peer in app.peers]


def test_c1_and_c2_reach_s1_across_nodes_through_hbone(bed: Testbed, apps: dict[str, App]) -> None:
    """Seed: "pods C1 and C2, running on node W1, connect with pod S1 running on node W2" and
    "The TCP traffic for C1 and C2 is securely tunneled via ztunnel-created HBONE connections"
    (Istio: cross_node_captured)."""
    for client, ip, account in (("c1", C1, "c1"), ("c2", C2, "c2")):
        assert ask(client, S1) == "s1\nping\n"
        # The app sees the client pod's own IP: ztunnel connected to it transparently.
        assert peer_ips(apps["s1"])[-1] == ip
        (out,) = outbound_entries(bed.proxy("w1"), client)
        assert out["transport"] == "HBONE", out
        assert out["dst.addr"] == f"{S1}:15008", out
        assert out["dst.hbone_addr"] == f"{S1}:{APP_PORT}", out
        (inbound,) = inbound_entries(bed.proxy("w2"), "s1", source=ip)
        assert inbound["transport"] == "HBONE"
        assert inbound["src.identity"] == spiffe(account)


def test_c3_to_s1_on_the_same_node_still_goes_through_ztunnel(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """Seed: "local traffic - shown in the figure from pod C3 to destination pod S1 on worker node
    W2 - also traverses the local ztunnel proxy instance" (Istio: local_captured_inpod)."""
    assert ask("c3", S1) == "s1\nping\n"
    assert peer_ips(apps["s1"])[-1] == C3
    (out,) = outbound_entries(bed.proxy("w2"), "c3")
    assert out["transport"] == "HBONE"
    (inbound,) = inbound_entries(bed.proxy("w2"), "s1", source=C3)
    assert inbound["src.identity"] == spiffe("c3")
    # The L4 telemetry is the same as across nodes: both reporters counted it over mTLS.
    text = metrics(bed, "w2")
    assert 'source_workload="c3"' in text
    assert 'connection_security_policy="mutual_tls"' in text


def test_a_service_request_lands_on_one_of_its_endpoints(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """Seed: "requests to a Service will be sent to an endpoint within the Service"
    (Istio: service_loadbalancing — both endpoints, on two nodes, get traffic)."""
    answers = {ask("c1", ECHO_VIP, 80).split("\n")[0] for _ in range(30)}
    assert answers == {"s1", "s2"}


def test_a_request_to_a_pod_ip_goes_to_that_pod(bed: Testbed, apps: dict[str, App]) -> None:
    """Seed: "requests directly to a Pod IP will go directly to that IP"."""
    assert {ask("c3", S2).split("\n")[0] for _ in range(10)} == {"s2"}
    assert peer_ips(apps["s2"])[-1] == C3


def test_out_of_mesh_client_arrives_as_plaintext_with_no_identity(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """Seed: "A pod can receive HBONE traffic or plaintext traffic" and "Requests from sources out
    of mesh will have no peer identity" (Istio: client_uncaptured)."""
    assert ask("outside", S1) == "s1\nping\n"
    assert peer_ips(apps["s1"])[-1] == OUTSIDE
    (inbound,) = inbound_entries(bed.proxy("w2"), "s1", source=OUTSIDE)
    assert inbound["transport"] == "TCP"
    assert inbound.get("src.identity") is None
    assert not outbound_entries(bed.proxy("w1"), "outside", timeout=0.5)


def test_in_mesh_client_reaches_out_of_mesh_server_as_plain_tcp(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """Seed: the destination is upgraded to HBONE only "If the destination is also added in the
    mesh"; otherwise the connection leaves as plain TCP (Istio: server_uncaptured)."""
    assert not redirect.installed("legacy")
    assert ask("c1", LEGACY) == "legacy\nping\n"
    assert peer_ips(apps["legacy"])[-1] == C1  # from the pod's own IP: outbound never spoofs
    (out,) = outbound_entries(bed.proxy("w1"), "c1")
    assert out["transport"] == "TCP"


def test_illegal_ports_are_refused_and_nothing_loops(bed: Testbed, apps: dict[str, App]) -> None:
    """Istio: malicious_calls_inpod — connections aimed at ztunnel's own ports are refused."""
    cases = [
        ("c1", "127.0.0.1", 15001),  # the outbound listener, dialed directly: a loop
        ("c1", "127.0.0.1", 15006),  # the plaintext inbound listener, dialed directly
        ("outside", S1, 15006),  # redirected to 15006 with 15006 as its destination
        ("outside", S1, 15001),
        ("c1", S1, 15006),  # captured, then an HBONE CONNECT to S1's own 15006
        ("c3", S1, 15001),
    ]
    for pod, ip, port in cases:
        assert refused(pod, ip, port) == "", f"{pod} -> {ip}:{port} was carried"
        # ...by ztunnel, saying why: not by accident (the last hop refuses, the first logs it).
        wait_for_loop_refusal(bed, pod, f"{pod} -> {ip}:{port}")
    assert ask("c1", S1) == "s1\nping\n"  # the proxies still serve everyone else


def test_pod_deleted_while_connected_has_its_connections_closed(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """A pod the CNI deletes (ZDS `del`) loses its connections, listeners and namespace in
    ztunnel; added again, it is served again."""
    from ambient.testbed.pods import connect, listening_ports, namespaces_held, netns_inode

    ztunnel_pid = bed.proxy("w1").process.pid
    c2_netns = netns_inode("c2")
    assert {15001, 15006, 15008} <= listening_ports("c2")
    assert c2_netns in namespaces_held(ztunnel_pid)
    sock = connect("c2", S1, APP_PORT)
    try:
        sock.sendall(b"hold\n")
        assert read_exactly(sock, len(b"s1\nhold\n")) == b"s1\nhold\n"  # carried, and open
        bed.remove_pod("c2")
        with contextlib.suppress(ConnectionResetError):  # reset: closed, as it must be
            assert sock.recv(100) == b"", "the connection outlived its pod"
    finally:
        sock.close()
        try:
            assert not {15001, 15006, 15008} & listening_ports("c2")
            assert c2_netns not in namespaces_held(ztunnel_pid)
        finally:
            bed.add_pod("c2")
    assert ask("c2", S1) == "s1\nping\n"


def test_traffic_between_nodes_is_encrypted(
    bed: Testbed, apps: dict[str, App], tmp_path: Path
) -> None:
    """Seed: "Mutual TLS (mTLS) is used for encryption": on the link between the nodes, the
    payload of C1 -> S1 never appears, and 15008 is the only destination port. The same capture
    shows the payload of a plaintext flow between out-of-mesh pods, so it can see payloads."""
    from ambient.testbed.pods import capture, packets

    secret = b"the-payload-that-must-not-leak-" * 64
    plain = b"visible-plaintext-out-of-mesh-" * 64
    pcap = tmp_path / "between-nodes.pcap"
    tcpdump = capture(bed, pcap)
    try:
        assert ask("c1", S1, payload=secret).endswith(secret.decode())
        assert ask("c2", S1, payload=secret).endswith(secret.decode())
        assert ask("outside", LEGACY, payload=plain).endswith(plain.decode())
        # tcpdump reads the kernel's capture ring on its own schedule: stopped at once, it can
        # lose the last packets (the plaintext, seen missing once in a few dozen runs). The
        # plaintext flow went last, so once it is in the file the mesh flows are too.
        wait_until(
            lambda: plain[:60] in pcap.read_bytes(),
            timeout=5,
            what="the capture to show the plaintext payload (does it capture anything?)",
        )
    finally:
        tcpdump.terminate()
        tcpdump.wait(10)
    raw = pcap.read_bytes()
    assert plain[:60] in raw, "the capture saw no plaintext payload: it captures nothing"
    assert secret[:31] not in raw
    mesh_packets = packets(pcap, f"host {C1} or host {C2}")
    assert mesh_packets
    assert not packets(pcap, f"(host {C1} or host {C2}) and not port 15008")
    assert packets(pcap, f"src host {C1} and dst host {S1} and dst port 15008")


@pytest.fixture
def attacker(bed: Testbed) -> Iterator[Callable[[str, str], str]]:
    """An HBONE client in the `outside` pod (not captured), holding a certificate from the
    mesh's CA: ``attack(identity, authority)`` sends a CONNECT to S1's 15008 and returns what
    came back through the tunnel ('' when refused)."""
    dataplane = DataPlane(1)
    ca = CertificateAuthority.load(bed.workdir / "ca")
    fd = os.open(netns.NETNS_DIR / "outside", os.O_RDONLY)
    try:
        outside = Netns(fd, "outside")
    finally:
        os.close(fd)

    def attack(identity: str, authority: str) -> str:
        dataplane.load_identity(ca.issue(identity))
        plan = HboneTarget(f"{S1}:15008", authority, [spiffe("echo")], identity)
        entry = dataplane.forward("127.0.0.1:0", plan, netns=outside)
        try:
            port = int(entry.local_address.rpartition(":")[2])
            return refused("outside", "127.0.0.1", port)
        finally:
            entry.close()

    yield attack
    dataplane.close()


def test_hbone_to_one_pod_naming_another_is_refused(
    bed: Testbed, apps: dict[str, App], attacker: Callable[[str, str], str]
) -> None:
    """Istio: hbone_ip_mismatch — a CONNECT reaching S1's 15008 must name S1, not a neighbour."""
    assert attacker(spiffe("c1"), f"{S1}:{APP_PORT}") == "s1\nping\n"  # the control: carried
    (carried,) = inbound_entries(bed.proxy("w2"), "s1", source=OUTSIDE)
    assert "error" not in carried, carried
    assert attacker(spiffe("c1"), f"{C3}:{APP_PORT}") == ""
    (refusal,) = inbound_entries(bed.proxy("w2"), "s1", source=OUTSIDE)
    assert f"authority {C3}:{APP_PORT} is not this pod" in refusal["error"], refusal


def test_a_peer_from_another_trust_domain_is_rejected(
    bed: Testbed, apps: dict[str, App], attacker: Callable[[str, str], str]
) -> None:
    """Istio: trust_domain_mismatch_rejected — a client certificate of another trust domain (even
    one signed by the same root) fails the handshake; the app never sees the connection, and the
    refusal is logged with the reason (as Istio logs its early denials)."""
    before = len(apps["s1"].peers)
    assert attacker("spiffe://evil.example/ns/default/sa/c1", f"{S1}:{APP_PORT}") == ""
    assert len(apps["s1"].peers) == before
    (refusal,) = inbound_entries(bed.proxy("w2"), "s1", source=OUTSIDE)
    assert refusal["transport"] == "HBONE" and "bytes_sent" not in refusal, refusal
    assert 'no SPIFFE identity in trust domain "cluster.local"' in refusal["error"], refusal
    assert ask("c1", S1) == "s1\nping\n"  # and everyone else is still served


def test_the_cni_handing_over_an_unknown_pod_gets_a_clear_refusal(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """ZDS: an `add` for a pod the mesh config does not place on this node is acked with an error
    naming it; the ztunnel goes on serving its other pods."""
    zds = bed.nodes["w1"].zds
    with pytest.raises(ZdsError, match=r"default/ghost \(uid ghost-uid\) is not a pod of node w1"):
        zds.add_pod("ghost-uid", "ghost", "default", "ghost", str(netns.NETNS_DIR / "outside"))
    with pytest.raises(
        ZdsError, match="pod default/s1 runs on node w2 in the mesh config, not on w1"
    ):
        # A pod of the other node, handed to the wrong ztunnel.
        zds.add_pod(
            "Kubernetes//Pod/default/s1", "s1", "default", "echo", str(netns.NETNS_DIR / "s1")
        )
    for uid in ("ghost-uid", "Kubernetes//Pod/default/s1"):  # the CNI forgets them again
        with pytest.raises(ZdsError, match="unknown pod"):
            zds.del_pod(uid)
    assert ask("c1", S1) == "s1\nping\n"


def test_a_port_nobody_listens_on_is_reported_by_the_server_side_ztunnel(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """An unreachable upstream: the client's connection is closed without an answer, and S1's
    ztunnel logs which address refused; everyone else is still served."""
    assert refused("c1", S1, 9999) == ""
    (entry,) = inbound_entries(bed.proxy("w2"), "s1", destination=f"{S1}:9999")
    assert f"{S1}:9999" in entry["error"] and "refused" in entry["error"].lower(), entry
    assert ask("c1", S1) == "s1\nping\n"


def test_the_node_proxies_stop_and_start_again_with_the_pods_left_in_place(
    bed: Testbed, apps: dict[str, App]
) -> None:
    """What compare_istio does to run another ztunnel on the same pods: with the proxies stopped
    the pods and their capture stay (a captured connection finds nobody and fails, it never
    bypasses the mesh); started again, the new proxies are handed the pods by each node's CNI
    socket and carry them through HBONE as before."""
    old = {node: bed.proxy(node).process.pid for node in bed.nodes}
    bed.stop_proxies()
    try:
        assert all(proxy.process is None for proxy in bed.nodes.values())
        assert refused("c1", S1, APP_PORT) == ""
        assert netns.exists("c1") and netns.exists("s1")
    finally:
        bed.start_proxies()
    assert all(bed.proxy(node).process.pid != old[node] for node in bed.nodes)
    assert ask("c1", S1) == "s1\nping\n"
    (out,) = outbound_entries(bed.proxy("w1"), "c1")
    assert out["transport"] == "HBONE", out
    (inbound,) = inbound_entries(bed.proxy("w2"), "s1", source=C1)
    assert inbound["src.identity"] == spiffe("c1")
