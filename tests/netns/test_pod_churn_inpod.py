"""A pod handed over and taken back by the CNI (ZDS ``del``/``add``) over and over, in-pod mode on
the testbed: afterwards it is served again, the ztunnel holds no more descriptors or threads than
before, none of them holds the pod's namespace once the pod is deleted, and a connection of
another pod of the same node lived through it all.

Its own testbed names (so it can run beside the default testbed): node chn-a holds the churned
pod chn-c1 and the steady client chn-c2; node chn-b holds the server chn-s1.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.testbed import netns
from ambient.testbed.pods import (
    APP_PORT,
    ask,
    connect,
    listening_ports,
    namespaces_held,
    netns_inode,
    serve_app,
)
from ambient.testbed.testbed import Testbed
from ambient.testing import App, wait_until

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: chn-c1, namespace: default, labels: {app: chn-c1}}
spec: {nodeName: chn-a, serviceAccountName: chn-c1}
status: {podIP: 10.141.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: chn-c2, namespace: default, labels: {app: chn-c2}}
spec: {nodeName: chn-a, serviceAccountName: chn-c2}
status: {podIP: 10.141.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: chn-s1, namespace: default, labels: {app: chn-s1}}
spec:
  nodeName: chn-b
  serviceAccountName: chn-s1
  containers: [{name: app, ports: [{containerPort: 8080}]}]
status: {podIP: 10.141.2.1}
"""
S1 = "10.141.2.1"
CYCLES = 100
# Descriptors and threads beyond the baseline that are not a leak (one made on demand).
SLACK = 4
PROXY_PORTS = {15001, 15006, 15008}


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    workdir = tmp_path_factory.mktemp("churn-testbed")
    mesh_file = workdir / "mesh.yaml"
    mesh_file.write_text(MESH)
    with Testbed(
        [mesh_file], workdir, underlay="10.254.41.0/24", underlay_netns="chn-underlay"
    ) as testbed:
        yield testbed
    left = [n for n in ("chn-c1", "chn-s1", "node-chn-a", "chn-underlay") if netns.exists(n)]
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def app(bed: Testbed) -> Iterator[App]:
    server = serve_app("chn-s1", "echo")
    yield server
    server.close()


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def check_flows(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload) and (chunk := sock.recv(len(payload) - len(data))):
        data += chunk
    assert data == payload, "the steady pod's connection no longer carries bytes"


def test_a_pod_deleted_and_added_a_hundred_times_is_served_again_and_leaks_nothing(
    bed: Testbed, app: App
) -> None:
    proxy = bed.proxy("chn-a")
    pid = proxy.process.pid
    pod_netns = netns_inode("chn-c1")
    steady = connect("chn-c2", S1, APP_PORT)
    steady.settimeout(10)
    check_flows(steady, b"before the churn")
    # One cycle first: what the first del/add creates once is not a leak.
    bed.remove_pod("chn-c1")
    bed.add_pod("chn-c1")
    assert ask("chn-c1", S1) == "ping\n"
    baseline_fds, baseline_threads = fds(pid), threads(pid)
    proxy.forget_entries()

    started = time.monotonic()
    for _ in range(CYCLES):
        bed.remove_pod("chn-c1")
        bed.add_pod("chn-c1")
    elapsed = time.monotonic() - started
    print(f"{CYCLES} ZDS del/add cycles in {elapsed:.1f} s")

    # The steady connection was never cut: it still flows, and nothing logged its end.
    check_flows(steady, b"after the churn")
    assert not proxy.claim_entries(lambda e: e.get("src.workload") == "chn-c2", timeout=0.5)
    # The churned pod is served again.
    assert listening_ports("chn-c1") >= PROXY_PORTS
    assert ask("chn-c1", S1) == "ping\n"
    wait_until(
        lambda: fds(pid) <= baseline_fds + SLACK,
        what=f"the ztunnel's descriptors to come back to {baseline_fds} (+{SLACK})",
    )
    wait_until(
        lambda: threads(pid) <= baseline_threads + SLACK,
        what=f"the ztunnel's threads to come back to {baseline_threads} (+{SLACK})",
    )

    # Deleted once more: no thread or descriptor of the ztunnel holds its namespace.
    assert pod_netns in namespaces_held(pid)
    bed.remove_pod("chn-c1")
    try:
        assert not PROXY_PORTS & listening_ports("chn-c1")
        wait_until(
            lambda: pod_netns not in namespaces_held(pid),
            what="the ztunnel to let go of the deleted pod's namespace",
        )
    finally:
        bed.add_pod("chn-c1")
    assert ask("chn-c1", S1) == "ping\n"
    check_flows(steady, b"at the end")
    steady.close()
