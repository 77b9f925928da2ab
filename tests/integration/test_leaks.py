"""Nothing leaks: whatever a ztunnel process carried or served comes back once it is over —
connections leave the core's registry, file descriptors and threads return to their baseline,
memory stays near it; a pod that left takes its certificate and its metric series with it.

The bounds are loose on purpose (a few descriptors or threads, 20 MiB of RSS): memory is measured
precisely by the benchmarks; these catch what grows with every connection or every pod. Every
address bound here is in 127.44.0.0/15."""

from __future__ import annotations

import textwrap
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ambient import socks5
from ambient.identity import CertificateAuthority
from ambient.testing import App, exchange, wait_until
from ambient.ztunnel.process import ZtunnelProcess

# Descriptors and threads a process may hold beyond its baseline without it being a leak
# (a keep-alive scrape connection, a worker thread started on demand).
SLACK = 4
RSS_SLACK = 20 * 1024 * 1024


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def scrape(node: ZtunnelProcess) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def settled(node: ZtunnelProcess) -> bool:
    """No connection in the core's registry, no tunnel carrying bytes."""
    samples = {n: v for n, _, v in scrape(node)}
    return (
        samples["ambient_core_live_connections"] == 0
        and samples["ambient_core_active_tunnels"] == 0
    )


def dump(node: ZtunnelProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.admin}/config_dump", timeout=5) as r:
        return orjson.loads(r.read())


# --- connection churn through a ztunnel pair -------------------------------------------------

PAIR = """
apiVersion: v1
kind: Namespace
metadata: {name: churn, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: churn}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 127.44.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: churn
  annotations: {ambient.dev/app-address: 127.45.2.1}
spec:
  nodeName: n2
  serviceAccountName: server
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.44.2.1}
"""
CONNECTIONS = 1000
CLIENT_THREADS = 4


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[ZtunnelProcess]]:
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(PAIR))
    CertificateAuthority.create().save(tmp_path / "ca")
    app = App("echo", ("127.45.2.1", 8080))
    nodes: list[ZtunnelProcess] = []
    try:
        for name in ("n1", "n2"):
            nodes.append(ZtunnelProcess(name, [tmp_path / "mesh.yaml"], tmp_path / "ca", tmp_path))
            nodes[-1].wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        app.close()


def one_connection(i: int) -> bool:
    sock = socks5.connect(("127.44.1.1", 15080), ("127.44.2.1", 8080), source="127.44.1.1")
    payload = b"%d" % i
    return exchange(sock, payload) == payload


def churn(count: int) -> int:
    """``count`` short connections, client pod to server pod, CLIENT_THREADS at a time; returns
    how many carried their bytes."""
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return sum(pool.map(one_connection, range(count)))


def test_a_thousand_short_connections_leave_no_connection_fd_or_memory_behind(pair):
    warm_up = 50  # pools, decision threads, allocator arenas: what a first burst creates once
    assert churn(warm_up) == warm_up
    for node in pair:
        wait_until(lambda node=node: settled(node), what=f"{node.node} to settle after warm-up")
    baseline = {node.node: (fds(node.process.pid), rss(node.process.pid)) for node in pair}

    assert churn(CONNECTIONS) == CONNECTIONS

    for node in pair:
        pid = node.process.pid
        base_fds, base_rss = baseline[node.node]
        wait_until(lambda node=node: settled(node), what=f"{node.node}'s connections to go")
        wait_until(
            lambda pid=pid, base=base_fds: fds(pid) <= base + SLACK,
            what=f"{node.node}'s descriptors to come back to {base_fds} (+{SLACK})",
        )
        assert rss(pid) <= base_rss + RSS_SLACK, (node.node, rss(pid), base_rss)
    # Each side counted every connection, and closed each cleanly.
    opened = [
        v
        for n, labels, v in scrape(pair[0])
        if n == "istio_tcp_connections_opened_total" and labels.get("reporter") == "source"
    ]
    assert opened == [warm_up + CONNECTIONS]


# --- pod churn in loopback mode ----------------------------------------------------------------

SINGLE = """
apiVersion: v1
kind: Namespace
metadata: {name: churn, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: churn
  annotations: {ambient.dev/app-address: 127.45.1.2}
spec:
  nodeName: n1
  serviceAccountName: server
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 127.44.1.2}
"""
VISITOR = """
---
apiVersion: v1
kind: Pod
metadata: {name: visitor, namespace: churn}
spec: {nodeName: n1, serviceAccountName: visitor}
status: {podIP: 127.44.1.3}
"""
VISITOR_ID = "spiffe://cluster.local/ns/churn/sa/visitor"
REWRITES = 20


@pytest.fixture
def single(tmp_path: Path) -> Iterator[tuple[ZtunnelProcess, Path]]:
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(textwrap.dedent(SINGLE))
    CertificateAuthority.create().save(tmp_path / "ca")
    app = App("echo", ("127.45.1.2", 8080))
    node = ZtunnelProcess(
        "n1", [mesh_file], tmp_path / "ca", tmp_path, "--watch-interval", "0.1"
    ).wait_ready()
    try:
        yield node, mesh_file
    finally:
        node.stop()
        app.close()


def visitor_series(node: ZtunnelProcess) -> list[tuple[str, dict[str, str]]]:
    return [
        (n, labels)
        for n, labels, _ in scrape(node)
        if n.startswith("istio_tcp_") and "visitor" in labels.values()
    ]


def identities(node: ZtunnelProcess) -> list[str]:
    return [c["identity"] for c in dump(node)["certificates"]]


def test_pods_coming_and_going_leave_no_certificate_metric_fd_or_thread_behind(single):
    node, mesh_file = single
    pid = node.process.pid

    def rewrite(with_visitor: bool) -> None:
        before = dump(node)["reload"]["reloads"]
        mesh_file.write_text(textwrap.dedent(SINGLE + (VISITOR if with_visitor else "")))
        wait_until(lambda: dump(node)["reload"]["reloads"] > before, what="the rewrite to apply")
        served = "churn/visitor" in dump(node)["servedPods"]
        assert served == with_visitor

    def visit(i: int) -> None:
        """A connection from the visitor to the server, over until both sides logged it."""
        sock = socks5.connect(("127.44.1.3", 15080), ("127.44.1.2", 8080), source="127.44.1.3")
        assert exchange(sock, b"visit %d" % i) == b"visit %d" % i
        for direction in ("outbound", "inbound"):
            assert node.claim_entries(
                lambda e, d=direction: (
                    e.get("direction") == d and e.get("src.workload") == "visitor"
                )
            ), f"no {direction} line for visit {i}"
        wait_until(lambda: settled(node), what="the visit's connections to leave the registry")

    # One cycle first: what a first pod and first connection create once is not a leak.
    rewrite(True)
    visit(0)
    assert VISITOR_ID in identities(node)
    assert visitor_series(node), "the visitor's connection was not counted: nothing to drop"
    rewrite(False)
    baseline = (fds(pid), threads(pid))

    for i in range(REWRITES):
        present = i % 2 == 0
        rewrite(present)
        if present:
            visit(i + 1)

    assert dump(node)["servedPods"] == ["churn/server"]
    assert VISITOR_ID not in identities(node)
    assert visitor_series(node) == []
    wait_until(
        lambda: fds(pid) <= baseline[0] + SLACK,
        what=f"descriptors to come back to {baseline[0]} (+{SLACK})",
    )
    wait_until(
        lambda: threads(pid) <= baseline[1] + SLACK,
        what=f"threads to come back to {baseline[1]} (+{SLACK})",
    )
    assert node.claim_entries(lambda e: "error" in e, timeout=0) == []
